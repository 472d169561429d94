"""Device-side multi-crop augmentation: shapes, determinism, channel strategies, crop geometry, one compile."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinocell_jax import config as config_lib
from dinocell_jax.data import augment
from dinocell_jax.data.augment import ALL_CHANNELS, MEAN_CHANNEL, AugmentConfig
from dinocell_jax.data.normalize import intensity_bounds, normalize_fields
from dinocell_jax.data.synthetic import SyntheticCellPainting

FIELD, G, S, L = 32, 16, 8, 3
TRACES = collections.Counter()


def _traced_views(key, fields, low, high, aug, strategy=None):
    TRACES[(aug, fields.shape)] += 1
    return augment.make_views(key, fields, low, high, aug, strategy)


# Unoptimised XLA compiles ~4x faster on CPU; these tests check values, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
views = jax.jit(_traced_views, static_argnames=("aug", "strategy"), compiler_options=FAST_COMPILE)
# Everything that changes intensities or orientation off: crops are pure crop + resize.
PLAIN = dict(flip_p=0.0, rot90=False, jitter_p=0.0, blur_p_global=(0.0, 0.0), blur_p_local=0.0, solarize_p=0.0)


def _synthetic_batch(n, size=FIELD, seed=0):
    ds = SyntheticCellPainting(num_fields=n, field_size=size, seed=seed)
    fields = np.stack([ds[i]["field"] for i in range(n)])
    bounds = [intensity_bounds(f) for f in fields]
    return fields, np.stack([b[0] for b in bounds]), np.stack([b[1] for b in bounds])


def _offset_fields(b, c, base, delta):
    """Channel k = base + k * delta (uint16 [b, c, H, W]) with one shared normalisation."""
    fields = np.stack([base + k * delta for k in range(c)])[None].repeat(b, 0).astype(np.uint16)
    low = np.zeros((b, c), np.float32)
    high = np.full((b, c), 20000.0, np.float32)
    return fields, low, high


def _unit(x):
    return np.asarray(augment.unstandardize(x))


def test_from_config_reads_crops_and_strategy():
    cfg = config_lib.base_config()
    cfg.data.strategy = "stacked"
    cfg.data.local_mean_p = 0.7
    aug = AugmentConfig.from_config(cfg)
    assert (aug.global_size, aug.local_size, aug.n_local) == (224, 96, 8)
    assert aug.global_scale == (0.4, 1.0) and aug.local_scale == (0.05, 0.4)
    assert aug.blur_p_global == (1.0, 0.1) and aug.solarize_p == 0.2
    assert aug.strategy == "stacked" and aug.local_mean_p == 0.7
    hash(aug)
    with pytest.raises(ValueError, match="strategy: 'rgb'"):
        AugmentConfig(strategy="rgb")
    with pytest.raises(ValueError, match="local_scale"):
        AugmentConfig(local_scale=(0.5, 0.2))


# Settings shared by several tests, so that each compiles once for the module.
MULTIVIEW = AugmentConfig(global_size=G, local_size=S, n_local=L, strategy="multiview")
AVERAGE_PLAIN = AugmentConfig(global_size=G, local_size=S, n_local=2, strategy="average", **PLAIN)
STACKED_PLAIN = AugmentConfig(global_size=32, local_size=16, n_local=8, strategy="stacked", **PLAIN)


def _ramp_batch(b=64, c=5, field=64):
    """Channel 0 = x / W and channel 1 = y / H after normalisation (others: x + y)."""
    yy, xx = np.mgrid[:field, :field]
    planes = [xx * 1000, yy * 1000] + [(xx + yy) * 500] * (c - 2)
    fields = np.stack(planes)[None].repeat(b, 0).astype(np.uint16)
    return fields, np.zeros((b, c), np.float32), np.full((b, c), field * 1000.0, np.float32)


@pytest.mark.parametrize("strategy", ["multiview", "average", "stacked"])
def test_shapes_dtypes_and_channel_ids(strategy):
    aug, (fields, low, high) = {
        "multiview": (MULTIVIEW, _synthetic_batch(2)),
        "average": (AVERAGE_PLAIN, _synthetic_batch(4)),
        "stacked": (STACKED_PLAIN, _ramp_batch()),
    }[strategy]
    b, c = fields.shape[:2]
    cin = c if strategy == "stacked" else 1
    g, s, n = aug.global_size, aug.local_size, aug.n_local
    out = views(jax.random.key(0), fields, low, high, aug)
    assert out["global_crops"].shape == (2, b, g, g, cin) and out["global_crops"].dtype == jnp.float32
    assert out["local_crops"].shape == (n, b, s, s, cin) and out["local_crops"].dtype == jnp.float32
    assert out["global_channel"].shape == (2, b) and out["global_channel"].dtype == jnp.int32
    assert out["local_channel"].shape == (n, b) and out["local_channel"].dtype == jnp.int32
    for name in ("global_crops", "local_crops"):
        x = np.asarray(out[name])
        assert np.all(np.isfinite(x)) and x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6
    g, loc = np.asarray(out["global_channel"]), np.asarray(out["local_channel"])
    if strategy == "multiview":
        assert np.all(g[0] == MEAN_CHANNEL) and np.all((g[1] >= 0) & (g[1] < c))
        assert np.all((loc >= MEAN_CHANNEL) & (loc < c))
    elif strategy == "average":
        assert np.all(g == MEAN_CHANNEL) and np.all(loc == MEAN_CHANNEL)
    else:
        assert np.all(g == ALL_CHANNELS) and np.all(loc == ALL_CHANNELS)
    if strategy == "stacked":  # the stains stay apart: the x and y ramps are different inputs
        crops = np.asarray(augment.unstandardize(out["global_crops"]))
        assert crops[..., 0].std() > 0.05 and not np.allclose(crops[..., 0], crops[..., 1])


def test_views_are_deterministic_by_key():
    fields, low, high = _synthetic_batch(2)
    a = views(jax.random.key(1), fields, low, high, MULTIVIEW)
    b = views(jax.random.key(1), fields, low, high, MULTIVIEW)
    c = views(jax.random.key(2), fields, low, high, MULTIVIEW)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
    assert not np.allclose(np.asarray(a["local_crops"]), np.asarray(c["local_crops"]))


def test_stacked_single_stains_zero_the_other_channels_with_their_probability():
    fields, low, high = _ramp_batch()
    full = views(jax.random.key(4), fields, low, high, STACKED_PLAIN)
    mixed = views(jax.random.key(4), fields, low, high,
                  dataclasses.replace(STACKED_PLAIN, stacked_single_p=0.5))
    g_chan, l_chan = np.asarray(mixed["global_channel"]), np.asarray(mixed["local_channel"])
    assert np.all(g_chan[0] == ALL_CHANNELS)  # the teacher's first view always has every stain
    for name, chan in (("global_crops", g_chan), ("local_crops", l_chan)):
        a, b = np.asarray(full[name]), np.asarray(mixed[name])
        for n, i in zip(*np.nonzero(chan != ALL_CHANNELS)):
            # One stain, as in the full crop (same key, same boxes), the others zero.
            np.testing.assert_array_equal(b[n, i, ..., chan[n, i]], a[n, i, ..., chan[n, i]])
            assert not np.any(np.delete(b[n, i], chan[n, i], axis=-1))
        np.testing.assert_array_equal(b[chan == ALL_CHANNELS], a[chan == ALL_CHANNELS])
    single = np.concatenate([g_chan[1], l_chan.ravel()]) != ALL_CHANNELS
    assert 0.4 < single.mean() < 0.6 and set(l_chan[l_chan >= 0].tolist()) == {0, 1, 2, 3, 4}


MULTIVIEW_FULL = AugmentConfig(global_size=G, local_size=S, n_local=8, global_scale=(1.0, 1.0),
                               strategy="multiview", local_mean_p=0.3, **PLAIN)


def test_multiview_global_crops_are_the_mean_and_one_channel():
    yy, xx = np.mgrid[:FIELD, :FIELD]
    base = 2000 + 60 * xx + 25 * yy + 800 * ((xx // 4 + yy // 4) % 2)  # asymmetric, textured
    delta = 1500
    fields, low, high = _offset_fields(64, 5, base, delta)
    out = views(jax.random.key(3), fields, low, high, MULTIVIEW_FULL)
    g1, g2 = _unit(out["global_crops"][0]), _unit(out["global_crops"][1])
    chan = np.asarray(out["global_channel"][1])

    norm = np.asarray(normalize_fields(fields, low, high))  # [B, 5, H, W]
    # global_scale (1, 1) makes every global crop the whole field, so references are plain resizes.
    resize = lambda img: np.asarray(jax.image.resize(img, (G, G), "linear", antialias=True))
    np.testing.assert_allclose(g1[..., 0], resize(norm[0].mean(0))[None].repeat(64, 0), atol=2e-5)
    # Channels differ by constants, so the channel of global crop 2 reads off its offset from crop 1.
    offset = (g2 - g1).mean(axis=(1, 2, 3)) * 20000.0 / delta + 2
    np.testing.assert_allclose(offset, chan, atol=1e-3)
    for i in range(8):
        np.testing.assert_allclose(g2[i, ..., 0], resize(norm[i, chan[i]]), atol=2e-5)
    assert set(chan.tolist()) == {0, 1, 2, 3, 4}


def test_multiview_local_crops_are_the_mean_with_local_mean_p():
    b = 64
    levels = np.array([1000, 4000, 7000, 10000, 13000])
    fields, low, high = _offset_fields(b, 5, np.full((FIELD, FIELD), levels[0]), levels[1] - levels[0])
    expected = {k: levels[k] / 20000.0 for k in range(5)} | {MEAN_CHANNEL: levels.mean() / 20000.0}
    n_mean = n_total = 0
    for seed in range(4):
        out = views(jax.random.key(100 + seed), fields, low, high, MULTIVIEW_FULL)
        crops, chan = _unit(out["local_crops"]), np.asarray(out["local_channel"])
        value = crops.mean(axis=(2, 3, 4))
        np.testing.assert_allclose(crops.std(axis=(2, 3, 4)), 0, atol=1e-5)
        np.testing.assert_allclose(value, np.vectorize(expected.get)(chan), atol=1e-5)
        n_mean += (chan == MEAN_CHANNEL).sum()
        n_total += chan.size
        single = chan[chan >= 0]
        assert set(single.tolist()) == {0, 1, 2, 3, 4}
    frac = n_mean / n_total  # 2048 draws: sd 0.01
    assert abs(frac - 0.3) < 0.05, frac


def _torchvision_mean_area(scale, ratio, n=200_000, seed=0):
    """Mean area fraction of torchvision's first-fitting draw, by simulation on a square field."""
    rng = np.random.default_rng(seed)
    area = rng.uniform(*scale, (n, 10))
    r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, 10)))
    fits = (np.sqrt(area * r) <= 1) & (np.sqrt(area / r) <= 1)
    first = np.argmax(fits, axis=1)
    return area[np.arange(n), first].mean()


