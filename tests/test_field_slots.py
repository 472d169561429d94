"""Shared-memory slots: a field handed off by a worker is read by the trainer, and its slot reused."""

import gc
import os
import sys

import numpy as np
import pytest

from dinocell_jax.data import field_slots, pipeline

sys.path.insert(0, os.path.dirname(__file__))
from test_pipeline import keys, synthetic_config  # noqa: E402


@pytest.fixture
def worker(monkeypatch):
    """This process acting as a grain worker (its own slots), and the trainer's side beside it."""
    slots = field_slots.WorkerSlots()
    monkeypatch.setattr(field_slots, "_worker_slots", slots)
    return slots


def test_outside_workers_arrays_are_plain_and_hand_off_is_the_identity():
    assert field_slots._worker_slots is None
    a = field_slots.new_array((2, 3), np.uint16)
    assert type(a) is np.ndarray and field_slots.hand_off(a) is a


def test_a_handed_off_field_reaches_the_trainer_and_its_slot_is_reused_once_dropped(worker):
    trainer = field_slots.TrainerSlots()
    field = field_slots.new_array((5, 8, 8), np.uint16)
    field[:] = np.arange(320, dtype=np.uint16).reshape(5, 8, 8)
    ref = field_slots.hand_off(field)
    del field
    assert isinstance(ref, field_slots.SlotRef) and ref.shape == (5, 8, 8)

    view = trainer.attach(ref)
    np.testing.assert_array_equal(view, np.arange(320).reshape(5, 8, 8))
    assert not view.flags.writeable
    assert not os.path.exists(os.path.join("/dev/shm", ref.name))  # unlinked once mapped

    # While the trainer holds the view (or a part of it), the slot is not reused.
    part = view[2]
    del view
    second = field_slots.hand_off(field_slots.new_array((5, 8, 8), np.uint16))
    assert second.name != ref.name and len(worker) == 2

    # Once dropped, the next field of that size goes into the first free slot again.
    del part
    gc.collect()
    third = field_slots.hand_off(field_slots.new_array((5, 8, 8), np.uint16))
    assert third.name == ref.name and len(worker) == 2
    assert trainer.attach(third).shape == (5, 8, 8) and len(trainer) == 1  # mapped once
    trainer.close()


def test_a_slot_array_dropped_without_hand_off_frees_its_slot(worker):
    first = field_slots.new_array((4, 4), np.uint16)
    name = first.ref.name
    del first  # e.g. the field failed after its slot was taken
    gc.collect()
    again = field_slots.new_array((4, 4), np.uint16)
    assert again.ref.name == name and len(worker) == 1


def test_hand_off_copies_a_plain_array_into_a_slot(worker):
    plain = np.arange(12, dtype=np.uint16).reshape(3, 4)
    ref = field_slots.hand_off(plain)
    assert isinstance(ref, field_slots.SlotRef) and len(worker) == 1
    view = field_slots.TrainerSlots().attach(ref)  # held: its slot stays in use
    np.testing.assert_array_equal(view, plain)
    in_slot = field_slots.new_array((3, 4), np.uint16)
    assert field_slots.hand_off(in_slot) == in_slot.ref and len(worker) == 2  # no copy of its own


def test_worker_processes_reuse_their_slots():
    # 2 workers, 40 fields: the trainer maps only as many segments as are in flight at once,
    # and each field is the one an in-process reader makes.
    c = synthetic_config(num_workers=2, num_fields=40)
    it = pipeline.make_iterator(c, seed=5, process_index=0, process_count=1, stack_fields=False)
    reference = pipeline.make_iterator(synthetic_config(num_fields=40), seed=5, process_index=0, process_count=1)
    expected = {}
    for _ in range(10):
        batch = next(reference)
        expected.update(zip(keys(batch), batch["field"]))
    seen = 0
    for _ in range(10):
        batch = next(it)
        for k, field in zip(keys(batch), batch["field"]):
            np.testing.assert_array_equal(field, expected[k])
            seen += 1
        del batch, field
    assert seen == 40 and 0 < len(it._slots) < 20, len(it._slots)
    it.close()
    reference.close()
