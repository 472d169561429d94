"""Parameter groups, AdamW and clipping against DINOv2's rules and torch.optim.AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinocell_jax import config as config_lib
from dinocell_jax.ssl import optim
from dinocell_jax.ssl.schedules import Schedules

torch = pytest.importorskip("torch")
param_groups = pytest.importorskip("dinov2.utils.param_groups")
dinov2_utils = pytest.importorskip("dinov2.utils.utils")

DEPTH = 12


def _block(rng, d):
    return {
        "norm1": {"scale": rng.normal(size=[d]), "bias": rng.normal(size=[d])},
        "attn": {"qkv": {"kernel": rng.normal(size=[d, 3 * d]), "bias": rng.normal(size=[3 * d])},
                 "proj": {"kernel": rng.normal(size=[d, d]), "bias": rng.normal(size=[d])}},
        "ls1": {"gamma": rng.normal(size=[d])},
        "norm2": {"scale": rng.normal(size=[d]), "bias": rng.normal(size=[d])},
        "mlp": {"fc1": {"kernel": rng.normal(size=[d, 2 * d]), "bias": rng.normal(size=[2 * d])},
                "fc2": {"kernel": rng.normal(size=[2 * d, d]), "bias": rng.normal(size=[d])}},
        "ls2": {"gamma": rng.normal(size=[d])},
    }


def _head(rng, d):
    return {"mlp": {0: {"kernel": rng.normal(size=[d, 6]), "bias": rng.normal(size=[6])},
                    1: {"kernel": rng.normal(size=[6, 3]), "bias": rng.normal(size=[3])}},
            "last_layer": {"kernel": rng.normal(size=[3, 10])}}


def tiny_params(seed=0, d=4, depth=DEPTH):
    """A ViT-shaped params tree with ARCHITECTURE.md's names, 4 wide (float32)."""
    rng = np.random.default_rng(seed)
    tree = {
        "backbone": {
            "patch_embed": {"kernel": rng.normal(size=[2, 2, 1, d]), "bias": rng.normal(size=[d])},
            "cls_token": rng.normal(size=[1, 1, d]),
            "storage_tokens": rng.normal(size=[1, 2, d]),
            "mask_token": rng.normal(size=[d]),
            "pos_embed": rng.normal(size=[1, 5, d]),
            "blocks": {i: _block(rng, d) for i in range(depth)},
            "norm": {"scale": rng.normal(size=[d]), "bias": rng.normal(size=[d])},
        },
        "dino_head": _head(rng, d),
        "ibot_head": _head(rng, d),
    }
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _torch_module(tree):
    """A torch module whose parameter names are our paths with '.' (blocks as a ModuleList)."""
    if isinstance(tree, dict) and all(isinstance(k, int) for k in tree):
        return torch.nn.ModuleList([_torch_module(tree[k]) for k in sorted(tree)])
    module = torch.nn.Module()
    for k, v in tree.items():
        if isinstance(v, dict):
            module.add_module(str(k), _torch_module(v))
        else:
            module.register_parameter(str(k), torch.nn.Parameter(torch.tensor(np.asarray(v), dtype=torch.float64)))
    return module


def _flat_by_dotted(tree):
    paths = optim.param_paths(tree)
    return {p.replace("/", "."): x for p, x in zip(jax.tree.leaves(paths), jax.tree.leaves(tree))}


def test_param_paths_join_dict_and_int_keys():
    paths = optim.param_paths(tiny_params())
    assert paths["backbone"]["blocks"][3]["attn"]["qkv"]["kernel"] == "backbone/blocks/3/attn/qkv/kernel"
    assert paths["dino_head"]["mlp"][1]["bias"] == "dino_head/mlp/1/bias"
    assert jax.tree.structure(paths) == jax.tree.structure(tiny_params())


