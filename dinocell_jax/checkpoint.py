"""Orbax checkpoints of a run: train state, data-iterator state and metadata.

One `CheckpointManager` under `<workdir>/checkpoints`, asynchronous, keeping
the last `checkpoint.keep` steps plus every `checkpoint.keep_every`-th. Each
step is a Composite of three items: `state` (the TrainState arrays), `data`
(the input iterator's JSON state, so a resumed run reads the same fields in
the same order) and `meta` (resolved config, wandb run id, package versions).

Trust, in the order things go wrong on a preemptible cluster:
- Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when
  every item is committed, so a save killed half-way is never listed: the
  previous step is restored, and `remove_unfinished` deletes the debris.
- Restores go into an abstract tree carrying the current shardings, so a
  checkpoint written on 8 devices restores on 4; the saved shapes are checked
  first, and a checkpoint of another model (width, patch size) fails with the
  list of parameters whose shapes differ.
- Artifact upload (`publish_artifacts`) starts only once Orbax has finalised a
  step: a background thread waits for the final directory, hard-links it into a
  snapshot (free on disk, and immune to `max_to_keep` deleting the original while
  wandb copies it) and hands the snapshot to the logger's writer thread. The next
  save snapshots the previous step first, before Orbax's retention may delete it.

`load_pretrained` starts a run from a DINOv2/DINOv3 PyTorch state dict
(`model.init_from`): student and teacher backbones, patch embedding resampled.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"  # <workdir>/checkpoints
UPLOAD_SUBDIR = "checkpoint_uploads"  # <workdir>/checkpoint_uploads/<step>: hard-linked snapshots
_TMP_MARK = ".orbax-checkpoint-tmp"
_FINAL_MARK = "_CHECKPOINT_METADATA"  # written inside the tmp dir before the rename
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "wandb", "dinocell-jax")


class CheckpointShapeError(ValueError):
    """A checkpoint whose arrays do not fit the configured model; the message lists the paths."""


class CheckpointNotFoundError(FileNotFoundError):
    """No finalised checkpoint where one was asked for; the message names the path."""


# ----------------------------------------------------------------------------
# Paths, metadata and compatibility.
# ----------------------------------------------------------------------------

def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_str(path) -> str:
    """`student/backbone/blocks/0/attn/qkv/kernel`: the same string for a dataclass field
    (GetAttrKey) and the dict key Orbax's metadata tree uses for it."""
    return "/".join(_key_name(k) for k in path)


