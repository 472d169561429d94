"""Multi-host training: launch detection, and real multi-process runs on CPU.

The end-to-end tests start `python -m dinocell_jax.train` as 2 processes x 4
simulated CPU devices on 127.0.0.1 (gloo collectives, coordinator on a free
port) next to one process with 8 devices, and compare them. Every child runs
under a deadline and is killed by its pid when the test ends.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dinocell_jax import checkpoint as ckpt_lib
from dinocell_jax import cli, parallel
from dinocell_jax.config import ConfigError
from dinocell_jax.data import pipeline
from dinocell_jax.ssl import optim
from dinocell_jax.ssl import step as step_lib
from dinocell_jax.ssl.schedules import Schedules
from tests.tiny import tiny_config, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# A tiny demo run: 8 fields per process, every step logged, no pictures, no mid-run save.
TINY = [
    "--config", "configs/demo.py",
    f"--config.train.steps={STEPS}", "--config.train.batch_size=16",
    "--config.model.depth=2", "--config.model.embed_dim=32", "--config.model.num_heads=2",
    "--config.heads.out_dim=64", "--config.heads.hidden_dim=32", "--config.heads.bottleneck_dim=16",
    "--config.data.field_size=48", "--config.data.num_fields=64", "--config.data.read_threads=1",
    # KoLeo neighbourhoods of 4 fields whatever the device layout.
    "--config.loss.koleo_group_size=4",
    "--config.wandb.log_interval=1", "--config.wandb.attention_log_interval=1000",
    "--config.wandb.pca_log_interval=1000", "--config.wandb.histogram_interval=0",
    "--config.eval.interval=0", "--config.train.progress_bar=False",
    "--config.distributed.initialization_timeout=120", "--config.distributed.heartbeat_timeout=20",
    "--config.distributed.shutdown_timeout=20", "--config.distributed.barrier_timeout=120",
]


# ----------------------------------------------------------------------------- launch detection


def _config(**distributed):
    c = tiny_config()
    for k, v in distributed.items():
        c.distributed[k] = v
    return c


SLURM_2x4 = {  # srun step: 2 nodes, 4 tasks each, all 4 GPUs visible to every task
    "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_NTASKS": "8", "SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
}


def test_one_process_is_not_a_launch():
    assert parallel.detect_launch(_config(), env={}) is None
    assert parallel.detect_launch(_config(), env={"JAX_NUM_PROCESSES": "1"}) is None
    # The batch script of an sbatch job (no srun step) is one process, whatever --ntasks says.
    assert parallel.detect_launch(_config(), env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "16",
                                                  "SLURM_PROCID": "0"}) is None
    assert parallel.initialize(_config(), env={}) is None


def test_explicit_launch_from_env_and_config():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    launch = parallel.detect_launch(_config(), env=env)
    assert launch == parallel.Launch("explicit", "10.0.0.1:1234", 4, 3, None)
    # Config keys win over the environment, and they win over a SLURM step too.
    launch = parallel.detect_launch(
        _config(coordinator_address="head:99", num_processes=2, process_id=1, local_device_ids="0,1"),
        env=env | SLURM_2x4,
    )
    assert launch == parallel.Launch("explicit", "head:99", 2, 1, (0, 1))


def test_slurm_one_task_per_gpu_and_per_node():
    launch = parallel.detect_launch(_config(), env=SLURM_2x4)
    # First node of the step; the port is derived from the job id (same on every task).
    assert launch == parallel.Launch("slurm", f"gpu007:{123456 % 4096 + 61440}", 8, 6, (2,))
    # --gpus-per-task / --gpu-bind: the task already sees only its GPU, which is device 0.
    assert parallel.detect_launch(_config(), env=SLURM_2x4 | {"CUDA_VISIBLE_DEVICES": "2"}).local_device_ids is None
    per_node = SLURM_2x4 | {"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                            "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
                            "JAX_COORDINATOR_PORT": "7777"}
    # One task per node drives all the node's GPUs (JAX's own detection would give it GPU 0 only).
    assert parallel.detect_launch(_config(), env=per_node) == parallel.Launch("slurm", "gpu007:7777", 2, 1, None)


@pytest.mark.parametrize("nodelist, first", [
    ("node001", "node001"), ("node001,host2", "node001"), ("node[001-015],host2", "node001"),
    ("node[007,009-015]", "node007"), ("a-b[10-11]", "a-b10"),
])
def test_slurm_first_host(nodelist, first):
    assert parallel._slurm_first_host(nodelist) == first


def test_open_mpi_launch():
    env = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    # The coordinator is left to JAX's detection (mpirun's URI).
    assert parallel.detect_launch(_config(), env=env) == parallel.Launch("openmpi", None, 8, 5, (1,))


def test_incomplete_or_inconsistent_launch_names_the_setting():
    with pytest.raises(parallel.DistributedError, match=r"\['num_processes', 'process_id'\]"):
        parallel.detect_launch(_config(), env={"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(parallel.DistributedError, match="process_id=4 is not in"):
        parallel.detect_launch(_config(coordinator_address="h:1", num_processes=4, process_id=4), env={})
    with pytest.raises(parallel.DistributedError, match="JAX_NUM_PROCESSES='two'"):
        parallel.detect_launch(_config(), env={"JAX_NUM_PROCESSES": "two"})
    with pytest.raises(parallel.DistributedError, match="local_device_ids='0;1'"):
        parallel.detect_launch(_config(coordinator_address="h:1", num_processes=2, process_id=0,
                                       local_device_ids="0;1"), env={})


def test_gpu_backend_settings_are_set_unless_the_user_set_them():
    config = tiny_config()
    spatial = "--xla_gpu_enable_allocator_spatial_partitioning=false"
    triton = "--xla_gpu_enable_triton_gemm=false"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    parallel.configure_gpu_backend(config, env, jaxlib_version=(0, 11, 2))
    # JAX's own 0.75 cannot hold batch 128 on 80 GB; the flag keeps the temporaries' block whole;
    # cuBLAS runs the matmuls faster than Triton's GEMMs
    assert env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95",
                   "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {spatial} {triton}"}
    # the user's values win; a longer flag that starts with the same name is not the flag
    mine = "--xla_gpu_enable_allocator_spatial_partitioning=true --xla_gpu_enable_triton_gemm_int4=true"
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5", "XLA_FLAGS": mine}
    parallel.configure_gpu_backend(config, env, jaxlib_version=(0, 12, 0))
    assert env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5", "XLA_FLAGS": f"{mine} {triton}"}
    env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm"}  # a bare boolean flag: true
    parallel.configure_gpu_backend(config, env, jaxlib_version=(0, 10, 2))
    assert env["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm"
    env = {}
    parallel.configure_gpu_backend(config, env, jaxlib_version=(0, 10, 2))  # would abort on the flag
    assert env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", "XLA_FLAGS": triton}
    config.train.triton_gemm = True
    env = {}
    parallel.configure_gpu_backend(config, env, jaxlib_version=(0, 11, 2))
    assert env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", "XLA_FLAGS": spatial}
    config.train.device_memory_fraction = 1.5
    with pytest.raises(ConfigError, match="train.device_memory_fraction: 1.5"):
        parallel.configure_gpu_backend(config, {})


def test_process_rows_and_barrier_in_one_process():
    mesh = parallel.make_mesh(tiny_config())
    assert parallel.process_rows(mesh, 16) == slice(0, 16)
    parallel.barrier("alone", timeout_s=1)  # one process: returns at once


def test_rows_sent_one_by_one_join_into_the_stacked_batch_inside_jit():
    mesh = parallel.make_mesh(tiny_config())
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 65535, (2, 4, 4), dtype=np.uint16) for _ in range(16)]
    low = rng.random((16, 2), dtype=np.float32)
    with jax.set_mesh(mesh):  # as in the training loop
        from_rows = parallel.to_global_batch({"field": rows, "norm_low": low}, mesh)
    stacked = parallel.to_global_batch({"field": np.stack(rows), "norm_low": low}, mesh)
    sharding = parallel.batch_sharding(mesh)
    # 16 rows on 8 devices: two positions, each one row per device, nothing computed yet.
    assert isinstance(from_rows["field"], tuple) and len(from_rows["field"]) == 2
    for position in from_rows["field"]:
        assert position.shape == (8, 2, 4, 4) and position.sharding == sharding
    joined = jax.jit(parallel.join_rows, in_shardings=sharding, out_shardings=sharding)(from_rows["field"])
    assert joined.sharding == stacked["field"].sharding == sharding
    for a, b in zip(joined.addressable_shards, stacked["field"].addressable_shards):
        assert a.device == b.device and a.index == b.index
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    assert parallel.join_rows(stacked["field"]) is stacked["field"]
    np.testing.assert_array_equal(np.asarray(from_rows["norm_low"]), low)


def _batches_in_blocks() -> bool:
    """Whether process p's part of each global batch is rows [p*b, (p+1)*b) of the one-process batch.

    With this layout the global batch, and so the whole run, does not depend on
    the number of processes: every field keeps its row, hence its augmentation
    key, iBOT mask and KoLeo group.
    """
    config = tiny_config(**{"data.field_size": 16, "data.num_fields": 24, "data.read_threads": 1,
                            "train.batch_size": 8})
    source = pipeline.make_source(config, "train")

    def batches(p, count):
        it = pipeline.make_iterator(config, seed=3, process_index=p, process_count=count, source=source)
        out = [next(it)["field"] for _ in range(4)]  # past an epoch boundary (21 train fields)
        it.close()
        return out

    whole, halves = batches(0, 1), [batches(p, 2) for p in range(2)]
    return all(np.array_equal(np.concatenate([halves[0][i], halves[1][i]]), whole[i]) for i in range(4))


def test_processes_share_each_global_batch_in_blocks():
    assert _batches_in_blocks()


# ----------------------------------------------------------------------------- multi-process runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path, devices: int, **extra) -> dict:
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": xla_flags(devices),
        "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
        "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
    })
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_DIR"):
        env[var] = str(tmp_path / "wandb-home")
    for var in [v for v in env if v.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROC",
                                                "JAX_PROCESS_ID"))]:
        del env[var]
    env.update(extra)
    return env


def _start(tmp_path, workdir, n_processes: int, devices: int, args=(), tag="") -> list[subprocess.Popen]:
    """n_processes trainers on `workdir` (one process: no distributed runtime)."""
    port = _free_port()
    procs = []
    for i in range(n_processes):
        extra = {} if n_processes == 1 else {
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n_processes),
            "JAX_PROCESS_ID": str(i)}
        log = open(tmp_path / f"{tag or os.path.basename(workdir)}.{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dinocell_jax.train", *TINY, *args, "--workdir", str(workdir)],
            cwd=REPO, env=_env(tmp_path, devices, **extra), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        ))
        log.close()
    return procs


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the child's own session: it and its grain threads
            p.wait()


def _wait(procs, deadline_s: float) -> list[int]:
    end = time.monotonic() + deadline_s
    for p in procs:
        p.wait(timeout=max(1.0, end - time.monotonic()))
    return [p.returncode for p in procs]


def _tail(path, n=40) -> str:
    lines = [l for l in open(path, errors="replace") if not l.startswith("    @")]
    return "".join(lines[-n:])


def _losses(workdir) -> list[dict]:
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [{k: r[k] for k in ("training/iteration", "loss/total", "loss/dino", "loss/ibot", "loss/koleo")}
            for r in rows if "loss/total" in r]


def _restore(workdir):
    """The run's last checkpoint, restored in this one 8-device process."""
    config, _ = cli.parse_config(TINY)
    mesh = parallel.make_mesh(config)
    optimizer = optim.make_optimizer(config, Schedules.from_config(config))
    abstract = jax.eval_shape(lambda k: step_lib.init_state(config, k, optimizer), jax.random.key(0))
    shardings = parallel.state_shardings(abstract, mesh, config)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), config)
    try:
        state, data_state, _ = checkpointer.restore(abstract)
    finally:
        checkpointer.close()
    return jax.device_get(state), data_state


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    pair_dir, single_dir = tmp_path / "pair", tmp_path / "single"
    procs = []
    try:
        procs = _start(tmp_path, pair_dir, 2, 4) + _start(tmp_path, single_dir, 1, 8)
        codes = _wait(procs, deadline_s=420)
    finally:
        _kill(procs)
    logs = [tmp_path / "pair.0.log", tmp_path / "pair.1.log", tmp_path / "single.0.log"]
    assert codes == [0, 0, 0], "\n".join(f"--- {p.name}\n{_tail(p)}" for p in logs)
    assert "loss/total" not in open(logs[1]).read()  # process 1 does not log

    # Process 0 alone logs: one JSONL line per step, one wandb run (in its workdir only).
    assert [r["training/iteration"] for r in _losses(pair_dir)] == list(range(1, STEPS + 1))
    runs = sorted({os.path.realpath(r) for r in glob.glob(str(tmp_path / "**" / "run-*.wandb"), recursive=True)})
    pair_runs = [r for r in runs if str(pair_dir) in r]
    assert len(pair_runs) == 1 and len(runs) == 2, runs

    pair_state, pair_data = _restore(pair_dir)  # written by two processes, read by one
    single_state, _ = _restore(single_dir)
    assert int(pair_state.step) == STEPS and pair_data["grain"] is not None

    # Same global batches, same losses and parameters (up to the order of float sums).
    pair, single = _losses(pair_dir), _losses(single_dir)
    for a, b in zip(pair, single, strict=True):
        for key in a:
            # KoLeo takes the log of nearest-neighbour distances of nearly collapsed tiny-model
            # features, which turns last-bit differences of the sums into ~1e-5 of the loss;
            # a wrong batch or step moves the losses by 1e-2 or more.
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for tree in ("student", "teacher"):
        a, b = getattr(pair_state, tree), getattr(single_state, tree)
        paths = optim.param_paths(a)
        for path, x, y in zip(jax.tree.leaves(paths), jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            # Adam divides by sqrt(v): a gradient element near zero turns a last-bit difference of
            # a cross-process sum into ~1e-5 of its update (seen up to 5.5e-5); a wrong batch or step moves ~1e-3.
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-4, err_msg=f"{tree}/{path}")


