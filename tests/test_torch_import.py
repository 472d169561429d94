"""PyTorch state dicts <-> our params: round trips, DINOv3 keys, FlexiViT resize, position resize, files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dinocell_jax.models import torch_import as ti
from dinocell_jax.models.heads import DINOHead
from dinocell_jax.models.vit import ViTConfig, VisionTransformer

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")


def _torch_vit(**kw):
    from dinov2.models.vision_transformer import DinoVisionTransformer

    args = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, init_values=0.5,
                block_chunks=0)
    model = DinoVisionTransformer(**{**args, **kw}).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _cfg(**kw):
    base = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, in_chans=3, layerscale_init=0.5,
                pos_embed="learned", pos_embed_size=32)
    return ViTConfig(**{**base, **kw})


def _model(cfg, params):
    return nnx.merge(nnx.split(nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)[0], params)


def _dinov3_state_dict(cfg: ViTConfig, seed=0):
    """A DINOv3-layout state dict (vision_transformer.py / LinearKMaskedBias / RopePositionEmbedding names)."""
    rng = np.random.default_rng(seed)
    sd = ti.backbone_to_torch(
        nnx.to_pure_dict(nnx.state(VisionTransformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param)), cfg, flavor="dinov3")
    return {k: (v + 0.1 * rng.normal(size=v.shape).astype(np.float32)) if not k.endswith(("_mask", "periods")) else v
            for k, v in sd.items()}


def test_dinov2_round_trip_is_exact():
    from dinov2.models.vision_transformer import vit_small

    sd = {k: v.numpy() for k, v in vit_small(patch_size=8, img_size=224, init_values=1e-5, block_chunks=0)
          .state_dict().items()}
    cfg = ViTConfig(patch_size=8, in_chans=3, pos_embed="learned", layerscale_init=1e-5)
    back = ti.backbone_to_torch(ti.backbone_from_torch(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_dinov3_keys_import_and_round_trip():
    cfg = _cfg(pos_embed="rope", n_storage_tokens=4, mask_k_bias=True, in_chans=1)
    sd = _dinov3_state_dict(cfg)
    assert {"storage_tokens", "rope_embed.periods", "blocks.1.attn.qkv.bias_mask"} <= set(sd)
    params = ti.backbone_from_torch({"teacher.backbone." + k: v for k, v in sd.items()}, cfg)  # prefix found
    back = ti.backbone_to_torch(params, cfg, flavor="dinov3")
    assert set(back) == set(sd)
    for k in sd:
        expected = sd[k] * sd[k + "_mask"] if k + "_mask" in sd else sd[k]  # the masked k-bias is folded in
        np.testing.assert_array_equal(back[k], expected, err_msg=k)
    # The folded bias makes a checkpoint with bias_mask correct even for a model without mask_k_bias.
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    plain_cfg = _cfg(pos_embed="rope", n_storage_tokens=4, in_chans=1)
    a = _model(cfg, params)(images)["x_norm_clstoken"]
    b = _model(plain_cfg, ti.backbone_from_torch(sd, plain_cfg))(images)["x_norm_clstoken"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # DINOv2 flavour of the same model: register_tokens, zeroed k-bias, no RoPE buffer.
    v2 = ti.backbone_to_torch(params, cfg)
    assert "register_tokens" in v2 and "rope_embed.periods" not in v2
    np.testing.assert_array_equal(v2["blocks.0.attn.qkv.bias"][32:64], 0.0)


def test_rope_periods_are_checked():
    cfg = _cfg(pos_embed="rope", in_chans=1)
    sd = _dinov3_state_dict(cfg)
    np.testing.assert_allclose(sd["rope_embed.periods"], [1.0, 100 ** 0.25, 100 ** 0.5, 100 ** 0.75], rtol=1e-6)
    with pytest.raises(ti.StateDictError, match=r"rope_embed.periods.*rope_base=10"):
        ti.backbone_from_torch(sd, _cfg(pos_embed="rope", in_chans=1, rope_base=10.0))
    with pytest.raises(ti.StateDictError, match="pos_embed='learned'"):
        ti.backbone_from_torch(sd, _cfg(in_chans=1))


def test_errors_name_the_keys():
    model = _torch_vit()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = _cfg()
    broken = dict(sd)
    del broken["blocks.1.mlp.fc2.bias"]
    broken["blocks.0.norm1.weight"] = np.zeros(31, np.float32)
    broken["head.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ti.StateDictError) as err:
        ti.backbone_from_torch(broken, cfg)
    msg = str(err.value)
    assert "missing keys ['blocks.1.mlp.fc2.bias']" in msg
    assert "blocks.0.norm1.weight: (31,)" in msg and "expected (32,)" in msg
    assert "unexpected keys ['head.weight']" in msg
    with pytest.raises(ti.StateDictError, match="patch_embed.proj.weight.*in_chans=5"):
        ti.backbone_from_torch(sd, _cfg(in_chans=5))
    with pytest.raises(ti.StateDictError, match="prefix"):
        ti.backbone_from_torch({"student.cls_token": sd["cls_token"], "teacher.cls_token": sd["cls_token"]}, cfg)


def test_imported_model_matches_torch_at_other_grid_and_grey_channels():
    """A 4x4-grid RGB DINOv2 model into a 6x6-grid 1-channel config: equal to torch on a grey RGB image."""
    model = _torch_vit()
    cfg = _cfg(in_chans=1, pos_embed_size=48)
    params = ti.backbone_from_torch(model.state_dict(), cfg)
    assert params["pos_embed"].shape == (1, 37, 32)
    grey = np.random.default_rng(0).normal(size=(2, 1, 48, 48)).astype(np.float32)
    with torch.no_grad():
        ref = model.forward_features(torch.from_numpy(np.repeat(grey, 3, axis=1)))
    out = _model(cfg, params)(jnp.asarray(grey.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out["x_norm_patchtokens"]), ref["x_norm_patchtokens"].numpy(),
                               rtol=1e-5, atol=1e-5)


def _resize(x, size):
    return np.asarray(jax.image.resize(jnp.asarray(x), (size, size), "bilinear"), np.float64)


def test_flexivit_pi_resize_up_is_exact():
    rng = np.random.default_rng(0)
    kernel8 = rng.normal(size=(8, 8, 2, 5))
    kernel16 = ti.pi_resize_patch_kernel(kernel8, 16)
    assert kernel16.shape == (16, 16, 2, 5)
    patch8 = rng.normal(size=(8, 8, 2))
    patch16 = np.stack([_resize(patch8[..., c], 16) for c in range(2)], -1)  # bilinear upsampling by 2
    np.testing.assert_allclose(np.einsum("hwc,hwcd->d", patch16, kernel16),
                               np.einsum("hwc,hwcd->d", patch8, kernel8), rtol=1e-4, atol=1e-5)


def test_flexivit_pi_resize_down_gives_the_token_of_the_pinv_upsampled_patch():
    rng = np.random.default_rng(1)
    kernel16 = rng.normal(size=(16, 16, 1, 4))
    kernel8 = ti.pi_resize_patch_kernel(kernel16, 8)
    patch8 = rng.normal(size=(8, 8))
    down = np.stack([_resize(e.reshape(16, 16), 8).ravel() for e in np.eye(256)], axis=1)  # [64, 256]
    patch16 = np.linalg.lstsq(down, patch8.ravel(), rcond=None)[0].reshape(16, 16)  # min-norm upsampled patch
    np.testing.assert_allclose(_resize(patch16, 8), patch8, atol=1e-4)  # it really shrinks back to patch8
    np.testing.assert_allclose(np.einsum("hw,hwd->d", patch8, kernel8[:, :, 0]),
                               np.einsum("hw,hwd->d", patch16, kernel16[:, :, 0]), rtol=1e-4, atol=1e-4)


def test_patch_size_change_keeps_model_importable():
    model = _torch_vit(patch_size=16, img_size=32)
    params = ti.backbone_from_torch(model.state_dict(), _cfg(patch_size=8, pos_embed_size=16))
    assert params["patch_embed"]["proj"]["kernel"].shape == (8, 8, 3, 32)
    assert params["pos_embed"].shape == (1, 5, 32)


def test_head_round_trip():
    from dinov2.layers import DINOHead as TorchDINOHead

    head = TorchDINOHead(16, 64, nlayers=3, hidden_dim=24, bottleneck_dim=8)
    sd = {k: v.numpy() for k, v in head.state_dict().items()}
    params = ti.head_from_torch({"dino_head." + k: v for k, v in sd.items()}, prefix="dino_head.", out_dim=64)
    back = ti.head_to_torch(params)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    with pytest.raises(ti.StateDictError, match=r"out_dim=65536 \(state dict has 64\)"):
        ti.head_from_torch(sd, out_dim=65536)
    plain = nnx.to_pure_dict(nnx.state(DINOHead(16, 64, 24, 8, rngs=nnx.Rngs(0)), nnx.Param))
    plain_sd = ti.head_to_torch(plain, prefix="ibot_head.")
    assert "ibot_head.last_layer.weight" in plain_sd and "ibot_head.mlp.4.bias" in plain_sd
    again = ti.head_from_torch(plain_sd, prefix="ibot_head.")
    np.testing.assert_array_equal(again["last_layer"]["kernel"], plain["last_layer"]["kernel"])


def test_load_state_dict_files(tmp_path):
    model = _torch_vit()
    torch.save({"teacher": {"backbone": model.state_dict()}, "iteration": 3}, tmp_path / "ckpt.pth")
    sd = ti.load_state_dict(tmp_path / "ckpt.pth")
    assert "teacher.backbone.cls_token" in sd
    params = ti.backbone_from_torch(sd, _cfg())
    exported = ti.backbone_to_torch(params, _cfg())
    ti.save_safetensors(exported, tmp_path / "backbone.safetensors")
    again = ti.load_state_dict(tmp_path / "backbone.safetensors")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(again[k], v.numpy(), err_msg=k)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ti.load_state_dict(tmp_path / "missing.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        ti.load_state_dict(tmp_path / "bad.safetensors")