def test_sample_boxes_respect_scale_ratio_and_field():
    h, w = 40, 56
    boxes = np.asarray(augment.sample_boxes(jax.random.key(0), (4000,), h, w, (0.4, 1.0), (3 / 4, 4 / 3)))
    top, left, bh, bw = boxes.T
    area = bh * bw / (h * w)
    assert np.all((area >= 0.4 - 1e-5) & (area <= 1.0 + 1e-5))
    assert np.all((bw / bh >= 3 / 4 - 1e-5) & (bw / bh <= 4 / 3 + 1e-5))
    assert np.all((top >= 0) & (left >= 0) & (top + bh <= h + 1e-4) & (left + bw <= w + 1e-4))


@pytest.mark.parametrize("which,scale", [("global_crops", (0.4, 1.0)), ("local_crops", (0.05, 0.4))])
def test_crop_area_fractions_follow_the_scale_range(which, scale):
    # Stacked ramps: a crop's value span along the x and y ramps measures its width and height.
    fields, low, high = _ramp_batch()
    crops = _unit(views(jax.random.key(7), fields, low, high, STACKED_PLAIN)[which])
    size = crops.shape[2]
    span = (crops.max(axis=(2, 3)) - crops.min(axis=(2, 3))) * size / (size - 1)  # [N, B, 2]
    frac = (span[..., 0] * span[..., 1]).ravel()
    lo, hi = scale
    assert frac.min() > lo * 0.9 and frac.max() < hi * 1.05, (frac.min(), frac.max())
    assert frac.min() < lo + 0.15 * (hi - lo) and frac.max() > hi - 0.15 * (hi - lo)
    expected = _torchvision_mean_area(scale, (3 / 4, 4 / 3))
    assert abs(frac.mean() - expected) < 0.05 * (hi - lo) + 0.01, (frac.mean(), expected)


