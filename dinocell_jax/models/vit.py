"""The DINOv2/DINOv3 Vision Transformer backbone in Flax NNX.

Pre-norm blocks `x += LS1(Attn(LN1 x)); x += LS2(MLP(LN2 x))` over the tokens
`[CLS, storage x R, patches]` (../shared/REFERENCE.md, "Model"). Position is
either DINOv2's learned absolute embedding (bicubic-resized for other crop
sizes exactly as DINOv2's `interpolate_pos_encoding`) or DINOv3's axial RoPE on
patch tokens. Parameters are fp32; matmuls run in `cfg.dtype`; LayerNorm statistics
and the softmax stay fp32; the residual stream is `cfg.residual_dtype` (fp32 unless
set: see `ViTConfig.residual_dtype`).

Parameter paths (stable, the optimiser rules and the PyTorch importer match them):
`patch_embed/proj/{kernel,bias}`, `cls_token`, `storage_tokens`, `mask_token`,
`pos_embed` (learned only), `blocks/<i>/{norm1,attn/qkv,attn/proj,ls1,norm2,
mlp/fc1,mlp/fc2,ls2}/...`, `norm/{scale,bias}`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dinocell_jax import parallel

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Static description of a backbone; hashable, so it can close over jitted code."""

    patch_size: int = 8
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layerscale_init: float | None = 1e-5  # 0 / None: no LayerScale
    n_storage_tokens: int = 0
    pos_embed: str = "rope"  # "rope" (DINOv3) | "learned" (DINOv2)
    pos_embed_size: int = 224  # learned grid is pos_embed_size // patch_size square
    rope_base: float = 100.0
    drop_path_rate: float = 0.0
    in_chans: int = 1
    mask_k_bias: bool = False
    attention_impl: str = "xla"  # "xla" | "cudnn"
    dtype: str = "float32"  # compute dtype name
    # The residual stream's dtype. bfloat16 is 5-8% faster on an H100 (every LayerNorm, drop
    # path and residual add moves half the bytes) but rounds away a block's update below
    # 1/256 of the stream: with LayerScale 1e-5 the blocks are invisible in the forward pass
    # until their gains grow. DINOv3 trains that way (its FSDP2 param_dtype bf16 casts the
    # gammas and tokens too), so the DINOCell config uses bfloat16; fp32 is the default here
    # for the fp32 models that match torch.
    residual_dtype: str = "float32"
    ln_eps: float = 1e-6
    remat: bool = False  # recompute each block's activations in the backward pass
    remat_mlp: bool = False  # keep only fc1's output of each MLP; recompute its GELU in the backward pass

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"ViTConfig.{field}: {msg}")

        if self.embed_dim % self.num_heads:
            fail("embed_dim", f"{self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.pos_embed not in ("rope", "learned"):
            fail("pos_embed", f"{self.pos_embed!r} is not 'rope' or 'learned'")
        if self.pos_embed == "rope" and self.head_dim % 4:
            fail("embed_dim", f"RoPE needs a head dim divisible by 4, got {self.head_dim}")
        if self.pos_embed == "learned" and self.pos_embed_size % self.patch_size:
            fail("pos_embed_size", f"{self.pos_embed_size} is not a multiple of patch_size={self.patch_size}")
        if self.attention_impl not in ("xla", "cudnn"):
            fail("attention_impl", f"{self.attention_impl!r} is not 'xla' or 'cudnn'")
        for field in ("dtype", "residual_dtype"):
            if getattr(self, field) not in COMPUTE_DTYPES:
                fail(field, f"{getattr(self, field)!r} is not one of {tuple(COMPUTE_DTYPES)}")
        if self.attention_impl == "cudnn" and self.dtype == "float32":
            fail("attention_impl", "cuDNN flash attention needs dtype bfloat16 or float16")
        if not 0.0 <= self.drop_path_rate < 1.0:
            fail("drop_path_rate", f"{self.drop_path_rate} is not in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def compute_dtype(self):
        return COMPUTE_DTYPES[self.dtype]

    @property
    def reduced_precision(self) -> bool:
        """bf16/fp16 compute: the blocks may use forms whose error is under that precision
        (one-pass LayerNorm statistics, tanh GELU); fp32 keeps torch's exact forms."""
        return self.compute_dtype != jnp.float32

    @property
    def stream_dtype(self):
        return COMPUTE_DTYPES[self.residual_dtype]

    @property
    def pos_grid(self) -> int:
        """Side of the learned position grid."""
        return self.pos_embed_size // self.patch_size


def _preset(embed_dim, depth, num_heads, patch_size, overrides):
    return ViTConfig(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **overrides)


def vit_tiny(patch_size: int = 16, **overrides) -> ViTConfig:
    return _preset(192, 12, 3, patch_size, overrides)


def vit_small(patch_size: int = 16, **overrides) -> ViTConfig:
    return _preset(384, 12, 6, patch_size, overrides)


def vit_base(patch_size: int = 16, **overrides) -> ViTConfig:
    return _preset(768, 12, 12, patch_size, overrides)


_PRESETS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def vit_config_from(model_cfg, in_chans: int) -> ViTConfig:
    """Builds the ViTConfig of `config.model`; `in_chans` follows from the channel strategy."""
    m = model_cfg
    common = dict(
        mlp_ratio=float(m.mlp_ratio),
        qkv_bias=bool(m.qkv_bias),
        layerscale_init=float(m.layerscale) or None,
        n_storage_tokens=int(m.n_storage_tokens),
        pos_embed=str(m.pos_embed),
        pos_embed_size=int(m.pos_embed_size),
        rope_base=float(m.rope_base),
        drop_path_rate=float(m.drop_path_rate),
        in_chans=int(in_chans),
        mask_k_bias=bool(m.mask_k_bias),
        attention_impl=str(m.attention_impl),
        dtype=str(m.dtype),
        residual_dtype=str(m.residual_dtype),
        remat=bool(m.remat),
        remat_mlp=bool(m.remat_mlp),
    )
    if m.arch == "vit_custom":
        return ViTConfig(
            patch_size=int(m.patch_size), embed_dim=int(m.embed_dim), depth=int(m.depth),
            num_heads=int(m.num_heads), **common,
        )
    if m.arch not in _PRESETS:
        raise ValueError(f"config.model.arch: {m.arch!r} is not one of {(*_PRESETS, 'vit_custom')}")
    return _PRESETS[m.arch](int(m.patch_size), **common)


# ----------------------------------------------------------------------------
# Position: torch-compatible bicubic resize of the learned grid, and RoPE.
# ----------------------------------------------------------------------------

def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 ([..., 4]); a = -0.75 as torch."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def torch_bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None) -> np.ndarray:
    """[out_size, in_size] float64 matrix of torch's 1-D bicubic resize (align_corners=False, no antialias).

    torch maps output pixel `o` to source `(o + 0.5) * s - 0.5` with `s = 1/scale_factor` when a scale
    factor is passed (what DINOv2's `interpolate_pos_encoding` does, with its +0.1 offset), else
    `s = in/out`; taps outside the input are clamped to the border.
    """
    s = 1.0 / scale_factor if scale_factor else in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * s - 0.5
    base = np.floor(src)
    w = _cubic_weights(src - base)
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
    mat = np.zeros((out_size, in_size), np.float64)
    np.add.at(mat, (np.repeat(np.arange(out_size), 4), taps.ravel()), w.ravel())
    return mat


def resize_pos_grid(grid: jax.Array, out_hw: tuple[int, int], *, dinov2_offset: bool = False) -> jax.Array:
    """Bicubic resize of a position grid `[h, w, D]` -> `[H, W, D]` (same dtype), torch semantics.

    `dinov2_offset` reproduces DINOv2's `interpolate_pos_encoding` (scale factor `(H + 0.1) / h`),
    which samples the source slightly differently from a plain size-based resize.
    """
    (h, w), (oh, ow) = grid.shape[:2], out_hw
    sh = (oh + 0.1) / h if dinov2_offset else None
    sw = (ow + 0.1) / w if dinov2_offset else None
    mh = jnp.asarray(torch_bicubic_matrix(h, oh, sh), jnp.float32)
    mw = jnp.asarray(torch_bicubic_matrix(w, ow, sw), jnp.float32)
    out = jnp.einsum("oh,hwd,pw->opd", mh, grid.astype(jnp.float32), mw, precision=jax.lax.Precision.HIGHEST)
    return out.astype(grid.dtype)


def rope_sincos(grid_hw: tuple[int, int], head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """DINOv3 axial RoPE tables `(sin, cos)`, each `[H*W, head_dim]` fp32, patches in row-major order.

    `periods[j] = base^(2j/(head_dim/2))` for j < head_dim/4; patch centres normalised to [-1, 1] per
    axis ("separate" normalisation); angles `2*pi*coord/period`, y then x, tiled twice.
    """
    h, w = grid_hw
    periods = base ** (2 * np.arange(head_dim // 4, dtype=np.float64) / (head_dim // 2))
    cy = 2 * (np.arange(h, dtype=np.float64) + 0.5) / h - 1
    cx = 2 * (np.arange(w, dtype=np.float64) + 0.5) / w - 1
    coords = np.stack(np.meshgrid(cy, cx, indexing="ij"), axis=-1).reshape(h * w, 2)
    angles = 2 * np.pi * coords[:, :, None] / periods[None, None, :]
    angles = np.tile(angles.reshape(h * w, head_dim // 2), 2)
    return jnp.asarray(np.sin(angles), jnp.float32), jnp.asarray(np.cos(angles), jnp.float32)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates the last `sin.shape[0]` tokens of `x [B, T, heads, hd]`; the prefix (CLS, storage) is untouched.

    Computed in fp32 and cast back to `x.dtype`.
    """
    n_prefix = x.shape[1] - sin.shape[0]
    prefix, patches = x[:, :n_prefix], x[:, n_prefix:].astype(jnp.float32)
    lo, hi = jnp.split(patches, 2, axis=-1)
    rotated = jnp.concatenate([-hi, lo], axis=-1)
    patches = patches * cos[:, None, :] + rotated * sin[:, None, :]
    return jnp.concatenate([prefix, patches.astype(x.dtype)], axis=1)


# ----------------------------------------------------------------------------
# Attention kernels.
# ----------------------------------------------------------------------------

def attention_weights(q: jax.Array, k: jax.Array) -> jax.Array:
    """Softmax attention probabilities `[B, heads, T, S]` fp32 of `q [B, T, heads, hd]`, `k [B, S, heads, hd]`."""
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    return jax.nn.softmax(logits * (q.shape[-1] ** -0.5), axis=-1)


def explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention by einsum with an fp32 softmax: `(out [B, T, heads, hd] in v.dtype, probs [B, heads, T, T] fp32)`."""
    probs = attention_weights(q, k)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v), probs


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None,
                    valid_len: int | None = None, pad_multiple: int = 8) -> jax.Array:
    """`jax.nn.dot_product_attention` over a token count padded to a multiple of `pad_multiple`.

    q, k, v: `[B, T, heads, hd]`; returns `[B, T, heads, hd]` in q's dtype. cuDNN's flash-attention
    backward rejects odd token counts (1 + 4 + 784 = 789). With `valid_len`, the tokens are already
    padded (the backbone pads once, not per block) and only the first `valid_len` are real; without
    it, q, k, v are padded here and the result sliced back. Either way the true length goes in as
    `query_seq_lengths`/`key_value_seq_lengths`, which keeps the result exact. The same code runs
    with `implementation='xla'` or None, which is how it is tested on CPU.
    """
    b, t = q.shape[:2]
    if valid_len is not None:
        if valid_len == t:
            return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
        lengths = jnp.full((b,), valid_len, jnp.int32)
        return jax.nn.dot_product_attention(
            q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation
        )
    padded = -(-t // pad_multiple) * pad_multiple
    if padded == t:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    widths = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    out = fused_attention(*(jnp.pad(a, widths) for a in (q, k, v)), implementation=implementation,
                          valid_len=t)
    return out[:, :t]


# ----------------------------------------------------------------------------
# Drop path (DINOv2 batch-subset stochastic depth).
# ----------------------------------------------------------------------------

def drop_add_residual(x: jax.Array, residual_fn, key: jax.Array | None, rate: float) -> jax.Array:
    """`x + residual_fn(x)` with DINOv2's batch-subset stochastic depth.

    x: `[B, ...]`. With a key and rate > 0, each of `G` contiguous batch groups (G = devices of the
    active mesh when they divide B, else 1) of size `b = B/G` computes the residual on
    `max(int(b * (1 - rate)), 1)` random samples only, scaled by `b / subset`; the other samples
    pass unchanged. Without a key (or rate 0) it is the plain residual.
    """
    if key is None or rate == 0.0:
        return x + residual_fn(x).astype(x.dtype)
    batch = x.shape[0]
    # One group per device, as DINOv2 draws per GPU (the batch is split over the whole mesh).
    devices = parallel.active_devices()
    groups = 1 if batch % devices else devices
    per_group = batch // groups
    subset = max(int(per_group * (1 - rate)), 1)
    keys = jax.random.split(key, groups)
    idx = jax.vmap(lambda k: jnp.sort(jax.random.permutation(k, per_group)[:subset]))(keys)  # [G, subset]
    # Sorted, distinct rows: the gather, the scatter and their transposes need no atomics.
    hints = dict(indices_are_sorted=True, unique_indices=True)

    def take(rows, i):
        return jnp.take(rows, i[0], axis=0, **hints)

    def add(rows, i, residual):
        return rows.at[i[0]].add(residual, **hints)

    if groups > 1:  # each device gathers and scatters its own rows (see parallel.per_device)
        take, add = parallel.per_device(take), parallel.per_device(add)
    residual = residual_fn(take(x, idx)).astype(x.dtype) * (per_group / subset)
    return add(x, idx, residual)


# ----------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------

def torch_trunc_normal(key, shape, dtype=jnp.float32):
    """DINOv2's `trunc_normal_(std=0.02)` init."""
    # torch's trunc_normal_(std=0.02) truncates at +-2 in absolute units, i.e. +-100 std: a plain
    # normal in practice (jax's truncated_normal initialiser would cut at +-2 std instead).
    return 0.02 * jax.random.truncated_normal(key, -100.0, 100.0, shape, dtype)


class Linear(nnx.Module):
    """`y = x @ kernel + bias` with `kernel [in, out]` fp32, computed in `dtype`."""

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool = True, dtype=jnp.float32,
                 kernel_init=torch_trunc_normal, rngs: nnx.Rngs):
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_dim, out_dim)))
        self.bias = nnx.Param(jnp.zeros((out_dim,), jnp.float32)) if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array, bias_mask: jax.Array | None = None) -> jax.Array:
        """x `[..., in]` -> `[..., out]` in `dtype`; `bias_mask [out]` multiplies the bias (DINOv3 k-bias)."""
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            b = self.bias[...] if bias_mask is None else self.bias[...] * bias_mask
            y = y + b.astype(self.dtype)
        return y


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs, dtype=None, *, one_pass: bool = False) -> nnx.LayerNorm:
    """Statistics and normalisation in fp32; the result in `dtype` (None: fp32).

    The blocks' norms feed the compute-dtype matmuls only, so they hand over that dtype
    directly (the values the matmul's cast would give, without a separate fp32 pass).
    `one_pass` takes the variance as E[x^2] - E[x]^2, both moments in one read of the
    tokens: 4.5% of the training step on an H100 against the two-pass form torch uses.
    Its cancellation error grows with a token's (mean / std)^2: relative 5e-5 at a ratio
    of 10, 6e-3 at 100, against bf16's 4e-3 resolution. The blocks' norms use it in
    reduced precision; the final norm, whose fp32 output is the features, keeps two passes.
    """
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=one_pass, dtype=dtype, rngs=rngs)


