"""Reusable shared-memory slots for the fields that grain's worker processes hand to the trainer.

A field crosses from a worker to the trainer through shared memory. A fresh segment
per field, as grain makes them, costs ~9 ms of a worker's time at 1080 px (the
kernel allocates and zeroes 11.7 MB of tmpfs pages, one fault at a time) and again
on the trainer's side (mapping, faulting, unlinking): as much as decoding and
correcting the field itself. So each worker keeps its segments (slots, one field
each) and reuses them: 14 workers on the H100 host's 16 cores went from ~270 to
317-411 fields/s (docs/BENCHMARKS.md, input).

- Worker side (after `enable()`, which grain's worker start-up calls): `new_array`
  gives an array in a free slot of one of the worker's segments (a new segment when
  none is free), marked in use, for a field to be written straight into. `hand_off`
  (pipeline.ReadField, for every source) turns a record's field into the `SlotRef`
  (segment name, shape, dtype) the record carries instead, copying it into a slot
  first if it is not in one: grain pickles that small object. A slot array dropped
  without being handed off (a field that failed after all) frees its slot. Outside
  workers `new_array` is `np.empty` and `hand_off` the identity.
- Trainer side, `TrainerSlots.attach(ref)`: an array view of the slot. Each segment
  is mapped once and its name unlinked at once; the mapping stays while the worker may
  send the slot again. When the view (and whatever aliases it: a CPU jax array, a
  sub-view) is garbage collected, the slot's header byte goes back to free and the
  worker may reuse it. A slot is written by the worker only while free, and read by
  the trainer only while in use: the byte hands it from one side to the other.

Segments a worker made but the trainer never mapped (records in flight when an
iterator closes) are unlinked by multiprocessing's resource tracker at exit, as
grain's own segments are.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import weakref
from multiprocessing import resource_tracker, shared_memory

import numpy as np

HEADER = 64  # bytes before the field: byte 0 says free (0) or in use (1); 64 keeps the data aligned
_FREE, _IN_USE = 0, 1


@dataclasses.dataclass(frozen=True)
class SlotRef:
    """What travels through grain's queue instead of a field: where the trainer finds it."""

    name: str  # shared-memory segment, without the leading "/"
    size: int  # bytes of the segment
    shape: tuple[int, ...]
    dtype: str


class SlotArray(np.ndarray):
    """A worker's array in a slot of one of its segments; `ref` says where the trainer finds it."""

    ref: SlotRef | None = None
    _unsent: weakref.finalize | None = None


class WorkerSlots:
    """One worker process's segments; arrays go into free ones."""

    def __init__(self):
        self._segments: list[shared_memory.SharedMemory] = []

    def new_array(self, shape: tuple[int, ...], dtype) -> SlotArray:
        """An uninitialised array of `shape` in a slot now marked in use."""
        dtype = np.dtype(dtype)
        size = HEADER + math.prod(shape) * dtype.itemsize
        segment = next((s for s in self._segments if s.size == size and s.buf[0] == _FREE), None)
        if segment is None:
            segment = shared_memory.SharedMemory(create=True, size=size)
            self._segments.append(segment)
        segment.buf[0] = _IN_USE
        array = np.ndarray(shape, dtype, buffer=segment.buf, offset=HEADER).view(SlotArray)
        array.ref = SlotRef(segment.name.lstrip("/"), size, tuple(shape), dtype.str)
        array._unsent = weakref.finalize(array, _mark_free, segment.buf)
        return array

    def __len__(self) -> int:
        return len(self._segments)


_worker_slots: WorkerSlots | None = None


def enable() -> None:
    """From now on `new_array` and `hand_off` use this process's slots (grain workers only: the
    trainer process must attach what they hand off, see `TrainerSlots`)."""
    global _worker_slots
    _worker_slots = _worker_slots or WorkerSlots()


def new_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array, in a slot in a worker process."""
    if _worker_slots is None:
        return np.empty(shape, dtype)
    return _worker_slots.new_array(tuple(shape), dtype)


def hand_off(value):
    """In a worker, an array -> the SlotRef of its slot (copied into one first unless it was
    made in one by `new_array`), for the record sent to the trainer, which now owns the slot
    until it drops its view. Outside workers, and for anything but an array, `value` itself."""
    if _worker_slots is None or not isinstance(value, np.ndarray):
        return value
    if not isinstance(value, SlotArray) or value.ref is None:  # a view of a slot array has no ref
        copy = _worker_slots.new_array(value.shape, value.dtype)
        np.copyto(copy, value, casting="no")
        value = copy
    value._unsent.detach()
    return value.ref


class TrainerSlots:
    """The trainer's mappings of the workers' segments, for one data iterator."""

    def __init__(self):
        self._maps: dict[str, mmap.mmap] = {}

    def attach(self, ref: SlotRef) -> np.ndarray:
        """The array of `ref`, read-only; its slot is freed when the array is garbage collected."""
        mapped = self._maps.get(ref.name)
        if mapped is None:
            mapped = self._maps[ref.name] = _map_and_unlink(ref)
        data = np.frombuffer(mapped, np.uint8, ref.size - HEADER, HEADER)
        weakref.finalize(data, _mark_free, mapped)
        array = data.view(np.dtype(ref.dtype)).reshape(ref.shape)
        array.flags.writeable = False
        return array

    def close(self) -> None:
        """Forgets the mappings; each is unmapped once no array of it is left (an mmap
        with arrays on it stays open until they are gone)."""
        self._maps.clear()

    def __len__(self) -> int:
        return len(self._maps)


def _map_and_unlink(ref: SlotRef) -> mmap.mmap:
    # POSIX shared memory is a file under /dev/shm on Linux. A plain mmap of it, unlike
    # multiprocessing's SharedMemory, may be dropped while arrays still view it.
    path = os.path.join("/dev/shm", ref.name)
    fd = os.open(path, os.O_RDWR)
    try:
        mapped = mmap.mmap(fd, ref.size)
    finally:
        os.close(fd)
    # The name is no longer needed: the worker keeps its own mapping. Unlinking it now,
    # and telling the resource tracker (where the worker registered it), leaves nothing
    # in /dev/shm whatever happens to either process later.
    os.unlink(path)
    resource_tracker.unregister("/" + ref.name, "shared_memory")
    return mapped


def _mark_free(buffer) -> None:
    """Byte 0 of a slot (a worker's segment buffer, the trainer's mmap) back to free; a closed one stays as it is."""
    try:
        buffer[0] = _FREE
    except ValueError:  # released memoryview or closed mmap: the process is shutting down
        pass