def _stored_shape(leaf) -> tuple[int, ...]:
    """The shape Orbax stores: a typed PRNG key is saved as its raw key data ([..., 2] uint32)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape)


def shape_mismatches(saved_meta, abstract_state) -> list[str]:
    """Human-readable differences between a saved metadata tree and an abstract state.

    Each entry names the `/`-joined path and both shapes; arrays present on only
    one side are listed too. Empty when the checkpoint fits.
    """
    saved = {_path_str(p): tuple(getattr(leaf, "shape", ()) or ())
             for p, leaf in jax.tree_util.tree_flatten_with_path(saved_meta)[0]}
    wanted = {_path_str(p): _stored_shape(leaf)
              for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    diffs = []
    for key, want in wanted.items():
        if key not in saved:
            diffs.append(f"{key}: missing in the checkpoint (config expects {want})")
        elif saved[key] != want:
            diffs.append(f"{key}: checkpoint {saved[key]} vs config {want}")
    diffs += [f"{key}: in the checkpoint {saved[key]} but not in this config"
              for key in saved if key not in wanted]
    return diffs


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a checkpoint depends on, and Python's."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def run_metadata(config, wandb_run_id: str | None) -> dict[str, Any]:
    """The `meta` item of a checkpoint: JSON-able, enough to know what wrote it."""
    return {
        "config": config.to_dict(),
        "wandb_run_id": wandb_run_id,
        "versions": package_versions(),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved_config: Mapping, config, ignore: Sequence[str] = ("workdir", "checkpoint.", "wandb.")
                   ) -> list[str]:
    """`key: saved -> now` for every config value that differs from the checkpoint's.

    Keys starting with an `ignore` prefix (paths, resume and logging settings) are
    skipped: they legitimately change between a run and its resumption.
    """
    # Through JSON, as the checkpoint's copy went: tuples compare equal to lists.
    saved = _flatten(json.loads(json.dumps(saved_config)))
    now = _flatten(json.loads(json.dumps(config.to_dict())))
    changes = []
    for key in sorted(set(saved) | set(now)):
        if any(key == p or key.startswith(p) for p in ignore):
            continue
        if saved.get(key, "<absent>") != now.get(key, "<absent>"):
            changes.append(f"{key}: {saved.get(key, '<absent>')!r} -> {now.get(key, '<absent>')!r}")
    return changes


def _is_finalized(step_dir: str) -> bool:
    return (os.path.isdir(step_dir) and _TMP_MARK not in os.path.basename(step_dir)
            and os.path.exists(os.path.join(step_dir, _FINAL_MARK)))


def _steps_in(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and _is_finalized(os.path.join(directory, name)))


def resolve_checkpoint_path(path: str) -> tuple[str, int | None]:
    """(checkpoint root, step or None = latest) of a path a user may give.

    Accepts a workdir (holding `checkpoints/`), a checkpoint root (holding step
    directories) or one step directory (`.../checkpoints/10000`).
    Raises CheckpointNotFoundError naming the path when none of these holds a
    finalised checkpoint.
    """
    path = os.path.abspath(os.path.expanduser(path))
    base = os.path.basename(path.rstrip(os.sep))
    if base.isdigit() and _is_finalized(path):
        return os.path.dirname(path), int(base)
    for root in (os.path.join(path, CHECKPOINT_SUBDIR), path):
        if _steps_in(root):
            return root, None
    if _TMP_MARK in base:
        raise CheckpointNotFoundError(f"{path}: an unfinished Orbax save (killed while writing); "
                                      "give the checkpoint directory to use the last finished step")
    raise CheckpointNotFoundError(
        f"{path}: no finished checkpoint (looked for a step directory, step directories in it, "
        f"and {os.path.join(path, CHECKPOINT_SUBDIR)})")


# ----------------------------------------------------------------------------
# Artifact publishing: finalised steps -> hard-linked snapshot -> logger.
# ----------------------------------------------------------------------------

def snapshot_dir(src: str, dst: str) -> str:
    """A hard-linked copy of directory `src` at `dst` (plain copies where links fail).

    Built under `<dst>.partial` and renamed, so `dst` only ever holds a whole
    snapshot. Hard links share the data blocks: free while the original exists,
    and they keep the files alive after Orbax deletes the original.
    """
    partial = dst + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    for root, _, files in os.walk(src):
        target = os.path.join(partial, os.path.relpath(root, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            try:
                os.link(os.path.join(root, name), os.path.join(target, name))
            except OSError:  # another filesystem, or one without hard links
                shutil.copy2(os.path.join(root, name), os.path.join(target, name))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(partial, dst)
    return dst


class _ArtifactPublisher:
    """Hands each finalised step to the logger as a hard-linked snapshot.

    A background thread polls for steps that Orbax has finalised; `Checkpointer.save`
    also calls `publish_finalized` right before the next save, whose retention
    pass may delete older steps, so no step is deleted before its snapshot exists.
    The logger uploads on its own writer thread, in submission order; a snapshot is
    deleted once `artifacts_log` (the JSONL tracker's record of handed-over
    artifacts) names a later snapshot, which proves the writer is done with it, and
    in `discard_snapshots` after the logger has finished.
    """

    def __init__(self, checkpoint_dir: str, staging_dir: str, logger, final_step: int,
                 artifacts_log: str | None, poll_s: float = 0.5):
        self.checkpoint_dir, self.staging_dir = checkpoint_dir, staging_dir
        self.logger, self.final_step = logger, int(final_step)
        self.artifacts_log, self.poll_s = artifacts_log, poll_s
        self._pending: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        os.makedirs(staging_dir, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="dinocell-ckpt-publisher", daemon=True)
        self._thread.start()

    def add(self, step: int) -> None:
        with self._lock:
            self._pending.append(int(step))

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.publish_finalized()

    def publish_finalized(self, saves_done: bool = False) -> None:
        """Snapshots and hands over every pending step Orbax has finalised.

        A pending step that is not finalised while a later one is (Orbax saves one
        step at a time), or when no save is in flight any more (`saves_done`), failed
        to save: it is dropped with a warning.
        """
        with self._lock:
            finished = _steps_in(self.checkpoint_dir)
            for step in list(self._pending):
                if step in finished:
                    self._pending.remove(step)
                    try:
                        self._hand_over(step)
                    except Exception as e:  # noqa: BLE001 - an upload problem never stops training
                        log.warning("checkpoint artifact of step %d not uploaded: %r", step, e)
                elif saves_done or any(s > step for s in finished):
                    self._pending.remove(step)
                    log.warning("checkpoint step %d was never finalised; no artifact for it", step)

    def _hand_over(self, step: int) -> None:
        snap = snapshot_dir(os.path.join(self.checkpoint_dir, str(step)), os.path.join(self.staging_dir, str(step)))
        self.logger.log_model_checkpoint(snap, step, ["final"] if step == self.final_step else [])
        self._discard_handed_over()

    def _handed_over(self) -> list[int]:
        """Steps whose snapshot the logger's writer has started on (its JSONL record names the path)."""
        if not self.artifacts_log or not os.path.exists(self.artifacts_log):
            return []
        steps = []
        with open(self.artifacts_log) as f:
            for line in f:
                try:
                    path = os.path.abspath(json.loads(line)["path"])
                except (ValueError, KeyError, TypeError):
                    continue
                if os.path.dirname(path) == os.path.abspath(self.staging_dir) and os.path.basename(path).isdigit():
                    steps.append(int(os.path.basename(path)))
        return steps

    def _discard_handed_over(self) -> None:
        handed = self._handed_over()
        if not handed:
            return
        for name in os.listdir(self.staging_dir):
            # The writer handles jobs in order: the job of a later snapshot has
            # started, so the copy of this one into wandb's staging area is over.
            if name.isdigit() and int(name) < max(handed):
                shutil.rmtree(os.path.join(self.staging_dir, name), ignore_errors=True)

    def close(self) -> None:
        """Call when no save is in flight: hands over what is left and stops the thread."""
        self._stop.set()
        self._thread.join()
        self.publish_finalized(saves_done=True)