def _dihedral(img):
    """The 8 symmetries of a square image [S, S]."""
    out = []
    for k in range(4):
        r = np.rot90(img, k)
        out += [r, r[:, ::-1]]
    return out


def test_flips_and_rotations_cover_the_eight_symmetries():
    yy, xx = np.mgrid[:FIELD, :FIELD]
    fields, low, high = _offset_fields(64, 5, 1000 + 90 * xx + 300 * yy, 300)
    aug = dataclasses.replace(MULTIVIEW_FULL, local_scale=(1.0, 1.0), flip_p=0.5, rot90=True)
    out = views(jax.random.key(11), fields, low, high, aug)
    norm = np.asarray(normalize_fields(fields[:1], low[:1], high[:1]))[0]
    counts = np.zeros(8, int)
    for name, chan_name, size in (("global_crops", "global_channel", G), ("local_crops", "local_channel", S)):
        crops, chans = _unit(out[name])[..., 0], np.asarray(out[chan_name])
        refs = {c: _dihedral(np.asarray(jax.image.resize(norm.mean(0) if c < 0 else norm[c], (size, size),
                                                         "linear", antialias=True)))
                for c in range(-1, 5)}
        for crop, c in zip(crops.reshape(-1, size, size), chans.ravel()):
            match = [j for j, r in enumerate(refs[c]) if np.allclose(crop, r, atol=2e-5)]
            assert len(match) == 1
            counts[match[0]] += 1
    assert counts.sum() == 640 and counts.min() > 40, counts  # ~80 each when uniform


