"""Throughput of the training step of any config on the devices present.

    python scripts/benchmark.py --config configs/vits8_jump_multiview.py \
        --config.train.batch_size=64 --config.model.attention_impl=cudnn
    python scripts/benchmark.py --config configs/demo.py --steps 3 --warmup 1   # CPU toy size

Fields are already on the device (random uint16 at `data.field_size`), so this
measures the jitted step: device-side augmentation, teacher and student,
heads, losses, optimiser, EMA. `--no-aug` feeds ready-made crops instead, to
isolate the model. Prints one JSON line last: images_per_s, step_s (median
over timed windows), mfu (analytic FLOPs / peak bf16 FLOP/s), peak_mem_gib,
compile_s, device, n_devices, batch, jax.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dinocell_jax import cli, parallel  # noqa: E402
from dinocell_jax import config as config_lib  # noqa: E402
from dinocell_jax.data.sources import channel_list  # noqa: E402
from dinocell_jax.ssl import optim  # noqa: E402
from dinocell_jax.ssl import step as step_lib  # noqa: E402
from dinocell_jax.ssl.schedules import Schedules  # noqa: E402

PEAK_FLOPS = 790e12  # H100 SXM bf16 dense matmul rate measured here (../shared/GPU.md)


def vit_forward_flops(tokens: int, dim: int, depth: int, mlp_ratio: float, patch_pixels: int) -> float:
    """Matmul FLOPs of one ViT forward on one crop (2 per multiply-add)."""
    per_layer = 2 * tokens * (3 * dim * dim + dim * dim + 2 * mlp_ratio * dim * dim)
    attention = 2 * 2 * tokens * tokens * dim  # QK^T and AV
    return depth * (per_layer + attention) + 2 * (tokens - 1) * patch_pixels * dim


def analytic_flops_per_field(config, models) -> float:
    """FLOPs of one field's share of a training step (backward = 2 x forward)."""
    v, h, c = models.vit, config.heads, config.crops
    extra = 1 + v.n_storage_tokens
    patch_pixels = v.patch_size ** 2 * v.in_chans

    def crop(size):
        n = (size // v.patch_size) ** 2
        return vit_forward_flops(n + extra, v.embed_dim, v.depth, v.mlp_ratio, patch_pixels)

    g, l = crop(c.global_size), crop(c.local_size)
    backbone = 3 * (2 * g + c.n_local * l) + 2 * g  # student fwd+bwd, teacher fwd
    head_row = 2 * (v.embed_dim * h.hidden_dim + (h.n_layers - 2) * h.hidden_dim ** 2
                    + h.hidden_dim * h.bottleneck_dim + h.bottleneck_dim * h.out_dim)
    group = step_lib.device_group_size(config, jax.device_count())
    masked_rows = step_lib.mask_upperbound(config, group) / group  # the static iBOT buffer
    heads = head_row * (3 * (2 + c.n_local) + 2 + 4 * masked_rows)
    return backbone + heads


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """{kernel name: "file.py:line function op"} for the instructions of the optimised HLO.

    The GPU kernel of a fusion is named after the fusion instruction ('.' written as
    '_'), and its metadata points (through the module's StackFrames table) at the
    line of our code it came from.
    """
    import re

    tables: dict[str, dict[int, str]] = {}
    section = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            tables[section] = {}
        elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
            section = None
        elif section:
            key, _, value = line.partition(" ")
            tables[section][int(key)] = value.strip().strip('"')

    def field(value, name):
        m = re.search(name + r"=(\d+)", value)
        return int(m.group(1)) if m else None

    def frame_source(frame_id):
        frame = tables.get("StackFrames", {}).get(frame_id, "")
        loc = tables.get("FileLocations", {}).get(field(frame, "file_location_id"), "")
        file = tables.get("FileNames", {}).get(field(loc, "file_name_id"), "?")
        function = tables.get("FunctionNames", {}).get(field(loc, "function_name_id"), "?")
        return f"{os.path.basename(file)}:{field(loc, 'line')} {function}"

    out = {}
    pattern = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*metadata=\{([^}]*)\}")
    for line in hlo_text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        meta = m.group(2)
        op = re.search(r'op_name="([^"]*)"', meta)
        frame = field(meta, "stack_frame_id")
        src, lineno = re.search(r'source_file="([^"]*)"', meta), field(meta, "source_line")
        if frame is not None:
            where = frame_source(frame)
        elif src and lineno is not None:
            where = f"{os.path.basename(src.group(1))}:{lineno}"
        else:
            where = "?"
        out[m.group(1).replace(".", "_")] = f"{where} {op.group(1).split('/')[-1] if op else ''}"
    return out


