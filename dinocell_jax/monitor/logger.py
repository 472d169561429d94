"""The logger a training loop (or a user, as the guide shows) talks to.

```
logger = create_logger(config, workdir, process_index=jax.process_index())
logger.log_metrics({"custom/my_metric": value}, step=iteration)
logger.log_histogram("backbone/weights", weights, step=iteration)
logger.log_images({"visualization/my_image": image_uint8_hwc}, step=iteration)
logger.log_model_checkpoint(step_dir, step=iteration, aliases=("final",))
logger.finish()
```

Every call returns at once: values (numpy, Python or jax arrays) go through a
queue to ONE background thread that converts them, renders pictures and owns the
wandb run, the JSONL + PNG files in the workdir and the console. On processes
other than 0 every method is a no-op. The wandb run id lives in
`<workdir>/wandb_run_id`, so relaunching the same command continues the same run.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import re
import secrets
import string
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dinocell_jax.cli import auto_run_name
from dinocell_jax.monitor import tracker as tracking
from dinocell_jax.monitor.figures import probe_report

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
RUN_NAME_FILE = "wandb_run_name"
_SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|token|secret|password)$", re.IGNORECASE)


class MetricAccumulator:
    """Exact means of scalar metrics over a logging interval.

    `add` takes one step's metrics (numpy / Python scalars); `means` gives each
    key's mean over the steps that had it (math.fsum of float64 values, so a known
    sequence gives its exact mean), except the keys in `last`, which report the
    most recent value (an averaged iteration number is not an iteration).
    """

    def __init__(self, last: Sequence[str] = ("training/iteration", "training/epoch")):
        self.last = frozenset(last)
        self._values: dict[str, list[float]] = {}
        self.count = 0

    def add(self, metrics: Mapping[str, Any]) -> None:
        for key, value in metrics.items():
            self._values.setdefault(key, []).append(float(tracking.to_scalar(key, value)))
        self.count += 1

    def means(self) -> dict[str, float]:
        return {
            key: values[-1] if key in self.last else math.fsum(values) / len(values)
            for key, values in self._values.items()
        }

    def reset(self) -> None:
        self._values.clear()
        self.count = 0


class GradientHealth:
    """The guide's gradient-health check, rate limited.

    `check(global_norm, step)` returns a warning message when the norm is above
    `high` (guide: > 10, potential instability), below `low` (< 0.001, vanishing)
    or not finite, at most once per `min_interval_s` seconds (the next message
    counts the suppressed ones); otherwise None. The caller hands the message to
    `Logger.alert` (wandb alert + console warning).
    """

    def __init__(self, high: float = 10.0, low: float = 1e-3, min_interval_s: float = 600.0, *, clock=time.monotonic):
        self.high, self.low, self.min_interval_s = float(high), float(low), float(min_interval_s)
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def check(self, global_norm: float, step: int) -> str | None:
        norm = float(global_norm)
        if not math.isfinite(norm):
            problem = "is not finite"
        elif norm > self.high:
            problem = f"is above {self.high:g} (potential instability)"
        elif norm < self.low:
            problem = f"is below {self.low:g} (vanishing gradients)"
        else:
            return None
        now = self._clock()
        if self._last is not None and now - self._last < self.min_interval_s:
            self._suppressed += 1
            return None
        more = f"; {self._suppressed} more unhealthy steps since the last warning" if self._suppressed else ""
        self._last, self._suppressed = now, 0
        return f"gradients/global_norm = {norm:.4g} at iteration {step} {problem}{more}"


def redact_secrets(obj: Any) -> Any:
    """A copy of a config dict with secret-looking keys and the wandb API key masked."""
    key = os.environ.get("WANDB_API_KEY", "")
    if isinstance(obj, Mapping):
        return {k: "<redacted>" if _SECRET_KEY.search(str(k)) else redact_secrets(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v) for v in obj]
    if isinstance(obj, str) and len(key) >= 8 and key in obj:
        return obj.replace(key, "<redacted>")
    return obj


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def run_identity(config, workdir: str | os.PathLike) -> tuple[str, str]:
    """(run id, run name) of this workdir's wandb run, created and stored on first use.

    A stored id is reused unless `wandb.resume == "never"`; the stored name is
    reused so a resumed run keeps its auto-generated name; `wandb.name` wins.
    """
    workdir = pathlib.Path(workdir)
    id_path, name_path = workdir / RUN_ID_FILE, workdir / RUN_NAME_FILE
    reuse = config.wandb.resume != "never"
    run_id = id_path.read_text().strip() if reuse and id_path.exists() else ""
    name = config.wandb.name or (name_path.read_text().strip() if run_id and name_path.exists() else "")
    if not run_id:
        run_id = _new_run_id()
        id_path.write_text(run_id + "\n")
    if not name:
        name = auto_run_name(config)
    name_path.write_text(name + "\n")
    return run_id, name


def as_image(name: str, value: Any) -> np.ndarray:
    """uint8 `[H, W]` / `[H, W, 3|4]` for wandb and PNG; floats are read as [0, 1]."""
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"image {name!r}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (HWC), got {array.shape}")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.bool_):
        return np.round(np.clip(np.nan_to_num(array.astype(np.float64)), 0, 1) * 255).astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = tracking.to_scalar(key, value)
        except ValueError as e:
            log.warning("dropped: %s", e)
    return out


class Logger:
    """The public logging API; see the module docstring. Build it with `create_logger`.

    `tracker` None makes every method a no-op (processes other than 0).
    """

    def __init__(self, tracker: tracking.AsyncTracker | None, *, run_id: str | None = None):
        self._tracker = tracker
        self._run_id = run_id

    @property
    def enabled(self) -> bool:
        return self._tracker is not None

    @property
    def wandb_run_id(self) -> str | None:
        """The wandb run id (stored in `<workdir>/wandb_run_id`); None when wandb is off or not process 0."""
        return self._run_id

    def _submit(self, job) -> None:
        if self._tracker is not None:
            self._tracker.submit(job)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Scalars (Python, numpy or jax; fetched on the writer thread) at iteration `step`."""
        metrics, step = dict(metrics), int(step)
        self._submit(lambda t: t.log_scalars(_scalars(metrics), step))

    def log_histogram(self, name: str, values: Any, step: int, *, bins: int = 64) -> None:
        """A histogram of `values` (any shape; non-finite entries left out), or a
        precomputed `(counts [K], edges [K+1])` pair, e.g. counted on device. K <= 512."""
        step = int(step)

        def job(t):
            if isinstance(values, tuple) and len(values) == 2:
                counts, edges = tracking.check_histogram(name, *values)
            else:
                counts, edges = tracking.histogram(np.asarray(values), bins)
            t.log_histogram(name, counts, edges, step)

        self._submit(job)

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        """Images by name: uint8 (or [0, 1] float) HWC arrays, or lists of them (a gallery)."""
        images, step = dict(images), int(step)

        def job(t):
            converted = {
                k: as_image(k, v) if not isinstance(v, (list, tuple)) else [as_image(k, a) for a in v]
                for k, v in images.items()
            }
            t.log_images(converted, step)

        self._submit(job)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A table (wandb.Table; JSON in `<workdir>/tables/`); list-of-float columns are
        embeddings that wandb's 2D projection panel can explore."""
        columns, rows, step = list(columns), [list(r) for r in rows], int(step)
        self._submit(lambda t: t.log_table(name, columns, rows, step))

    def log_probe(
        self,
        outputs: Mapping[str, Any],
        meta: Mapping[str, Sequence[Any]],
        step: int,
        *,
        attention: bool,
        pca: bool,
        channel_names: Sequence[str],
    ) -> None:
        """`figures.probe_report` of `metrics_fn` outputs, run on the writer thread (the
        device values are fetched there), then its scalars, pictures and tables logged."""
        outputs, meta, step = dict(outputs), dict(meta), int(step)

        def job(t):
            scalars, images, tables = probe_report(
                {k: np.asarray(v) for k, v in outputs.items()},
                meta,
                step,
                attention=attention,
                pca=pca,
                channel_names=channel_names,
            )
            if scalars:
                t.log_scalars(scalars, step)
            if images:
                t.log_images(images, step)
            for name, columns, rows in tables:
                t.log_table(name, columns, rows, step)

        self._submit(job)

    def log_model_checkpoint(self, path: str | os.PathLike, step: int, aliases: Sequence[str] = ()) -> None:
        """Uploads a finalised checkpoint (directory or file) as a `model` artifact
        `model-<run id>` with aliases `latest`, `step-<step>` and `aliases` (e.g.
        "final"). Failures are logged, never raised. Call it only for a finished save:
        wandb copies the files when the writer thread gets to this job."""
        path, step = pathlib.Path(path), int(step)
        all_aliases = list(dict.fromkeys(["latest", f"step-{step}", *aliases]))
        name = f"model-{self._run_id or 'run'}"

        def job(t):
            if ".orbax-checkpoint-tmp" in path.name:
                raise ValueError(f"log_model_checkpoint: {path} is an unfinished Orbax save")
            if not path.exists():
                raise FileNotFoundError(f"log_model_checkpoint: {path} does not exist")
            t.log_artifact(str(path), name=name, type="model", aliases=all_aliases, step=step)

        self._submit(job)

    def alert(self, title: str, text: str) -> None:
        """A wandb alert (delivered by email/Slack only for online runs) and a console warning."""
        self._submit(lambda t: t.alert(title, text))

    def summary(self, values: Mapping[str, Any]) -> None:
        """Run summary values (wandb run summary; `<workdir>/summary.json`)."""
        values = dict(values)
        self._submit(lambda t: t.log_summary({k: _summary_value(v) for k, v in values.items()}))

    def flush(self) -> None:
        """Blocks until everything logged so far is written."""
        if self._tracker is not None:
            self._tracker.flush()

    def finish(self) -> None:
        """Writes what is queued, finishes the wandb run and stops the writer thread."""
        if self._tracker is not None:
            self._tracker.finish()


