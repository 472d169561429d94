"""Pictures, channel consistency and system metrics of monitor/ (no wandb here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinocell_jax.config import CHANNELS
from dinocell_jax.monitor import figures
from dinocell_jax.monitor.consistency import channel_consistency
from dinocell_jax.monitor.system import DeviceStarvation, LoopTimer, StepTrace, system_metrics

LUMA = np.array([0.299, 0.587, 0.114])
PATCH = 4


def _blob_images(centres, size=32, sigma=2.5, seed=0):
    """[P, size, size] float32: one bright Gaussian blob per image on faint noise."""
    yy, xx = np.mgrid[:size, :size]
    noise = np.random.default_rng(seed).uniform(0, 0.05, (len(centres), size, size))
    blobs = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)) for cy, cx in centres])
    return (blobs + noise).astype(np.float32)


def _intensity_attention(images, heads=3):
    """[P, heads, h, w]: CLS attention that follows intensity (patch-pooled, sums to 1)."""
    p, size, _ = images.shape
    pooled = images.reshape(p, size // PATCH, PATCH, size // PATCH, PATCH).mean(axis=(2, 4))
    pooled = pooled / pooled.sum(axis=(1, 2), keepdims=True)
    return np.repeat(pooled[:, None], heads, axis=1)


def _attention_peaks(picture, n_images, size):
    """Reads the attention grid back: per column, (row, col) in input pixels of the
    hottest overlay pixel, after removing the grey input shown in the top row."""
    panel = (picture.shape[0] - 3 * figures.PAD) // 2
    scale = panel // size
    peaks = []
    for p in range(n_images):
        x0 = figures.PAD + p * (panel + figures.PAD)
        top = picture[figures.PAD : figures.PAD + panel, x0 : x0 + panel] @ LUMA
        y1 = 2 * figures.PAD + panel
        bottom = picture[y1 : y1 + panel, x0 : x0 + panel] @ LUMA
        heat = bottom - (1 - figures.OVERLAY_ALPHA) * top
        r, c = np.unravel_index(np.argmax(heat), heat.shape)
        peaks.append((r / scale, c / scale))
    return np.array(peaks)


def test_attention_picture_peaks_on_the_blob_the_model_attends():
    centres = [(8, 9), (22, 24), (25, 6)]
    images = _blob_images(centres)
    outputs = {"images": images, "attention": _intensity_attention(images)}
    _, pictures, _ = figures.probe_report(outputs, {}, 1000, attention=True, pca=False, channel_names=CHANNELS)
    grid = pictures["attention/maps"]
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    peaks = _attention_peaks(grid, len(centres), 32)
    # The hottest pixel lies in the patch holding the blob centre.
    assert np.all(np.linalg.norm(peaks - np.array(centres), axis=1) <= PATCH * np.sqrt(2))

    # Control: the same inputs with attention following blobs elsewhere; the picture
    # must follow the attention, not the image.
    elsewhere = [(25, 25), (5, 5), (6, 26)]
    outputs["attention"] = _intensity_attention(_blob_images(elsewhere, seed=1))
    _, pictures, _ = figures.probe_report(outputs, {}, 1000, attention=True, pca=False, channel_names=CHANNELS)
    peaks = _attention_peaks(pictures["attention/maps"], len(centres), 32)
    assert np.all(np.linalg.norm(peaks - np.array(elsewhere), axis=1) <= PATCH * np.sqrt(2))
    assert np.all(np.linalg.norm(peaks - np.array(centres), axis=1) > 10)


def test_attention_grid_layout_and_channel_average():
    rng = np.random.default_rng(0)
    multi = rng.random((2, 80, 96, 5))
    grid = figures.attention_grid(multi, rng.random((2, 10, 12)))
    assert grid.shape == (2 * 80 + 3 * figures.PAD, 2 * (96 + figures.PAD) + figures.PAD, 3)
    # Top-left panel is the channel mean, percentile-stretched to grey.
    top = grid[figures.PAD : figures.PAD + 80, figures.PAD : figures.PAD + 96].astype(float)
    assert np.array_equal(top[..., 0], top[..., 2])
    assert np.corrcoef(top[..., 0].ravel(), multi[0].mean(-1).ravel())[0, 1] > 0.95
    with pytest.raises(ValueError, match=r"attention must be \[P, h, w\].*shape \(3, 10, 12\)"):
        figures.attention_grid(multi, rng.random((3, 10, 12)))
    heads = figures.attention_heads(rng.random((2, 6, 8, 8)))
    assert heads.shape == (2 * (64 + figures.PAD) + figures.PAD, 6 * (64 + figures.PAD) + figures.PAD, 3)


def test_attention_entropy_uniform_is_one_and_focused_is_zero():
    uniform = np.full((2, 3, 4, 4), 1 / 16)
    focused = np.zeros((2, 3, 4, 4))
    focused[..., 1, 2] = 0.7  # the rest of the mass went to CLS/storage tokens
    assert figures.attention_entropy(uniform) == pytest.approx(1.0)
    assert figures.attention_entropy(focused) == pytest.approx(0.0, abs=1e-12)


def test_pca_scatter_one_picture_per_colouring():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (10, 6)), rng.normal(5, 1, (10, 6))])
    pictures = figures.pca_scatter(features, {"channel": ["a"] * 10 + ["b"] * 10, "plate": ["p"] * 20})
    assert set(pictures) == {"channel", "plate"}
    for img in pictures.values():
        assert img.dtype == np.uint8 and img.shape == (420, 500, 3)
    # Two categories give two colours besides the white/black/grey of the axes.
    colourful = pictures["channel"].reshape(-1, 3).astype(int)
    saturated = colourful[(colourful.max(1) - colourful.min(1)) > 60]
    assert len({tuple(c // 32) for c in saturated}) >= 2
    with pytest.raises(ValueError, match=r"color_by\['plate'\] has 3 labels for 20 features"):
        figures.pca_scatter(features, {"plate": ["p"] * 3})


def test_patch_pca_rgb_colours_regions_by_feature():
    a, b = np.eye(8)[0] * 3, np.eye(8)[1] * 3
    feats = np.zeros((2, 4, 4, 8))
    feats[:, :, :2] = a
    feats[:, :, 2:] = b
    feats += np.random.default_rng(0).normal(0, 0.01, feats.shape)
    rgb = figures.patch_pca_rgb(feats)
    scale = 64 // 4
    assert rgb.shape == (64 + 2 * figures.PAD, 2 * (64 + figures.PAD) + figures.PAD, 3)
    panel = rgb[figures.PAD : figures.PAD + 64, figures.PAD : figures.PAD + 64].astype(int)
    left, right = panel[:, : 2 * scale].reshape(-1, 3), panel[:, 2 * scale :].reshape(-1, 3)
    # Red is the leading component: it splits the two regions and is flat inside each
    # (green and blue are noise components, stretched to full range by design).
    assert abs(left[:, 0].mean() - right[:, 0].mean()) > 200
    assert left[:, 0].std() < 10 and right[:, 0].std() < 10


def test_probe_report_pca_part():
    rng = np.random.default_rng(0)
    p, c, d = 6, 5, 12
    outputs = {
        "cls": rng.normal(size=(p, d)),
        "patch": rng.normal(size=(p, 4, 4, d)),
        "channel_cls": rng.normal(size=(p, c, d)),
        "mean_cls": rng.normal(size=(p, d)),
    }
    meta = {"plate": ["P1", "P1", "P2", "P2", "P3", "P3"], "well": [f"A0{i}" for i in range(p)]}
    scalars, pictures, tables = figures.probe_report(
        outputs, meta, 5000, attention=False, pca=True, channel_names=CHANNELS
    )
    pairs = [k for k in scalars if k.startswith("consistency/ch") and "_vs_ch" in k]
    assert len(pairs) == 10 and "consistency/ch4_vs_ch5" in pairs and "consistency/average" in scalars
    assert set(pictures) == {"pca/by_channel", "pca/by_plate", "pca/patch_rgb"}
    assert all(img.dtype == np.uint8 for img in pictures.values())
    (name, columns, rows), = tables
    assert name == "pca/embeddings" and columns == ["field", "view", "plate", "well", "embedding"]
    assert len(rows) == p * (c + 1) and all(len(r[-1]) == d for r in rows)
    assert rows[1][:4] == [0, "ER", "P1", "A00"] and rows[-1][:3] == [p - 1, "mean", "P3"]
    assert rows[1][-1] == pytest.approx(outputs["channel_cls"][0, 1].tolist())
    with pytest.raises(KeyError, match="channel_cls"):
        figures.probe_report({"cls": outputs["cls"]}, {}, 0, attention=False, pca=True, channel_names=CHANNELS)
    with pytest.raises(ValueError, match=r"meta\['plate'\] has 2 values for 6 probe fields"):
        figures.probe_report(outputs, {"plate": ["a", "b"]}, 0, attention=False, pca=True, channel_names=CHANNELS)


def test_channel_consistency_identical_channels():
    rng = np.random.default_rng(0)
    field = rng.normal(size=(16, 1, 32))
    out = channel_consistency(np.repeat(field, 5, axis=1), field[:, 0], CHANNELS)
    expected = {f"consistency/ch{i}_vs_ch{j}" for i in range(1, 6) for j in range(i + 1, 6)}
    assert expected <= set(out) and len(expected) == 10
    for key in [*expected, "consistency/average", "consistency/average_centered", "consistency/ch3_vs_mean"]:
        assert out[key] == pytest.approx(1.0), key
    assert out["consistency/retrieval_top1"] == 1.0
    # Cosines ignore each channel's embedding norm.
    scaled = channel_consistency(np.repeat(field, 5, axis=1) * rng.uniform(0.5, 2, (16, 5, 1)), field[:, 0], CHANNELS)
    assert scaled["consistency/average"] == pytest.approx(1.0)


def test_channel_consistency_random_is_near_chance():
    rng = np.random.default_rng(1)
    out = channel_consistency(rng.normal(size=(64, 5, 64)), rng.normal(size=(64, 64)), CHANNELS)
    assert abs(out["consistency/average"]) < 0.03
    assert abs(out["consistency/ch1_vs_mean"]) < 0.06
    assert out["consistency/retrieval_top1"] < 4 / 64  # chance is 1/64


def test_channel_consistency_centering_removes_shared_direction():
    rng = np.random.default_rng(2)
    shared = 10 * rng.normal(size=32)
    emb = shared + rng.normal(size=(32, 5, 32))  # fields and channels unrelated beyond a common offset
    out = channel_consistency(emb, emb.mean(1), CHANNELS)
    assert out["consistency/average"] > 0.9
    assert abs(out["consistency/average_centered"]) < 0.05


def test_channel_consistency_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"mean_emb must be \[4, 8\], got shape \(4, 7\)"):
        channel_consistency(np.zeros((4, 5, 8)), np.zeros((4, 7)), CHANNELS)
    with pytest.raises(ValueError, match="3 channel_names"):
        channel_consistency(np.zeros((4, 5, 8)), np.zeros((4, 8)), CHANNELS[:3])


class _FakeGpu:
    def __init__(self, used, peak):
        self._stats = {"bytes_in_use": used, "peak_bytes_in_use": peak, "bytes_limit": 80e9}

    def memory_stats(self):
        return self._stats


def test_system_metrics():
    import jax

    cpu = system_metrics(jax.local_devices())
    assert "system/gpu_memory_gb" not in cpu  # CPU has no memory stats: skipped, not 0
    assert 0 < cpu["system/host_memory_gb"] < 1e4 and 0 < cpu["system/host_memory_percent"] <= 100
    gpu = system_metrics([_FakeGpu(3e9, 5e9), _FakeGpu(7e9, 7.5e9)])
    assert gpu["system/gpu_memory_gb"] == pytest.approx(7.0)
    assert gpu["system/gpu_memory_peak_gb"] == pytest.approx(7.5)
    assert gpu["system/gpu_memory_limit_gb"] == pytest.approx(80.0)


def test_loop_timer():
    now = [0.0]
    timer = LoopTimer("data_wait", clock=lambda: now[0])
    for wait, compute in [(0.5, 1.5), (1.5, 0.5)]:
        with timer.timing():
            now[0] += wait
        now[0] += compute
    assert timer.pop() == {"system/data_wait_s": 1.0, "system/data_wait_fraction": 0.5}
    assert timer.pop() == {}


def test_device_starvation_counts_dispatches_that_found_the_device_idle():
    starvation = DeviceStarvation()
    assert starvation.pop() == {}
    slow = jax.jit(lambda x: x @ x @ x @ x)
    done = jax.block_until_ready(slow(jnp.ones((512, 512))))
    starvation.observe(done.is_ready())  # finished before the next dispatch: the device idled
    for previous_done in (False, False, True):
        starvation.observe(previous_done)
    assert starvation.pop() == {"system/device_starved_fraction": 0.5}
    assert starvation.pop() == {}


def _traced_python_calls(directory) -> int:
    """Events of the Python tracer (named `$file:line function`) in a StepTrace's Perfetto file."""
    import gzip
    import json
    import pathlib

    (path,) = pathlib.Path(directory).rglob("*perfetto_trace.json.gz")
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    return sum(1 for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("$"))


@pytest.mark.parametrize("python", [False, True])
def test_step_trace_traces_python_calls_only_when_asked(tmp_path, python):
    # The Python tracer slows Python several-fold: off by default, so a trace's host timing is a run's.
    trace = StepTrace(str(tmp_path), start=1, steps=2, python=python)
    step = jax.jit(lambda x: x @ x)
    x = jnp.ones((64, 64))
    for i in range(4):
        trace.before_step(i)
        x = step(x) / 64
        trace.after_step(i, x)
    assert (_traced_python_calls(tmp_path) > 0) == python
