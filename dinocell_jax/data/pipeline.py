"""The host input pipeline: a field source by `config.data.source`, and a grain
iterator of this process's batches with checkpointable state.

    source (random access: synthetic, loaddata:, folder:, tfds:)
      -> index range -> seeded shuffle (a new order each epoch) -> repeat
      -> this process's share (every process_count-th index)
      -> read + decode (grain threads, and worker processes when data.num_workers > 0)
      -> main process: drop unreadable fields (counted, logged), collate batches

Skipping happens in the main process on records that carry their error, so the
counters hold whatever the number of workers, and the grain iterator state after
a batch is exactly "these indices consumed": `get_state()` after N batches and
`set_state()` on a fresh iterator continue with batch N+1 as an uninterrupted
run would (same data.num_workers required, grain interleaves workers' outputs).

TensorFlow is never imported here (tfds' ArrayRecord reader does not need it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
import pandas as pd

from dinocell_jax.data import field_slots
from dinocell_jax.data.sources import (
    META,
    DataError,
    FieldSource,
    FileReader,
    ReadError,
    channel_list,
    crop_or_pad,
    finish_field,
    holdout_mask,
    read_loaddata,
    scan_folder,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "holdout")


# ----------------------------------------------------------------------------- sources


class SyntheticSource:
    """`SyntheticCellPainting` fields through the same finishing as real ones.

    Fields are drawn at data.field_size x data.downscale, so that the downscale
    (if any) runs as it does for microscope fields.
    """

    def __init__(self, data_cfg, seed: int, indices: np.ndarray):
        from dinocell_jax.data.synthetic import SyntheticCellPainting

        self.data_cfg = data_cfg
        self.generator = SyntheticCellPainting(
            num_fields=int(data_cfg.num_fields),
            field_size=int(data_cfg.field_size) * max(1, int(data_cfg.downscale)),
            n_phenotypes=int(data_cfg.n_phenotypes),
            n_plates=int(data_cfg.n_plates),
            seed=int(seed),
            phenotypes=str(data_cfg.phenotypes),
        )
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        raw = self.generator[int(self.indices[int(i)])]
        field, low, high = finish_field(raw["field"], self.data_cfg)
        record = {"field": field, "norm_low": low, "norm_high": high, "label": int(raw["label"])}
        for k in META:
            record[k] = str(raw[k])
        return record


class TfdsSource:
    """A prepared TFDS dataset (ArrayRecord) read with `tfds.data_source`, no TensorFlow."""

    def __init__(self, name: str, split: str, data_cfg):
        import tensorflow_datasets as tfds

        from dinocell_jax.data import tfds_builders  # noqa: F401  registers our builders

        self.data_cfg = data_cfg
        data_dir = data_cfg.tfds_data_dir or None
        try:
            self.data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            raise DataError(
                f"data.source tfds:{name}: cannot open split {split!r} under data.tfds_data_dir={data_dir!r} "
                f"({type(e).__name__}: {e}); prepare it with `python -m dinocell_jax.data.tfds_builders`"
            ) from e

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        ex = self.data[int(i)]
        field = np.asarray(ex["field"], np.uint16)
        if field.shape[-1] != int(self.data_cfg.field_size) or field.shape[-2] != int(self.data_cfg.field_size):
            field = crop_or_pad(field, int(self.data_cfg.field_size))
        record = {
            "field": field,
            "norm_low": np.asarray(ex["norm_low"], np.float32),
            "norm_high": np.asarray(ex["norm_high"], np.float32),
            "label": int(ex["label"]),
        }
        for k in META:
            v = ex[k]
            record[k] = v.decode() if isinstance(v, bytes) else str(v)
        return record


def _split_rows(meta: pd.DataFrame, data_cfg, split: str, what: str) -> np.ndarray:
    held = holdout_mask(meta, float(data_cfg.holdout), str(data_cfg.holdout_by))
    rows = np.flatnonzero(held if split == "holdout" else ~held)
    if len(rows) == 0:
        raise DataError(
            f"{what}: the {split!r} split is empty (data.holdout={data_cfg.holdout}, "
            f"data.holdout_by={data_cfg.holdout_by!r}, {len(meta)} fields)"
        )
    return rows


def field_table(data_cfg):
    """(table, channels, reader) of a `loaddata:` or `folder:` source, labels joined (column `label`)."""
    kind, _, arg = str(data_cfg.source).partition(":")
    reader = FileReader.from_config(data_cfg)
    if kind == "loaddata":
        channels = channel_list(data_cfg, by_name=True)
        table = read_loaddata(arg, channels, reader, illumination=bool(data_cfg.illumination),
                              path_remap=str(data_cfg.path_remap))
    elif kind == "folder":
        channels = channel_list(data_cfg)
        table = scan_folder(arg, channels, reader)
    else:
        raise DataError(f"data.source={data_cfg.source!r}: expected synthetic, loaddata:<table>, folder:<dir> or tfds:<name>")
    if data_cfg.labels_csv:
        from dinocell_jax.data.labels import join_labels

        ids, _ = join_labels(table, str(data_cfg.labels_csv), str(data_cfg.label_column), reader)
    else:
        ids = np.full(len(table), -1, np.int32)
    table["label"] = ids
    return table, channels, reader


def make_source(config, split: str = "train"):
    """Random access to one split's fields: `len(s)`, `s[i] -> record`.

    Record: `field` uint16 [C, S, S] (S = data.field_size: the field after the
    optional integer downscale, centre-cropped or mirror-padded to S), `norm_low`,
    `norm_high` float32 [C] (normalize.intensity_bounds of the whole field before
    the crop), `label` int (-1 unknown), `source`, `batch`, `plate`, `well`,
    `site` str. `s[i]` raises ReadError naming the path when the field cannot be read.
    The held-out split takes data.holdout of the plates (data.holdout_by).
    """
    if split not in SPLITS:
        raise DataError(f"make_source: split {split!r} is not one of {SPLITS}")
    d = config.data
    kind, _, arg = str(d.source).partition(":")
    if kind == "synthetic":
        from dinocell_jax.data.synthetic import SyntheticCellPainting

        probe = SyntheticCellPainting(int(d.num_fields), 8, int(d.n_phenotypes), int(d.n_plates), int(config.seed))
        meta = pd.DataFrame([probe.metadata(i) for i in range(len(probe))]).astype({"site": str})
        return SyntheticSource(d, int(config.seed), _split_rows(meta, d, split, "data.source=synthetic"))
    if kind == "tfds":
        if not arg:
            raise DataError("data.source tfds:<name>: no dataset name (jump_cellpainting or synthetic_cells)")
        return TfdsSource(arg, split, d)
    table, channels, reader = field_table(d)
    rows = _split_rows(table, d, split, f"data.source={d.source}")
    sub = table.iloc[rows].reset_index(drop=True)
    return FieldSource(sub, channels, d, reader, labels=sub["label"].to_numpy())


# ----------------------------------------------------------------------------- iterator


class ReadField:
    """index -> record, or {'error': message, 'index': i} when the field is unreadable.

    A top-level class so grain can pickle it into spawned workers.
    """

    def __init__(self, source):
        self.source = source

    def __call__(self, index: int) -> dict:
        try:
            record = self.source[int(index)]
        except ReadError as e:
            return {"error": str(e), "index": int(index)}
        # In a worker the field goes into a shared-memory slot: the trainer gets its reference.
        record["field"] = field_slots.hand_off(record["field"])
        return record


def _check_fields(records: list[dict]) -> list[np.ndarray]:
    """The records' fields, naming the field whose shape or type differs from the first."""
    first = records[0]["field"]
    for r in records:
        if r["field"].shape != first.shape or r["field"].dtype != first.dtype:
            where = "/".join(str(r.get(k, "?")) for k in ("plate", "well", "site"))
            raise DataError(f"field {where} is {r['field'].dtype}{list(r['field'].shape)}, the batch's first "
                            f"is {first.dtype}{list(first.shape)}: every field of a batch must have one shape")
    return [r["field"] for r in records]


