"""Where metrics go: a small `Tracker` interface and its backends.

Backends: `WandbTracker` (one wandb run), `JsonlTracker` (`metrics.jsonl` and PNG
figures in the workdir, so an offline user sees everything without a server),
`ConsoleTracker` (a line per log), `CompositeTracker` (fan-out that isolates a
failing backend) and `AsyncTracker`, which owns all of them on ONE background
thread: wandb's `log` is not thread-safe, and a slow backend must never stall the
training loop. Trackers receive plain numpy / Python values; `Logger`
(`monitor/logger.py`) converts device values on that thread, one step late.

Every scalar row carries `training/iteration`, the x axis of every wandb chart
(`define_metric`); `wandb.log` is never given `step=`, so a run resumed from a
checkpoint older than its last logged step keeps the re-logged points.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pathlib
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import numpy as np

log = logging.getLogger(__name__)

STEP_KEY = "training/iteration"
MAX_HISTOGRAM_BINS = 512  # wandb's limit


class Tracker:
    """The interface every backend implements; the base class does nothing.

    `images` values are uint8 `[H, W, 3]` (or `[H, W]`) arrays or lists of them;
    histograms arrive as `counts [K]` and `edges [K+1]` with K <= 512; table rows
    are lists of JSON-able Python values.
    """

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        pass

    def log_images(self, images: Mapping[str, np.ndarray | Sequence[np.ndarray]], step: int) -> None:
        pass

    def log_histogram(self, name: str, counts: np.ndarray, edges: np.ndarray, step: int) -> None:
        pass

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        pass

    def log_summary(self, values: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str, *, name: str, type: str, aliases: Sequence[str], step: int) -> None:
        pass

    def alert(self, title: str, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        pass


def file_stem(name: str) -> str:
    """A metric name as a file name: `attention/maps` -> `attention_maps`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _json_value(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (np.integer, np.bool_, bool)):
        return int(v)
    return v