class PatchProjection(nnx.Module):
    """Conv-layout `kernel [p, p, C, D]` and `bias [D]`, applied as one matmul over flattened patches."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.in_chans, cfg.embed_dim
        # torch Conv2d default init (DINOv2 leaves it, DINOv3 restates it): U(+-1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(c * p * p)
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (p, p, c, d), jnp.float32, -bound, bound))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (d,), jnp.float32, -bound, bound))
        self.dtype = cfg.compute_dtype

    def __call__(self, images: jax.Array) -> jax.Array:
        """images `[B, H, W, C]` -> patch embeddings `[B, H/p * W/p, D]` in compute dtype, row-major."""
        p, _, c, d = self.kernel.shape
        b, h, w, _ = images.shape
        patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
        y = jnp.dot(patches, self.kernel[...].reshape(p * p * c, d).astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.proj = PatchProjection(cfg, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.proj(images)


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init: float):
        self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32))

    def __call__(self, x):
        return x * self.gamma[...].astype(x.dtype)


class Mlp(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = Linear(cfg.embed_dim, hidden, dtype=cfg.compute_dtype, rngs=rngs)
        self.fc2 = Linear(hidden, cfg.embed_dim, dtype=cfg.compute_dtype, rngs=rngs)
        # torch's nn.GELU is the exact erf form. In bf16/fp16 the tanh form is used (as
        # flax's and big_vision's default): 4% of the step faster on an H100, and at most
        # 5e-4 from erf (at x = +-2.7), under the rounding of the bf16 activation it is
        # stored in wherever |gelu| > 0.25; fp32 keeps erf, which the torch parity tests pin.
        self.approximate_gelu = cfg.reduced_precision
        self.remat = cfg.remat_mlp

    def __call__(self, x):
        approximate = self.approximate_gelu

        def gelu_fc2(fc2: Linear, h: jax.Array) -> jax.Array:
            return fc2(jax.nn.gelu(h, approximate=approximate))

        if self.remat:
            # The backward pass keeps only fc1's output h and recomputes GELU(h) for fc2's
            # gradients (fc2's matmul is not rerun: nothing in the backward needs its output).
            # The 4x-wide GELU output and the tanh form's intermediates are most of a block's
            # saved activations; recomputing them costs one elementwise pass.
            gelu_fc2 = nnx.remat(gelu_fc2)
        return gelu_fc2(self.fc2, self.fc1(x))


class Attention(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d = cfg.embed_dim
        self.qkv = Linear(d, 3 * d, bias=cfg.qkv_bias, dtype=cfg.compute_dtype, rngs=rngs)
        self.proj = Linear(d, d, dtype=cfg.compute_dtype, rngs=rngs)
        self.num_heads = cfg.num_heads
        self.mask_k_bias = cfg.mask_k_bias
        self.impl = cfg.attention_impl

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None, *,
                 return_attention: bool = False, valid_len: int | None = None) -> tuple[jax.Array, jax.Array | None]:
        """x `[B, T, D]` -> (`[B, T, D]` compute dtype, probabilities `[B, heads, T, T]` fp32 or None).

        valid_len: tokens past it are padding (fused attention only).
        """
        b, t, d = x.shape
        bias_mask = None
        if self.mask_k_bias and self.qkv.bias is not None:
            # DINOv3 LinearKMaskedBias: keys carry no bias (it cancels in the softmax anyway).
            bias_mask = jnp.concatenate([jnp.ones(d), jnp.zeros(d), jnp.ones(d)]).astype(jnp.float32)
        qkv = self.qkv(x, bias_mask).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        probs = None
        if return_attention or self.impl == "xla":
            out, probs = explicit_attention(q, k, v)
        else:
            out = fused_attention(q, k, v, implementation=self.impl, valid_len=valid_len)
        out = self.proj(out.reshape(b, t, d))
        return out, probs if return_attention else None


class Block(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(cfg.embed_dim, cfg.ln_eps, rngs, cfg.compute_dtype, one_pass=cfg.reduced_precision)
        self.attn = Attention(cfg, rngs=rngs)
        self.ls1 = LayerScale(cfg.embed_dim, cfg.layerscale_init) if cfg.layerscale_init else None
        self.norm2 = _layer_norm(cfg.embed_dim, cfg.ln_eps, rngs, cfg.compute_dtype, one_pass=cfg.reduced_precision)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.ls2 = LayerScale(cfg.embed_dim, cfg.layerscale_init) if cfg.layerscale_init else None
        self.drop_path_rate = cfg.drop_path_rate

    def __call__(self, x: jax.Array, rope, *, key: jax.Array | None = None,
                 return_attention: bool = False, valid_len: int | None = None) -> tuple[jax.Array, jax.Array | None]:
        """x `[B, T, D]` residual dtype -> (same, last attention probabilities or None)."""
        scale1 = self.ls1 if self.ls1 is not None else (lambda y: y)
        scale2 = self.ls2 if self.ls2 is not None else (lambda y: y)
        probs = []

        def attn_residual(y):
            out, p = self.attn(self.norm1(y), rope, return_attention=return_attention, valid_len=valid_len)
            probs.append(p)
            return scale1(out)

        def mlp_residual(y):
            return scale2(self.mlp(self.norm2(y)))

        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        x = drop_add_residual(x, attn_residual, k1, self.drop_path_rate)
        x = drop_add_residual(x, mlp_residual, k2, self.drop_path_rate)
        return x, probs[0]


class VisionTransformer(nnx.Module):
    """ViT backbone; see the module docstring for the parameter layout."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d = cfg.embed_dim
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        # DINOv2 init: CLS (and registers) N(0, 1e-6), mask token zeros, learned position trunc-normal .02.
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, d), jnp.float32))
        if cfg.n_storage_tokens:
            self.storage_tokens = nnx.Param(
                1e-6 * jax.random.normal(rngs.params(), (1, cfg.n_storage_tokens, d), jnp.float32))
        else:
            self.storage_tokens = None
        self.mask_token = nnx.Param(jnp.zeros((1, d), jnp.float32))
        if cfg.pos_embed == "learned":
            self.pos_embed = nnx.Param(torch_trunc_normal(rngs.params(), (1, 1 + cfg.pos_grid ** 2, d)))
        else:
            self.pos_embed = None
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = _layer_norm(d, cfg.ln_eps, rngs)

    def _position(self, grid_hw: tuple[int, int]) -> jax.Array:
        """Learned position `[1, 1 + H*W, D]` fp32 for a `grid_hw` patch grid (DINOv2 semantics)."""
        pos = self.pos_embed[...]
        g = self.cfg.pos_grid
        if grid_hw == (g, g):
            return pos
        grid = resize_pos_grid(pos[0, 1:].reshape(g, g, -1), grid_hw, dinov2_offset=True)
        return jnp.concatenate([pos[:, :1], grid.reshape(1, -1, pos.shape[-1])], axis=1)

    def __call__(self, images: jax.Array, masks: jax.Array | None = None, *,
                 drop_path_key: jax.Array | None = None, return_attention: bool = False) -> dict[str, jax.Array]:
        """Backbone features.

        images: `[B, H, W, C]` float (H, W multiples of the patch size, C = cfg.in_chans).
        masks: `[B, N]` bool, N = (H/p)(W/p); True patches are replaced by the mask token.
        drop_path_key: enables batch-subset stochastic depth (training); None = deterministic.
        Returns fp32 `x_norm_clstoken [B, D]`, `x_storage_tokens [B, R, D]`, `x_norm_patchtokens [B, N, D]`
        and, when `return_attention`, `attention [B, heads, T, T]` fp32 of the last block (T = 1 + R + N).
        """
        cfg = self.cfg
        if images.ndim != 4 or images.shape[-1] != cfg.in_chans:
            raise ValueError(f"VisionTransformer: images must be [B, H, W, {cfg.in_chans}], got {images.shape}")
        b, h, w, _ = images.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"VisionTransformer: image size {h}x{w} is not a multiple of patch_size={p}")
        grid_hw = (h // p, w // p)
        n = grid_hw[0] * grid_hw[1]
        if masks is not None and masks.shape != (b, n):
            raise ValueError(f"VisionTransformer: masks must be [B, N] = {(b, n)}, got {masks.shape}")
        if return_attention and drop_path_key is not None:
            raise ValueError("VisionTransformer: return_attention is for inference; pass drop_path_key=None")

        x = self.patch_embed(images).astype(jnp.float32)
        if masks is not None:
            x = jnp.where(masks[..., None], self.mask_token[...][None], x)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, cfg.embed_dim))
        x = jnp.concatenate([cls, x], axis=1)
        if self.pos_embed is not None:
            x = x + self._position(grid_hw)
        if self.storage_tokens is not None:
            storage = jnp.broadcast_to(self.storage_tokens[...], (b, cfg.n_storage_tokens, cfg.embed_dim))
            x = jnp.concatenate([x[:, :1], storage, x[:, 1:]], axis=1)
        t = x.shape[1]
        x = x.astype(cfg.stream_dtype)
        # The fused kernel needs a multiple of 8 tokens: pad once here rather than
        # in every block (pads and slices of q, k, v cost ~5% of the step).
        padded = t if return_attention or cfg.attention_impl == "xla" else -(-t // 8) * 8
        x = jnp.pad(x, ((0, 0), (0, padded - t), (0, 0)))
        rope = None
        if cfg.pos_embed == "rope":
            # Full-length tables, identity on CLS, storage and padding tokens, so the
            # rotation is one elementwise product with no slicing of q and k.
            sin, cos = rope_sincos(grid_hw, cfg.head_dim, cfg.rope_base)
            rows = ((1 + cfg.n_storage_tokens, padded - t), (0, 0))
            rope = (jnp.pad(sin, rows), jnp.pad(cos, rows, constant_values=1.0))

        block_keys = jax.random.split(drop_path_key, cfg.depth) if drop_path_key is not None else [None] * cfg.depth

        def run_block(block, x, rope, key):
            return block(x, rope, key=key, valid_len=t)[0]

        if cfg.remat:
            # Keep only each block's input for the backward pass: the backbone's
            # activations are most of a step's memory at batch 128 per GPU.
            run_block = nnx.remat(run_block)
        probs = None
        for i, block in enumerate(self.blocks):
            if return_attention and i == cfg.depth - 1:
                x, probs = block(x, rope, key=block_keys[i], return_attention=True, valid_len=t)
            else:
                x = run_block(block, x, rope, block_keys[i])
        x = self.norm(x[:, :t])
        r = cfg.n_storage_tokens
        out = {"x_norm_clstoken": x[:, 0], "x_storage_tokens": x[:, 1:1 + r], "x_norm_patchtokens": x[:, 1 + r:]}
        if return_attention:
            out["attention"] = probs
        return out


def param_count(params: Any) -> int:
    """Number of scalars in a params pytree (pure dict, nnx.State, module, or their `eval_shape`)."""
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    return int(sum(math.prod(getattr(leaf, "shape", np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(params)))
