"""Hands a trained backbone to the PyTorch world (DINOCell's segmentation, timm, dinov2).

    python -m dinocell_jax.export --workdir runs/x --out backbone.safetensors
    python -m dinocell_jax.export --workdir runs/x --out backbone.pth --format torch
    python -m dinocell_jax.export --workdir runs/x/checkpoints/10000 --out b.safetensors --which student

Writes the teacher backbone (the model DINO evaluates and ships) of the latest
checkpoint, or of `--step N`, in DINOv2 key names (`--flavor dinov3` for DINOv3's:
`storage_tokens`, `rope_embed.periods`). `--workdir` may be a run directory, its
`checkpoints/` or one step directory (a downloaded wandb `model` artifact): the
config comes from `<workdir>/config.json`, `--config`, or the checkpoint itself.
The safetensors header carries the architecture (patch size, width, depth,
heads, registers, position embedding, input channels), the input normalisation
(`data.input_norm`) and the step.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from dinocell_jax import checkpoint as ckpt_lib

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "torch")
WHICH = ("teacher", "student")


def architecture(cfg) -> dict[str, str]:
    """String metadata (safetensors headers hold only strings) describing a ViTConfig."""
    return {
        "patch_size": str(cfg.patch_size), "embed_dim": str(cfg.embed_dim), "depth": str(cfg.depth),
        "num_heads": str(cfg.num_heads), "mlp_ratio": str(cfg.mlp_ratio),
        "n_storage_tokens": str(cfg.n_storage_tokens), "pos_embed": str(cfg.pos_embed),
        "pos_embed_size": str(cfg.pos_embed_size), "rope_base": str(cfg.rope_base),
        "in_chans": str(cfg.in_chans), "layerscale_init": str(cfg.layerscale_init),
    }


def export_backbone(backbone_params: Mapping, vit_cfg, out: str, *, fmt: str = "safetensors",
                    flavor: str = "dinov2", metadata: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """Writes backbone params as a PyTorch state dict; returns it (float32 numpy).

    backbone_params: our pure param dict of `VisionTransformer(vit_cfg)`.
    fmt: "safetensors" (header metadata: architecture + `metadata`) or "torch"
    (`torch.save` of a dict of tensors, loadable with `weights_only=True`).
    """
    from dinocell_jax.models import torch_import

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: not one of {FORMATS}")
    state_dict = torch_import.backbone_to_torch(jax.device_get(backbone_params), vit_cfg, flavor=flavor)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        header = {"format": "pt", "flavor": flavor, **architecture(vit_cfg), **dict(metadata or {})}
        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, out, metadata=header)
    else:
        import torch

        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, out)
    return state_dict


def load_tool_config(argv: Sequence[str]):
    """(config, workdir, remaining args) for a tool pointed at a run, its checkpoints or one step.

    Like `cli.parse_known_config`, but a `--workdir` without `config.json` (a copied
    checkpoint, a downloaded artifact) takes the config stored in the checkpoint.
    """
    from dinocell_jax import cli

    args = list(argv)
    workdir = None
    for i, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        if flag == "--workdir":
            workdir = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
    has_config = any(a.partition("=")[0] == "--config" for a in args)
    if workdir and not has_config and not os.path.isfile(os.path.join(workdir, "config.json")):
        config = ckpt_lib.config_from_checkpoint(workdir)
        overrides = {}
        rest = []
        i = 0
        while i < len(args):
            flag, eq, inline = args[i].partition("=")
            if flag == "--workdir":
                i += 1 if eq else 2
            elif flag.startswith("--config."):
                overrides[flag[len("--config."):]] = inline if eq else args[i + 1]
                i += 1 if eq else 2
            else:
                rest.append(args[i])
                i += 1
        cli.apply_overrides(config, overrides)
        return config, workdir, rest
    return cli.parse_known_config(args)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dinocell_jax.export --workdir W --out F [--format safetensors|torch] [--step N]
    [--which teacher|student] [--flavor dinov2|dinov3] [--config.k=v ...]`."""
    from dinocell_jax import cli
    from dinocell_jax.config import ConfigError
    from dinocell_jax.models.vit import vit_config_from
    from dinocell_jax.ssl.step import input_channels

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config, workdir, rest = load_tool_config(args)
        out = cli.pop_flag(rest, "--out")
        fmt = cli.pop_flag(rest, "--format") or "safetensors"
        step = cli.pop_flag(rest, "--step")
        which = cli.pop_flag(rest, "--which") or "teacher"
        flavor = cli.pop_flag(rest, "--flavor") or "dinov2"
        if rest:
            raise ConfigError(f"{rest[0]}: unknown argument (export takes --workdir, --out, --format, --step, "
                              "--which, --flavor, --config, --config.*)")
        if not out:
            raise ConfigError("--out: missing (e.g. --out backbone.safetensors)")
        if fmt not in FORMATS:
            raise ConfigError(f"--format {fmt!r}: not one of {FORMATS}")
        if which not in WHICH:
            raise ConfigError(f"--which {which!r}: not one of {WHICH}")
        if flavor not in ("dinov2", "dinov3"):
            raise ConfigError(f"--flavor {flavor!r}: not 'dinov2' or 'dinov3'")
        step = None if step is None else int(step)
        state, _ = ckpt_lib.restore_trained(config, workdir, step)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = int(jax.device_get(state.step))
    vit_cfg = vit_config_from(config.model, input_channels(config))
    params = getattr(state, which)["backbone"]
    state_dict = export_backbone(params, vit_cfg, out, fmt=fmt, flavor=flavor,
                                 metadata={"step": str(done), "which": which, "source": os.path.abspath(workdir),
                                           # how inputs must be prepared (augment.standardize)
                                           "input_norm": str(config.data.input_norm)})
    n_params = sum(int(np.prod(v.shape)) for v in state_dict.values())
    print(f"wrote {out}: {which} backbone of step {done}, {len(state_dict)} tensors, "
          f"{n_params / 1e6:.2f}M values, {flavor} keys ({fmt})")
    return 0


if __name__ == "__main__":
    # Here, not in main(): main() also runs inside tests and notebooks that own the handlers.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())
