"""System metrics on the host: accelerator memory, GPU utilisation, host memory,
the time the training loop waits for its input pipeline, and an on-demand profiler trace.

The original spent ~95% of each step waiting for data; `system/data_wait_fraction`
is the number that shows it, and `system/device_starved_fraction` whether the devices
then actually idled.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax

log = logging.getLogger(__name__)

_GB = 1e9


def _device_memory(devices: Sequence[Any]) -> dict[str, float]:
    """Largest in-use / peak / limit over the devices: the fullest device is the one that OOMs.
    Devices without memory statistics (the CPU backend returns None) contribute nothing."""
    used, peak, limit = [], [], []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - unsupported on some backends / non-addressable devices
            stats = None
        if not stats:
            continue
        used.append(stats.get("bytes_in_use", 0))
        peak.append(stats.get("peak_bytes_in_use", 0))
        if "bytes_limit" in stats:
            limit.append(stats["bytes_limit"])
    if not used:
        return {}
    out = {"system/gpu_memory_gb": max(used) / _GB, "system/gpu_memory_peak_gb": max(peak) / _GB}
    if limit:
        out["system/gpu_memory_limit_gb"] = max(limit) / _GB
    return out


class _Nvml:
    """pynvml, initialised once; unavailable (not installed, no driver) stays off quietly."""

    handles: list | None = None

    @classmethod
    def utilization(cls) -> float | None:
        if cls.handles is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                cls.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            except Exception:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, ...
                cls.handles = []
        if not cls.handles:
            return None
        import pynvml

        try:
            rates = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in cls.handles]
        except Exception as e:  # noqa: BLE001
            log.warning("NVML stopped answering (%r); GPU utilisation is no longer logged", e)
            cls.handles = []
            return None
        return sum(rates) / len(rates)


def system_metrics(devices: Sequence[Any]) -> dict[str, float]:
    """Host-side system metrics, all floats.

    Args:
      devices: this process's devices (`jax.local_devices()`).

    Returns:
      `system/gpu_memory_gb`, `system/gpu_memory_peak_gb`, `system/gpu_memory_limit_gb`
      (from `device.memory_stats()`, max over devices; SKIPPED where the backend has
      no memory stats, e.g. CPU, rather than logged as a misleading 0);
      `system/gpu_utilization` (percent, mean over this host's GPUs, via NVML when
      pynvml is importable and a GPU answers); `system/host_memory_gb` (this
      process's resident memory) and `system/host_memory_percent` (whole host).
    """
    import psutil

    out = _device_memory(devices)
    utilization = _Nvml.utilization()
    if utilization is not None:
        out["system/gpu_utilization"] = float(utilization)
    out["system/host_memory_gb"] = psutil.Process().memory_info().rss / _GB
    out["system/host_memory_percent"] = float(psutil.virtual_memory().percent)
    return out


class LoopTimer:
    """Time spent in one part of the training loop's host work.

    `LoopTimer("data_wait")`: the loop waiting for its next batch; `LoopTimer("host_to_device")`:
    handing batches to the devices (on the feeder thread of `data/device_feed.py`). Wrap each
    occurrence in `with timer.timing():`; `pop()` at a log step returns the interval's
    numbers and starts a new interval. Thread-safe: timed on one thread, popped on another.
    """

    def __init__(self, name: str, clock=time.perf_counter):
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._spent = 0.0
        self._count = 0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        t0 = self._clock()
        try:
            yield
        finally:
            with self._lock:
                self._spent += self._clock() - t0
                self._count += 1

    def pop(self) -> dict[str, float]:
        """`system/<name>_s` (mean time per batch, seconds) and `system/<name>_fraction`
        (its share of the interval's wall time); empty when nothing was timed."""
        now = self._clock()
        with self._lock:
            elapsed, spent, count = now - self._start, self._spent, self._count
            self._start, self._spent, self._count = now, 0.0, 0
        if count == 0:
            return {}
        return {f"system/{self.name}_s": spent / count, f"system/{self.name}_fraction": spent / max(elapsed, 1e-12)}


class DeviceStarvation:
    """How often the devices ran dry: `system/device_starved_fraction`.

    The loop dispatches step s while step s - 1 may still run. If step s - 1 had
    already finished when step s was about to be dispatched, the devices sat idle in
    between, however long the loop took (its input, its own host work, launching the
    step). `system/data_wait_fraction` cannot tell this: the loop may wait for its
    batch while the devices are still busy with a queued step. Near 0 is healthy; near
    1 means the devices idle once every step (docs/MONITORING.md says what to look at).
    Observed and popped on the loop's thread only, unlike the feeder's LoopTimer.
    """

    def __init__(self):
        self._steps = 0
        self._starved = 0

    def observe(self, previous_step_done: bool) -> None:
        """Record one dispatch: whether the step before it had already finished."""
        self._steps += 1
        self._starved += bool(previous_step_done)

    def pop(self) -> dict[str, float]:
        """The interval's fraction of dispatches that found the devices idle; empty if none."""
        steps, starved = self._steps, self._starved
        self._steps = self._starved = 0
        return {"system/device_starved_fraction": starved / steps} if steps else {}


class StepTrace:
    """A `jax.profiler` trace of `steps` training steps from step `start` (< 0: none), into `directory`.

    For what the loop's counters cannot say (why the devices starve, which kernels take
    the time): the trace holds the devices' kernels and copies and the host's threads
    (the loop, the feeder, the runtime), with `python` every Python call too, which slows
    Python several-fold. Open `directory` in TensorBoard's profile plugin or its
    `*.trace.json.gz` in Perfetto. The last traced step is waited for before the trace
    stops, so its kernels are in it.
    """

    def __init__(self, directory: str, start: int, steps: int, python: bool = False):
        self._directory = directory
        self._start = int(start)
        self._stop = self._start + int(steps)
        self._python = bool(python)
        self._active = False

    def before_step(self, step: int) -> None:
        if step == self._start and self._start >= 0:
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = int(self._python)
            jax.profiler.start_trace(self._directory, create_perfetto_trace=True, profiler_options=options)
            self._active = True

    def after_step(self, step: int, outputs) -> None:
        if self._active and step + 1 >= self._stop:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        """Ends the trace if one is running (also when the loop leaves early)."""
        if not self._active:
            return
        self._active = False
        if outputs is not None:
            jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