def discard_snapshots(staging_dir: str) -> None:
    """Removes every artifact snapshot (after the logger finished, or leftovers of a killed run)."""
    if os.path.isdir(staging_dir):
        shutil.rmtree(staging_dir, ignore_errors=True)


# ----------------------------------------------------------------------------
# The checkpointer.
# ----------------------------------------------------------------------------

class Checkpointer:
    """The run's Orbax CheckpointManager (Composite of state, data, meta), asynchronous.

    directory: the checkpoint root (`<workdir>/checkpoints`), created unless read_only.
    config: reads `checkpoint.keep` (last N kept; <= 0 keeps all) and
    `checkpoint.keep_every` (also keep every K-th step; 0 = off).
    """

    def __init__(self, directory: str, config, *, read_only: bool = False):
        self.directory = os.path.abspath(directory)  # Orbax wants absolute paths
        keep = int(config.checkpoint.keep)
        keep_every = int(config.checkpoint.keep_every)
        policies = [ocp.checkpoint_managers.LatestN(n=keep if keep > 0 else None)]
        if keep_every > 0:
            policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=True,
        )
        # Handlers named up front: a fresh manager can then read item metadata
        # (the shape check) before anything was restored.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._publisher: _ArtifactPublisher | None = None
        self._staging_dir: str | None = None

    # ---- reading
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def check_fits(self, abstract_state, step: int) -> None:
        """Raises CheckpointShapeError listing the arrays of `step` whose shapes differ from abstract_state."""
        saved = self.manager.item_metadata(step)
        state_meta = saved.get("state") if saved is not None else None
        if state_meta is None:
            raise CheckpointNotFoundError(f"{self.directory}/{step}: has no 'state' item")
        # The student's parameters first: the teacher and optimiser moments repeat them.
        diffs = sorted(shape_mismatches(state_meta, abstract_state), key=lambda d: not d.startswith("student/"))
        if diffs:
            more = f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else ""
            raise CheckpointShapeError(
                f"checkpoint {self.directory}/{step} does not fit this config "
                f"({len(diffs)} arrays differ; other model width, depth, patch size, heads or "
                "channel strategy?):\n  " + "\n  ".join(diffs[:20]) + more)

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of `step` (default: the latest finished one).

        abstract_state: the TrainState tree of jax.ShapeDtypeStruct carrying the
        current shardings; the arrays come back laid out that way whatever
        device count wrote them. Raises CheckpointNotFoundError or
        CheckpointShapeError naming the directory, step and arrays.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise CheckpointNotFoundError(f"no finished checkpoint in {self.directory}")
        if step not in self.manager.all_steps():
            raise CheckpointNotFoundError(
                f"{self.directory}: no finished checkpoint of step {step} (steps: {self.all_steps()})")
        self.check_fits(abstract_state, step)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"], restored["meta"]

    # ---- writing
    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        """Starts an asynchronous save of `step`; False when nothing was saved.

        A step already saved (a stop request right after a periodic save) is not
        written twice. With `publish_artifacts` on, the step is uploaded once
        finalised.
        """
        step = int(step)
        if step in self.manager.all_steps():
            return False
        if self._publisher is not None:
            # Orbax's save waits for the previous one anyway; snapshot it first, since
            # this save's retention pass may delete it.
            self.manager.wait_until_finished()
            self._publisher.publish_finalized()
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )
        if saved and self._publisher is not None:
            self._publisher.add(step)
        return bool(saved)

    def remove_unfinished(self) -> list[str]:
        """Deletes `*.orbax-checkpoint-tmp*` debris of saves killed half-way; returns the paths.

        Only the process that owns the run may call it: a reader (export, evaluate)
        could otherwise delete the save a live trainer is writing.
        """
        removed = []
        if os.path.isdir(self.directory):
            for name in sorted(os.listdir(self.directory)):
                if _TMP_MARK in name:
                    path = os.path.join(self.directory, name)
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        for path in removed:
            log.warning("removed an unfinished checkpoint (save interrupted): %s", path)
        return removed

    def publish_artifacts(self, logger, *, final_step: int, staging_dir: str,
                          artifacts_log: str | None = None) -> None:
        """Uploads every later save as a wandb `model` artifact through `logger`.

        logger: has `log_model_checkpoint(path, step, aliases)` (monitor.logger.Logger).
        final_step: the step that also gets the alias `final` (besides `latest`,
        `step-<N>`). staging_dir: where hard-linked snapshots live until handed
        over. artifacts_log: the logger's record of handed-over artifacts
        (`<workdir>/artifacts.jsonl`), used to delete snapshots early.
        """
        discard_snapshots(staging_dir)  # leftovers of a killed run
        self._staging_dir = os.path.abspath(staging_dir)
        self._publisher = _ArtifactPublisher(self.directory, self._staging_dir, logger, final_step, artifacts_log)

    def discard_snapshots(self) -> None:
        """Deletes the artifact snapshots; call after the logger has finished (uploads handed over)."""
        if self._staging_dir is not None:
            discard_snapshots(self._staging_dir)

    def wait(self) -> None:
        """Blocks until the save in flight is on disk (and queued for upload, when publishing)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the save in flight, hands every finished step to the uploader, closes Orbax."""
        try:
            self.manager.wait_until_finished()
        finally:
            if self._publisher is not None:
                self._publisher.close()
                self._publisher = None
            self.manager.close()


