"""Preemption, end to end on the real trainer (subprocesses, tiny model, 8 simulated devices).

Run A trains T steps uninterrupted. Run B trains the same config, is SIGKILLed once its
step-2 checkpoint is on disk, is restarted (C), receives SIGTERM a few steps later (exit 0,
checkpoint at the step reached), and is restarted again: D stops one step short of the end
(`train.stop_after`) and E finishes. B/C/D/E's final parameters, optimiser state, teacher,
data-iterator state and per-step losses (so the data order) must be bit-identical to A's, and
the wandb run must stay the same. B and its restarts read each step's metrics two steps late
(`train.steps_in_flight=2`), A one step late: the same losses, every step logged once, in order.
"""

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from dinocell_jax import checkpoint as ckpt_lib
from dinocell_jax import cli, parallel
from dinocell_jax.ssl import optim
from dinocell_jax.ssl import step as step_lib
from dinocell_jax.ssl.schedules import Schedules
from tiny import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
# tests/tiny.py's sizes through the command line of configs/demo.py.
TINY = [
    "--config", "configs/demo.py",
    "--config.model.embed_dim=32", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.model.patch_size=4", "--config.model.n_storage_tokens=1",
    "--config.heads.out_dim=64", "--config.heads.hidden_dim=32", "--config.heads.bottleneck_dim=16",
    "--config.crops.global_size=16", "--config.crops.local_size=8", "--config.crops.n_local=2",
    "--config.data.field_size=32", "--config.data.num_fields=64", "--config.train.batch_size=16",
    "--config.loss.koleo_group_size=8", "--config.train.progress_bar=false",
    "--config.wandb.log_interval=1", "--config.wandb.log_attention_maps=false",
    "--config.wandb.log_feature_pca=false", "--config.wandb.histogram_interval=0", "--config.eval.interval=0",
    "--config.optim.epochs=4", "--config.optim.warmup_epochs=1", "--config.loss.warmup_teacher_temp_epochs=1",
    "--config.optim.freeze_last_layer_epochs=1",
    f"--config.train.steps={STEPS}", "--config.checkpoint.interval=2", "--config.checkpoint.keep=2",
]


B_RUNS = ["--config.train.steps_in_flight=2"]


def _env(tmp_path):
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu",
        "WANDB_MODE": "offline", "WANDB_SILENT": "true",
        # Restarts reuse the first runs' executables: the test spends its time on behaviour.
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    })
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        env[var] = str(tmp_path / "wandb_home")
    return env


def _start(workdir, env, log_path, *overrides):
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "dinocell_jax.train", *TINY, *overrides, "--workdir", str(workdir)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(predicate, proc, what, timeout=240):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _finished_steps(workdir):
    return ckpt_lib._steps_in(os.path.join(workdir, "checkpoints"))


def _metrics(workdir):
    rows = []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path).read().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written
    return rows


