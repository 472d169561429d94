"""Orbax checkpoints of a run: train state, data-iterator state and metadata.

One `CheckpointManager` under `<workdir>/checkpoints`, asynchronous, keeping
the last `checkpoint.keep` steps plus every `checkpoint.keep_every`-th. Orbax
writes each step into a temporary directory and renames it when complete, so
a save interrupted half-way is never listed: the previous step is used.
Restores always go into an abstract tree carrying the current shardings, so a
checkpoint written on 8 devices restores on 4.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointShapeError(ValueError):
    """A checkpoint whose arrays do not fit the configured model."""


def _shape_mismatches(saved_meta, abstract_state) -> list[str]:
    """Paths whose saved shape differs from the abstract state's."""
    saved = {jax.tree_util.keystr(p): tuple(getattr(l, "shape", ()))
             for p, l in jax.tree_util.tree_flatten_with_path(saved_meta)[0]}
    diffs = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        key = jax.tree_util.keystr(path)
        want = tuple(leaf.shape)
        if key not in saved:
            diffs.append(f"{key}: missing in checkpoint (expected {want})")
        elif saved[key] != want:
            diffs.append(f"{key}: checkpoint {saved[key]} vs config {want}")
    return diffs


class Checkpointer:
    def __init__(self, directory: str, config):
        self.directory = os.path.abspath(directory)  # Orbax wants absolute paths
        keep_every = config.checkpoint.keep_every or None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep,
            keep_period=keep_every,
            create=True,
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of `step` (default latest), laid out as abstract_state.

        abstract_state: the TrainState tree of jax.ShapeDtypeStruct with the
        current shardings.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        saved = self.manager.item_metadata(step)
        if saved is not None and saved.get("state") is not None:
            diffs = _shape_mismatches(saved["state"], abstract_state)
            if diffs:
                raise CheckpointShapeError(
                    f"checkpoint {self.directory} step {step} does not fit this config:\n  "
                    + "\n  ".join(diffs[:20])
                )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