def collate(records: list[dict], stack_fields: bool = True) -> dict:
    """Records -> batch: field [b,C,H,W] uint16, norm_low/high [b,C] float32, label [b] int32, metadata [b] str.

    With `stack_fields=False`, `field` is the list of the b [C,H,W] fields as they
    arrived: `parallel.to_global_batch` sends each to its device, and the step joins them.
    At 1080 px a batch of 64 is 746 MB; stacking it on the host is one more pass
    over fresh memory on the thread that feeds the step (page faults included,
    0.3-0.65 s on the H100 host, longer than the step).
    """
    fields = _check_fields(records)
    batch = {
        "field": np.stack(fields) if stack_fields else fields,
        "norm_low": np.stack([r["norm_low"] for r in records]).astype(np.float32),
        "norm_high": np.stack([r["norm_high"] for r in records]).astype(np.float32),
        "label": np.asarray([r["label"] for r in records], np.int32),
    }
    for k in META:
        batch[k] = np.asarray([r[k] for r in records], dtype=str)
    return batch


class DataIterator:
    """This process's batches; `get_state`/`set_state` for exact resume; `stats` counters."""

    def __init__(self, dataset, batch_size: int, *, max_failure_fraction: float, failure_check_after: int,
                 stack_fields: bool = True):
        self._dataset = dataset
        self._it = iter(dataset)
        self.batch_size = int(batch_size)
        self.stack_fields = bool(stack_fields)
        self.max_failure_fraction = float(max_failure_fraction)
        self.failure_check_after = int(failure_check_after)
        self._read = 0
        self._skipped = 0
        self._wait_s = 0.0
        self._collate_s = 0.0
        self._last_error = ""
        self._slots = field_slots.TrainerSlots()  # the workers' fields, mapped once per slot

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        records = []
        while len(records) < self.batch_size:
            start = time.perf_counter()
            try:
                record = next(self._it)
            except StopIteration:
                # A partial last batch is dropped: every batch has the same shape.
                self._check_failures(final=True)
                raise
            finally:
                self._wait_s += time.perf_counter() - start
            if "error" in record:
                self._skipped += 1
                self._last_error = record["error"]
                log.warning("skipped field %d: %s", record["index"], record["error"])
                self._check_failures(final=False)
                continue
            self._read += 1
            if isinstance(record["field"], field_slots.SlotRef):
                record["field"] = self._slots.attach(record["field"])
            records.append(record)
        start = time.perf_counter()
        batch = collate(records, self.stack_fields)
        self._collate_s += time.perf_counter() - start
        return batch

    def _check_failures(self, final: bool) -> None:
        total = self._read + self._skipped
        if total == 0 or (not final and total < self.failure_check_after):
            return
        if self._skipped > self.max_failure_fraction * total:
            raise DataError(
                f"{self._skipped} of {total} fields ({100 * self._skipped / total:.1f}%) could not be read, "
                f"more than data.max_failure_fraction={self.max_failure_fraction}; last error: {self._last_error}. "
                "Fix or remove the bad files (each one is logged above), or raise data.max_failure_fraction."
            )

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: grain's iterator state (one per process) and the counters."""
        return {
            "grain": self._it.get_state(),
            "fields_read": self._read,
            "fields_skipped": self._skipped,
        }

    def set_state(self, state: dict[str, Any] | str | bytes) -> None:
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if "grain" not in state:
            raise DataError(f"data iterator state has no 'grain' entry; keys: {sorted(state)}")
        self._it.set_state(state["grain"])
        self._slots.close()  # the workers before the restore do not send again
        self._read = int(state.get("fields_read", 0))
        self._skipped = int(state.get("fields_skipped", 0))

    def close(self) -> None:
        """Stops grain's worker processes and threads now rather than at garbage collection."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._slots.close()

    def stats(self) -> dict[str, float]:
        """Counters since the start of the run (the field counts are restored with the state);
        wait_s: time spent waiting for fields, collate_s: collating them into batches."""
        return {
            "fields_read": self._read,
            "fields_skipped": self._skipped,
            "wait_s": self._wait_s,
            "collate_s": self._collate_s,
        }


def make_iterator(config, split: str = "train", *, seed: int, process_index: int | None = None,
                  process_count: int | None = None, num_epochs: int | None = None,
                  shuffle: bool = True, source=None, stack_fields: bool = True) -> DataIterator:
    """Batches of this process: dict of numpy arrays (see `collate`, also for
    `stack_fields`), batch_size = train.batch_size // process_count.

    Shuffling is seeded and differs per epoch; epochs repeat forever unless
    `num_epochs`. The shuffled stream is cut into global batches and process p
    reads rows [p*b, (p+1)*b) of each, so P processes together build exactly the
    global batch one process would (the step's crops, masks and KoLeo groups
    follow the row), reading disjoint fields that cover each epoch (with
    `num_epochs`, the stream is cut to whole global batches). `source` overrides
    make_source(config, split).

    Reading runs on data.read_threads threads, in the trainer process or, with
    data.num_workers > 0, in each worker process; about data.prefetch batches of
    fields are buffered in all.
    """
    import grain

    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"make_iterator: process_index={process_index} not in [0, process_count={process_count})")
    d = config.data
    batch = int(config.train.batch_size)
    if batch % process_count:
        raise DataError(f"train.batch_size={batch} is not divisible by the {process_count} processes")
    local_batch = batch // process_count
    source = make_source(config, split) if source is None else source
    n = len(source)
    if n == 0:
        raise DataError(f"data.source={d.source!r}: split {split!r} has no field")

    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = ds.shuffle(seed=int(seed))
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        total = n * int(num_epochs)
        ds = ds[: total - total % batch]
    # Row j of this process's part of every global batch is one strided slice; mixing
    # the b slices round-robin yields the rows in order.
    first = process_index * local_batch
    ds = grain.MapDataset.mix([ds[first + j::batch] for j in range(local_batch)])
    ds = ds.map(ReadField(source))
    threads = max(1, int(d.read_threads))
    workers = int(d.num_workers)
    # Buffered fields per reading process, data.prefetch batches over all of them: a
    # worker's buffer is its own, and 1080 px fields are 11.7 MB each.
    buffered = max(threads, -(-int(d.prefetch) * local_batch // max(1, workers)))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffered))
    if workers > 0:
        from absl import flags

        # grain's worker processes read absl flags; a program that did not start through
        # absl.app (tests, notebooks, our CLI) has not parsed them: take their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Fields travel as slot references (field_slots); the records' small arrays
        # (bounds) are cheaper pickled than given a shared-memory segment each.
        it_ds = grain.experimental.WithOptionsIterDataset(
            it_ds, grain.experimental.DatasetOptions(min_shm_size=1 << 20))
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffered),
            worker_init_fn=start_worker,
        )
    return DataIterator(it_ds, local_batch, max_failure_fraction=float(d.max_failure_fraction),
                        failure_check_after=int(d.failure_check_after), stack_fields=stack_fields)


def start_worker(worker_index: int, worker_count: int) -> None:
    """grain worker start-up: below the trainer's priority, fields written to shared-memory slots.

    When the workers' decoding fills every core, the trainer's thread still gets the
    CPU it needs to hand each batch to the devices and dispatch the step on time.
    """
    del worker_index, worker_count
    os.nice(10)
    field_slots.enable()
