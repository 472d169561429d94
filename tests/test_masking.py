"""iBOT masks: exact counts, block shape like DINOv2's generator, stratified ratios, static gather."""

import importlib.util
import pathlib
import random

import dinov2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, NamedSharding
from scipy import ndimage

from dinocell_jax.ssl import masking


def _dinov2_masking():
    """dinov2/data/masking.py by path: importing dinov2.data pulls in torchvision."""
    path = pathlib.Path(dinov2.__file__).parent / "data" / "masking.py"
    spec = importlib.util.spec_from_file_location("dinov2_masking", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _components(mask) -> int:
    return ndimage.label(mask)[1]  # 4-connectivity


@pytest.mark.parametrize("grid", [(28, 28), (6, 9)])
def test_exact_count_for_every_target(grid):
    gen = masking.BlockMaskGenerator(grid)
    n = grid[0] * grid[1]
    rng = np.random.default_rng(0)
    for target in sorted({0, 1, 3, 4, n // 10, n // 3, n // 2, n // 2 + 1, n - 1, n}):
        for _ in range(5):
            mask = gen(rng, target)
            assert mask.shape == grid and mask.dtype == bool
            assert mask.sum() == target


def test_same_seed_same_mask():
    gen = masking.BlockMaskGenerator((12, 12))
    a = gen(np.random.default_rng(5), 40)
    b = gen(np.random.default_rng(5), 40)
    c = gen(np.random.default_rng(6), 40)
    assert (a == b).all() and not (a == c).all()


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5])
def test_blocks_shaped_like_dinov2(fraction):
    """As few connected pieces as DINOv2's blocks, far fewer than scattered patches."""
    grid, n_masks = (28, 28), 100
    n = grid[0] * grid[1]
    target = int(fraction * n)
    ref = _dinov2_masking().MaskingGenerator(grid, max_num_patches=0.5 * n)
    ours = masking.BlockMaskGenerator(grid)
    rng = np.random.default_rng(1)
    random.seed(1)
    ref_pieces = np.mean([_components(ref(target)) for _ in range(n_masks)])
    our_pieces = np.mean([_components(ours(rng, target)) for _ in range(n_masks)])
    scattered = np.zeros(n, bool)
    scattered[rng.choice(n, target, replace=False)] = True
    assert abs(our_pieces - ref_pieces) < 1.0, (our_pieces, ref_pieces)
    assert our_pieces < target / ours.min_num_patches
    assert our_pieces * 5 < _components(scattered.reshape(grid))


def test_batch_masks_stratified_and_shuffled():
    n_images, grid = 16, (8, 8)
    n = 64
    probs = np.linspace(0.1, 0.5, 9)
    lower = [int(n * p) for p in probs[:-1]]
    upper = [int(n * p) for p in probs[1:]]
    bound = masking.masked_upperbound(n_images, n)
    rng = np.random.default_rng(2)
    masked_at = np.zeros(n_images)
    draws = 200
    for _ in range(draws):
        masks = masking.sample_batch_masks(rng, n_images, grid)
        assert masks.shape == (n_images, n) and masks.dtype == bool
        counts = masks.sum(axis=1)
        assert (counts > 0).sum() == n_images // 2
        # Sorted, the i-th masked image falls in the i-th ratio stratum.
        for c, lo, hi in zip(np.sort(counts[counts > 0]), lower, upper):
            assert lo <= c <= hi
        assert counts.sum() <= bound
        masked_at += counts > 0
    # Which image is masked is shuffled: every position about half the time.
    assert 0.35 < masked_at.min() / draws and masked_at.max() / draws < 0.65


@pytest.mark.parametrize("n_images,n_patches", [(160, 784), (128, 784), (10, 144), (16, 64)])
def test_upperbound_equals_dinov2_collate(n_images, n_patches):
    """The same number as dinov2/data/collate.py computes for the batch."""
    n_masked = int(n_images * 0.5)
    probs = torch.linspace(0.1, 0.5, n_masked + 1)
    want = sum(int(n_patches * probs[i + 1]) for i in range(n_masked))
    assert masking.masked_upperbound(n_images, n_patches, (0.1, 0.5), 0.5) == want


def test_no_masks_when_probability_zero():
    masks = masking.sample_batch_masks(np.random.default_rng(0), 6, (4, 4), sample_probability=0.0)
    assert not masks.any() and masking.masked_upperbound(6, 16, (0.1, 0.5), 0.0) == 0


def _gather_reference(tokens, masks):
    counts = masks.sum(axis=1)
    rows = tokens[masks]
    weights = np.repeat(1.0 / np.maximum(counts, 1), counts)
    return rows, weights, np.flatnonzero(masks.reshape(-1))


def test_gather_masked_recovers_masked_tokens():
    n_images, grid, dim = 8, (6, 6), 5
    upper = masking.masked_upperbound(n_images, 36)
    traces = []

    @jax.jit
    def gather(tokens, masks):
        traces.append(None)
        return masking.gather_masked(tokens, masks, upper)

    rng = np.random.default_rng(3)
    for _ in range(3):
        tokens = rng.standard_normal((n_images, 36, dim)).astype(np.float32)
        masks = masking.sample_batch_masks(rng, n_images, grid)
        buffer, weights, valid, index = gather(tokens, masks)
        assert buffer.shape == (upper, dim) and weights.shape == valid.shape == index.shape == (upper,)
        assert weights.dtype == jnp.float32 and index.dtype == jnp.int32 and valid.dtype == bool
        rows, want_w, want_i = _gather_reference(tokens, masks)
        n = len(rows)
        assert int(valid.sum()) == n and bool(valid[:n].all())
        np.testing.assert_array_equal(buffer[:n], rows)
        np.testing.assert_array_equal(buffer[n:], 0)
        np.testing.assert_array_equal(index[:n], want_i)
        np.testing.assert_allclose(weights[:n], want_w, rtol=1e-6)
        np.testing.assert_array_equal(weights[n:], 0)
        np.testing.assert_allclose(weights.sum(), (masks.sum(axis=1) > 0).sum(), rtol=1e-5)
    assert len(traces) == 1  # static shapes: one compilation for every draw


def test_gather_masked_on_sharded_batch():
    """Tokens and masks sharded over 8 devices give the same buffer as one device."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    n_images, grid, dim = 16, (4, 4), 3
    upper = masking.masked_upperbound(n_images, 16)
    rng = np.random.default_rng(4)
    tokens = rng.standard_normal((n_images, 16, dim)).astype(np.float32)
    masks = masking.sample_batch_masks(rng, n_images, grid)
    rows = NamedSharding(mesh, jax.P("data"))
    sharded = jax.jit(lambda t, m: masking.gather_masked(t, m, upper))(
        jax.device_put(tokens, rows), jax.device_put(masks, rows)
    )
    single = masking.gather_masked(jnp.asarray(tokens), jnp.asarray(masks), upper)
    for a, b in zip(sharded, single):
        np.testing.assert_array_equal(a, b)


def test_edge_errors_name_the_argument():
    gen = masking.BlockMaskGenerator((4, 4))
    with pytest.raises(ValueError, match="num_masking_patches=17"):
        gen(np.random.default_rng(0), 17)
    with pytest.raises(ValueError, match=r"masks must be \[2, 16\]"):
        masking.gather_masked(jnp.zeros((2, 16, 3)), jnp.zeros((2, 15), bool), 4)
    with pytest.raises(ValueError, match="ratio_min_max"):
        masking.sample_batch_masks(np.random.default_rng(0), 4, (4, 4), ratio_min_max=(0.5, 0.1))
