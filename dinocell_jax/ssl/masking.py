"""iBOT masks: block-wise masks drawn on the host, and the gather of masked tokens on the device.

The host side follows DINOv2 (`dinov2/data/masking.py`, `dinov2/data/collate.py`):
rectangles of log-uniform aspect are dropped on the patch grid until the
image's target count is reached; half of the global crops of a batch get a
mask, with target ratios stratified over [0.1, 0.5]. Like DINOv3, a mask is then
topped up with random patches to exactly its target count, which makes the
number of masked tokens of a batch bounded by a static `masked_upperbound`: the
device gathers them into a buffer of that many rows and runs the
65536-prototype iBOT head on the buffer only, never on every patch token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# DINOv2 `_mask`: attempts at placing one block before the generator gives up on blocks.
_TRIES_PER_BLOCK = 10


class BlockMaskGenerator:
    """Block-wise iBOT masks on a (h, w) patch grid with an exact masked count.

    grid: (h, w) patches of a global crop (28 x 28 for 224 px at patch 8);
    max_num_patches: the largest block (DINOv2: 0.5 * h * w, the default);
    min_num_patches: the smallest block (DINOv2: 4);
    min_aspect, max_aspect: block aspect ratio range, log-uniform
    (DINOv2: 0.3 and 1 / 0.3, the default when max_aspect is None).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        height, width = (int(g) for g in grid)
        if height <= 0 or width <= 0:
            raise ValueError(f"BlockMaskGenerator: grid must be two positive sizes, got {grid}")
        if not 0 < min_aspect:
            raise ValueError(f"BlockMaskGenerator: min_aspect must be > 0, got {min_aspect}")
        self.height, self.width = height, width
        self.num_patches = height * width
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        lo, hi = (math.exp(a) for a in self.log_aspect)
        return (
            f"BlockMaskGenerator(grid=({self.height}, {self.width}), blocks {self.min_num_patches}"
            f"..{self.max_num_patches} patches, aspect {lo:.3f}..{hi:.3f})"
        )

    def _add_block(self, rng: np.random.Generator, mask: np.ndarray, budget: float) -> int:
        """Masks one rectangle adding at most `budget` new patches; returns how many it added."""
        for _ in range(_TRIES_PER_BLOCK):
            # Written out because the budget may be below min_num_patches (Python's
            # random.uniform, which DINOv2 uses, allows that; numpy's uniform does not).
            area = self.min_num_patches + (budget - self.min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                window = mask[top : top + h, left : left + w]
                added = h * w - int(window.sum())
                # A block that adds nothing or overshoots the budget is rejected (DINOv2).
                if 0 < added <= budget:
                    window[...] = True
                    return added
        return 0

    def __call__(self, rng: np.random.Generator, num_masking_patches: int) -> np.ndarray:
        """A mask bool [h, w] with exactly `num_masking_patches` True.

        Blocks are added while one fits the remaining budget (capped at
        max_num_patches per block); a block never overshoots, so the count is
        only ever short, and the shortfall is filled with random unmasked patches.
        """
        count = int(num_masking_patches)
        if not 0 <= count <= self.num_patches:
            raise ValueError(
                f"BlockMaskGenerator: num_masking_patches={num_masking_patches} is outside "
                f"[0, {self.num_patches}] for grid ({self.height}, {self.width})"
            )
        mask = np.zeros((self.height, self.width), dtype=bool)
        masked = 0
        while masked < count:
            added = self._add_block(rng, mask, min(count - masked, self.max_num_patches))
            if added == 0:
                break
            masked += added
        if masked < count:
            free = np.flatnonzero(~mask)
            mask.flat[rng.choice(free, size=count - masked, replace=False)] = True
        return mask


def _stratified_ratios(n_images: int, ratio_min_max, sample_probability) -> tuple[int, np.ndarray]:
    """(number of masked images, the n_masked + 1 stratum edges) as DINOv2's collate."""
    lo, hi = (float(r) for r in ratio_min_max)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"masking: ratio_min_max must satisfy 0 <= min <= max <= 1, got {ratio_min_max}")
    if not 0.0 <= sample_probability <= 1.0:
        raise ValueError(f"masking: sample_probability must be in [0, 1], got {sample_probability}")
    n_masked = int(n_images * sample_probability)
    return n_masked, np.linspace(lo, hi, n_masked + 1)