def print_top_kernels(trace_dir: str, n_steps: int, top: int = 25, sources: dict[str, str] | None = None) -> None:
    """Device time per kernel name from the Perfetto trace, summed over the traced steps.

    With `sources` (see `hlo_sources`) each kernel is shown with the line of code it
    came from, and the time is also summed per source line.
    """
    import glob
    import gzip

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    # Device threads are the ones whose process name mentions the GPU.
    pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
            and "/device:" in str(e.get("args", {}).get("name", ""))}
    if not pids:  # CPU: XLA's ops run on host threads
        pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    totals: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in pids:
            totals[e["name"]] = totals.get(e["name"], 0.0) + e.get("dur", 0.0)
    total = sum(totals.values())
    print(f"device kernel time per step: {total / n_steps / 1e3:.1f} ms")
    kinds = (("attention", ("sdpa", "flash", "fmha")), ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas")),
             ("scatter/gather", ("scatter", "gather", "dynamic")), ("reduction", ("reduce",)),
             ("elementwise", ("loop_",)))
    by_kind: dict[str, float] = {}
    for name, dur in totals.items():
        kind = next((k for k, keys in kinds if any(key in name for key in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + dur
    print("  ".join(f"{k} {v / n_steps / 1e3:.1f} ms" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    sources = sources or {}

    def source(name):
        return sources.get(name.replace(".", "_"), "")

    for name, dur in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{dur / n_steps / 1e3:8.2f} ms {100 * dur / total:5.1f}%  {name[:60]:60s} {source(name)[:80]}")
    if sources:
        by_line: dict[str, float] = {}
        for name, dur in totals.items():
            line = source(name).split(" ")[0] or "(unattributed)"
            by_line[line] = by_line.get(line, 0.0) + dur
        print("device time per source line:")
        for line, dur in sorted(by_line.items(), key=lambda kv: -kv[1])[:top]:
            print(f"{dur / n_steps / 1e3:8.2f} ms {100 * dur / total:5.1f}%  {line}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compile")
    parser.add_argument("--window", type=int, default=5, help="steps per timed window")
    parser.add_argument("--no-aug", action="store_true", help="feed ready-made crops")
    parser.add_argument("--profile", default="", help="also trace 3 steps into this dir and print the top GPU kernels")
    args, rest = parser.parse_known_args(argv)
    config, _ = cli.parse_config(rest)
    config.wandb.enabled = False
    parallel.configure_gpu_backend(config)
    n_devices = jax.device_count()
    config_lib.validate(config, n_devices)

    mesh = parallel.make_mesh(config)
    models = step_lib.make_models(config)
    schedules = Schedules.from_config(config)
    optimizer = optim.make_optimizer(config, schedules)
    abstract, init = step_lib.sharded_init(config, optimizer, mesh)
    shardings = step_lib.shardings_of(abstract)
    state = init(jax.random.key(0))

    b, n_ch, f = config.train.batch_size, len(channel_list(config.data)), config.data.field_size
    rng = np.random.default_rng(0)
    host = {
        "field": rng.integers(100, 60000, (b, n_ch, f, f), dtype=np.uint16),
        "norm_low": np.full((b, n_ch), 100.0, np.float32),
        "norm_high": np.full((b, n_ch), 60000.0, np.float32),
        "masks": step_lib.host_masks(config, 0, step_lib.device_group_size(config, n_devices)),
    }
    if args.no_aug:
        cin = step_lib.input_channels(config)
        g, l = config.crops.global_size, config.crops.local_size
        host = {
            "global_crops": rng.standard_normal((b, 2, g, g, cin), np.float32),
            "local_crops": rng.standard_normal((b, config.crops.n_local, l, l, cin), np.float32),
            "masks": host["masks"],
        }
    batch_sh = parallel.batch_sharding(mesh)
    batch = jax.device_put(host, batch_sh)
    step_fn = step_lib.make_train_step(
        config, models, optimizer, schedules, n_devices, augment_on_device=not args.no_aug
    )
    step = jax.jit(step_fn, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # as train.py: drop path draws its subsets per device
        compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    windows = []
    for _ in range(max(1, args.steps // args.window)):
        t0 = time.perf_counter()
        for _ in range(args.window):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        windows.append((time.perf_counter() - t0) / args.window)
    step_s = float(np.median(windows))
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for _ in range(3):
                state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
        print_top_kernels(args.profile, n_steps=3, sources=hlo_sources(compiled.as_text()))
    loss = float(metrics["loss/total"])
    flops = analytic_flops_per_field(config, models) * b
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    result = {
        "images_per_s": round(b / step_s, 1),
        "step_s": round(step_s, 5),
        "mfu": round(flops / step_s / (PEAK_FLOPS * n_devices), 4),
        "gflop_per_image": round(flops / b / 1e9, 1),
        "peak_mem_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
        "compile_s": round(compile_s, 1),
        "device": device.device_kind,
        "n_devices": n_devices,
        "batch": b,
        "aug": not args.no_aug,
        "attention": config.model.attention_impl,
        "dtype": config.model.dtype,
        "residual_dtype": config.model.residual_dtype,
        "loss": round(loss, 4),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # the trainer's (train.triton_gemm) and the user's
    }
    print(json.dumps(result), flush=True)
    if not np.isfinite(loss):
        raise SystemExit("non-finite loss in the benchmark")
    return result


if __name__ == "__main__":
    main()
