"""The ViT backbone: parity with DINOv2's PyTorch ViT-S/8, position encodings, attention kernels, drop path."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from dinocell_jax import config as config_lib
from dinocell_jax.models import vit as vit_lib
from dinocell_jax.models.torch_import import backbone_from_torch
from dinocell_jax.models.vit import (
    ViTConfig, VisionTransformer, apply_rope, drop_add_residual, explicit_attention, fused_attention,
    param_count, resize_pos_grid, rope_sincos, vit_config_from,
)


def _tiny(**kw):
    base = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, in_chans=1, layerscale_init=0.1)
    return ViTConfig(**{**base, **kw})


def _readout(out):
    """A scalar with informative gradients: random projections of the patch and CLS features.

    (A sum of squares of LayerNormed tokens is nearly constant: its gradients upstream of
    the final norm are rounding noise.)
    """
    patches, cls = out["x_norm_patchtokens"], out["x_norm_clstoken"]
    w_patch = jax.random.normal(jax.random.key(2), patches.shape)
    w_cls = jax.random.normal(jax.random.key(3), cls.shape)
    return jnp.sum(patches * w_patch) + jnp.sum(cls * w_cls)


def _run(model, images, masks=None, **kwargs):
    """One jitted forward: op-by-op eager dispatch is slower on CPU than compiling a tiny model once."""
    return nnx.jit(lambda m, x, mk: m(x, mk, **kwargs))(model, images, masks)


def _randomise(module, seed=0):
    """Every parameter random, so parity covers biases, norms, LayerScale, tokens and positions."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.3 * noise.abs() + 0.05)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim >= 2 and "token" not in name and "pos_embed" not in name:
                p.copy_(noise * (0.5 / math.sqrt(p[0].numel())))
            else:
                p.copy_(0.2 * noise)
    return module


def _functional(model):
    graphdef, state = nnx.split(model, nnx.Param)
    fwd = jax.jit(lambda params, x, m: nnx.merge(graphdef, params)(x, m))
    return nnx.to_pure_dict(state), fwd


@pytest.fixture(scope="module")
def dinov2_pair():
    from dinov2.models.vision_transformer import vit_small

    torch_model = _randomise(vit_small(patch_size=8, img_size=224, init_values=1e-5, block_chunks=0)).eval()
    cfg = vit_lib.vit_small(8, pos_embed="learned", in_chans=3, n_storage_tokens=0)
    params = backbone_from_torch(torch_model.state_dict(), cfg)
    _, fwd = _functional(nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0))))
    return torch_model, params, fwd


@pytest.mark.parametrize("size", [224, 96])
def test_parity_with_dinov2_vit_small_patch8(dinov2_pair, size):
    torch_model, params, fwd = dinov2_pair
    rng = np.random.default_rng(size)
    images = rng.normal(size=(2, 3, size, size)).astype(np.float32)
    n = (size // 8) ** 2
    masks = rng.random((2, n)) < 0.4
    masks[1] = False  # one masked and one unmasked sample in the same batch
    for m in (None, masks):
        with torch.no_grad():
            ref = torch_model.forward_features(torch.from_numpy(images), None if m is None else torch.from_numpy(m))
        out = fwd(params, jnp.asarray(images.transpose(0, 2, 3, 1)), None if m is None else jnp.asarray(m))
        for key in ("x_norm_clstoken", "x_norm_patchtokens"):
            theirs = ref[key].numpy()
            np.testing.assert_allclose(np.asarray(out[key]), theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
        assert out["x_storage_tokens"].shape == (2, 0, 384)


def test_param_count_vit_small_patch8(dinov2_pair):
    torch_model = dinov2_pair[0]
    cfg = vit_lib.vit_small(8, pos_embed="learned", in_chans=3)
    n = param_count(nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0))))
    assert n == sum(p.numel() for p in torch_model.parameters())
    assert 21.6e6 < n < 21.8e6  # REFERENCE: ~21.7M
    # DINOCell: RoPE instead of the 785 x 384 learned grid, 1 input channel, 4 storage tokens.
    dinocell = vit_lib.vit_small(8, n_storage_tokens=4)
    n_dinocell = param_count(nnx.eval_shape(lambda: VisionTransformer(dinocell, rngs=nnx.Rngs(0))))
    assert n_dinocell == n - 785 * 384 - 2 * 64 * 384 + 4 * 384


