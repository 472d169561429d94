"""Devices: the mesh, the shardings of state and batches, and multi-host start-up.

One mesh with a `data` axis (batch) and an `fsdp` axis (batch too, and the
parameters and optimiser state split by the regex rules of `mesh.fsdp_rules`).
With `mesh.fsdp = 1` every parameter is replicated and this is plain data
parallelism.

Multi-host runs use JAX's own distributed runtime: every process runs the same
command, `initialize(config)` connects it to the coordinator (process 0), and
from then on `jax.devices()` lists every process's devices, so the mesh spans
them all. `detect_launch` reads who we are from the config or the launcher's
environment (explicit `JAX_*` variables, SLURM `srun`, Open MPI `mpirun`).
A process that dies stops sending heartbeats and the coordination service
terminates the others within `distributed.heartbeat_timeout` seconds; barriers
carry `distributed.barrier_timeout`; so a broken job ends instead of hanging.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping, MutableMapping

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding

from dinocell_jax.config import ConfigError
from dinocell_jax.ssl.optim import param_paths

BATCH_AXES = ("data", "fsdp")

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """A multi-process launch that cannot start or cannot go on; the message names the setting."""


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp) mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    fsdp = config.mesh.fsdp
    return jax.make_mesh(
        (len(devices) // fsdp, fsdp), BATCH_AXES,
        axis_types=(AxisType.Auto, AxisType.Auto), devices=devices,
    )


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dimension split over all devices."""
    return NamedSharding(mesh, jax.P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, jax.P())


def active_devices() -> int:
    """Devices of the mesh set by `jax.set_mesh` around tracing (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.size


def per_device(fn):
    """`fn` run on each device's rows: every argument and result is split on its leading
    axis over the whole active mesh, as the batch is. Without a mesh it is `fn`.

    For gathers and scatters with data-dependent row numbers local to each device's
    rows (drop path's subsets, iBOT's masked tokens): left to the SPMD partitioner, a
    gather into the sharded batch becomes "every device gathers every row" (an
    all-reduce of the gathered rows) and what follows runs replicated on every device.
    """
    def run(*args):
        if active_devices() == 1:
            return fn(*args)
        mesh = jax.sharding.get_abstract_mesh()
        rows = jax.P(mesh.axis_names)
        return jax.shard_map(fn, mesh=mesh, in_specs=rows, out_specs=rows)(*args)

    return run


def _fsdp_spec(path: str, shape, rules, fsdp_size: int) -> jax.P:
    for pattern, axis in rules:
        if re.fullmatch(pattern, path):
            if axis is None or fsdp_size == 1:
                return jax.P()
            # Split the largest dimension the axis divides; small or odd arrays stay whole.
            dims = sorted(range(len(shape)), key=lambda d: -shape[d])
            for d in dims:
                if shape[d] % fsdp_size == 0 and shape[d] >= fsdp_size:
                    spec = [None] * len(shape)
                    spec[d] = axis
                    return jax.P(*spec)
            return jax.P()
    return jax.P()


def state_shardings(abstract_state, mesh, config):
    """NamedShardings for a TrainState-shaped tree of ShapeDtypeStructs.

    Parameter-shaped leaves (student, teacher and the optimiser moments, whose
    paths end with a parameter path) follow `mesh.fsdp_rules`; everything else
    (step, rng, centres, counters) is replicated.
    """
    rules = tuple((str(p), a) for p, a in config.mesh.fsdp_rules)
    fsdp_size = mesh.shape["fsdp"]
    paths = param_paths(abstract_state)

    def one(path, leaf):
        if not hasattr(leaf, "shape") or leaf.ndim == 0 or fsdp_size == 1:
            return replicated(mesh)
        return NamedSharding(mesh, _fsdp_spec(path, leaf.shape, rules, fsdp_size))

    return jax.tree.map(one, paths, abstract_state)


def host_local_batch_size(global_batch: int) -> int:
    return global_batch // jax.process_count()


def process_rows(mesh, global_batch: int) -> slice:
    """Rows of the global batch that this process's devices hold under `batch_sharding`.

    Host-made per-row inputs (iBOT masks) must be sliced with this, not with
    `process_index * local_batch`: the mesh decides where a process's rows sit.
    Raises DistributedError when they are not one contiguous block (a mesh whose
    device order interleaves processes), since a process's data is contiguous.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = sorted({idx[0].indices(global_batch)[:2] for idx in index_map.values()})
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(stop - start for start, stop in starts)
    if covered != hi - lo:
        raise DistributedError(
            f"process {jax.process_index()} holds batch rows {starts}, not one contiguous block; "
            "order the mesh devices process by process"
        )
    return slice(lo, hi)