def masked_upperbound(n_images: int, n_patches: int, ratio_min_max=(0.1, 0.5), sample_probability=0.5) -> int:
    """Static buffer size: sum_i int(N * probs[i + 1]) over the masked images.

    Every `sample_batch_masks(rng, n_images, grid, ratio_min_max,
    sample_probability)` with h * w = n_patches has at most this many True (image
    i's count is int(N * u) with u < probs[i + 1]). The bound holds per call: if
    masks are drawn per process or per device, sum the bounds of those calls.
    """
    n_masked, probs = _stratified_ratios(n_images, ratio_min_max, sample_probability)
    return int(sum(int(n_patches * p) for p in probs[1:]))


def sample_batch_masks(
    rng: np.random.Generator,
    n_images: int,
    grid: tuple[int, int],
    ratio_min_max=(0.1, 0.5),
    sample_probability=0.5,
) -> np.ndarray:
    """iBOT masks of a batch of global crops, bool [n_images, h * w].

    n_masked = int(n_images * sample_probability) images get a block mask; the
    i-th of them has int(N * u) masked patches, u ~ U[probs[i], probs[i + 1]) with
    probs = linspace(min, max, n_masked + 1) (DINOv2 collate: stratified ratios,
    so a batch always spans the whole range); the other images have none, and
    which image gets which mask is shuffled. The shuffle makes any fixed reshape
    (e.g. to [B, 2, N] or [2, B, N]) an equally valid assignment.
    """
    generator = BlockMaskGenerator(grid)
    n_masked, probs = _stratified_ratios(n_images, ratio_min_max, sample_probability)
    masks = np.zeros((n_images, generator.num_patches), dtype=bool)
    for i in range(n_masked):
        target = int(generator.num_patches * rng.uniform(probs[i], probs[i + 1]))
        masks[i] = generator(rng, target).reshape(-1)
    return masks[rng.permutation(n_images)]


def gather_masked(
    tokens: jax.Array, masks: jax.Array, upperbound: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The masked tokens of a batch in a static buffer (jit-friendly).

    tokens: [n, N, D] any dtype (patch tokens of n global crops); masks: [n, N]
    bool; upperbound: static int, at least the batch's masked count
    (`masked_upperbound`); tokens beyond it are dropped.
    Returns, in row-major order of (image, patch):
      buffer [U, D] tokens.dtype, the masked tokens then zeros;
      weights [U] fp32, 1 / (masked count of the token's image), 0 for padding
        (the weights of each masked image sum to 1: DINOv2 `masks_weight`);
      valid [U] bool, True for the masked rows;
      index [U] int32, row of each entry in tokens.reshape(n * N, D) (0 for padding).
    """
    n, n_patches, dim = tokens.shape
    if masks.shape != (n, n_patches):
        raise ValueError(
            f"gather_masked: masks must be [{n}, {n_patches}] for tokens {tokens.shape}, got {masks.shape}"
        )
    upperbound = int(upperbound)
    if upperbound <= 0:
        raise ValueError(f"gather_masked: upperbound must be a positive int, got {upperbound}")
    masks = jnp.asarray(masks, bool)
    flat = masks.reshape(-1)
    (index,) = jnp.nonzero(flat, size=upperbound, fill_value=0)
    index = index.astype(jnp.int32)
    valid = jnp.arange(upperbound) < jnp.sum(flat)
    buffer = jnp.where(valid[:, None], tokens.reshape(n * n_patches, dim)[index], 0).astype(tokens.dtype)
    per_image = 1.0 / jnp.maximum(jnp.sum(masks, axis=1).astype(jnp.float32), 1.0)
    weights = jnp.where(valid, per_image[index // n_patches], 0.0)
    return buffer, weights, valid, index
