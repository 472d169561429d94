"""Intensity bounds on the host and the device-side normalisation."""

import numpy as np
import pytest

from dinocell_jax.data.normalize import HISTOGRAM_MIN_SAMPLES, MAX_SAMPLES, intensity_bounds, normalize_fields


@pytest.mark.parametrize("shape", [(5, 64, 48), (2, 256, 256)])  # numpy's percentile; the histogram
def test_percentile_bounds_match_numpy_on_small_fields(shape):
    assert (shape[1] * shape[2] >= HISTOGRAM_MIN_SAMPLES) == (shape[1] == 256)
    rng = np.random.default_rng(0)
    field = rng.gamma(2.0, 800.0, shape).astype(np.uint16)
    lo, hi = intensity_bounds(field, "percentile", 0.1, 99.9)
    ref = np.percentile(field.reshape(shape[0], -1), [0.1, 99.9], axis=1)
    assert lo.dtype == np.float32 and hi.dtype == np.float32 and lo.shape == (shape[0],)
    np.testing.assert_array_equal(lo, ref[0].astype(np.float32))
    np.testing.assert_array_equal(hi, ref[1].astype(np.float32))
    # Float fields take numpy's path and agree.
    lo_f, hi_f = intensity_bounds(field.astype(np.float32), "percentile", 0.1, 99.9)
    np.testing.assert_allclose(lo_f, lo, rtol=1e-6)
    np.testing.assert_allclose(hi_f, hi, rtol=1e-6)


def test_large_fields_use_a_fixed_subsample_close_to_the_full_percentile():
    rng = np.random.default_rng(1)
    field = rng.gamma(2.0, 800.0, (2, 1080, 1080)).astype(np.uint16)
    assert field[0].size > MAX_SAMPLES
    lo, hi = intensity_bounds(field, low=1.0, high=99.0)
    full = np.percentile(field.reshape(2, -1), [1.0, 99.0], axis=1)
    np.testing.assert_allclose(lo, full[0], rtol=0.02)
    np.testing.assert_allclose(hi, full[1], rtol=0.02)
    again = intensity_bounds(field, low=1.0, high=99.0)
    np.testing.assert_array_equal(lo, again[0])


def test_minmax_and_constant_channels():
    field = np.zeros((3, 8, 8), np.uint16)
    field[0] = 500
    field[1, 2, 3] = 9000
    field[2] = np.arange(64).reshape(8, 8) + 10
    lo, hi = intensity_bounds(field, "minmax")
    np.testing.assert_array_equal(lo, [500, 0, 10])
    np.testing.assert_array_equal(hi, [501, 9000, 73])  # a constant channel gets high = low + 1
    lo_p, hi_p = intensity_bounds(field)
    assert np.all(hi_p > lo_p)
    out = np.asarray(normalize_fields(field[None], lo[None], hi[None]))
    assert np.all(np.isfinite(out)) and np.all(out[0, 0] == 0)


def test_normalize_fields_clips_to_unit_range_per_image_and_channel():
    fields = np.array([[[[0, 100, 200, 300]], [[0, 100, 200, 300]]],
                       [[[0, 100, 200, 300]], [[0, 100, 200, 300]]]], np.uint16)  # [2, 2, 1, 4]
    low = np.array([[100, 0], [0, 0]], np.float32)
    high = np.array([[200, 300], [150, 600]], np.float32)
    out = np.asarray(normalize_fields(fields, low, high))
    assert out.dtype == np.float32 and out.shape == (2, 2, 1, 4)
    np.testing.assert_allclose(out[0, 0, 0], [0, 0, 1, 1])
    np.testing.assert_allclose(out[0, 1, 0], [0, 1 / 3, 2 / 3, 1], rtol=1e-6)
    np.testing.assert_allclose(out[1, 0, 0], [0, 2 / 3, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(out[1, 1, 0], [0, 1 / 6, 1 / 3, 0.5], rtol=1e-6)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"\[C, H, W\].*\(8, 8\)"):
        intensity_bounds(np.zeros((8, 8), np.uint16))
    with pytest.raises(ValueError, match="mode 'zscore'"):
        intensity_bounds(np.zeros((1, 8, 8), np.uint16), mode="zscore")
    with pytest.raises(ValueError, match="low=50"):
        intensity_bounds(np.zeros((1, 8, 8), np.uint16), low=50, high=10)