@pytest.mark.slow
def test_killed_process_brings_the_other_down(tmp_path):
    heartbeat = 5
    workdir = tmp_path / "killed"
    procs = []
    try:
        procs = _start(tmp_path, workdir, 2, 4, args=[
            "--config.train.steps=100000", f"--config.distributed.heartbeat_timeout={heartbeat}"])
        end = time.monotonic() + 300
        # Wait until both train (process 0 has logged a step: collectives are running).
        while not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").stat().st_size:
            assert all(p.poll() is None for p in procs), _tail(tmp_path / "killed.0.log")
            assert time.monotonic() < end, "the pair did not start training"
            time.sleep(0.5)
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout=heartbeat + 60)
        elapsed = time.monotonic() - killed
    finally:
        _kill(procs)
    assert procs[0].returncode != 0
    assert elapsed < heartbeat + 60
    # XLA's coordination service names the cause in the survivor's log.
    assert "task" in _tail(tmp_path / "killed.0.log").lower()


BARRIER_SCRIPT = """
import sys, time
from tests.tiny import tiny_config
from dinocell_jax import parallel
c = tiny_config()
c.distributed.coordinator_address, c.distributed.num_processes = sys.argv[1], 2
c.distributed.process_id = int(sys.argv[2])
parallel.initialize(c)
if c.distributed.process_id == 0:
    start = time.monotonic()
    try:
        parallel.barrier("checkpoint done", timeout_s=3)
    except parallel.DistributedError as e:
        print(f"RAISED after {time.monotonic() - start:.1f}s: {e}", flush=True)
        import os; os._exit(0)
    print("NO ERROR", flush=True)
else:
    time.sleep(15)  # never reaches the barrier
"""


@pytest.mark.slow
def test_barrier_times_out_with_a_clear_error(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    env = _env(tmp_path, 1)
    procs = []
    try:
        procs = [subprocess.Popen([sys.executable, "-c", BARRIER_SCRIPT, address, str(i)], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True) for i in range(2)]
        out, _ = procs[0].communicate(timeout=120)
    finally:
        _kill(procs)
    assert "RAISED after" in out, out
    seconds = float(out.split("RAISED after ")[1].split("s:")[0])
    assert 2.5 < seconds < 30
    assert "barrier 'checkpoint done'" in out and "distributed.barrier_timeout" in out
