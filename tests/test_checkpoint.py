"""Checkpoints: round trip, 8 -> 4 device restore, shape errors, killed saves, retention,
artifact uploads (wandb offline), continued pretraining from a PyTorch state dict."""

import functools
import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dinocell_jax import checkpoint as ckpt_lib
from dinocell_jax import parallel
from dinocell_jax.models import torch_import
from dinocell_jax.models.vit import vit_config_from
from dinocell_jax.monitor import logger as logger_lib
from dinocell_jax.ssl import optim
from dinocell_jax.ssl import step as step_lib
from dinocell_jax.ssl.schedules import Schedules
from tiny import tiny_config

import wandb_records


def _abstract(config, devices=None):
    optimizer = optim.make_optimizer(config, Schedules.from_config(config))
    init = functools.partial(step_lib.init_state, config, optimizer=optimizer)
    abstract = jax.eval_shape(init, jax.random.key(0))
    mesh = parallel.make_mesh(config, devices)
    shardings = parallel.state_shardings(abstract, mesh, config)
    return init, shardings, jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _state(config, devices=None, seed=0):
    """A TrainState of random values laid out by the config's shardings (no compile: fast)."""
    _, _, abstract = _abstract(config, devices)
    rng = np.random.default_rng(seed)

    def fill(a):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(seed), a.sharding)
        return jax.device_put(rng.normal(size=a.shape).astype(a.dtype), a.sharding)

    return jax.tree.map(fill, abstract), abstract


def _leaves(state):
    state = state.replace(rng=jax.random.key_data(state.rng))
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_restore_on_four_devices_gives_the_same_arrays(tmp_path):
    # Written with parameters split over an fsdp axis of 2 on 8 devices, read on 4 devices
    # with fsdp 4: Orbax must reshard, not just reload.
    config = tiny_config(**{"mesh.fsdp": 2})
    state, _ = _state(config, seed=3)
    state = state.replace(step=jnp.asarray(7, jnp.int32))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), config)
    assert ckpt.save(7, state, {"grain": {"pos": 112}}, ckpt_lib.run_metadata(config, "abc"))
    ckpt.close()

    config4 = tiny_config(**{"mesh.fsdp": 4})
    devices4 = jax.devices()[:4]
    _, abstract4 = _state(config4, devices4)  # only for the abstract tree
    restored, data, meta = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), config4).restore(abstract4)
    want, got = _leaves(state), _leaves(restored)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    kernel = restored.student["backbone"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.mesh.devices.size == 4
    assert kernel.sharding.spec == jax.P(None, "fsdp")  # [32, 128]: the larger dim is split 4 ways
    assert data == {"grain": {"pos": 112}}
    assert meta["wandb_run_id"] == "abc" and meta["versions"]["jax"] == jax.__version__
    assert meta["config"]["model"]["embed_dim"] == 32


@pytest.mark.parametrize("change, culprit", [
    ({"model.embed_dim": 48, "model.num_heads": 3}, "student/backbone/blocks/0/attn/proj/bias: checkpoint (32,) vs config (48,)"),
    ({"model.patch_size": 8}, "student/backbone/patch_embed/proj/kernel: checkpoint (4, 4, 1, 32) vs config (8, 8, 1, 32)"),
])
def test_incompatible_checkpoint_names_the_shapes(tmp_path, change, culprit):
    config = tiny_config()
    state, _ = _state(config)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), config)
    ckpt.save(1, state, {}, {})
    ckpt.close()
    _, _, abstract = _abstract(tiny_config(**change))
    with pytest.raises(ckpt_lib.CheckpointShapeError) as err:
        ckpt_lib.Checkpointer(str(tmp_path), config).restore(abstract)
    assert culprit in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_keeps_last_n_plus_every_kth(tmp_path):
    config = tiny_config(**{"checkpoint.keep": 2, "checkpoint.keep_every": 4})
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), config)
    tree = {"w": jnp.arange(4.0)}
    for step in range(1, 10):
        ckpt.save(step, tree, {}, {})
        ckpt.wait()
    assert not ckpt.save(9, tree, {}, {})  # a step is never written twice (stop right after a periodic save)
    ckpt.close()
    assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == [4, 8, 9]


_KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    import jax, jax.numpy as jnp
    sys.path.insert(0, {tests!r})
    from tiny import tiny_config
    from dinocell_jax import checkpoint as ckpt_lib
    ckpt = ckpt_lib.Checkpointer({directory!r}, tiny_config())
    ckpt.save(1, {{"w": jnp.full((256, 1024), 1.0)}}, {{"pos": 1}}, {{}})
    ckpt.wait()
    big = {{"w": jnp.full((256, 1024), 2.0), "pad": jnp.ones((64, 1024, 1024), jnp.uint8)}}
    ckpt.save(2, big, {{"pos": 2}}, {{}})
    deadline = time.time() + 20
    while time.time() < deadline:
        if any(".orbax-checkpoint-tmp" in n for n in os.listdir({directory!r})):
            print("KILLED-MID-SAVE", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.001)
""")


def test_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    directory = str(tmp_path / "ckpt")
    script = _KILL_DURING_SAVE.format(tests=os.path.dirname(__file__), directory=directory)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9 and "KILLED-MID-SAVE" in proc.stdout, proc.stderr[-2000:]
    assert any(".orbax-checkpoint-tmp" in n for n in os.listdir(directory))
    assert ckpt_lib.resolve_checkpoint_path(directory) == (directory, None)

    ckpt = ckpt_lib.Checkpointer(directory, tiny_config())
    assert ckpt.latest_step() == 1
    abstract = {"w": jax.ShapeDtypeStruct((256, 1024), jnp.float32,
                                          sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    tree, data, _ = ckpt.restore(abstract)
    assert float(tree["w"].min()) == float(tree["w"].max()) == 1.0 and data == {"pos": 1}
    removed = ckpt.remove_unfinished()
    assert len(removed) == 1 and not os.path.exists(removed[0])
    assert ckpt.save(2, {"w": jnp.zeros((256, 1024))}, {"pos": 2}, {})  # the step can be written again
    ckpt.close()
    assert ckpt_lib.Checkpointer(directory, tiny_config()).latest_step() == 2


def test_resolve_checkpoint_path(tmp_path):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), tiny_config())
    ckpt.save(5, {"w": jnp.zeros(3)}, {}, {})
    ckpt.close()
    root = str(tmp_path / "checkpoints")
    assert ckpt_lib.resolve_checkpoint_path(str(tmp_path)) == (root, None)
    assert ckpt_lib.resolve_checkpoint_path(root) == (root, None)
    assert ckpt_lib.resolve_checkpoint_path(os.path.join(root, "5")) == (root, 5)
    with pytest.raises(ckpt_lib.CheckpointNotFoundError, match="no finished checkpoint"):
        ckpt_lib.resolve_checkpoint_path(str(tmp_path / "nowhere"))


def test_config_changes_ignore_paths_and_tuples():
    config = tiny_config()
    saved = json.loads(json.dumps(config.to_dict()))  # tuples become lists, as in the checkpoint
    saved["optim"]["lr"] = 1.0
    saved["checkpoint"]["resume_from"] = "/elsewhere"
    assert ckpt_lib.config_changes(saved, config) == [f"optim.lr: 1.0 -> {config.optim.lr!r}"]


def _artifact_records(workdir):
    out = []
    for record in wandb_records.read_records(wandb_records.run_files(workdir)[-1]):
        if record.WhichOneof("record_type") == "artifact":
            a = record.artifact
            out.append({"type": a.type, "aliases": list(a.aliases),
                        "files": {c.path for c in a.manifest.contents}})
    return out


def test_every_save_becomes_a_model_artifact_even_after_deletion(tmp_path):
    # keep=1: Orbax deletes steps 1 and 2 as soon as the next save lands, while their
    # uploads may still be queued. The snapshots must keep them whole.
    workdir = tmp_path / "run"
    config = tiny_config(**{"checkpoint.keep": 1, "wandb.enabled": True, "wandb.offline": True,
                            "wandb.project": "test", "wandb.log_model_checkpoints": True})
    logger = logger_lib.create_logger(config, workdir, console=False)
    ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), config)
    staging = str(workdir / ckpt_lib.UPLOAD_SUBDIR)
    ckpt.publish_artifacts(logger, final_step=3, staging_dir=staging,
                           artifacts_log=str(workdir / "artifacts.jsonl"))
    for step in (1, 2, 3):
        ckpt.save(step, {"w": jnp.full((64,), float(step))}, {"pos": step}, {"step": step})
    ckpt.close()
    logger.finish()
    ckpt.discard_snapshots()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
    assert not os.path.exists(staging)

    deadline = time.monotonic() + 15  # the offline run file is complete once wandb's core flushed it
    while len(records := _artifact_records(workdir)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [sorted(r["aliases"]) for r in records] == [["latest", "step-1"], ["latest", "step-2"],
                                                       ["final", "latest", "step-3"]]
    for r in records:
        assert r["type"] == "model"
        assert {"_CHECKPOINT_METADATA", "meta/metadata", "data/metadata", "state/_METADATA"} <= r["files"]
        assert not any(".orbax-checkpoint-tmp" in f for f in r["files"])


# ---- continued pretraining -------------------------------------------------------------------------


def _torch_backbone(patch_size):
    from dinov2.models.vision_transformer import DinoVisionTransformer

    # The PyPI dinov2 predates registers: n_storage_tokens=0 on our side.
    model = DinoVisionTransformer(img_size=16 // 4 * patch_size, patch_size=patch_size, in_chans=3, embed_dim=32,
                                  depth=2, num_heads=2, init_values=1e-5, block_chunks=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_load_pretrained_fills_student_and_teacher_with_patch_8_resampled(tmp_path):
    config = tiny_config(**{"model.pos_embed": "learned", "model.pos_embed_size": 16, "model.n_storage_tokens": 0})
    state, _ = _state(config)
    sd = _torch_backbone(patch_size=8)  # an RGB patch-8 DINOv2 backbone -> our 1-channel patch 4
    training_ckpt = {"student": {f"backbone.{k}": v + 1.0 for k, v in sd.items()},
                     "teacher": {f"backbone.{k}": v for k, v in sd.items()}}
    path = str(tmp_path / "dinov2.pth")
    torch.save(training_ckpt, path)

    loaded = ckpt_lib.load_pretrained(state, config, path)
    cfg = vit_config_from(config.model, 1)
    want = torch_import.backbone_from_torch({k: v.numpy() for k, v in sd.items()}, cfg, prefix="")
    assert want["patch_embed"]["proj"]["kernel"].shape == (4, 4, 1, 32)
    for which in ("student", "teacher"):
        got = getattr(loaded, which)["backbone"]
        for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{which} {p}")
        old = getattr(state, which)["backbone"]
        assert jax.tree.map(lambda x: x.sharding, got) == jax.tree.map(lambda x: x.sharding, old)
    for head in ("dino_head", "ibot_head"):  # heads stay fresh
        for a, b in zip(jax.tree.leaves(loaded.student[head]), jax.tree.leaves(state.student[head])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_pretrained_names_what_does_not_fit(tmp_path):
    config = tiny_config(**{"model.n_storage_tokens": 0})  # RoPE: a learned position embedding cannot be loaded
    state, _ = _state(config)
    path = str(tmp_path / "vit.pth")
    torch.save(_torch_backbone(patch_size=8), path)
    with pytest.raises(torch_import.StateDictError, match=r"model.init_from=.*vit.pth.*pos_embed"):
        ckpt_lib.load_pretrained(state, config, path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ckpt_lib.load_pretrained(state, config, str(tmp_path / "missing.pth"))
