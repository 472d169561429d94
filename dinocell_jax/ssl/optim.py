"""AdamW with DINOv2's parameter groups, per-module gradient clipping and gradient statistics.

Parameters are a plain nested dict `{"backbone": ..., "dino_head": ...,
"ibot_head": ...}` (docs/ARCHITECTURE.md). Every per-parameter rule is derived
from the leaf's `/`-joined path, the way DINOv2 derives it from the torch
parameter name (dinov2/utils/param_groups.py), so a new parameter gets the right
treatment without touching this file:

- layer-wise LR decay `decay ** (depth + 1 - layer_id)` with `layer_id` 0 for the
  patch embedding, CLS/storage/mask tokens and learned positions, `i + 1` for
  block `i`, and `depth + 1` (multiplier 1) for the final norm and the heads;
  the patch embedding is further scaled by `optim.patch_embed_lr_mult`;
- no weight decay on biases, norms and LayerScale gammas (DINOv2: name ends in
  `bias` or contains `norm` or `gamma`); tokens and positions keep it, as in DINOv2;
- the heads' `last_layer` follows the last-layer LR schedule (LR 0 while frozen).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dinocell_jax.ssl.schedules import Schedules

BACKBONE = "backbone"
# Leaves of the backbone that sit before block 0 (DINOv2 layer_id 0).
_EMBEDDING_NAMES = ("patch_embed", "cls_token", "storage_tokens", "mask_token", "pos_embed")


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_paths(tree) -> Any:
    """Same-structure tree whose leaves are the `/`-joined paths, e.g. `backbone/blocks/0/attn/qkv/kernel`."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "/".join(_key_name(k) for k in path), tree)


def _depth(paths: list[str]) -> int:
    """Number of backbone blocks, read from the `backbone/blocks/<i>/...` paths."""
    ids = {int(p.split("/")[2]) for p in paths if p.startswith(f"{BACKBONE}/blocks/")}
    return max(ids) + 1 if ids else 0


def _lr_multiplier(path: str, depth: int, decay: float, patch_embed_mult: float) -> float:
    parts = path.split("/")
    layer_id = depth + 1
    if parts[0] == BACKBONE and len(parts) > 1:
        if parts[1] in _EMBEDDING_NAMES:
            layer_id = 0
        elif parts[1] == "blocks":
            if len(parts) < 3 or not parts[2].isdigit():
                raise ValueError(f"parameter path {path!r}: expected backbone/blocks/<int>/...")
            layer_id = int(parts[2]) + 1
    mult = decay ** (depth + 1 - layer_id)
    if "patch_embed" in parts:
        mult *= patch_embed_mult
    return float(mult)


def _wd_multiplier(path: str) -> float:
    parts = path.split("/")
    no_decay = parts[-1] == "bias" or any("norm" in p or "gamma" in p for p in parts)
    return 0.0 if no_decay else 1.0


def _is_last_layer(path: str) -> bool:
    return "last_layer" in path.split("/")


def lr_multipliers(params, config) -> Any:
    """Tree of Python floats: each parameter's LR multiplier (layer-wise decay x patch-embed mult)."""
    paths = param_paths(params)
    depth = _depth(jax.tree.leaves(paths))
    o = config.optim
    return jax.tree.map(lambda p: _lr_multiplier(p, depth, o.layerwise_decay, o.patch_embed_lr_mult), paths)


def wd_multipliers(params) -> Any:
    """Tree of Python floats: 0.0 for biases, norm parameters and LayerScale gammas, else 1.0."""
    return jax.tree.map(_wd_multiplier, param_paths(params))


def is_last_layer(params) -> Any:
    """Tree of bools: True for the heads' `last_layer` parameters."""
    return jax.tree.map(_is_last_layer, param_paths(params))


class AdamWState(NamedTuple):
    """count: int32 [] updates applied so far; mu, nu: fp32 moments shaped like the params."""

    count: jax.Array
    mu: Any
    nu: Any