@pytest.mark.parametrize("grid,out,offset", [(14, 28, True), (28, 12, True), (5, 7, False), (6, 4, False)])
def test_pos_resize_matches_torch_bicubic(grid, out, offset):
    x = np.random.default_rng(0).normal(size=(grid, grid, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    if offset:  # DINOv2's interpolate_pos_encoding call
        ref = torch.nn.functional.interpolate(t, scale_factor=((out + 0.1) / grid,) * 2, mode="bicubic")
    else:
        ref = torch.nn.functional.interpolate(t, size=(out, out), mode="bicubic", align_corners=False)
    ours = resize_pos_grid(jnp.asarray(x), (out, out), dinov2_offset=offset)
    np.testing.assert_allclose(np.asarray(ours), ref[0].permute(1, 2, 0).numpy(), atol=1e-5)


def test_rope_hand_computed_2x2_grid():
    sin, cos = rope_sincos((2, 2), head_dim=8, base=100.0)
    # periods = 100^(2j/4) = [1, 10]; patch centres (0.25, 0.75) -> -0.5, +0.5 on each axis.
    for token, (y, x) in enumerate([(-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)]):
        angles = [2 * math.pi * y, 2 * math.pi * y / 10, 2 * math.pi * x, 2 * math.pi * x / 10] * 2
        np.testing.assert_allclose(np.asarray(sin[token]), np.sin(angles), atol=1e-6)
        np.testing.assert_allclose(np.asarray(cos[token]), np.cos(angles), atol=1e-6)
    # q = e_1 rotates in the (1, 5) plane by the y angle of period 10; the CLS prefix is untouched.
    q = jnp.zeros((1, 5, 1, 8)).at[:, :, 0, 1].set(1.0)
    rotated = apply_rope(q, sin, cos)
    np.testing.assert_array_equal(np.asarray(rotated[0, 0, 0]), np.eye(8)[1])
    a = 2 * math.pi * 0.5 / 10  # token 3 (y = +0.5)
    expected = np.zeros(8)
    expected[1], expected[5] = math.cos(a), math.sin(a)
    np.testing.assert_allclose(np.asarray(rotated[0, 4, 0]), expected, atol=1e-6)


def test_rope_scores_depend_only_on_relative_offsets():
    h = w = 4
    sin, cos = rope_sincos((h, w), head_dim=16, base=100.0)
    rng = np.random.default_rng(0)
    q = jnp.broadcast_to(jnp.asarray(rng.normal(size=16), jnp.float32), (1, h * w, 1, 16))
    k = jnp.broadcast_to(jnp.asarray(rng.normal(size=16), jnp.float32), (1, h * w, 1, 16))
    scores = np.asarray(jnp.einsum("bthd,bshd->ts", apply_rope(q, sin, cos), apply_rope(k, sin, cos)))
    by_offset = {}
    for i in range(h * w):
        for j in range(h * w):
            off = (j // w - i // w, j % w - i % w)
            by_offset.setdefault(off, []).append(scores[i, j])
    assert len(by_offset) == 49
    for values in by_offset.values():
        np.testing.assert_allclose(values, values[0], atol=1e-5)
    assert np.ptp([v[0] for v in by_offset.values()]) > 0.1  # and position does change the scores


def test_padded_attention_with_lengths_equals_unpadded():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 13, 2, 8)), jnp.float32) for _ in range(3))
    ref, probs = explicit_attention(q, k, v)
    out = fused_attention(q, k, v, implementation="xla")  # 13 tokens padded to 16, as on cuDNN
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, atol=1e-6)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    g_ref = jax.jit(jax.grad(loss(lambda *a: explicit_attention(*a)[0]), argnums=(0, 1, 2)))(q, k, v)
    g_pad = jax.jit(jax.grad(loss(lambda *a: fused_attention(*a, implementation="xla")), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_pad, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("pos_embed", ["rope", "learned"])
def test_backbone_padded_once_for_fused_attention_equals_unpadded(monkeypatch, pos_embed):
    # attention_impl="cudnn" pads the tokens once in the backbone (19 -> 24 here) and
    # passes the true length to every block; run that path on CPU by swapping the
    # kernel for XLA's, and compare with the unpadded explicit attention, gradients too.
    fused = vit_lib.fused_attention
    monkeypatch.setattr(vit_lib, "fused_attention", lambda *a, implementation, **kw: fused(*a, implementation="xla", **kw))
    cfg_xla = _tiny(dtype="bfloat16", n_storage_tokens=2, pos_embed=pos_embed)
    cfg_fused = _tiny(dtype="bfloat16", n_storage_tokens=2, pos_embed=pos_embed, attention_impl="cudnn")
    model = VisionTransformer(cfg_xla, rngs=nnx.Rngs(0))
    graphdef_xla, params = nnx.split(model, nnx.Param)
    graphdef_fused = nnx.split(VisionTransformer(cfg_fused, rngs=nnx.Rngs(0)), nnx.Param)[0]
    images = jax.random.normal(jax.random.key(1), (3, 16, 16, 1))

    def loss(graphdef):
        return jax.jit(jax.value_and_grad(lambda params: _readout(nnx.merge(graphdef, params)(images))))

    (l_xla, g_xla), (l_fused, g_fused) = loss(graphdef_xla)(params), loss(graphdef_fused)(params)
    np.testing.assert_allclose(float(l_fused), float(l_xla), rtol=2e-3)
    for a, b in zip(jax.tree_util.tree_leaves(g_fused), jax.tree_util.tree_leaves(g_xla)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05 * float(jnp.max(jnp.abs(b))) + 1e-6)


@pytest.mark.parametrize("remat", ["remat", "remat_mlp"])
def test_remat_gives_the_same_gradients(remat):
    images = jax.random.normal(jax.random.key(1), (4, 16, 16, 1))
    params = nnx.split(VisionTransformer(_tiny(drop_path_rate=0.2), rngs=nnx.Rngs(0)), nnx.Param)[1]

    def grads(on):
        graphdef = nnx.split(VisionTransformer(_tiny(drop_path_rate=0.2, **{remat: on}), rngs=nnx.Rngs(0)),
                             nnx.Param)[0]

        def loss(p):
            return _readout(nnx.merge(graphdef, p)(images, drop_path_key=jax.random.key(3)))

        return jax.jit(jax.grad(loss))(params)

    for a, b in zip(jax.tree_util.tree_leaves(grads(True)), jax.tree_util.tree_leaves(grads(False))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)  # fp32 recomputed


def test_remat_mlp_keeps_only_fc1_output_of_the_hidden_width(capsys):
    images = jnp.zeros((2, 16, 16, 1))

    def hidden_wide_residuals(remat_mlp):
        model = VisionTransformer(_tiny(dtype="bfloat16", remat_mlp=remat_mlp), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        print_saved_residuals(lambda p: _readout(nnx.merge(graphdef, p)(images)), params)
        lines = capsys.readouterr().out.splitlines()
        return sum(bool(re.match(r"\w+\[2,\d+,128\]", line.strip())) for line in lines)  # [images, tokens, 4 x 32]

    assert hidden_wide_residuals(True) == 2  # fc1's output, one per block
    assert hidden_wide_residuals(False) > 2  # also GELU's output and the tanh form's intermediates


def test_bf16_residual_stream_stays_close_to_fp32():
    images = jax.random.normal(jax.random.key(1), (3, 16, 16, 1))
    cfg = dict(dtype="bfloat16", n_storage_tokens=2, layerscale_init=0.5)
    params = nnx.split(VisionTransformer(_tiny(**cfg), rngs=nnx.Rngs(0)), nnx.Param)[1]

    def features_and_grads(residual_dtype):
        graphdef = nnx.split(VisionTransformer(_tiny(**cfg, residual_dtype=residual_dtype), rngs=nnx.Rngs(0)),
                             nnx.Param)[0]
        out = jax.jit(lambda p: nnx.merge(graphdef, p)(images))(params)
        return out, jax.jit(jax.grad(lambda p: _readout(nnx.merge(graphdef, p)(images))))(params)

    (out16, g16), (out32, g32) = features_and_grads("bfloat16"), features_and_grads("float32")
    assert out16["x_norm_patchtokens"].dtype == jnp.float32  # the final norm hands over fp32
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        np.testing.assert_allclose(out16[key], out32[key], atol=0.1)
        assert float(jnp.max(jnp.abs(out16[key] - out32[key]))) > 0  # the stream was bf16
    for a, b in zip(jax.tree_util.tree_leaves(g16), jax.tree_util.tree_leaves(g32)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.1 * float(jnp.max(jnp.abs(b))) + 1e-6)
    with pytest.raises(ValueError, match="residual_dtype"):
        _tiny(residual_dtype="int8")


def test_one_pass_layer_norm_error_grows_with_the_token_offset():
    # In reduced precision the blocks' norms take both moments in one pass (vit._layer_norm):
    # against a float64 two-pass reference, fp32-exact for centred tokens, 1e-4 at mean/std = 10.
    for dtype, reduced in (("float32", False), ("bfloat16", True)):
        block = VisionTransformer(_tiny(dtype=dtype), rngs=nnx.Rngs(0)).blocks[0]
        assert (block.norm1.use_fast_variance, block.norm2.use_fast_variance, block.mlp.approximate_gelu) == (
            reduced, reduced, reduced)
    rng = np.random.default_rng(0)
    for ratio, tolerance in ((0.0, 2e-6), (10.0, 1e-4)):
        x = ((ratio + rng.standard_normal((64, 384))) * 3.0).astype(np.float32)
        norm = vit_lib._layer_norm(384, 1e-6, nnx.Rngs(0), one_pass=True)
        centred = x.astype(np.float64) - x.mean(-1, keepdims=True, dtype=np.float64)
        want = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, atol=tolerance)


def test_bf16_compute_keeps_params_and_attention_fp32():
    cfg = _tiny(dtype="bfloat16", n_storage_tokens=2)
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    images = jax.random.normal(jax.random.key(1), (3, 16, 16, 1))
    out = _run(model, images, return_attention=True)
    assert out["x_norm_clstoken"].shape == (3, 32)
    assert out["x_storage_tokens"].shape == (3, 2, 32)
    assert out["x_norm_patchtokens"].shape == (3, 16, 32)
    assert out["attention"].shape == (3, 2, 19, 19) and out["attention"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out["attention"].sum(-1)), 1.0, atol=1e-5)
    graphdef, state = nnx.split(model, nnx.Param)
    fp32 = nnx.merge(nnx.split(VisionTransformer(_tiny(n_storage_tokens=2), rngs=nnx.Rngs(0)), nnx.Param)[0], state)
    ref = _run(fp32, images)["x_norm_clstoken"]
    assert float(jnp.max(jnp.abs(out["x_norm_clstoken"] - ref))) < 0.1  # bf16 error, not a different model


def test_storage_tokens_carry_no_position():
    for pos in ("rope", "learned"):
        cfg = _tiny(pos_embed=pos, pos_embed_size=16, n_storage_tokens=2)
        model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
        model.storage_tokens[...] = jax.random.normal(jax.random.key(2), (1, 2, 32))
        images = jax.random.normal(jax.random.key(3), (2, 16, 16, 1))
        out = model(images)
        model.storage_tokens[...] = model.storage_tokens[...][:, ::-1]
        swapped = model(images)
        np.testing.assert_allclose(swapped["x_storage_tokens"], out["x_storage_tokens"][:, ::-1], atol=1e-5)
        np.testing.assert_allclose(swapped["x_norm_clstoken"], out["x_norm_clstoken"], atol=1e-5)


def test_mask_k_bias_removes_the_key_bias():
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
    for masked in (True, False):
        model = VisionTransformer(_tiny(mask_k_bias=masked), rngs=nnx.Rngs(0))
        out = model(images)["x_norm_clstoken"]
        for block in model.blocks:
            block.attn.qkv.bias[...] = block.attn.qkv.bias[...].at[32:64].set(1.0)
        changed = float(jnp.max(jnp.abs(model(images)["x_norm_clstoken"] - out)))
        # Under RoPE a key bias is rotated per position, so it matters unless masked.
        assert (changed < 1e-6) if masked else (changed > 1e-3)


def test_masks_replace_patch_embeddings():
    model = VisionTransformer(_tiny(), rngs=nnx.Rngs(0))
    model.mask_token[...] = jnp.ones((1, 32))
    a = jax.random.normal(jax.random.key(0), (1, 16, 16, 1))
    b = a.at[:, :4, :4].set(5.0)  # changes patch 0 only
    masks = jnp.zeros((1, 16), bool).at[0, 0].set(True)
    np.testing.assert_allclose(model(a, masks)["x_norm_patchtokens"], model(b, masks)["x_norm_patchtokens"], atol=1e-6)
    assert float(jnp.max(jnp.abs(model(a)["x_norm_patchtokens"] - model(b)["x_norm_patchtokens"]))) > 1e-3


def test_drop_add_residual_updates_exactly_a_subset():
    x = jnp.zeros((10, 3, 4))
    out = drop_add_residual(x, lambda y: jnp.ones_like(y), jax.random.key(0), rate=0.3)
    changed = np.asarray(jnp.any(out != 0, axis=(1, 2)))
    assert changed.sum() == 7  # int(10 * 0.7)
    np.testing.assert_allclose(np.asarray(out[changed]), 10 / 7)  # residual scaled by B / subset
    other = drop_add_residual(x, lambda y: jnp.ones_like(y), jax.random.key(1), rate=0.3)
    assert not np.array_equal(np.asarray(jnp.any(other != 0, axis=(1, 2))), changed)
    np.testing.assert_array_equal(drop_add_residual(x, lambda y: y + 1, None, rate=0.3), x + 1)


@pytest.mark.parametrize("devices", [1, 8])
def test_drop_path_values_and_gradients_equal_the_masked_residual(devices):
    # On a row-wise residual, computing it on the subset equals computing it on every row
    # and keeping the subset's: the custom gathers (and their transposes) must agree.
    w = jax.random.normal(jax.random.key(3), (4, 4))
    x = jax.random.normal(jax.random.key(1), (32, 3, 4))
    key = jax.random.key(5)

    def residual(y):
        return jnp.tanh(y @ w)

    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        kept = jax.jit(lambda: drop_add_residual(jnp.zeros_like(x), jnp.ones_like, key, rate=0.25))()
        kept = np.asarray(kept[:, 0, 0] != 0)
        assert kept.sum() == 24 and kept.reshape(devices, -1).sum(axis=1).tolist() == [32 // devices * 3 // 4] * devices

        def masked(x):
            return x + jnp.where(kept[:, None, None], residual(x) * 4 / 3, 0.0)

        def loss(fn):
            return jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.sin(fn(x)) * x)))(x)

        (value, grad), (want_value, want_grad) = loss(lambda x: drop_add_residual(x, residual, key, 0.25)), loss(masked)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_drop_path_subsets_are_per_device_under_a_mesh():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.zeros((16, 2))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda x, k: drop_add_residual(x, lambda y: jnp.ones_like(y), k, rate=0.5))(
            x, jax.random.key(0))
    changed = np.asarray(out[:, 0] != 0).reshape(8, 2)
    np.testing.assert_array_equal(changed.sum(axis=1), 1)  # one of each device's 2 samples
    np.testing.assert_allclose(np.asarray(out)[np.asarray(out[:, 0] != 0)], 2.0)


