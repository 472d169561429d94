"""The host side of monitoring: interval means, the background logger, the JSONL/PNG
workdir record and the wandb run as wandb itself stores it offline."""

import json
import logging
import time

import numpy as np
import pytest

from dinocell_jax.config import CHANNELS, base_config
from dinocell_jax.monitor import tracker as tracking
from dinocell_jax.monitor.logger import GradientHealth, MetricAccumulator, auto_run_name, create_logger, redact_secrets
from wandb_records import load_run, run_files

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # looks like a wandb API key
GUIDE_SCALARS = [
    "loss/dino", "loss/dino_local", "loss/dino_global", "loss/ibot", "loss/koleo", "loss/total",
    "training/lr", "training/wd", "training/teacher_momentum", "training/teacher_temp",
    "training/epoch", "training/images_per_sec", "training/step_time",
    *[f"gradients/{m}_{s}" for m in ("backbone", "dino_head", "ibot_head") for s in ("mean", "std", "max")],
    "gradients/global_norm", "system/host_memory_gb",
]  # fmt: skip
PROBE_PICTURES = ["attention/maps", "attention/heads", "pca/by_channel", "pca/by_plate", "pca/patch_rgb"]


def _config(**wandb):
    c = base_config()
    c.wandb.log_interval = 5
    c.wandb.update(wandb)
    return c


def _step_metrics(i):
    """Fake step metrics whose interval means are known: loss/total = i."""
    m = {k: np.float32(0.5) for k in GUIDE_SCALARS}
    m.update({"loss/total": np.float32(i), "training/epoch": np.float32(i / 10)})
    return m


def _probe_outputs(p=4, c=5, d=8, size=16, h=4):
    rng = np.random.default_rng(0)
    return {
        "images": rng.random((p, size, size), np.float32),
        "attention": rng.random((p, 2, h, h), np.float32),
        "cls": rng.normal(size=(p, d)).astype(np.float32),
        "patch": rng.normal(size=(p, h, h, d)).astype(np.float32),
        "channel_cls": rng.normal(size=(p, c, d)).astype(np.float32),
        "mean_cls": rng.normal(size=(p, d)).astype(np.float32),
    }


def _demo_run(logger, steps, *, probe_at=()):
    """What the trainer does: accumulate every step, log interval means at log steps."""
    acc = MetricAccumulator()
    for i in steps:
        acc.add(_step_metrics(i))
        if (i + 1) % 5 == 0:
            logger.log_metrics(acc.means(), step=i + 1)
            acc.reset()
        if i + 1 in probe_at:
            meta = {"plate": ["P1", "P1", "P2", "P2"], "well": ["A01", "A02", "B01", "B02"]}
            logger.log_probe(_probe_outputs(), meta, i + 1, attention=True, pca=True, channel_names=CHANNELS)