def test_multipliers_match_dinov2_param_groups():
    config = config_lib.base_config()
    params = tiny_params()
    lr = dict(zip(jax.tree.leaves(optim.param_paths(params)), jax.tree.leaves(optim.lr_multipliers(params, config))))
    wd = dict(zip(jax.tree.leaves(optim.param_paths(params)), jax.tree.leaves(optim.wd_multipliers(params))))
    last = dict(zip(jax.tree.leaves(optim.param_paths(params)), jax.tree.leaves(optim.is_last_layer(params))))

    # REFERENCE.md numbers
    assert lr["backbone/blocks/0/attn/qkv/kernel"] == pytest.approx(0.9**12)
    assert lr["backbone/blocks/11/mlp/fc2/bias"] == pytest.approx(0.9)
    assert lr["backbone/patch_embed/kernel"] == pytest.approx(0.9**13 * 0.2)
    for token in ("cls_token", "storage_tokens", "mask_token", "pos_embed"):
        assert lr[f"backbone/{token}"] == pytest.approx(0.9**13), token
    assert lr["backbone/norm/scale"] == 1.0 and lr["dino_head/mlp/0/kernel"] == 1.0
    assert lr["ibot_head/last_layer/kernel"] == 1.0
    assert wd["backbone/blocks/4/ls2/gamma"] == 0.0 and wd["backbone/blocks/4/norm1/scale"] == 0.0
    assert wd["backbone/blocks/4/attn/qkv/bias"] == 0.0 and wd["backbone/blocks/4/attn/qkv/kernel"] == 1.0
    assert wd["backbone/pos_embed"] == 1.0 and wd["backbone/cls_token"] == 1.0  # DINOv2 decays tokens
    assert {p for p, v in last.items() if v} == {"dino_head/last_layer/kernel", "ibot_head/last_layer/kernel"}

    # DINOv2's own rules, module by module, on torch parameters with the same names
    for module_name in ("backbone", "dino_head", "ibot_head"):
        groups = param_groups.get_params_groups_with_decay(
            _torch_module(jax.device_get(params[module_name])), lr_decay_rate=0.9, patch_embed_lr_mult=0.2
        )
        for g in groups:
            path = f"{module_name}/" + g["name"].replace(".", "/")
            want_lr = g["lr_multiplier"]
            if g["name"] == "storage_tokens":
                want_lr = 0.9**13  # DINOv3 adds storage tokens to layer 0; DINOv2 has none
            assert lr[path] == pytest.approx(want_lr), path
            assert wd[path] == g["wd_multiplier"], path
            assert last[path] == g["is_last_layer"], path


def _short_config():
    config = config_lib.base_config()
    config.optim.epochs = 4
    config.train.epoch_length = 3  # 12 steps: 3 warmup, last layer frozen for 3
    config.optim.warmup_epochs = 1
    config.optim.lr = 1e-2
    config.optim.scaling_rule = "none"
    config.optim.weight_decay, config.optim.weight_decay_end = 0.3, 0.5  # large, so a wrong mask shows
    config.optim.adamw_beta2 = 0.99
    return config


def test_adamw_matches_torch_with_dinov2_param_groups():
    config = _short_config()
    depth = 2
    params = tiny_params(1, depth=depth)
    schedules = Schedules.from_config(config)
    tx = optim.make_optimizer(config, schedules)
    opt_state = tx.init(params)

    # torch side: DINOv2's groups and apply_optim_scheduler with its CosineScheduler arrays
    named = _flat_by_dotted(params)
    torch_params = {k: torch.nn.Parameter(torch.tensor(np.asarray(v))) for k, v in named.items()}
    lr_mult = dict(zip(named, jax.tree.leaves(optim.lr_multipliers(params, config))))
    wd_mult = dict(zip(named, jax.tree.leaves(optim.wd_multipliers(params))))
    is_last = dict(zip(named, jax.tree.leaves(optim.is_last_layer(params))))
    assert len(set(lr_mult.values())) > 2 and set(wd_mult.values()) == {0.0, 1.0}
    groups = [dict(params=[p], name=k, lr_multiplier=lr_mult[k], wd_multiplier=wd_mult[k], is_last_layer=is_last[k])
              for k, p in torch_params.items()]
    opt = torch.optim.AdamW(groups, betas=(config.optim.adamw_beta1, config.optim.adamw_beta2), eps=1e-8)
    lr_ref = dinov2_utils.CosineScheduler(1e-2, config.optim.min_lr, 12, warmup_iters=3)
    last_ref = dinov2_utils.CosineScheduler(1e-2, config.optim.min_lr, 12, warmup_iters=3)
    last_ref.schedule[:3] = 0
    wd_ref = dinov2_utils.CosineScheduler(0.3, 0.5, 12)

    update = jax.jit(tx.update)
    rng = np.random.default_rng(2)
    for it in range(6):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        updates, opt_state = update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for g in opt.param_groups:
            g["weight_decay"] = wd_ref[it] * g["wd_multiplier"]
            g["lr"] = (last_ref[it] if g["is_last_layer"] else lr_ref[it]) * g["lr_multiplier"]
        for k, g in _flat_by_dotted(grads).items():
            torch_params[k].grad = torch.tensor(np.asarray(g))
        opt.step()
        for k, v in _flat_by_dotted(params).items():
            np.testing.assert_allclose(np.asarray(v), torch_params[k].detach().numpy(), rtol=2e-6, atol=2e-7,
                                       err_msg=f"step {it} {k}")
    assert int(opt_state.count) == 6
    # the frozen last layer moved only after step 3 (lr 0 while frozen, weight decay included)
    assert not np.allclose(np.asarray(params["dino_head"]["last_layer"]["kernel"]),
                           np.asarray(tiny_params(1, depth=depth)["dino_head"]["last_layer"]["kernel"]))