# ----------------------------------------------------------------------------
# Continued pretraining from PyTorch weights.
# ----------------------------------------------------------------------------

_BACKBONE_PREFIXES = ("teacher.backbone.", "model.teacher.backbone.", "teacher.", "backbone.", "")


def _backbone_prefix(state_dict: Mapping[str, Any]) -> str:
    """The key prefix of the backbone to load: the teacher's when a training checkpoint holds both."""
    prefixes = sorted({k[: -len("cls_token")] for k in state_dict if k == "cls_token" or k.endswith(".cls_token")})
    if not prefixes:
        raise KeyError("no 'cls_token' key: not a ViT backbone state dict")
    for preferred in _BACKBONE_PREFIXES:
        if preferred in prefixes:
            return preferred
    if len(prefixes) == 1:
        return prefixes[0]
    teacher = [p for p in prefixes if "teacher" in p]
    if len(teacher) == 1:
        return teacher[0]
    raise KeyError(f"several backbones in the state dict (prefixes {prefixes}); keep one")


def load_pretrained(state, config, path: str):
    """`state` with student AND teacher backbones replaced by a DINOv2/DINOv3 `.pth`/`.safetensors`.

    The importer (`models.torch_import.backbone_from_torch`) resamples the patch
    embedding to `model.patch_size` (FlexiViT PI-resize), sums RGB kernels for
    1-channel inputs and resizes a learned position grid. In a training
    checkpoint holding student and teacher, the teacher's backbone is taken.
    Heads, optimiser state and step are left as they are (fresh heads: the
    prototypes of another dataset mean nothing here). The new arrays get the
    shardings of the arrays they replace. Raises FileNotFoundError or
    torch_import.StateDictError naming the path and the keys/shapes.
    """
    from dinocell_jax.models import torch_import
    from dinocell_jax.models.vit import vit_config_from
    from dinocell_jax.ssl.step import input_channels

    state_dict = torch_import.load_state_dict(path)
    cfg = vit_config_from(config.model, input_channels(config))
    try:
        prefix = _backbone_prefix(state_dict)
        imported = torch_import.backbone_from_torch(state_dict, cfg, prefix=prefix)
    except KeyError as e:  # StateDictError is a KeyError
        raise torch_import.StateDictError(f"model.init_from={path}: {e}") from e
    current = state.student["backbone"]
    diffs = shape_mismatches(imported, current)
    if diffs:
        raise torch_import.StateDictError(f"model.init_from={path}: does not fit the model: " + "; ".join(diffs))

    def place(new, old):
        value = np.asarray(new, dtype=old.dtype)
        return jax.make_array_from_callback(old.shape, old.sharding, lambda index: value[index])

    backbone = jax.tree.map(place, imported, current)
    teacher_backbone = jax.tree.map(place, imported, state.teacher["backbone"])
    log.info("model.init_from: loaded the backbone of %s (prefix %r) into student and teacher", path, prefix)
    return state.replace(
        student={**state.student, "backbone": backbone},
        teacher={**state.teacher, "backbone": teacher_backbone},
    )


