"""PyTorch DINOv2/DINOv3 state dicts <-> our parameter dicts, both directions from one key table.

Import (`backbone_from_torch`) accepts DINOv2 (`register_tokens`, learned `pos_embed`)
and DINOv3 (`storage_tokens`, `rope_embed.periods`, `attn.qkv.bias_mask`) checkpoints,
optionally under a prefix (`teacher.backbone.`, `module.`, ...), and adapts them to the
target `ViTConfig`: the patch embedding is resampled to `cfg.patch_size` by FlexiViT's
pseudo-inverse resize (Beyer et al. 2023), RGB kernels are summed for 1-channel inputs,
and the learned position grid is bicubic-resized to `cfg.pos_grid` as DINOv2 would.
Export (`backbone_to_torch`) writes DINOv2 (default) or DINOv3 key names.

torch is imported lazily (only `load_state_dict` of a `.pth` needs it): training does not.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dinocell_jax.models.heads import DINOHead
from dinocell_jax.models.vit import VisionTransformer, ViTConfig, resize_pos_grid

# How a torch tensor is laid out relative to ours: (to ours, to torch).
_LAYOUTS = {
    "same": (lambda a: a, lambda a: a),
    "linear": (lambda a: a.T, lambda a: a.T),  # torch [out, in] <-> kernel [in, out]
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),  # [D, C, p, p] <-> [p, p, C, D]
    "gain": (lambda a: a.reshape(-1), lambda a: a.reshape(-1, 1)),  # weight_norm g [out, 1] <-> [out]
}
_LN = (("scale", "weight", "same"), ("bias", "bias", "same"))
_LIN = (("kernel", "weight", "linear"), ("bias", "bias", "same"))


class StateDictError(KeyError):
    """A state dict that does not fit the target; the message names the keys and shapes."""

    def __str__(self):
        return str(self.args[0])


# ----------------------------------------------------------------------------
# The key table.
# ----------------------------------------------------------------------------

def _module_entries(path: tuple, key: str, fields) -> list[tuple[tuple, str, str]]:
    return [(path + (ours,), f"{key}.{theirs}", layout) for ours, theirs, layout in fields]


def backbone_key_table(cfg: ViTConfig, flavor: str = "dinov2") -> list[tuple[tuple, str, str]]:
    """`(our path, torch key, layout)` for every backbone parameter of `cfg`; flavor "dinov2" | "dinov3"."""
    if flavor not in ("dinov2", "dinov3"):
        raise ValueError(f"flavor {flavor!r} is not 'dinov2' or 'dinov3'")
    table = [
        (("patch_embed", "proj", "kernel"), "patch_embed.proj.weight", "conv"),
        (("patch_embed", "proj", "bias"), "patch_embed.proj.bias", "same"),
        (("cls_token",), "cls_token", "same"),
        (("mask_token",), "mask_token", "same"),
    ]
    if cfg.n_storage_tokens:
        table.append((("storage_tokens",), "register_tokens" if flavor == "dinov2" else "storage_tokens", "same"))
    if cfg.pos_embed == "learned":
        table.append((("pos_embed",), "pos_embed", "same"))
    qkv = _LIN if cfg.qkv_bias else _LIN[:1]
    for i in range(cfg.depth):
        b = ("blocks", i)
        table += _module_entries(b + ("norm1",), f"blocks.{i}.norm1", _LN)
        table += _module_entries(b + ("attn", "qkv"), f"blocks.{i}.attn.qkv", qkv)
        table += _module_entries(b + ("attn", "proj"), f"blocks.{i}.attn.proj", _LIN)
        table += _module_entries(b + ("norm2",), f"blocks.{i}.norm2", _LN)
        table += _module_entries(b + ("mlp", "fc1"), f"blocks.{i}.mlp.fc1", _LIN)
        table += _module_entries(b + ("mlp", "fc2"), f"blocks.{i}.mlp.fc2", _LIN)
        if cfg.layerscale_init:
            table += [(b + ("ls1", "gamma"), f"blocks.{i}.ls1.gamma", "same"),
                      (b + ("ls2", "gamma"), f"blocks.{i}.ls2.gamma", "same")]
    table += _module_entries(("norm",), "norm", _LN)
    return table


def head_key_table(n_layers: int, weight_norm: bool) -> list[tuple[tuple, str, str]]:
    """`(our path, torch key, layout)` of a DINOHead (dinov2/dinov3 `DINOHead` names)."""
    table = []
    for i in range(n_layers):
        # torch's nn.Sequential interleaves GELUs (index 2i); a 1-layer MLP is a bare Linear.
        key = "mlp" if n_layers == 1 else f"mlp.{2 * i}"
        table += _module_entries(("mlp", i), key, _LIN)
    if weight_norm:
        table += [(("last_layer", "kernel"), "last_layer.weight_v", "linear"),
                  (("last_layer", "gain"), "last_layer.weight_g", "gain")]
    else:
        table.append((("last_layer", "kernel"), "last_layer.weight", "linear"))
    return table


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------

def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def _strip_prefix(state_dict: Mapping[str, Any], anchor: str, prefix: str | None) -> dict[str, np.ndarray]:
    """Keys under `prefix` (auto: the unique prefix of the key ending in `anchor`) with it removed."""
    if prefix is None:
        found = sorted({k[: -len(anchor)] for k in state_dict if k == anchor or k.endswith("." + anchor)})
        if len(found) != 1:
            raise StateDictError(
                f"state dict: cannot locate the model by key {anchor!r} (found prefixes {found}); pass prefix=")
        prefix = found[0]
    return {k[len(prefix):]: _to_numpy(v) for k, v in state_dict.items() if k.startswith(prefix)}


def _abstract_params(module_fn) -> dict:
    state = nnx.state(nnx.eval_shape(module_fn), nnx.Param)
    return nnx.to_pure_dict(state)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _from_table(sd: dict[str, np.ndarray], table, expected: dict, what: str, ignored=()) -> dict:
    params, missing, mismatched = {}, [], []
    for path, key, layout in table:
        if key not in sd:
            missing.append(key)
            continue
        value = _LAYOUTS[layout][0](sd[key])
        want = tuple(_get(expected, path).shape)
        if value.shape != want:
            where = "/".join(map(str, path))
            mismatched.append(f"{key}: {sd[key].shape} -> {value.shape}, expected {want} for {where}")
            continue
        _set(params, path, jnp.asarray(value))
    used = {key for _, key, _ in table} | set(ignored)
    unexpected = sorted(set(sd) - used)
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if problems:
        raise StateDictError(f"{what}: " + " | ".join(problems))
    return params


def _to_table(params: dict, table) -> dict[str, np.ndarray]:
    return {key: np.ascontiguousarray(_LAYOUTS[layout][1](np.asarray(_get(params, path), np.float32)))
            for path, key, layout in table}


# ----------------------------------------------------------------------------
# FlexiViT PI-resize of the patch embedding.
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def bilinear_resize_matrix(old: int, new: int) -> np.ndarray:
    """`[new*new, old*old]` float64 matrix of `jax.image.resize(x, (new, new), 'bilinear')` on a flattened patch.

    The resize is separable, so the 2-D matrix is the Kronecker product of the 1-D one with itself
    (row-major flattening). Antialiased when shrinking, as jax.image.resize (and FlexiViT).
    """
    one_d = np.asarray(jax.image.resize(jnp.eye(old, dtype=jnp.float32), (new, old), "bilinear"), np.float64)
    return np.kron(one_d, one_d)


def pi_resize_patch_kernel(kernel: np.ndarray, new_patch: int) -> np.ndarray:
    """FlexiViT PI-resize: `kernel [p, p, C, D]` -> `[new, new, C, D]` float32.

    With B the bilinear resize of patches p -> new, the new kernel is `pinv(B^T) w`, which keeps
    tokens equal, `<x, w> = <B x, w_new>`, for every patch x when new >= p; when shrinking it is
    the least-squares fit, exact for patches `x = pinv(B) y`.
    """
    p, _, c, d = kernel.shape
    if new_patch == p:
        return np.asarray(kernel, np.float32)
    resize = bilinear_resize_matrix(p, new_patch)
    flat = np.asarray(kernel, np.float64).reshape(p * p, c * d)
    return (np.linalg.pinv(resize.T) @ flat).reshape(new_patch, new_patch, c, d).astype(np.float32)


# ----------------------------------------------------------------------------
# Backbone.
# ----------------------------------------------------------------------------

def _adapt_patch_embed(weight: np.ndarray, cfg: ViTConfig) -> np.ndarray:
    """torch `[D, C, p, p]` -> torch `[D, cfg.in_chans, cfg.patch_size, cfg.patch_size]`."""
    d, c, p, _ = weight.shape
    if c != cfg.in_chans:
        if c == 3 and cfg.in_chans == 1:
            # A grey image replicated on R, G, B gives the same tokens as the summed kernel on one channel.
            weight = weight.sum(axis=1, keepdims=True)
        else:
            raise StateDictError(
                f"patch_embed.proj.weight: {weight.shape} has {c} input channels, the model has "
                f"in_chans={cfg.in_chans} (only 3 -> 1 is converted, by summing)")
    if p != cfg.patch_size:
        ours = _LAYOUTS["conv"][0](weight)
        weight = _LAYOUTS["conv"][1](pi_resize_patch_kernel(ours, cfg.patch_size))
    return weight


def backbone_from_torch(state_dict: Mapping[str, Any], cfg: ViTConfig, *, prefix: str | None = None) -> dict:
    """A DINOv2/DINOv3 backbone state dict -> our pure param dict for `VisionTransformer(cfg)` (fp32 arrays).

    `prefix`: the key prefix of the backbone (None: found from the key ending in `cls_token`).
    Raises StateDictError naming missing, unexpected or mis-shaped keys.
    """
    sd = _strip_prefix(state_dict, "cls_token", prefix)
    ignored = []
    if "rope_embed.periods" in sd:
        ignored.append("rope_embed.periods")
        if cfg.pos_embed != "rope":
            raise StateDictError("rope_embed.periods: the checkpoint uses RoPE but cfg.pos_embed='learned'")
        head_dim = cfg.head_dim
        ours = cfg.rope_base ** (2 * np.arange(head_dim // 4) / (head_dim // 2))
        theirs = sd["rope_embed.periods"]
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-3):
            raise StateDictError(
                f"rope_embed.periods: {theirs.shape} {theirs[:4]}... differ from cfg.rope_base={cfg.rope_base} "
                f"({ours.shape} {ours[:4]}...); set model.rope_base to the checkpoint's")
    if "pos_embed" in sd and cfg.pos_embed != "learned":
        raise StateDictError(
            "pos_embed: the checkpoint has a learned position embedding; set model.pos_embed='learned'")
    for key in [k for k in sd if k.endswith("attn.qkv.bias_mask")]:
        # Fold the DINOv3 key-bias mask into the bias: the result is right whatever cfg.mask_k_bias says.
        bias_key = key[: -len("_mask")]
        if bias_key in sd:
            sd[bias_key] = sd[bias_key] * np.nan_to_num(sd[key])
        ignored.append(key)
    if "patch_embed.proj.weight" in sd:
        sd["patch_embed.proj.weight"] = _adapt_patch_embed(sd["patch_embed.proj.weight"], cfg)
    if cfg.pos_embed == "learned" and "pos_embed" in sd:
        pos = sd["pos_embed"]
        n = pos.shape[1] - 1
        side = int(round(np.sqrt(n)))
        if pos.ndim != 3 or pos.shape[0] != 1 or side * side != n:
            raise StateDictError(f"pos_embed: {pos.shape} is not [1, 1 + G*G, D]")
        if side != cfg.pos_grid:
            grid = resize_pos_grid(jnp.asarray(pos[0, 1:].reshape(side, side, -1)), (cfg.pos_grid,) * 2,
                                   dinov2_offset=True)
            sd["pos_embed"] = np.concatenate([pos[:, :1], np.asarray(grid).reshape(1, cfg.pos_grid ** 2, -1)], 1)
    flavor = "dinov3" if "storage_tokens" in sd else "dinov2"
    expected = _abstract_params(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    return _from_table(sd, backbone_key_table(cfg, flavor), expected, "backbone state dict", ignored)


def backbone_to_torch(params: dict, cfg: ViTConfig, *, flavor: str = "dinov2") -> dict[str, np.ndarray]:
    """Our backbone params -> a torch-style state dict of float32 numpy arrays.

    flavor "dinov2" (default, `register_tokens`; a masked key bias is written as zeros) or
    "dinov3" (`storage_tokens`, `rope_embed.periods`, `attn.qkv.bias_mask`).
    """
    sd = _to_table(params, backbone_key_table(cfg, flavor))
    d = cfg.embed_dim
    if cfg.mask_k_bias and cfg.qkv_bias:
        mask = np.concatenate([np.ones(d), np.zeros(d), np.ones(d)]).astype(np.float32)
        for i in range(cfg.depth):
            key = f"blocks.{i}.attn.qkv.bias"
            if flavor == "dinov2":
                sd[key] = sd[key] * mask
            else:
                sd[f"{key}_mask"] = mask
    if flavor == "dinov3" and cfg.pos_embed == "rope":
        h = cfg.head_dim
        sd["rope_embed.periods"] = (cfg.rope_base ** (2 * np.arange(h // 4) / (h // 2))).astype(np.float32)
    return sd


# ----------------------------------------------------------------------------
# Heads.
# ----------------------------------------------------------------------------

def _head_structure(sd: dict[str, np.ndarray]) -> tuple[int, bool]:
    if "mlp.weight" in sd:
        n_layers = 1
    else:
        idx = sorted(int(k.split(".")[1]) for k in sd if k.startswith("mlp.") and k.endswith(".weight"))
        if not idx:
            raise StateDictError(f"head state dict: no 'mlp.*.weight' keys among {sorted(sd)}")
        n_layers = len(idx)
    # Newer torch parametrize-based weight norm names g/v original0/original1.
    for new, old in (("last_layer.parametrizations.weight.original0", "last_layer.weight_g"),
                     ("last_layer.parametrizations.weight.original1", "last_layer.weight_v")):
        if new in sd:
            sd[old] = sd.pop(new)
    return n_layers, "last_layer.weight_g" in sd


def head_from_torch(state_dict: Mapping[str, Any], *, prefix: str = "", **head_kwargs) -> dict:
    """A dinov2/dinov3 `DINOHead` state dict (keys under `prefix`) -> our pure DINOHead params.

    The structure (in_dim, out_dim, hidden_dim, bottleneck_dim, n_layers, weight_norm_last_layer)
    is read from the shapes; any of those passed as `head_kwargs` (e.g. from `config.heads`) must agree.
    """
    sd = {k[len(prefix):]: _to_numpy(v) for k, v in state_dict.items() if k.startswith(prefix)}
    n_layers, weight_norm = _head_structure(sd)
    first = sd["mlp.weight" if n_layers == 1 else "mlp.0.weight"]
    last_key = "last_layer.weight_v" if weight_norm else "last_layer.weight"
    if last_key not in sd:
        raise StateDictError(f"head state dict: missing key {prefix + last_key!r} (keys: {sorted(sd)})")
    out_dim, bottleneck = sd[last_key].shape
    found = dict(in_dim=first.shape[1], out_dim=out_dim, bottleneck_dim=bottleneck, n_layers=n_layers,
                 weight_norm_last_layer=weight_norm)
    if n_layers > 1:
        found["hidden_dim"] = first.shape[0]
    wrong = [f"{k}={head_kwargs[k]} (state dict has {v})" for k, v in found.items()
             if k in head_kwargs and head_kwargs[k] != v]
    if wrong:
        raise StateDictError(f"head state dict{' ' + prefix if prefix else ''}: does not match " + ", ".join(wrong))
    expected = _abstract_params(lambda: DINOHead(**found, rngs=nnx.Rngs(0)))
    return _from_table(sd, head_key_table(n_layers, weight_norm), expected, "head state dict")


def head_to_torch(params: dict, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Our DINOHead params -> a dinov2 `DINOHead` state dict (float32 numpy), keys under `prefix`."""
    n_layers = len(params["mlp"])
    table = head_key_table(n_layers, "gain" in params["last_layer"])
    return {prefix + k: v for k, v in _to_table(params, table).items()}


# ----------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------

def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `.pth`/`.pt` (torch, CPU, weights only) or `.safetensors` file into float32 numpy arrays.

    A `.pth` holding a training checkpoint dict (`{"model": {...}}`, `{"teacher": {...}}`, ...) is
    flattened to dotted keys, so `backbone_from_torch`'s prefix search finds the backbone.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"state dict file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
        except Exception as err:  # safetensors raises its own types
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    if not path.endswith((".pth", ".pt", ".bin")):
        raise ValueError(f"{path}: unknown state dict format (expected .pth, .pt, .bin or .safetensors)")
    import torch  # only here: training never needs torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    flat: dict[str, np.ndarray] = {}

    def visit(prefix, node):
        if hasattr(node, "detach"):
            flat[prefix[:-1]] = _to_numpy(node)
        elif isinstance(node, Mapping):
            for k, v in node.items():
                visit(f"{prefix}{k}.", v)

    visit("", obj)
    if not flat:
        raise ValueError(f"{path}: holds no tensors")
    return flat


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes a numpy state dict (e.g. from `backbone_to_torch`) as safetensors."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, os.fspath(path))