def make_optimizer(config, schedules: Schedules | Mapping | None = None) -> optax.GradientTransformation:
    """AdamW exactly as `torch.optim.AdamW` with DINOv2's per-parameter LR and WD.

    For a leaf with multipliers (lr_mult, wd_mult, last) at update number t = count + 1,
    with s = count the 0-based iteration:
        lr = schedules.lr(s) * lr_mult * (schedules.last_layer_lr_mult(s) if last else 1)
        wd = schedules.wd(s) * wd_mult
        p <- p * (1 - lr * wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + 1e-8)
    The multipliers are computed from the parameter paths of the tree it is
    given (at trace time: they are constants of the compiled step).

    `schedules` is a `Schedules` (None builds it from the config). The form
    `make_optimizer(config, params)` of docs/ARCHITECTURE.md is accepted too: a
    params tree in that position is checked for readable paths at once.
    `update(grads, state, params)` needs `params` (decoupled weight decay).
    """
    if isinstance(schedules, Mapping):
        lr_multipliers(schedules, config)
        schedules = None
    if schedules is None:
        schedules = Schedules.from_config(config)
    b1, b2, eps = float(config.optim.adamw_beta1), float(config.optim.adamw_beta2), 1e-8

    def init(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)  # noqa: E731
        return AdamWState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("make_optimizer: update() needs params for the decoupled weight decay")
        step = state.count
        t = (step + 1).astype(jnp.float32)
        lr, wd, last_mult = schedules.lr(step), schedules.wd(step), schedules.last_layer_lr_mult(step)
        lr_mult, wd_mult, last = lr_multipliers(grads, config), wd_multipliers(grads), is_last_layer(grads)
        bc1 = 1.0 - b1**t
        bc2_sqrt = jnp.sqrt(1.0 - b2**t)

        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g.astype(jnp.float32), state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, grads)

        def leaf_update(p, m, v, lm, wm, is_last):
            p_lr = lr * lm * (last_mult if is_last else 1.0)
            decay = -(p_lr * wd * wm) * p.astype(jnp.float32)
            adam = -(p_lr / bc1) * m / (jnp.sqrt(v) / bc2_sqrt + eps)
            return (decay + adam).astype(p.dtype)

        updates = jax.tree.map(leaf_update, params, mu, nu, lr_mult, wd_mult, last)
        return updates, AdamWState(count=state.count + 1, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def _global_norm(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)) if leaves else jnp.float32(0)


def clip_by_module(grads: Mapping, max_norm: float) -> tuple[dict, dict[str, jax.Array]]:
    """Clips each top-level module (backbone, dino_head, ibot_head) to global L2 norm `max_norm`.

    Same rule as torch `clip_grad_norm_` applied per module (DINOv2 clips each
    of its student modules separately): g *= min(max_norm / (norm + 1e-6), 1).
    `max_norm <= 0` disables clipping. Returns (clipped grads, {module: fp32 []
    norm before clipping}).
    """
    clipped, norms = {}, {}
    for name, sub in grads.items():
        norm = _global_norm(sub)
        norms[name] = norm
        if max_norm > 0:
            scale = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
            sub = jax.tree.map(lambda g: (g * scale).astype(g.dtype), sub)
        clipped[name] = sub
    return clipped, norms


def gradient_stats(grads: Mapping) -> dict[str, jax.Array]:
    """The guide's gradient metrics, fp32 scalars, computed on device.

    Per top-level module: `gradients/<module>_mean` the mean magnitude mean|g|
    (the guide's "average gradient magnitude"; a raw mean would cancel to ~0),
    `_std` the standard deviation of the raw values g, `_max` max|g|, `_norm` the
    L2 norm; plus `gradients/global_norm` over all modules. Pass the gradients
    before clipping to see what the clip threshold acts on.
    """
    stats, sq_total = {}, jnp.float32(0)
    for name, sub in grads.items():
        leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(sub)]
        if not leaves:
            continue
        # per-leaf reductions, no concatenation: the leaves may be sharded differently
        count = sum(x.size for x in leaves)
        mean = sum(jnp.sum(x) for x in leaves) / count
        sq = sum(jnp.sum(jnp.square(x)) for x in leaves)
        stats[f"gradients/{name}_mean"] = sum(jnp.sum(jnp.abs(x)) for x in leaves) / count
        # two-pass variance: E[g^2] - E[g]^2 loses the small spread of gradients to rounding
        stats[f"gradients/{name}_std"] = jnp.sqrt(sum(jnp.sum(jnp.square(x - mean)) for x in leaves) / count)
        stats[f"gradients/{name}_max"] = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))
        stats[f"gradients/{name}_norm"] = jnp.sqrt(sq)
        sq_total = sq_total + sq
    stats["gradients/global_norm"] = jnp.sqrt(sq_total)
    return stats