def _console_steps(log_path, offset):
    """The steps a trainer printed to its log (`[k] loss/total ...`) after byte `offset`:
    a restarted run's own progress (metrics.jsonl still holds the killed run's last rows
    until the restart has dropped them)."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [int(m) for m in re.findall(r"^\[(\d+)\] loss/total", text, re.MULTILINE)]


def _tail(path):
    return open(path, errors="replace").read()[-3000:]


def _restore(workdir, step):
    config, _ = cli.parse_config(TINY + ["--workdir", str(workdir)])
    optimizer = optim.make_optimizer(config, Schedules.from_config(config))
    abstract = jax.eval_shape(functools.partial(step_lib.init_state, config, optimizer=optimizer),
                              jax.random.key(0))
    shardings = parallel.state_shardings(abstract, parallel.make_mesh(config), config)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config, read_only=True)
    try:
        state, data, meta = ckpt.restore(abstract, step)
    finally:
        ckpt.close()
    state = state.replace(rng=jax.random.key_data(state.rng))
    leaves = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    return leaves, data, meta


def test_sigkill_and_sigterm_resume_bit_identical(tmp_path):
    env = _env(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"

    # ---- A uninterrupted, B killed with SIGKILL once its step-2 checkpoint is finalised.
    proc_a = _start(a, env, log_a)
    proc_b = _start(b, env, log_b, *B_RUNS)
    _wait_for(lambda: 2 in _finished_steps(b), proc_b, "B's checkpoint of step 2")
    proc_b.send_signal(signal.SIGKILL)
    assert proc_b.wait(60) == -signal.SIGKILL
    killed_at = max(_finished_steps(b))
    assert killed_at < STEPS, "B finished before it was killed; the test proves nothing"
    run_id = (b / "wandb_run_id").read_text().strip()
    assert proc_a.wait(300) == 0, _tail(log_a)

    # ---- C resumes B, gets SIGTERM a few steps later: clean exit, checkpoint at the step reached.
    offset = log_b.stat().st_size
    proc_c = _start(b, env, log_b, *B_RUNS)
    _wait_for(lambda: any(k > killed_at for k in _console_steps(log_b, offset)), proc_c, "C's first logged step")
    proc_c.send_signal(signal.SIGTERM)
    assert proc_c.wait(120) == 0, _tail(log_b)
    stopped_at = max(_finished_steps(b))
    assert killed_at < stopped_at < STEPS, (killed_at, stopped_at)
    assert max(r["training/iteration"] for r in _metrics(b)) == stopped_at  # flushed up to the step reached

    # ---- D goes on to one step short of the end (train.stop_after: exit 0 with a checkpoint
    # there, the schedules still spanning all STEPS), E finishes.
    proc_d = _start(b, env, log_b, *B_RUNS, f"--config.train.stop_after={STEPS - 1}")
    assert proc_d.wait(300) == 0, _tail(log_b)
    assert max(_finished_steps(b)) == STEPS - 1
    proc_e = _start(b, env, log_b, *B_RUNS)
    assert proc_e.wait(300) == 0, _tail(log_b)
    assert max(_finished_steps(b)) == STEPS
    assert (b / "wandb_run_id").read_text().strip() == run_id  # one wandb run through both interruptions

    # ---- Bit-identical to the uninterrupted run.
    want, want_data, _ = _restore(a, STEPS)
    got, got_data, meta = _restore(b, STEPS)
    assert want.keys() == got.keys()
    differing = [k for k in want if not np.array_equal(want[k], got[k])]
    assert not differing, f"{len(differing)} arrays differ, e.g. {differing[:5]}"
    assert any("opt_state" in k for k in want) and any("teacher" in k for k in want)
    assert got_data == want_data
    assert meta["wandb_run_id"] == run_id

    def losses(workdir):
        rows = {r["training/iteration"]: r for r in _metrics(workdir)}
        return {i: (rows[i]["loss/total"], rows[i]["loss/dino"], rows[i]["loss/ibot"]) for i in sorted(rows)}

    assert list(losses(b)) == list(range(1, STEPS + 1))  # one row per step, the killed run's extras dropped
    assert losses(b) == losses(a)  # same batches in the same order, same masks, same updates


def test_every_logged_step_is_written_before_its_checkpoint(tmp_path, monkeypatch):
    """A run killed right after a checkpoint resumes past it, so the steps up to the checkpoint
    must be in metrics.jsonl when it is saved. The file's writer holds a step's row until the
    next step's arrives (one step's several log calls make one row): without the trainer's
    flush at the save, step 2's row would be missing at step 2's checkpoint. In-process, so the
    check runs at the save itself, not after a kill that may or may not beat the writer."""
    from dinocell_jax import train

    seen = {}
    original_save = ckpt_lib.Checkpointer.save

    def save(self, step, *args, **kwargs):
        seen[int(step)] = [r["training/iteration"] for r in _metrics(tmp_path / "run")]
        return original_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # main installs its own
    try:
        argv = [a for a in TINY if not a.startswith("--config.train.steps=")]
        assert train.main(argv + ["--config.train.steps=4", "--config.wandb.enabled=false",
                                  *B_RUNS, "--workdir", str(tmp_path / "run")]) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert seen == {2: [1, 2], 4: [1, 2, 3, 4]}, seen