def _summary_value(v: Any) -> Any:
    array = np.asarray(v) if not isinstance(v, (str, dict, list)) else None
    if array is not None and array.size == 1 and array.dtype != object:
        return array.reshape(()).item()
    return v


def create_logger(
    config,
    workdir: str | os.PathLike,
    *,
    process_index: int = 0,
    resume_step: int | None = None,
    console: bool = True,
    wandb_init_timeout: float = 30.0,
) -> Logger:
    """The run's logger: wandb (when `config.wandb.enabled`), JSONL + PNG in `workdir`
    and the console, all written from one background thread.

    Args:
      config: the resolved run config (`config.wandb.*`, `model.arch`, ...).
      workdir: the run directory; wandb files go to `<workdir>/wandb/`.
      process_index: only process 0 logs; elsewhere a no-op logger is returned.
      resume_step: the checkpoint step the run resumes from; rows of
        `metrics.jsonl` after it are dropped because they will be logged again.
      console: print a line per scalar log.
      wandb_init_timeout: seconds an online `wandb.init` may take before the run
        falls back to offline.
    """
    if process_index != 0:
        return Logger(None)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    w = config.wandb
    run_id, name = run_identity(config, workdir) if w.enabled else (None, "")
    resolved = redact_secrets(config.to_dict())

    def make() -> tracking.Tracker:
        trackers: list[tracking.Tracker] = [tracking.JsonlTracker(workdir, resume_step=resume_step)]
        if console:
            trackers.append(tracking.ConsoleTracker())
        if w.enabled:
            trackers.append(
                tracking.WandbTracker(
                    config=resolved,
                    project=w.project,
                    entity=w.entity,
                    name=name,
                    group=w.group,
                    tags=tuple(w.tags),
                    notes=w.notes,
                    dir=workdir,
                    run_id=run_id,
                    resume=w.resume,
                    offline=w.offline,
                    init_timeout=wandb_init_timeout,
                )
            )
        return tracking.CompositeTracker(trackers)

    return Logger(tracking.AsyncTracker(make), run_id=run_id)