def to_global_batch(local_batch: dict, mesh) -> dict:
    """This process's part of the batch -> global jax.Arrays split on the batch axis.

    A value is a numpy array of this process's rows, or a list of its rows (each
    [...]). A list is sent row by row, never copied into one host buffer (see
    `pipeline.collate`), and arrives as a tuple of "row positions" (`_rows_to_global`):
    the step joins them with `join_rows`.
    """
    sharding = batch_sharding(mesh)
    return {
        k: _rows_to_global(v, sharding, mesh) if isinstance(v, list)
        else jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def _rows_to_global(rows: list, sharding, mesh) -> tuple[jax.Array, ...]:
    """Rows -> tuple of r global arrays [shards, ...]: position i holds row i of every device's block.

    Every device holds a block of r rows of the global batch; row i of each block goes
    into position i, one row per device. Each row is its own host-to-device copy, and
    nothing runs on the devices until the step joins the positions (`join_rows`).
    Why not stack them on the device first: that stack would be a computation of its
    own, queued on the compute stream after the running step and before the next one.
    The copies it waits for wait in turn for the running step (the runtime orders
    them after the compute stream), so the device would idle for the whole transfer,
    ~15 ms a step for 1080 px fields (docs/BENCHMARKS.md, input). Joined inside the
    step, the copies overlap the step before.
    """
    n = len(rows) * jax.process_count()
    shape = tuple(rows[0].shape)
    first = process_rows(mesh, n).start  # global row of rows[0]
    blocks = sharding.addressable_devices_indices_map((n,) + shape)
    per_device = sharding.shard_shape((n,) + shape)[0]
    devices, starts = list(blocks), [idx[0].indices(n)[0] - first for idx in blocks.values()]
    positions = []
    for i in range(per_device):
        shards = jax.device_put([rows[start + i][None] for start in starts], devices)
        positions.append(jax.make_array_from_single_device_arrays((n // per_device,) + shape, sharding, shards))
    return tuple(positions)


def join_rows(value):
    """A batch value as one [B, ...] array: `value` itself, or the row positions of
    `to_global_batch` joined back into the batch's row order (inside the jitted step)."""
    if not isinstance(value, tuple):
        return value
    stacked = jax.numpy.stack(value, axis=1)  # [shards, rows per shard, ...]: shard d's block in order
    return stacked.reshape((-1,) + stacked.shape[2:])


# ----------------------------------------------------------------------------- multi-host


@dataclasses.dataclass(frozen=True)
class Launch:
    """Who this process is in a multi-process job, as handed to jax.distributed.initialize.

    A None field is left to JAX's own cluster detection; `local_device_ids`
    None means every accelerator of the host is this process's.
    """

    launcher: str  # "explicit" (config / JAX_* variables), "slurm" or "openmpi"
    coordinator_address: str | None
    num_processes: int
    process_id: int | None
    local_device_ids: tuple[int, ...] | None


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def _device_ids(spec: str, what: str) -> tuple[int, ...] | None:
    spec = spec.strip()
    if not spec:
        return None
    try:
        return tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise DistributedError(f"{what}={spec!r} is not a comma-separated list of device ids") from None


def _slurm_first_host(nodelist: str) -> str:
    """First host name of a SLURM node list: 'gpu[003-010,012],cpu1' -> 'gpu003'."""
    head = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist.strip())
    prefix, ranges = head.group(1), head.group(3)
    if not prefix and not ranges:
        raise DistributedError(f"SLURM_STEP_NODELIST={nodelist!r}: no host name in it")
    return prefix + (re.split(r"[,-]", ranges)[0] if ranges else "")


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    """Tasks of this step on this node, from SLURM_STEP_TASKS_PER_NODE ('4(x2),3') and SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    counts = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = _int_env(env, "SLURM_NODEID") or 0
    return counts[node] if node < len(counts) else None


def _one_visible_gpu(env: Mapping[str, str]) -> bool:
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    return bool(visible) and "," not in visible


def detect_launch(config, env: Mapping[str, str] | None = None) -> Launch | None:
    """This process's place in a multi-process launch, or None when it runs alone.

    Precedence: `distributed.*` config keys, then `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (Kubernetes, hand-made launches), then
    a SLURM `srun` step (SLURM_STEP_NODELIST and SLURM_PROCID; a batch script
    run without srun is one process), then Open MPI's `mpirun`. With several
    tasks on a node each process takes the GPU of its local rank; with one task
    per node it takes all of them (JAX's own detection would take only GPU 0).
    """
    env = os.environ if env is None else env
    d = config.distributed
    address = d.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
    count = int(d.num_processes) if d.num_processes > 0 else _int_env(env, "JAX_NUM_PROCESSES")
    pid = int(d.process_id) if d.process_id >= 0 else _int_env(env, "JAX_PROCESS_ID")
    local_ids = _device_ids(d.local_device_ids, "config.distributed.local_device_ids")
    if local_ids is None:
        local_ids = _device_ids(env.get("JAX_LOCAL_DEVICE_IDS", ""), "JAX_LOCAL_DEVICE_IDS")

    if count is not None and count <= 1:
        return None
    if address and count is not None and pid is not None:
        launch = Launch("explicit", address, count, pid, local_ids)
    elif "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env:
        count = count or _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS")
        if not count or count <= 1:
            return None
        if not address:
            # Same rule on every task: the first node, a port derived from the job id
            # (JAX_COORDINATOR_PORT overrides it) so concurrent jobs do not collide.
            port = env.get("JAX_COORDINATOR_PORT") or str(
                (_int_env(env, "SLURM_JOB_ID") or 0) % 4096 + 61440)
            address = f"{_slurm_first_host(env['SLURM_STEP_NODELIST'])}:{port}"
        pid = _int_env(env, "SLURM_PROCID") if pid is None else pid
        if local_ids is None and (_slurm_tasks_on_node(env) or 1) > 1 and not _one_visible_gpu(env):
            local_ids = (_int_env(env, "SLURM_LOCALID") or 0,)
        launch = Launch("slurm", address, count, pid, local_ids)
    elif _int_env(env, "OMPI_COMM_WORLD_SIZE"):
        count = count or _int_env(env, "OMPI_COMM_WORLD_SIZE")
        if count <= 1:
            return None
        pid = _int_env(env, "OMPI_COMM_WORLD_RANK") if pid is None else pid
        local_size = _int_env(env, "OMPI_COMM_WORLD_LOCAL_SIZE") or 1
        if local_ids is None and local_size > 1 and not _one_visible_gpu(env):
            local_ids = (_int_env(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0,)
        # The coordinator comes from mpirun's URI through JAX's detection when not given.
        launch = Launch("openmpi", address or None, count, pid, local_ids)
    elif address or count is not None or pid is not None:
        missing = [name for name, value in (("coordinator_address", address), ("num_processes", count),
                                            ("process_id", pid)) if value in ("", None)]
        raise DistributedError(
            f"multi-process launch is missing {missing}: set config.distributed.<key> or the "
            "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables together"
        )
    else:
        return None
    if launch.process_id is not None and not 0 <= launch.process_id < launch.num_processes:
        raise DistributedError(
            f"{launch.launcher} launch: process_id={launch.process_id} is not in "
            f"[0, num_processes={launch.num_processes})"
        )
    return launch


MEMORY_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# jaxlib 0.11.2's preallocated GPU pool is spatially partitioned by default: the free space past
# the last buffer (the "central gap") is kept for collective memory and served only when no
# binned free block fits. A batch transferred while a step's temporaries are placed lands past
# them; once they are freed, the next allocations (the step's outputs, the next batch's fields)
# take their first bytes from the block they left, and the next step's temporaries no longer fit
# in it. With batch 128 (48 GiB of temporaries) on an 80 GB GPU's pool that failed after the
# first step while 69 GiB were free (docs/BENCHMARKS.md, thirteenth session). Without the
# partitioning, best fit takes small allocations from the smallest free block that fits (there,
# the space past the buffers), and the temporaries' block stays whole.
SPATIAL_PARTITIONING_FLAG = "xla_gpu_enable_allocator_spatial_partitioning"
_SPATIAL_PARTITIONING_SINCE = (0, 11, 2)  # earlier XLAs abort on the unknown flag
# XLA's Triton GEMM fusions off: cuBLAS then runs every matmul of the step. The DINOCell step on
# an H200 at batch 64: +7.8% images/s in one call (391.5 -> 422.2) and 1.5 GiB less
# (docs/BENCHMARKS.md, nineteenth session). Which matmuls had gone to Triton, and why they were
# slower there, was not measured.
TRITON_GEMM_FLAG = "xla_gpu_enable_triton_gemm"


def _add_xla_flag(env: MutableMapping[str, str], name: str, value: str) -> None:
    """Appends `--name=value` to `XLA_FLAGS` unless the flag is there already (the user's choice)."""
    flags = env.get("XLA_FLAGS", "")
    if not re.search(rf"--{name}(=|\s|$)", flags):
        env["XLA_FLAGS"] = f"{flags} --{name}={value}".strip()


def configure_gpu_backend(config, env: MutableMapping[str, str] | None = None,
                          jaxlib_version: tuple[int, ...] | None = None) -> None:
    """Sets up JAX's GPU backend before the first JAX call that starts one.

    - `train.device_memory_fraction` of each GPU's memory for the pool
      (`XLA_PYTHON_CLIENT_MEM_FRACTION`; JAX's own default is 0.75).
    - The pool without spatial partitioning (`--xla_gpu_enable_allocator_spatial_partitioning=false`
      in `XLA_FLAGS`, on the jaxlib versions that know the flag), so that a step's temporaries
      get their block back every step.
    - Unless `train.triton_gemm`, no Triton GEMM fusions (`--xla_gpu_enable_triton_gemm=false`):
      cuBLAS runs every matmul.

    A fraction already in the environment, or any of these flags already in `XLA_FLAGS` (either
    value), is the user's choice and is kept. The CPU backend ignores all of them.
    """
    env = os.environ if env is None else env
    fraction = config.train.device_memory_fraction
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"config.train.device_memory_fraction: {fraction} must be in (0, 1]")
    env.setdefault(MEMORY_FRACTION_ENV, str(fraction))
    if jaxlib_version is None:
        from jaxlib.version import __version_info__ as jaxlib_version
    if jaxlib_version >= _SPATIAL_PARTITIONING_SINCE:
        _add_xla_flag(env, SPATIAL_PARTITIONING_FLAG, "false")
    if not config.train.triton_gemm:
        _add_xla_flag(env, TRITON_GEMM_FLAG, "false")


def initialize(config, env: Mapping[str, str] | None = None) -> Launch | None:
    """Joins the multi-process job this process belongs to; a no-op for one process.

    Calls jax.distributed.initialize once, with the `distributed.*` timeouts:
    a process that cannot reach the coordinator within `initialization_timeout`
    seconds aborts (so does every other one), and a process that stops sending
    heartbeats for `heartbeat_timeout` seconds brings the others down. On CPU
    the cross-process collectives are `distributed.cpu_collectives` (gloo).
    Returns the Launch used (None when alone).
    """
    launch = detect_launch(config, env)
    if launch is None:
        return None
    if jax.distributed.is_initialized():
        return launch
    d = config.distributed
    try:
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    except AttributeError:  # a JAX without the option has only one CPU collectives backend
        pass
    detection = "deactivate" if launch.launcher in ("explicit", "slurm") else None
    log.info(
        "process %s of %d (%s launch): connecting to coordinator %s, local devices %s, "
        "timeouts: initialization %ds, heartbeat %ds",
        launch.process_id, launch.num_processes, launch.launcher, launch.coordinator_address,
        "all" if launch.local_device_ids is None else list(launch.local_device_ids),
        d.initialization_timeout, d.heartbeat_timeout,
    )
    jax.distributed.initialize(
        coordinator_address=launch.coordinator_address,
        num_processes=launch.num_processes,
        process_id=launch.process_id,
        local_device_ids=None if launch.local_device_ids is None else list(launch.local_device_ids),
        cluster_detection_method=detection,
        initialization_timeout=int(d.initialization_timeout),
        heartbeat_timeout_seconds=int(d.heartbeat_timeout),
        shutdown_timeout_seconds=int(d.shutdown_timeout),
    )
    log.info("process %d of %d joined: %d devices in all, %d here", jax.process_index(),
             jax.process_count(), jax.device_count(), jax.local_device_count())
    return launch


_barrier_count = 0


def barrier(name: str, timeout_s: float) -> None:
    """Waits until every process reaches barrier `name`; no-op for one process.

    Raises DistributedError naming the barrier when some process has not arrived
    after `timeout_s` seconds (it failed, or it is stuck elsewhere). Every
    process must pass the same names in the same order.
    """
    global _barrier_count
    if jax.process_count() == 1:
        return
    _barrier_count += 1
    barrier_id = f"dinocell:{name}:{_barrier_count}"
    from jax._src import distributed  # the client's barrier is the one with a timeout

    client = distributed.global_state.client
    if client is None:  # processes started by something other than jax.distributed
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(barrier_id)
        return
    try:
        client.wait_at_barrier(barrier_id, int(timeout_s * 1000))
    except Exception as e:  # the client raises XlaRuntimeError (DEADLINE_EXCEEDED, ...)
        raise DistributedError(
            f"barrier {name!r}: not every one of the {jax.process_count()} processes arrived within "
            f"{timeout_s:.0f} s (config.distributed.barrier_timeout); see the other processes' logs: {e}"
        ) from e


def shutdown() -> None:
    """Leaves the distributed runtime (after the last collective); no-op when not initialised."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