def test_last_layer_frozen_during_first_epoch():
    config = _short_config()
    params = tiny_params(3, depth=1)
    tx = optim.make_optimizer(config, params)  # the docs/ARCHITECTURE.md form
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        assert float(jnp.abs(updates["dino_head"]["last_layer"]["kernel"]).max()) == 0.0
    updates, state = tx.update(grads, state, params)
    assert float(jnp.abs(updates["dino_head"]["last_layer"]["kernel"]).max()) > 0.0
    # the warmup's first step has lr 0 everywhere
    updates, _ = tx.update(grads, tx.init(params), params)
    assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)) == 0.0


def test_clip_by_module_matches_torch_clip_grad_norm():
    rng = np.random.default_rng(4)
    grads = {
        "backbone": {"a": jnp.asarray(rng.normal(size=[5, 3]) * 4, jnp.float32), "b": jnp.full([7], 2.0)},
        "dino_head": {"w": jnp.asarray(rng.normal(size=[4]) * 0.1, jnp.float32)},
        "ibot_head": {"w": jnp.full([9], 3.0)},
    }
    clipped, norms = jax.jit(optim.clip_by_module, static_argnums=1)(grads, 3.0)
    for name, sub in grads.items():
        leaves = [torch.tensor(np.asarray(x)) for x in jax.tree.leaves(sub)]
        ts = [torch.nn.Parameter(torch.zeros_like(x)) for x in leaves]
        for t, g in zip(ts, leaves):
            t.grad = g.clone()
        want_norm = torch.nn.utils.clip_grad_norm_(ts, 3.0)
        assert float(norms[name]) == pytest.approx(float(want_norm), rel=1e-6), name
        for t, got in zip(ts, jax.tree.leaves(clipped[name])):
            np.testing.assert_allclose(np.asarray(got), t.grad.numpy(), rtol=1e-6, err_msg=name)
    assert float(norms["ibot_head"]) == pytest.approx(9.0)
    assert float(optim._global_norm(clipped["ibot_head"])) == pytest.approx(3.0, rel=1e-5)
    # a small module is not rescaled by the others' norms (per-module, not global, clipping)
    np.testing.assert_array_equal(np.asarray(clipped["dino_head"]["w"]), np.asarray(grads["dino_head"]["w"]))
    unclipped, _ = optim.clip_by_module(grads, 0.0)
    np.testing.assert_array_equal(np.asarray(unclipped["ibot_head"]["w"]), np.asarray(grads["ibot_head"]["w"]))


def test_gradient_stats():
    grads = {"backbone": {"a": jnp.array([1.0, -3.0]), "b": {0: jnp.array([[2.0], [-4.0]])}},
             "dino_head": {"w": jnp.array([0.5, 0.5])}}
    stats = jax.jit(optim.gradient_stats)(grads)
    g = np.array([1.0, -3.0, 2.0, -4.0])
    assert float(stats["gradients/backbone_mean"]) == pytest.approx(2.5)  # mean |g|
    assert float(stats["gradients/backbone_std"]) == pytest.approx(np.std(g), rel=1e-6)
    assert float(stats["gradients/backbone_max"]) == 4.0
    assert float(stats["gradients/backbone_norm"]) == pytest.approx(math.sqrt(30))
    assert float(stats["gradients/dino_head_std"]) == 0.0
    assert float(stats["gradients/global_norm"]) == pytest.approx(math.sqrt(30.5))
    assert set(stats) == {f"gradients/{m}_{s}" for m in ("backbone", "dino_head") for s in ("mean", "std", "max", "norm")} | {
        "gradients/global_norm"}