def _jsonl(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_metric_accumulator_exact_interval_means():
    acc = MetricAccumulator()
    losses = [4.5, 4.25, 3.0, 0.125, 0.25]  # exact in float32, so the means are known
    for i, loss in enumerate(losses):
        metrics = {"loss/total": np.float32(loss), "training/iteration": i, "training/epoch": i / 1000}
        if i % 2 == 0:
            metrics["val/loss/total"] = np.asarray([loss * 2])  # logged on some steps only
        acc.add(metrics)
    means = acc.means()
    assert means["loss/total"] == 12.125 / 5
    assert means["val/loss/total"] == (9.0 + 6.0 + 0.5) / 3
    assert means["training/iteration"] == 4 and means["training/epoch"] == 0.004  # last value, not a mean
    assert acc.count == 5
    acc.reset()
    assert acc.means() == {} and acc.count == 0
    acc.add({"loss/total": 1e16})
    acc.add({"loss/total": 1.0})
    acc.add({"loss/total": -1e16})
    assert acc.means()["loss/total"] == 1 / 3  # fsum: no cancellation error
    with pytest.raises(ValueError, match="metric 'gradients/all': expected a scalar, got shape \\(3,\\)"):
        acc.add({"gradients/all": np.ones(3)})


def test_gradient_health_thresholds_and_rate_limit():
    now = [0.0]
    health = GradientHealth(high=10.0, low=1e-3, min_interval_s=60.0, clock=lambda: now[0])
    assert health.check(0.5, 1) is None and health.check(10.0, 2) is None and health.check(1e-3, 3) is None
    msg = health.check(12.5, 4)
    assert "12.5" in msg and "iteration 4" in msg and "above 10" in msg
    assert health.check(float("nan"), 5) is None  # within the minute: suppressed
    assert health.check(1e-5, 6) is None
    now[0] = 61.0
    msg = health.check(1e-5, 7)
    assert "below 0.001" in msg and "2 more unhealthy steps" in msg
    now[0] = 200.0
    assert "not finite" in health.check(float("inf"), 8)


def test_auto_name_and_secrets():
    import datetime

    c = base_config()
    when = datetime.datetime(2026, 11, 27, 13, 0)
    assert auto_run_name(c, when) == "vits8-synthetic-multiview-20261127-130000"
    c.data.source, c.model.patch_size, c.data.strategy = "loaddata:/data/load_data.csv", 16, "average"
    assert auto_run_name(c, when) == "vits16-jump-average-20261127-130000"


def test_redact_secrets(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    out = redact_secrets({"a": {"api_key": "x", "note": f"key={FAKE_KEY}", "n": [1, FAKE_KEY]}, "token": 3})
    hidden = "<redacted>"
    assert out == {"a": {"api_key": hidden, "note": f"key={hidden}", "n": [1, hidden]}, "token": hidden}


def test_workdir_record_without_wandb(tmp_path, capsys, caplog):
    """JSONL rows merge per step, PNGs are named by metric and step, histograms and
    bad values are handled on the writer thread without raising."""
    logger = create_logger(_config(enabled=False), tmp_path)
    assert logger.wandb_run_id is None
    logger.log_metrics({"loss/total": np.float32(2.0), "training/lr": 1e-4}, step=10)
    logger.log_metrics({"val/loss/total": 3.0, "bad": np.ones(4)}, step=10)  # same step: one row; "bad" dropped
    logger.log_metrics({"loss/total": 1.0}, step=20)
    gallery = [np.ones((4, 4)), np.zeros((4, 4))]
    logger.log_images({"attention/maps": np.zeros((8, 8, 3), np.uint8), "gallery": gallery}, 20)
    logger.log_images({"chw": np.zeros((3, 8, 8))}, 20)  # not HWC: refused on the writer, logged
    logger.log_histogram("backbone/weights", np.r_[np.arange(100.0), np.nan], 20, bins=10)
    logger.log_histogram("backbone/grads", (np.ones(4), np.arange(5.0)), 20)
    logger.log_histogram("too/many", (np.ones(600), np.arange(601.0)), 20)  # refused, logged
    logger.summary({"final/loss": np.float32(1.0)})
    logger.finish()
    logger.log_metrics({"after": 1.0}, 30)  # ignored after finish, no error

    rows = _jsonl(tmp_path)
    assert [r["training/iteration"] for r in rows] == [10, 20]
    assert rows[0]["loss/total"] == 2.0 and rows[0]["val/loss/total"] == 3.0 and "bad" not in rows[0]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "attention_maps_20.png", "gallery_20_0.png", "gallery_20_1.png"]  # fmt: skip
    hists = [json.loads(line) for line in (tmp_path / "histograms.jsonl").read_text().splitlines()]
    assert [h["name"] for h in hists] == ["backbone/weights", "backbone/grads"]
    assert sum(hists[0]["counts"]) == 100 and len(hists[0]["edges"]) == 11  # NaN left out
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final/loss": 1.0}
    assert capsys.readouterr().out.splitlines()[0] == "[10] loss/total 2 | training/lr 0.0001"
    failures = [r.getMessage() for r in caplog.records if "logging failed" in r.getMessage()]
    assert len(failures) == 2 and "'chw'" in failures[0] and "'too/many': 600 bins" in failures[1]


def test_only_process_zero_writes(tmp_path):
    logger = create_logger(_config(), tmp_path / "run", process_index=1)
    logger.log_metrics({"loss/total": 1.0}, 1)
    logger.log_model_checkpoint(tmp_path, 1)
    logger.flush()
    logger.finish()
    assert not logger.enabled and logger.wandb_run_id is None
    assert not (tmp_path / "run").exists()


def test_composite_isolates_a_failing_backend(caplog):
    class Broken(tracking.Tracker):
        def log_scalars(self, scalars, step):
            raise RuntimeError("disk full")

    class Memory(tracking.Tracker):
        rows = []

        def log_scalars(self, scalars, step):
            self.rows.append((step, dict(scalars)))

    composite = tracking.CompositeTracker([Broken(), Memory()])
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            composite.log_scalars({"x": step}, step)
    assert Memory.rows == [(0, {"x": 0}), (1, {"x": 1}), (2, {"x": 2})]
    assert len([r for r in caplog.records if "disk full" in r.getMessage()]) == 1  # not once per call


def test_offline_run_holds_everything_and_no_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    config = _config(name="", group="g1", tags=("vit-small", "patch-8"), notes="demo")
    workdir = tmp_path / "run"
    logger = create_logger(config, workdir)
    _demo_run(logger, range(15), probe_at=(10,))
    logger.log_histogram("backbone/weights", np.random.default_rng(0).normal(size=1000), 15)
    logger.summary({"final/loss": 14.0})
    ckpt = tmp_path / "checkpoints" / "15"
    ckpt.mkdir(parents=True)
    (ckpt / "state").write_bytes(b"weights")
    logger.log_model_checkpoint(ckpt, 15, aliases=("final",))
    alert_text = "gradients/global_norm = 12 at iteration 15 is above 10"
    logger.alert("gradient health", alert_text)
    for step in range(16, 400):
        logger.log_metrics({"custom/my_metric": step / 2}, step=step)
    logger.finish()

    (path,) = run_files(workdir)
    run = load_run(path)
    assert run.run_id == logger.wandb_run_id == (workdir / "wandb_run_id").read_text().strip()
    assert run.name.startswith("vits8-synthetic-multiview-") and run.project == config.wandb.project
    assert (run.group, run.tags, run.notes) == ("g1", ["vit-small", "patch-8"], "demo")
    assert run.config["model"]["patch_size"] == 8 and run.config["wandb"]["log_interval"] == 5
    assert run.config == json.loads(json.dumps(config.to_dict()))  # the resolved config, whole
    assert run.metrics.get("*") == "training/iteration"
    for key in GUIDE_SCALARS:
        assert sorted(run.values(key)) == [5, 10, 15], key
    # Interval means of loss/total = i over i in [0, 5), [5, 10), [10, 15).
    assert run.values("loss/total") == {5: 2.0, 10: 7.0, 15: 12.0}
    assert run.values("training/epoch") == {5: pytest.approx(0.4), 10: pytest.approx(0.9), 15: pytest.approx(1.4)}
    for key in [f"consistency/ch{i}_vs_ch{j}" for i in range(1, 6) for j in range(i + 1, 6)] + ["consistency/average"]:
        assert list(run.values(key)) == [10], key
    for key in PROBE_PICTURES:
        (image,) = run.values(key).values()
        assert image["_type"] == "image-file" and (path.parent / "files" / image["path"]).exists()
    (table,) = run.values("pca/embeddings").values()
    assert table["_type"] == "table-file" and table["nrows"] == 4 * 6
    assert run.values("backbone/weights")[15]["_type"] == "histogram"
    (model,) = [a for a in run.artifacts if a["type"] == "model"]
    assert model["name"] == f"model-{run.run_id}" and sorted(model["aliases"]) == ["final", "latest", "step-15"]
    # The guide's custom-metric call, many times: the run file spans several 32 KiB blocks.
    assert run.values("custom/my_metric") == {s: s / 2 for s in range(16, 400)}
    assert path.stat().st_size > 2 * 32 * 1024
    assert run.summary["final/loss"] == 14
    assert run.alerts == [{"title": "gradient health", "text": alert_text}]

    # The same scalars in the workdir's JSONL, the pictures as PNGs.
    rows = {r["training/iteration"]: r for r in _jsonl(workdir) if r["training/iteration"] <= 15}
    assert sorted(rows) == [5, 10, 15]
    for step, row in rows.items():
        for key in GUIDE_SCALARS:
            assert row[key] == pytest.approx(run.values(key)[step]), key
    assert "consistency/average" in rows[10]
    for key in PROBE_PICTURES:
        assert (workdir / "figures" / f"{key.replace('/', '_')}_10.png").stat().st_size > 100
    assert json.loads((workdir / "artifacts.jsonl").read_text())["aliases"] == ["latest", "step-15", "final"]

    # The API key is nowhere in the workdir (run files, logs, media, JSONL).
    for f in workdir.rglob("*"):
        if f.is_file():
            assert FAKE_KEY.encode() not in f.read_bytes(), f


def test_resume_continues_the_run_and_relogs_older_steps(tmp_path):
    workdir = tmp_path / "run"
    first = create_logger(_config(), workdir, console=False)
    _demo_run(first, range(20))  # logged 5, 10, 15, 20
    first.finish()
    # Resume from a checkpoint at step 10: steps 11..20 run (and are logged) again.
    second = create_logger(_config(), workdir, console=False, resume_step=10)
    assert second.wandb_run_id == first.wandb_run_id
    _demo_run(second, range(10, 25))
    second.finish()

    runs = [load_run(p) for p in run_files(workdir)]
    assert len(runs) == 2 and {r.run_id for r in runs} == {first.wandb_run_id}
    assert runs[0].name == runs[1].name  # the auto name is kept, not re-stamped
    assert sorted(runs[1].values("loss/total")) == [15, 20, 25]  # nothing dropped below the old last step
    assert runs[1].values("loss/total")[15] == 12.0
    # The workdir's history is one run: steps after the checkpoint appear once.
    assert [r["training/iteration"] for r in _jsonl(workdir)] == [5, 10, 15, 20, 25]


@pytest.mark.parametrize("api_key", [None, FAKE_KEY], ids=["no-key", "unreachable-host"])
def test_online_failure_falls_back_offline_with_one_warning(tmp_path, monkeypatch, caplog, api_key):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    if api_key:
        monkeypatch.setenv("WANDB_API_KEY", api_key)
    workdir = tmp_path / "run"
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        logger = create_logger(_config(offline=False), workdir, console=False, wandb_init_timeout=2.0)
        _demo_run(logger, range(10))
        logger.finish()
    assert time.monotonic() - start < 30
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "logging offline" in warnings[0], warnings
    # (an aborted online attempt may leave its own `run-*` folder beside the offline one)
    (path,) = [p for p in run_files(workdir) if p.parent.name.startswith("offline-run-")]
    assert load_run(path).values("loss/total") == {5: 2.0, 10: 7.0}
    if api_key:
        for f in workdir.rglob("*"):
            if f.is_file():
                assert api_key.encode() not in f.read_bytes(), f



class _DeviceValue:
    """Stands in for a jax array: records which thread reads it to the host."""

    def __init__(self, value):
        self.value, self.read_on = value, []

    def __array__(self, dtype=None, copy=None):
        import threading

        self.read_on.append(threading.current_thread().name)
        return np.asarray(self.value, dtype)


def test_device_values_are_fetched_on_the_writer_thread(tmp_path):
    """The training thread hands values over without reading them (no device sync)."""
    import jax.numpy as jnp

    logger = create_logger(_config(enabled=False), tmp_path, console=False)
    loss, weights = _DeviceValue(3.0), _DeviceValue(np.arange(8.0))
    logger.log_metrics({"loss/total": loss, "loss/dino": jnp.float32(1.5)}, step=7)
    logger.log_histogram("backbone/weights", weights, step=7)
    logger.finish()
    assert loss.read_on == weights.read_on == ["dinocell-tracker"]
    assert _jsonl(tmp_path)[0] == {**_jsonl(tmp_path)[0], "loss/total": 3.0, "loss/dino": 1.5}
    assert sum(json.loads((tmp_path / "histograms.jsonl").read_text())["counts"]) == 8
