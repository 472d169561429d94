"""Devices: the mesh, the shardings of state and batches, and multi-host start-up.

One mesh with a `data` axis (batch) and an `fsdp` axis (batch too, and the
parameters and optimiser state split by the regex rules of `mesh.fsdp_rules`).
With `mesh.fsdp = 1` every parameter is replicated and this is plain data
parallelism.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding

from dinocell_jax.ssl.optim import param_paths

BATCH_AXES = ("data", "fsdp")


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


def to_global_batch(local_batch: dict, mesh) -> dict:
    """Numpy arrays of this process's part of the batch -> global jax.Arrays."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def _launcher_world_size() -> int:
    """Processes of a multi-process launch seen in the environment (1 if none)."""
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JAX_NUM_PROCESSES"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    # Kubernetes JobSet / indexed Job: the pod count is in our config or env.
    return 1


def initialize(config) -> None:
    """jax.distributed.initialize for multi-process launches; a no-op for one process.

    Explicit `distributed.*` config (or JAX_COORDINATOR_ADDRESS) wins; otherwise
    JAX's own cluster detection (SLURM, Open MPI, Kubernetes) fills in the
    coordinator, process count and id.
    """
    d = config.distributed
    explicit = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not explicit and _launcher_world_size() <= 1:
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {"initialization_timeout": int(d.initialization_timeout)}
    if d.coordinator_address:
        kwargs["coordinator_address"] = d.coordinator_address
    if d.num_processes > 0:
        kwargs["num_processes"] = int(d.num_processes)
    if d.process_id >= 0:
        kwargs["process_id"] = int(d.process_id)
    jax.distributed.initialize(**kwargs)
