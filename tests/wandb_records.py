"""Reads wandb's offline run files (`run-<id>.wandb`) back, for tests.

wandb no longer ships a Python reader (`wandb.sdk.internal.datastore` is gone), and
its writer is the Go core, so the tests read the format themselves. The file is a
LevelDB-style log: a 7-byte file header (":W&B", 2 magic bytes, 1 version byte),
then 32 KiB blocks of chunks. A chunk is a 7-byte header (CRC-32 of type+payload,
little-endian uint32; payload length, uint16; type: 1 full, 2 first, 3 middle,
4 last) and its payload; a block tail shorter than a chunk header is zero padding.
Blocks are counted from the start of the file, the file header included. Each
reassembled record is a `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

from wandb.proto import wandb_internal_pb2

FILE_HEADER = b":W&B"
FILE_HEADER_LEN = 7
BLOCK_LEN = 32 * 1024
CHUNK_HEADER_LEN = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class RecordFileError(ValueError):
    """The file is not a wandb run file or is corrupt; the message names the file and offset."""


def _payloads(data: bytes, path: str) -> Iterator[bytes]:
    if data[:4] != FILE_HEADER:
        raise RecordFileError(f"{path}: not a wandb run file (header {data[:7]!r})")
    pos, pending = FILE_HEADER_LEN, None
    while pos < len(data):
        left_in_block = BLOCK_LEN - pos % BLOCK_LEN
        if left_in_block < CHUNK_HEADER_LEN:
            pos += left_in_block
            continue
        if pos + CHUNK_HEADER_LEN > len(data):
            break  # a header cut by a writer still running or killed
        checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:
            pos += left_in_block  # zero fill up to the next block
            continue
        payload = data[pos + CHUNK_HEADER_LEN : pos + CHUNK_HEADER_LEN + length]
        if len(payload) < length:
            break
        if zlib.crc32(bytes([kind]) + payload) != checksum:
            raise RecordFileError(f"{path}: checksum mismatch in the chunk at byte {pos}")
        pos += CHUNK_HEADER_LEN + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = bytearray(payload)
        elif kind in (MIDDLE, LAST):
            if pending is None:
                raise RecordFileError(f"{path}: continuation chunk without a first chunk at byte {pos}")
            pending += payload
            if kind == LAST:
                yield bytes(pending)
                pending = None
        else:
            raise RecordFileError(f"{path}: unknown chunk type {kind} at byte {pos}")


def read_records(path: str | pathlib.Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of one `run-*.wandb` file, in write order."""
    data = pathlib.Path(path).read_bytes()
    for payload in _payloads(data, str(path)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _put(row: dict[str, Any], item) -> None:
    """Media values arrive split over nested keys (["attention/maps", "_type"], ...); nest them again."""
    keys = [item.key] if item.key else list(item.nested_key)
    for key in keys[:-1]:
        row = row.setdefault(key, {})
    row[keys[-1]] = _item_value(item)


def _item_value(item) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if kind == "json":
        return json.loads(item.json)
    if kind == "none" or kind is None:
        return None
    return getattr(item, kind)


@dataclasses.dataclass
class RunRecords:
    """What one offline run file holds, decoded."""

    path: pathlib.Path
    run_id: str
    name: str
    project: str
    group: str
    tags: list[str]
    notes: str
    config: dict[str, Any]
    history: list[dict[str, Any]]  # one dict per wandb.log call
    summary: dict[str, Any]
    metrics: dict[str, str]  # defined metric name (or glob) -> its step metric
    artifacts: list[dict[str, Any]]  # type, name, aliases
    alerts: list[dict[str, str]]

    def values(self, key: str, step_key: str = "training/iteration") -> dict[int, Any]:
        """`key`'s logged values by `step_key` (later rows win)."""
        return {row[step_key]: row[key] for row in self.history if key in row and step_key in row}


def load_run(path: str | pathlib.Path, *, wait_s: float = 15.0) -> RunRecords:
    """Decodes a run file, waiting up to `wait_s` for wandb to finish writing it.

    `run.finish()` returns before wandb's core process has flushed an offline run
    file; the file is complete once its `exit` record is there.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            done = any(r.WhichOneof("record_type") == "exit" for r in read_records(path))
        except RecordFileError:
            done = False
        if done or time.monotonic() > deadline:
            return _decode(path)
        time.sleep(0.1)


def _decode(path: str | pathlib.Path) -> RunRecords:
    run, config, history, summary, metrics, artifacts, alerts = None, {}, [], {}, {}, [], []
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            for item in run.config.update:
                _put(config, item)
        elif kind == "config":
            for item in record.config.update:
                _put(config, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _put(summary, item)
        elif kind == "metric":
            name = record.metric.name or record.metric.glob_name
            metrics[name] = record.metric.step_metric
        elif kind == "artifact":
            a = record.artifact
            artifacts.append({"type": a.type, "name": a.name, "aliases": list(a.aliases)})
        elif kind == "alert":
            alerts.append({"title": record.alert.title, "text": record.alert.text})
    if run is None:
        raise RecordFileError(f"{path}: no run record")
    config.pop("_wandb", None)
    return RunRecords(
        path=pathlib.Path(path),
        run_id=run.run_id,
        name=run.display_name,
        project=run.project,
        group=run.run_group,
        tags=list(run.tags),
        notes=run.notes,
        config={k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in config.items()},
        history=history,
        summary=summary,
        metrics=metrics,
        artifacts=artifacts,
        alerts=alerts,
    )


def run_files(workdir: str | pathlib.Path) -> list[pathlib.Path]:
    """The `run-*.wandb` files under `<workdir>/wandb/`, oldest first."""
    return sorted(pathlib.Path(workdir).glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.parent.name)