# ----------------------------------------------------------------------------
# Restoring parameters for tools (export, embed).
# ----------------------------------------------------------------------------

def restore_trained(config, path: str, step: int | None = None, devices=None):
    """(TrainState, meta) of a finished checkpoint, restored for a tool rather than a run.

    path: a workdir, a checkpoint root or a step directory (resolve_checkpoint_path).
    The state is laid out over `devices` (default: the first local device; the
    config's fsdp split where it divides them), so a checkpoint of any device
    count restores. Opened read-only: a live trainer writing to the same
    directory is left alone.
    """
    from dinocell_jax import parallel
    from dinocell_jax.ssl import optim
    from dinocell_jax.ssl import step as step_lib
    from dinocell_jax.ssl.schedules import Schedules

    directory, path_step = resolve_checkpoint_path(path)
    step = path_step if step is None else step
    optimizer = optim.make_optimizer(config, Schedules.from_config(config))
    abstract = jax.eval_shape(lambda k: step_lib.init_state(config, k, optimizer), jax.random.key(config.seed))
    devices = [jax.local_devices()[0]] if devices is None else list(devices)
    fsdp = int(config.mesh.fsdp) if len(devices) % int(config.mesh.fsdp) == 0 else 1
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((len(devices) // fsdp, fsdp), parallel.BATCH_AXES, axis_types=(auto, auto),
                         devices=devices)
    shardings = parallel.state_shardings(abstract, mesh, config)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    checkpointer = Checkpointer(directory, config, read_only=True)
    try:
        state, _, meta = checkpointer.restore(abstract, step)
    finally:
        checkpointer.close()
    return state, meta


def config_from_checkpoint(path: str):
    """The resolved config stored in a checkpoint's `meta` item (for a checkpoint without its workdir)."""
    from dinocell_jax import cli
    from dinocell_jax import config as config_lib

    directory, step = resolve_checkpoint_path(path)
    step = step if step is not None else _steps_in(directory)[-1]
    meta_file = os.path.join(directory, str(step), "meta", "metadata")
    if not os.path.exists(meta_file):
        raise CheckpointNotFoundError(f"{meta_file}: missing; this checkpoint has no stored config")
    with open(meta_file) as f:
        saved = json.load(f)
    config = config_lib.base_config()
    config.lock()
    cli.apply_overrides(config, saved["config"])
    return config