def test_drop_path_stays_on_each_device():
    # A gather across shards would be partitioned as "every device gathers every
    # subset" (an all-reduce of the picked rows) and run the block replicated:
    # correct values, no data parallelism. The compiled program must have no collective.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.NamedSharding(mesh, jax.P("data"))
    w = jnp.ones((4, 4))
    step = jax.jit(lambda x, k: drop_add_residual(x, lambda y: jnp.tanh(y @ w), k, rate=0.25),
                   in_shardings=(rows, None), out_shardings=rows)
    x = jax.ShapeDtypeStruct((32, 3, 4), jnp.float32, sharding=rows)
    with jax.set_mesh(mesh):
        hlo = step.lower(x, jax.random.key(0)).compile().as_text()
        grad_hlo = jax.jit(jax.grad(lambda x, k: step(x, k).sum())).lower(x, jax.random.key(0)).compile().as_text()
    for text in (hlo, grad_hlo):
        for collective in ("all-reduce", "all-gather", "all-to-all", "collective-permute"):
            assert collective not in text, collective


def test_model_drop_path_deterministic_without_key():
    model = VisionTransformer(_tiny(drop_path_rate=0.5), rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
    fwd = nnx.jit(lambda m, x, k: m(x, drop_path_key=k)["x_norm_clstoken"])
    plain = fwd(model, images, None)
    np.testing.assert_array_equal(fwd(model, images, None), plain)
    a = fwd(model, images, jax.random.key(1))
    np.testing.assert_array_equal(fwd(model, images, jax.random.key(1)), a)
    assert float(jnp.max(jnp.abs(a - plain))) > 1e-4
    no_rate = VisionTransformer(_tiny(), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(fwd(no_rate, images, jax.random.key(1)), fwd(no_rate, images, None))


def test_vit_config_from_config_model():
    c = config_lib.base_config()
    cfg = vit_config_from(c.model, in_chans=1)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (384, 12, 6, 8)
    assert (cfg.n_storage_tokens, cfg.pos_embed, cfg.layerscale_init, cfg.dtype) == (4, "rope", 1e-5, "bfloat16")
    c.model.arch, c.model.embed_dim, c.model.depth, c.model.num_heads, c.model.layerscale = "vit_custom", 64, 3, 4, 0.0
    cfg = vit_config_from(c.model, in_chans=5)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.in_chans, cfg.layerscale_init) == (64, 3, 4, 5, None)


def test_clear_errors():
    model = VisionTransformer(_tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[B, H, W, 1\].*\(1, 16, 16, 3\)"):
        model(jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="masks must be"):
        model(jnp.zeros((1, 16, 16, 1)), jnp.zeros((1, 15), bool))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        model(jnp.zeros((1, 18, 16, 1)))
    with pytest.raises(ValueError, match="ViTConfig.attention_impl"):
        _tiny(attention_impl="cudnn", dtype="float32")