def test_blur_smooths_and_solarize_inverts_bright_pixels():
    yy, xx = np.mgrid[:FIELD, :FIELD]
    fields, low, high = _offset_fields(4, 5, 4000 * ((xx // 2 + yy // 2) % 2) + 450 * xx, 0)  # up to 0.9
    off = views(jax.random.key(5), fields, low, high, AVERAGE_PLAIN)
    on_cfg = dataclasses.replace(AVERAGE_PLAIN, blur_p_global=(1.0, 0.0), blur_p_local=1.0, solarize_p=1.0)
    on = views(jax.random.key(5), fields, low, high, on_cfg)
    tv = lambda x: np.abs(np.diff(x, axis=2)).mean(axis=(2, 3, 4)) + np.abs(np.diff(x, axis=3)).mean(axis=(2, 3, 4))
    g_off, g_on = _unit(off["global_crops"]), _unit(on["global_crops"])
    # Same key: same boxes and sigmas, only the blur differs. Sigma is uniform in
    # [0.1, 2] (DINOv2), so some crops barely change; none gets sharper.
    for blurred, plain in ((g_on[:1], g_off[:1]), (_unit(on["local_crops"]), _unit(off["local_crops"]))):
        ratio = tv(blurred) / tv(plain)
        assert np.all(ratio < 1 + 1e-4) and ratio.mean() < 0.8, ratio
    # Global 2 is solarised, never blurred: bright pixels x >= 0.5 became 1 - x.
    expected = np.where(g_off[1] >= 0.5, 1 - g_off[1], g_off[1])
    np.testing.assert_allclose(g_on[1], expected, atol=1e-6)
    assert g_off[1].max() > 0.5


def test_jitter_changes_brightness_within_range():
    fields, low, high = _synthetic_batch(4)
    plain = _unit(views(jax.random.key(9), fields, low, high, AVERAGE_PLAIN)["global_crops"])
    jit_cfg = dataclasses.replace(AVERAGE_PLAIN, jitter_p=1.0, brightness=0.4, contrast=0.0)
    bright = _unit(views(jax.random.key(9), fields, low, high, jit_cfg)["global_crops"])
    # Brightness alone scales each crop by one factor in [0.6, 1.4] (then clips at 1).
    ratio = bright.sum(axis=(2, 3, 4)) / plain.sum(axis=(2, 3, 4))
    unclipped = bright.max(axis=(2, 3, 4)) < 1.0
    assert unclipped.sum() >= 4
    assert np.all((ratio[unclipped] > 0.6 - 1e-4) & (ratio[unclipped] < 1.4 + 1e-4))
    assert np.std(ratio) > 0.02


def test_compiles_once_for_repeated_calls():
    for seed in range(3):
        fields, low, high = _synthetic_batch(2, seed=seed)
        jax.block_until_ready(views(jax.random.key(seed), fields, low, high, MULTIVIEW))
    assert TRACES[(MULTIVIEW, (2, 5, FIELD, FIELD))] == 1


def test_probe_views_are_deterministic_centre_views():
    fields, low, high = _synthetic_batch(3, size=24)
    fields = fields[:, :, :, 2:22]  # non-square: the centred 20x20 square is used
    out = jax.jit(augment.probe_views, static_argnums=3, compiler_options=FAST_COMPILE)(fields, low, high, 8)
    assert out["mean"].shape == (3, 8, 8, 1) and out["channels"].shape == (3, 5, 8, 8, 1)
    mean, chans = _unit(out["mean"]), _unit(out["channels"])
    norm = np.asarray(normalize_fields(fields, low, high))[:, :, 2:22, :]
    ref = np.asarray(jax.image.resize(norm, (3, 5, 8, 8), "linear", antialias=True))
    np.testing.assert_allclose(chans[..., 0], ref, atol=2e-5)
    np.testing.assert_allclose(mean[..., 0], ref.mean(axis=1), atol=2e-5)
    raw = augment.probe_views(fields, low, high, 8, standardized=False)
    np.testing.assert_allclose(np.asarray(raw["mean"]), mean, atol=1e-6)


def test_bad_shapes_name_the_argument():
    fields, low, high = _synthetic_batch(2)
    aug = MULTIVIEW
    with pytest.raises(ValueError, match=r"norm_high must be \[B, C\]"):
        augment.make_views(jax.random.key(0), fields, low, high[:, :3], aug)
    with pytest.raises(ValueError, match=r"fields must be \[B, C, H, W\]"):
        augment.make_views(jax.random.key(0), fields[0], low, high, aug)


def test_sharded_batch_gives_the_same_views_as_one_device():
    fields, low, high = _synthetic_batch(8)
    key = jax.random.key(4)
    single = views(key, fields, low, high, MULTIVIEW)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = lambda x: jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
    with jax.set_mesh(mesh):
        sharded = views(key, shard(fields), shard(low), shard(high), MULTIVIEW)
    # Same random draws per image (threefry is partitionable); float sums may reassociate.
    for name in ("global_channel", "local_channel"):
        np.testing.assert_array_equal(np.asarray(sharded[name]), np.asarray(single[name]))
    for name in ("global_crops", "local_crops"):
        np.testing.assert_allclose(np.asarray(sharded[name]), np.asarray(single[name]), atol=1e-5)


def test_instance_inputs_are_standardised_per_crop_and_channel():
    fields, low, high = _synthetic_batch(4)
    aug = dataclasses.replace(STACKED_PLAIN, input_norm="instance")
    out = views(jax.random.key(0), fields, low, high, aug)
    for crops in (out["global_crops"], out["local_crops"]):
        crops = np.asarray(crops)  # [n, B, S, S, C]
        np.testing.assert_allclose(crops.mean(axis=(2, 3)), 0.0, atol=1e-4)
        spread = crops.std(axis=(2, 3))
        assert np.all(spread <= 1.0 + 1e-4) and np.median(spread) > 0.9  # 1 unless a crop is near flat
    # The same image at another brightness and offset gives the same inputs.
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
    np.testing.assert_allclose(augment.standardize(0.5 * x + 0.2, "instance"),
                               augment.standardize(x, "instance"), atol=0.02)
    # A blank crop stays blank instead of amplifying nothing to unit variance.
    # (Zero up to the float32 rounding of its mean, which depends on the order XLA sums in.)
    np.testing.assert_allclose(augment.standardize(jnp.full((8, 8, 1), 0.3), "instance"), 0.0, atol=1e-5)
    probe = augment.probe_views(fields, low, high, 16, input_norm="instance")
    np.testing.assert_allclose(np.asarray(probe["channels"]).mean(axis=(2, 3)), 0.0, atol=1e-4)
    with pytest.raises(ValueError, match="input_norm"):
        AugmentConfig(input_norm="batch")


def test_input_norm_is_validated():
    config = config_lib.base_config()
    config.data.input_norm = "batch"
    with pytest.raises(config_lib.ConfigError, match="config.data.input_norm"):
        config_lib.validate(config, 1)


@pytest.mark.parametrize("key", ["local_mean_p", "stacked_single_p"])
def test_view_probabilities_are_validated(key):
    config = config_lib.base_config()
    config.data[key] = 1.5
    with pytest.raises(config_lib.ConfigError, match=f"config.data.{key}"):
        config_lib.validate(config, 1)
