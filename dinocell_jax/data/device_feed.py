"""The training loop's input: the next batches already on the devices.

A thread takes each host batch from the data iterator and hands it to the
devices (`make_batch`: masks, transfer) while the step before it runs,
so the loop's own thread only dispatches steps and reports. On 1080 px fields the
transfer alone is ~0.08 s of CPU per batch of 64 on the H100 host; done on the
loop's thread it adds to the loop's host time per step, and the loop falls behind
the device (docs/BENCHMARKS.md, input).

Checkpoints save `get_state()`: the data iterator's state after the last batch
the loop took, not after the ones prefetched, so a resumed run continues with
the batch the interrupted run would have trained on next.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from dinocell_jax.monitor.system import LoopTimer

_POLL_S = 0.1  # how often a blocked feeder looks for close()
_CLOSE_TIMEOUT_S = 60.0


class DeviceFeed:
    """`next(feed)` -> the batch of the next step, put on the devices `depth` steps ahead.

    Args:
      data_iter: a `pipeline.DataIterator` (host batches, `get_state`, `stats`, `close`).
      make_batch: (host batch, step) -> the step's device batch.
      first_step: the step of the first batch.
      depth: batches on the devices ahead of the loop (each holds its fields in device memory).
      timer: times `make_batch` (the transfer), on the feeder's thread.
    """

    def __init__(self, data_iter, make_batch: Callable[[dict, int], dict], first_step: int,
                 depth: int, timer: LoopTimer):
        self._data_iter = data_iter
        self._make_batch = make_batch
        self._timer = timer
        self._state = data_iter.get_state()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._feed, args=(int(first_step),), name="device-feed",
                                        daemon=True)
        self._thread.start()

    def _feed(self, step: int) -> None:
        try:
            while not self._closed.is_set():
                host = next(self._data_iter)
                state = self._data_iter.get_state()  # as of this batch, for a checkpoint after its step
                with self._timer.timing():
                    batch = self._make_batch(host, step)
                self._put((batch, state))
                step += 1
        except BaseException as e:  # StopIteration and data errors too: raised by the loop's next()
            self._put(e)

    def _put(self, item) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put(item)  # every later call raises it too
            raise item
        batch, self._state = item
        return batch

    def get_state(self) -> dict:
        """The data iterator's state after the last batch `next` returned."""
        return self._state

    def stats(self) -> dict[str, float]:
        return self._data_iter.stats()

    def close(self) -> None:
        """Stops the feeder thread, then the data iterator's workers."""
        self._closed.set()
        self._thread.join(timeout=_CLOSE_TIMEOUT_S)  # it finishes the batch it is reading, if any
        self._data_iter.close()