class JsonlTracker(Tracker):
    """Writes the run into its workdir.

    - `metrics.jsonl`: one JSON object per logged step (`training/iteration` plus the
      scalars of that step; two calls for the same step are merged);
    - `figures/<name>_<step>.png` (list items get `_<k>`);
    - `histograms.jsonl`, `tables/<name>_<step>.json`, `summary.json`,
      `alerts.jsonl`, `artifacts.jsonl` (what was handed to the artifact store).

    `resume_step`: rows of `metrics.jsonl` after this iteration are dropped at start
    (they will be logged again by the resumed run), so the file stays one history.
    """

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None):
        self.workdir = pathlib.Path(workdir)
        self.figures = self.workdir / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.workdir / "metrics.jsonl"
        if resume_step is not None and self.metrics_path.exists():
            self._truncate_after(int(resume_step))
        self._row: dict[str, Any] | None = None

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if row.get(STEP_KEY, -1) <= step:
                kept.append(line)
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.metrics_path)

    def _append(self, path: pathlib.Path, obj: Mapping[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")

    def _write_row(self) -> None:
        if self._row is not None:
            self._append(self.metrics_path, self._row)
            self._row = None

    def log_scalars(self, scalars, step):
        if self._row is not None and self._row[STEP_KEY] != step:
            self._write_row()
        if self._row is None:
            self._row = {STEP_KEY: int(step), "_time": round(time.time(), 3)}
        self._row.update({k: _json_value(v) for k, v in scalars.items()})
        self._row[STEP_KEY] = int(step)  # the step argument is the x axis, as in the wandb row

    def log_images(self, images, step):
        from PIL import Image  # matplotlib's own dependency

        for name, value in images.items():
            arrays = [value] if isinstance(value, np.ndarray) else list(value)
            for k, array in enumerate(arrays):
                suffix = "" if isinstance(value, np.ndarray) else f"_{k}"
                path = self.figures / f"{file_stem(name)}_{step}{suffix}.png"
                Image.fromarray(np.asarray(array, np.uint8)).save(path)

    def log_histogram(self, name, counts, edges, step):
        row = {STEP_KEY: int(step), "name": name, "counts": np.asarray(counts).tolist()}
        self._append(self.workdir / "histograms.jsonl", {**row, "edges": np.asarray(edges).tolist()})

    def log_table(self, name, columns, rows, step):
        tables = self.workdir / "tables"
        tables.mkdir(exist_ok=True)
        with open(tables / f"{file_stem(name)}_{step}.json", "w") as f:
            json.dump({"columns": list(columns), "rows": [list(r) for r in rows]}, f)

    def log_summary(self, values):
        path = self.workdir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        summary.update({k: _json_value(v) for k, v in values.items()})
        path.write_text(json.dumps(summary, indent=1))

    def log_artifact(self, path, *, name, type, aliases, step):
        self._append(
            self.workdir / "artifacts.jsonl",
            {STEP_KEY: int(step), "path": str(path), "name": name, "type": type, "aliases": list(aliases)},
        )

    def alert(self, title, text):
        self._append(self.workdir / "alerts.jsonl", {"time": round(time.time(), 3), "title": title, "text": text})

    def flush(self):
        self._write_row()

    def finish(self):
        self._write_row()


DEFAULT_CONSOLE_KEYS = (
    "loss/total",
    "loss/dino",
    "loss/ibot",
    "loss/koleo",
    "val/loss/total",
    "training/lr",
    "training/teacher_momentum",
    "gradients/global_norm",
    "training/images_per_sec",
    "consistency/average",
    "system/gpu_memory_gb",
)


class ConsoleTracker(Tracker):
    """One line per scalar log with the keys a person watches; alerts as warnings."""

    def __init__(self, keys: Sequence[str] = DEFAULT_CONSOLE_KEYS, stream: TextIO | None = None):
        self.keys = tuple(keys)
        self.stream = stream

    def log_scalars(self, scalars, step):
        shown = [f"{k} {scalars[k]:.4g}" for k in self.keys if k in scalars]
        if shown:
            print(f"[{step}] " + " | ".join(shown), file=self.stream or sys.stdout, flush=True)

    def alert(self, title, text):
        log.warning("%s: %s", title, text)


class CompositeTracker(Tracker):
    """Hands every call to each backend; one failing backend does not silence the others."""

    def __init__(self, trackers: Sequence[Tracker]):
        self.trackers = list(trackers)
        self._failures: dict[tuple[str, str], int] = {}

    def _each(self, method: str, *args, **kwargs) -> None:
        for tracker in self.trackers:
            try:
                getattr(tracker, method)(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a logging failure must never stop training
                key = (type(tracker).__name__, method)
                self._failures[key] = self._failures.get(key, 0) + 1
                if self._failures[key] in (1, 10, 100, 1000):  # keep a persistent failure from flooding the console
                    log.warning("%s.%s failed (%d times): %r", *key, self._failures[key], e)

    def log_scalars(self, scalars, step):
        self._each("log_scalars", scalars, step)

    def log_images(self, images, step):
        self._each("log_images", images, step)

    def log_histogram(self, name, counts, edges, step):
        self._each("log_histogram", name, counts, edges, step)

    def log_table(self, name, columns, rows, step):
        self._each("log_table", name, columns, rows, step)

    def log_summary(self, values):
        self._each("log_summary", values)

    def log_artifact(self, path, *, name, type, aliases, step):
        self._each("log_artifact", path, name=name, type=type, aliases=aliases, step=step)

    def alert(self, title, text):
        self._each("alert", title, text)

    def flush(self):
        self._each("flush")

    def finish(self):
        self._each("finish")


def wandb_mode(offline: bool) -> str:
    """`offline` when the config or `WANDB_MODE` asks for it, `disabled` when the env does."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env == "disabled":
        return "disabled"
    if offline or env in ("offline", "dryrun"):
        return "offline"
    return "online"


def scrub(text: str) -> str:
    """Removes the API key from a message (wandb errors can echo request details)."""
    key = os.environ.get("WANDB_API_KEY", "")
    return text.replace(key, "<redacted>") if len(key) >= 8 else text


class WandbTracker(Tracker):
    """One wandb run, created in the constructor; call it from one thread only.

    Online start failures (no API key, host unreachable within `init_timeout` s)
    print ONE warning and continue offline under the same run id; if even that
    fails, wandb is switched off with a warning. Training never stops for wandb.
    """

    def __init__(
        self,
        *,
        config: Mapping[str, Any],
        project: str,
        run_id: str,
        name: str,
        dir: str | os.PathLike,
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        notes: str | None = None,
        resume: str | None = "allow",
        offline: bool = False,
        init_timeout: float = 30.0,
    ):
        import wandb

        self._wandb = wandb
        self.run = None
        self.mode = wandb_mode(offline)
        if self.mode == "disabled":
            return
        kwargs = dict(
            project=project or None,
            entity=entity or None,
            name=name or None,
            group=group or None,
            tags=list(tags) or None,
            notes=notes or None,
            config=dict(config),
            dir=str(dir),
            id=run_id,
            resume=resume or None,
            allow_val_change=True,  # a resumed run may legitimately change e.g. train.steps
        )
        # login_timeout bounds wandb's interactive key prompt, should a TTY be attached.
        settings = dict(init_timeout=init_timeout, login_timeout=init_timeout)
        try:
            self.run = wandb.init(mode=self.mode, settings=wandb.Settings(**settings), **kwargs)
        except Exception as e:  # noqa: BLE001 - wandb raises UsageError, CommError, timeouts...
            if self.mode != "online":
                log.warning("wandb: could not start a %s run (%s); wandb logging is off", self.mode, scrub(str(e)))
                return
            log.warning(
                "wandb: could not start an online run (%s: %s); logging offline to %s/wandb, "
                "upload later with `wandb sync`",
                type(e).__name__,
                scrub(str(e)).splitlines()[0] if str(e) else "",
                dir,
            )
            # A timed-out online init keeps the run id claimed inside wandb's service process.
            wandb.teardown()
            self.mode = "offline"
            try:
                self.run = wandb.init(mode="offline", settings=wandb.Settings(**settings), **kwargs)
            except Exception as e2:  # noqa: BLE001
                log.warning("wandb: offline start failed too (%s); wandb logging is off", scrub(str(e2)))
                return
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)

    def _log(self, row: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({**row, STEP_KEY: int(step)})

    def log_scalars(self, scalars, step):
        self._log({k: _json_value(v) for k, v in scalars.items()}, step)

    def log_images(self, images, step):
        def image(a):
            return self._wandb.Image(np.asarray(a, np.uint8))

        row = {k: image(v) if isinstance(v, np.ndarray) else [image(a) for a in v] for k, v in images.items()}
        self._log(row, step)

    def log_histogram(self, name, counts, edges, step):
        self._log({name: self._wandb.Histogram(np_histogram=(np.asarray(counts), np.asarray(edges)))}, step)

    def log_table(self, name, columns, rows, step):
        self._log({name: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step)

    def log_summary(self, values):
        if self.run is not None:
            self.run.summary.update({k: _json_value(v) for k, v in values.items()})

    def log_artifact(self, path, *, name, type, aliases, step):
        if self.run is None:
            return
        artifact = self._wandb.Artifact(name=name, type=type, metadata={STEP_KEY: int(step)})
        # Both copy into wandb's staging dir now, so the checkpoint may be deleted afterwards.
        if pathlib.Path(path).is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact, aliases=list(aliases))

    def alert(self, title, text):
        if self.run is not None:  # offline, the alert is kept in the run file (not emailed)
            self.run.alert(title=title, text=text, level=self._wandb.AlertLevel.WARN)

    def finish(self):
        if self.run is not None:
            self.run.finish()
            self.run = None


_STOP = object()


class AsyncTracker(Tracker):
    """Runs a tracker on one background thread fed by a queue.

    `make` builds the tracker ON that thread (so `wandb.init` and every later wandb
    call happen on the same thread). Calls return at once; `flush()` blocks until
    everything queued so far is written; `finish()` drains, finishes and joins.
    Jobs are callables `job(tracker)`, so conversion from device arrays and figure
    rendering can also run there (`submit`). The queue is unbounded: metrics at log
    intervals are small, and blocking the training loop is worse than memory.
    """

    def __init__(self, make: Callable[[], Tracker], *, name: str = "dinocell-tracker"):
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._failures: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, args=(make,), name=name, daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[], Tracker]) -> None:
        try:
            tracker = make()
        except Exception as e:  # noqa: BLE001
            log.warning("monitoring backends failed to start (%s); logging is off", scrub(repr(e)))
            tracker = Tracker()
        # Registered after make(): atexit runs last-in first-out, so this drains the
        # queue before wandb's own exit hook finishes the run.
        atexit.register(self.finish)
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    tracker.finish()
                    return
                job(tracker)
            except Exception as e:  # noqa: BLE001 - never let one bad value kill the writer
                message = scrub(repr(e))[:300]
                self._failures[message] = self._failures.get(message, 0) + 1
                if self._failures[message] in (1, 10, 100, 1000):  # a repeating failure must not flood
                    log.warning("logging failed (%d times): %s", self._failures[message], message)
            finally:
                self._queue.task_done()

    def submit(self, job: Callable[[Tracker], None]) -> None:
        if not self._closed:
            self._queue.put(job)

    def log_scalars(self, scalars, step):
        self.submit(lambda t: t.log_scalars(scalars, step))

    def log_images(self, images, step):
        self.submit(lambda t: t.log_images(images, step))

    def log_histogram(self, name, counts, edges, step):
        self.submit(lambda t: t.log_histogram(name, counts, edges, step))

    def log_table(self, name, columns, rows, step):
        self.submit(lambda t: t.log_table(name, columns, rows, step))

    def log_summary(self, values):
        self.submit(lambda t: t.log_summary(values))

    def log_artifact(self, path, *, name, type, aliases, step):
        self.submit(lambda t: t.log_artifact(path, name=name, type=type, aliases=aliases, step=step))

    def alert(self, title, text):
        self.submit(lambda t: t.alert(title, text))

    def flush(self):
        if self._closed:
            return
        self.submit(lambda t: t.flush())
        self._queue.join()

    def finish(self):
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.finish)
        self._queue.put(_STOP)
        self._thread.join()


def histogram(values: np.ndarray, bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(counts [K] int64, edges [K+1] float64) of the finite entries of `values`, K <= 512.

    Non-finite entries are left out (their count would hide the distribution); an
    empty or all-non-finite input gives one empty bin on [0, 1].
    """
    bins = int(min(max(bins, 1), MAX_HISTOGRAM_BINS))
    flat = np.asarray(values, np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return np.zeros(1, np.int64), np.array([0.0, 1.0])
    counts, edges = np.histogram(flat, bins=bins)
    return counts.astype(np.int64), edges


def check_histogram(name: str, counts: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validates a precomputed histogram (e.g. counted on device); errors name it."""
    counts, edges = np.asarray(counts), np.asarray(edges, np.float64)
    if counts.ndim != 1 or edges.shape != (counts.shape[0] + 1,):
        raise ValueError(f"histogram {name!r}: need counts [K] and edges [K+1], got {counts.shape} and {edges.shape}")
    if counts.shape[0] > MAX_HISTOGRAM_BINS:
        raise ValueError(f"histogram {name!r}: {counts.shape[0]} bins, wandb takes at most {MAX_HISTOGRAM_BINS}")
    return counts, edges


def to_scalar(name: str, value: Any) -> float:
    """A Python float from a 0-d / size-1 numpy or jax value; errors name the metric."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r}: expected a scalar, got shape {array.shape}")
    out = array.reshape(()).item()
    if isinstance(out, bool):
        return float(out)
    if not isinstance(out, (int, float)):
        raise ValueError(f"metric {name!r}: expected a number, got {type(out).__name__}")
    return out if isinstance(out, int) else float(out)
