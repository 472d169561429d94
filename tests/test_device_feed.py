"""DeviceFeed: batches in order, a checkpoint state of the consumed batch (not the prefetched), errors raised."""

import threading
import time

import pytest

from dinocell_jax.data.device_feed import DeviceFeed
from dinocell_jax.data.sources import DataError
from dinocell_jax.monitor.system import LoopTimer


class CountingIterator:
    """Host batches 0, 1, 2, ...; state = batches read; fails at batch `fail_at`."""

    def __init__(self, fail_at=None):
        self.read, self.fail_at, self.closed = 0, fail_at, False

    def __next__(self):
        if self.read == self.fail_at:
            raise DataError("field P1/A01/1 cannot be read")
        self.read += 1
        return {"index": self.read - 1}

    def get_state(self):
        return {"read": self.read}

    def stats(self):
        return {"fields_read": self.read}

    def close(self):
        self.closed = True


def wait_until(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_batches_come_in_order_and_the_state_is_that_of_the_last_one_taken():
    data = CountingIterator()
    feed = DeviceFeed(data, lambda host, step: (host["index"], step, threading.current_thread().name),
                      first_step=10, depth=2, timer=LoopTimer("host_to_device"))
    assert feed.get_state() == {"read": 0}
    wait_until(lambda: data.read >= 3)  # the feeder runs ahead: 2 queued, 1 waiting to be queued
    time.sleep(0.05)
    assert data.read == 3
    assert feed.get_state() == {"read": 0}  # nothing consumed yet
    assert next(feed) == (0, 10, "device-feed")  # made on the feeder's thread, with its step
    assert feed.get_state() == {"read": 1}
    assert [next(feed)[:2] for _ in range(3)] == [(1, 11), (2, 12), (3, 13)]
    assert feed.get_state() == {"read": 4}
    feed.close()
    assert data.closed and not feed._thread.is_alive()


def test_a_data_error_reaches_the_loop_after_the_good_batches():
    feed = DeviceFeed(CountingIterator(fail_at=2), lambda host, step: host["index"], first_step=0,
                      depth=4, timer=LoopTimer("host_to_device"))
    assert [next(feed), next(feed)] == [0, 1]
    for _ in range(2):  # and again on every later call
        with pytest.raises(DataError, match="P1/A01/1"):
            next(feed)
    assert feed.get_state() == {"read": 2}
    feed.close()
