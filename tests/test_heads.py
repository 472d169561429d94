"""DINOHead: parity with dinov2's DINOHead (weight-normalised and plain last layer), dtypes, init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dinocell_jax.models.heads import DINOHead
from dinocell_jax.models.torch_import import head_from_torch

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")

DIMS = dict(in_dim=24, out_dim=512, hidden_dim=48, bottleneck_dim=16)


def _torch_head(n_layers, weight_norm, seed=0):
    from dinov2.layers import DINOHead as TorchDINOHead

    head = TorchDINOHead(DIMS["in_dim"], DIMS["out_dim"], nlayers=n_layers, hidden_dim=DIMS["hidden_dim"],
                         bottleneck_dim=DIMS["bottleneck_dim"])
    if not weight_norm:  # DINOv3's plain prototype layer
        head.last_layer = torch.nn.Linear(DIMS["bottleneck_dim"], DIMS["out_dim"], bias=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("weight_g"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))  # a trained, non-unit gain
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return head


@pytest.mark.parametrize("n_layers,weight_norm", [(3, True), (3, False), (1, True), (2, False)])
def test_parity_with_dinov2_head(n_layers, weight_norm):
    ref_head = _torch_head(n_layers, weight_norm)
    params = head_from_torch(ref_head.state_dict())
    head = nnx.merge(nnx.split(DINOHead(**DIMS, n_layers=n_layers, weight_norm_last_layer=weight_norm,
                                        rngs=nnx.Rngs(0)), nnx.Param)[0], params)
    x = np.random.default_rng(0).normal(size=(6, DIMS["in_dim"])).astype(np.float32)
    with torch.no_grad():
        ref = ref_head(torch.from_numpy(x)).numpy()
    out = np.asarray(head(jnp.asarray(x)))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(head.prototypes(head.project(jnp.asarray(x)))), out, rtol=1e-6)


def test_project_is_unit_norm_and_logits_fp32_under_bf16():
    head = DINOHead(**DIMS, dtype="bfloat16", weight_norm_last_layer=True, rngs=nnx.Rngs(0))
    z = head.project(jax.random.normal(jax.random.key(0), (5, DIMS["in_dim"])) * 100)
    assert z.shape == (5, DIMS["bottleneck_dim"]) and z.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(jnp.linalg.norm(z, axis=-1)), 1.0, rtol=1e-6)
    logits = head.prototypes(z)
    assert logits.shape == (5, DIMS["out_dim"]) and logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(nnx.state(head, nnx.Param)))
    # A zero row (iBOT buffer padding) stays finite, and so does its gradient: no NaN from 0/0.
    assert bool(jnp.all(jnp.isfinite(head.project(jnp.zeros((1, DIMS["in_dim"]))))))
    for layer in head.mlp:
        layer.bias[...] = jnp.zeros_like(layer.bias[...])
    grads = nnx.grad(lambda h: jnp.sum(h(jnp.zeros((2, DIMS["in_dim"])))))(head)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_param_paths_and_init():
    params = nnx.to_pure_dict(nnx.state(DINOHead(**DIMS, rngs=nnx.Rngs(0)), nnx.Param))
    assert set(params) == {"mlp", "last_layer"}
    assert [params["mlp"][i]["kernel"].shape for i in range(3)] == [(24, 48), (48, 48), (48, 16)]
    assert set(params["last_layer"]) == {"kernel"}  # DINOv3: plain, bias-free
    assert all(np.all(params["mlp"][i]["bias"] == 0) for i in range(3))
    big = nnx.to_pure_dict(nnx.state(DINOHead(256, 4096, rngs=nnx.Rngs(0)), nnx.Param))
    assert abs(float(np.std(big["last_layer"]["kernel"])) - 0.02) < 1e-3  # trunc_normal(0.02)
    wn = nnx.to_pure_dict(nnx.state(DINOHead(**DIMS, weight_norm_last_layer=True, rngs=nnx.Rngs(0)), nnx.Param))
    assert set(wn["last_layer"]) == {"kernel", "gain"}
    np.testing.assert_array_equal(wn["last_layer"]["gain"], 1.0)  # dinov2 fills g with 1
