"""The reference step: the official DINOv2 PyTorch training step for the DINOCell configuration.

Issue 8 compares our step with the `dinov2` PyPI package's `SSLMetaArch` (the same
losses, heads, masking, optimiser and EMA as DINOv2's `train.py`), measured on the
same GPU. This script runs that step the way `scripts/benchmark.py` runs ours:
ViT-S/8, 2 x 224 global + 8 x 96 local crops, separate 65536-way DINO and iBOT
heads, Sinkhorn-Knopp, drop path 0.1, bf16 autocast over fp32 weights, random
crops and masks already on the device, median over windows after warm-up.

    python scripts/benchmark_reference.py --batch 64                # eager
    python scripts/benchmark_reference.py --batch 64 --compile      # torch.compile'd backbones
    python scripts/benchmark_reference.py --device cpu --batch 2 --arch vit_small --patch 16 \
        --global_size 32 --local_size 16 --prototypes 64 --steps 2 --window 1 --warmup 1   # CI

Prints one JSON line: images_per_s, step_s, peak_mem_gib, compile_s (warm-up time
of the first step), device, batch, torch, variant, loss.

What differs from a DINOv2 run, and why:
- One process, no FSDP: DINOv2 wraps each module in FSDP even on one GPU. The
  teacher's EMA (which `SSLMetaArch.update_teacher` does through FSDP's flat
  parameters) and gradient clipping (`FSDP.clip_grad_norm_`) are written out here
  over the same tensors, with `torch._foreach_*` as DINOv2 does.
- xFormers is not installed on the GPU image (nor here). The package needs its
  `memory_efficient_attention` with block-diagonal masks (the student runs its
  global and local crops as one nested sequence), `scaled_index_add` and
  `index_select_cat` (drop path on a subset of the batch). `_XFormersStandIn`
  implements them with `torch.nn.functional.scaled_dot_product_attention` (flash
  attention on the GPU), one call per run of equal-length sequences, so no mask
  is ever materialised. Without xFormers' `cross_entropy` the iBOT loss takes the
  package's own PyTorch fallback.
- The PyPI ViT has no storage (register) tokens and three input channels: the
  patch embedding is a negligible share of the work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types

import torch
import torch.nn.functional as F


class _BlockDiagonalMask:
    """xFormers' `fmha.BlockDiagonalMask` as DINOv2 uses it: sequences of given lengths
    concatenated along dim 1 of a batch of one, attending only within themselves."""

    def __init__(self, seqlens: list[int]):
        self.seqlens = list(seqlens)
        self._batch_sizes = None  # set by DINOv2 (get_attn_bias_and_cat) or from_tensor_list
        self.runs: list[list[int]] = []  # [count, length] of consecutive equal-length sequences
        for n in self.seqlens:
            if self.runs and self.runs[-1][1] == n:
                self.runs[-1][0] += 1
            else:
                self.runs.append([1, n])

    @classmethod
    def from_seqlens(cls, seqlens):
        return cls(seqlens)

    @classmethod
    def from_tensor_list(cls, tensors):
        mask = cls([t.shape[1] for t in tensors for _ in range(t.shape[0])])
        mask._batch_sizes = [t.shape[0] for t in tensors]
        return mask, torch.cat([t.reshape(1, -1, *t.shape[2:]) for t in tensors], dim=1)

    def split(self, tensor):
        """[1, sum(seqlens), ...] -> one [b, n, ...] tensor per group of `_batch_sizes` sequences."""
        out, start, seq = [], 0, 0
        for b in self._batch_sizes:
            length = sum(self.seqlens[seq:seq + b])
            out.append(tensor[:, start:start + length].reshape(b, -1, *tensor.shape[2:]))
            start, seq = start + length, seq + b
        return out


def _memory_efficient_attention(q, k, v, attn_bias=None, op=None):
    """q, k, v [B, N, heads, head_dim] (xFormers' layout) -> the same layout."""
    del op  # xFormers' kernel choice; SDPA picks its own

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    if attn_bias is None:
        return attend(q, k, v)
    out, start = [], 0
    for count, length in attn_bias.runs:
        rows = slice(start, start + count * length)
        q_run, k_run, v_run = (t[:, rows].reshape(count, length, *t.shape[2:]) for t in (q, k, v))
        out.append(attend(q_run, k_run, v_run).reshape(1, count * length, *q.shape[2:]))
        start += count * length
    return torch.cat(out, dim=1)


def _scaled_index_add(input, index, source, scaling=None, alpha=1.0):
    """input with `alpha * scaling * source[i]` added to its rows `index[i]` (a new tensor)."""
    return torch.index_add(input, 0, index, source if scaling is None else source * scaling, alpha=alpha)


def _index_select_cat(sources, indices):
    return torch.cat([s[i].flatten() for s, i in zip(sources, indices)])


def install_stand_ins() -> None:
    """Make `dinov2.train.ssl_meta_arch` importable without xFormers, fvcore or torchvision.

    xFormers: the stand-ins above. fvcore: `dinov2.fsdp` imports its Checkpointer, which
    the step never uses. `dinov2.train` and `dinov2.data` are entered as bare packages so
    their `__init__`s (the training script, the datasets) are not run.
    """
    import dinov2

    if "xformers" not in sys.modules:
        xformers, ops, fmha = (types.ModuleType(n) for n in ("xformers", "xformers.ops", "xformers.ops.fmha"))
        fmha.BlockDiagonalMask = _BlockDiagonalMask
        fmha.MemoryEfficientAttentionFlashAttentionOp = None
        ops.fmha = fmha
        ops.memory_efficient_attention = _memory_efficient_attention
        ops.unbind = torch.unbind
        ops.scaled_index_add = _scaled_index_add
        ops.index_select_cat = _index_select_cat
        xformers.ops = ops
        sys.modules.update({"xformers": xformers, "xformers.ops": ops, "xformers.ops.fmha": fmha})
    if "fvcore" not in sys.modules:
        try:
            import fvcore.common.checkpoint  # noqa: F401
        except ImportError:
            names = ("fvcore", "fvcore.common", "fvcore.common.checkpoint")
            fvcore, common, checkpoint = (types.ModuleType(n) for n in names)
            checkpoint.Checkpointer = checkpoint.PeriodicCheckpointer = object
            fvcore.common, common.checkpoint = common, checkpoint
            sys.modules.update(dict(zip(names, (fvcore, common, checkpoint))))
    root = os.path.dirname(dinov2.__file__)
    for sub in ("train", "data"):
        name = f"dinov2.{sub}"
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = package


def dinocell_cfg(args):
    """DINOv2's default SSL config with the DINOCell configuration's numbers."""
    import dinov2
    import ml_collections
    import yaml

    with open(os.path.join(os.path.dirname(dinov2.__file__), "configs", "ssl_default_config.yaml")) as f:
        cfg = ml_collections.ConfigDict(yaml.safe_load(f))
    cfg.compute_precision.grad_scaler = False  # bf16: no loss scaling
    s = cfg.student
    s.arch, s.patch_size, s.drop_path_rate, s.layerscale, s.drop_path_uniform = args.arch, args.patch, 0.1, 1e-5, True
    for head in (cfg.dino, cfg.ibot):
        head.head_n_prototypes, head.head_bottleneck_dim, head.head_hidden_dim = args.prototypes, 256, 2048
    cfg.dino.koleo_loss_weight = 0.1
    cfg.ibot.separate_head = True
    cfg.ibot.mask_sample_probability, cfg.ibot.mask_ratio_min_max = 0.5, [0.1, 0.5]
    cfg.train.centering = "sinkhorn_knopp"
    cfg.crops.global_crops_size, cfg.crops.local_crops_size = args.global_size, args.local_size
    cfg.crops.local_crops_number = 8
    return cfg


def random_batch(cfg, batch: int, seed: int = 0) -> dict:
    """A collated batch as DINOv2's loader gives it: random crops, its masking and collate."""
    import random

    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.masking import MaskingGenerator

    random.seed(seed)
    torch.manual_seed(seed)
    g, l, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    samples = [({"global_crops": list(torch.randn(2, 3, g, g)), "local_crops": list(torch.randn(n_local, 3, l, l))}, 0)
               for _ in range(batch)]
    grid = g // cfg.student.patch_size
    masking = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    return collate_data_and_cast(samples, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                                 mask_probability=cfg.ibot.mask_sample_probability, dtype=torch.float32,
                                 n_tokens=grid * grid, mask_generator=masking)


def build(cfg, device, compile_backbones: bool):
    """SSLMetaArch with the teacher initialised from the student (as `prepare_for_distributed_training`),
    and DINOv2's AdamW over its parameter groups."""
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    model = SSLMetaArch(cfg).to(device)
    model.need_to_synchronize_fsdp_streams = False  # FSDP's stream sharing: no FSDP here
    for k in model.student:
        model.teacher[k].load_state_dict(model.student[k].state_dict())
    model.train()
    optimizer = torch.optim.AdamW(model.get_params_groups(), betas=(0.9, 0.999))
    for group in optimizer.param_groups:  # any values: the step's work does not depend on them
        group["lr"] = 1e-4 * group["lr_multiplier"]
        group["weight_decay"] = 0.04 * group["wd_multiplier"]
    if compile_backbones:
        model.student.backbone = torch.compile(model.student.backbone)
        model.teacher.backbone = torch.compile(model.teacher.backbone)
    return model, optimizer


def make_step(model, optimizer, data, device: torch.device):
    """DINOv2's `do_train` iteration without the data loader, the LR schedule's lookups and logging."""
    teacher_params = [p for m in model.teacher.values() for p in m.parameters()]
    student_params = [p for m in model.student.values() for p in m.parameters()]

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            losses = model.forward_backward(data, teacher_temp=0.07)
        for module in model.student.values():
            torch.nn.utils.clip_grad_norm_(module.parameters(), 3.0)
        optimizer.step()
        with torch.no_grad():  # model.update_teacher(0.994), over plain parameters
            torch._foreach_mul_(teacher_params, 0.994)
            torch._foreach_add_(teacher_params, student_params, alpha=1 - 0.994)
        # DINOv2's loop also reads the losses back (its NaN check) at every step, a host sync
        # left out here: the reference gets its best case.
        return sum(v.detach() for v in losses.values())

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="torch.compile the student and teacher backbones")
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--global_size", type=int, default=224)
    p.add_argument("--local_size", type=int, default=96)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--window", type=int, default=5, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (the first compiles)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU (--device cpu for a toy run)")
    install_stand_ins()
    # The iBOT Sinkhorn-Knopp all-reduces its sums, as on every DINOv2 run: a group of one.
    rendezvous = os.path.join(tempfile.mkdtemp(prefix="dinov2_reference_"), "rendezvous")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         init_method=f"file://{rendezvous}", rank=0, world_size=1)
    cfg = dinocell_cfg(args)
    data = {k: v.to(device) if torch.is_tensor(v) else v for k, v in random_batch(cfg, args.batch).items()}
    model, optimizer = build(cfg, device, args.compile)
    if device.type == "cpu":
        # forward_backward moves its inputs with `.cuda(non_blocking=True)`; they are already here.
        torch.Tensor.cuda = lambda self, *a, **k: self

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step = make_step(model, optimizer, data, device)
    t0 = time.perf_counter()
    loss = step()
    sync()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(max(args.steps // args.window, 1)):
        t0 = time.perf_counter()
        for _ in range(args.window):
            loss = step()
        sync()
        times.append((time.perf_counter() - t0) / args.window)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(json.dumps({
        "images_per_s": round(args.batch / step_s, 1), "step_s": round(step_s, 5), "peak_mem_gib": round(peak, 2),
        "compile_s": round(compile_s, 1), "device": name, "batch": args.batch, "torch": torch.__version__,
        "variant": "torch.compile backbones" if args.compile else "eager", "loss": round(float(loss), 4),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
