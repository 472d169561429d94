"""End-to-end throughput of the real trainer: input pipeline, step and monitoring together.

Runs `python -m dinocell_jax.train` (one subprocess per mode, sharing a
persistent compilation cache so only the first compiles) and reads the
workdir's metrics.jsonl:

- `off`: W&B disabled, no attention maps, PCA or histograms (scalars still go to
  the JSONL, which is how we read the step time);
- `guide`: the config's monitoring as is (the guide's intervals: scalars 100,
  attention 1000, PCA 5000), W&B offline;
- `dense`: attention maps and PCA every `--dense_interval` steps, to measure what
  one picture costs; its cost at the guide's intervals is then
  `(dense - off) per event x events per step`.

Throughput is train.batch_size / the mean step time over the logged windows
after the first (which holds compilation). `input_wait_share` is the share of the
wall time the loop spent waiting for its next batch on the devices
(`system/data_wait_fraction`): time in which the device idles unless a step is still
queued. `device_starved_share` is the share of steps dispatched after the step before
had already finished (`system/device_starved_fraction`): each of those left the device
idle for a while. The feeder thread's side: `host_to_device_share`, its share spent handing
batches to the devices, and `collate_s_per_batch`, the trainer process's collation. The
loop's own side: `dispatch_s`, its mean time inside the step's call per step
(`system/dispatch_s`; with XLA's command buffers, re-recording the step's CUDA graph when
buffers moved is part of it).

    python scripts/benchmark_train.py --config configs/vits8_jump_multiview.py --steps 300 \
        --tiff 64 --config.train.batch_size=64      # 64 distinct 1080 px TIFF fields, re-read
    python scripts/benchmark_train.py --config configs/demo.py --steps 40 --modes off,guide  # CPU

Prints a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _mode_flags(mode: str, steps: int, dense_interval: int, log_interval: int) -> list[str]:
    common = [f"--config.train.steps={steps}", f"--config.wandb.log_interval={log_interval}",
              "--config.eval.interval=0", f"--config.checkpoint.interval={10 * steps}",
              "--config.wandb.log_model_checkpoints=False", "--config.train.progress_bar=False"]
    if mode == "off":
        return common + ["--config.wandb.enabled=False", "--config.wandb.log_attention_maps=False",
                         "--config.wandb.log_feature_pca=False", "--config.wandb.histogram_interval=0"]
    if mode == "guide":
        return common + ["--config.wandb.offline=True"]
    if mode == "dense":
        return common + ["--config.wandb.offline=True",
                         f"--config.wandb.attention_log_interval={dense_interval}",
                         f"--config.wandb.pca_log_interval={dense_interval}"]
    raise SystemExit(f"error: unknown mode {mode!r} (off, guide, dense)")


def _read(workdir: str, batch: int) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [r for r in rows if "training/step_time" in r]
    if len(rows) < 2:
        raise SystemExit(f"error: {workdir}: fewer than 2 logged windows; raise --steps")
    steady = rows[1:]  # the first window holds compilation
    step = float(np.mean([r["training/step_time"] for r in steady]))

    def share(key, digits=4):  # the steady windows' mean
        return round(float(np.mean([r.get(key, 0.0) for r in steady])), digits)

    def gib(key):
        return round(max(r.get(key, 0.0) for r in rows) * 1e9 / 2**30, 2)

    # The trainer's collation of the workers' fields (a cumulative counter, differenced
    # over the steady windows).
    batches = steady[-1]["training/iteration"] - rows[0]["training/iteration"]
    collate = steady[-1].get("data/collate_s", 0.0) - rows[0].get("data/collate_s", 0.0)
    return {"images_per_s": round(batch / step, 1), "step_s": round(step, 5),
            "input_wait_share": share("system/data_wait_fraction"),
            "device_starved_share": share("system/device_starved_fraction"),
            "collate_s_per_batch": round(collate / max(batches, 1), 5),
            "host_to_device_share": share("system/host_to_device_fraction"),
            "dispatch_s": share("system/dispatch_s", digits=5),
            "windows": len(steady),
            # the allocator's peak and limit on the fullest device (the trainer logs GB; 0 on CPU)
            "peak_mem_gib": gib("system/gpu_memory_peak_gb"), "mem_limit_gib": gib("system/gpu_memory_limit_gb")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--log_interval", type=int, default=100, help="scalar window (the guide's 100)")
    p.add_argument("--modes", default="off,guide,dense")
    p.add_argument("--dense_interval", type=int, default=50)
    p.add_argument("--tiff", type=int, default=0,
                   help="write this many distinct 1080 px 5-channel TIFF fields and train on them "
                        "(default: the config's source, e.g. synthetic)")
    p.add_argument("--workdir", default="", help="keep the runs here (default: a temporary directory)")
    args, rest = p.parse_known_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="dinocell_bench_")
    modes = args.modes.split(",")
    for mode in modes:
        # The trainer would resume an earlier run there (and exit at once if it had finished),
        # and its metrics.jsonl would be read as this run's.
        if os.path.exists(os.path.join(root, mode)):
            raise SystemExit(f"error: {os.path.join(root, mode)} exists (an earlier run's); remove it or "
                             "pass another --workdir")
    os.makedirs(root, exist_ok=True)
    if args.tiff:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from benchmark_input import write_fields

        os.makedirs(os.path.join(root, "fields"), exist_ok=True)
        table = write_fields(os.path.join(root, "fields"), args.tiff, 1080, illum=True)
        rest = rest + [f"--config.data.source=loaddata:{table}"]

    from dinocell_jax import cli

    config, _ = cli.parse_config(rest + ["--workdir", root])
    batch = int(config.train.batch_size)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", WANDB_MODE="offline")
    results = {}
    for mode in modes:
        workdir = os.path.join(root, mode)
        cmd = [sys.executable, "-m", "dinocell_jax.train", *rest, "--workdir", workdir,
               *_mode_flags(mode, args.steps, args.dense_interval, args.log_interval)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        # Kept whole for every mode: an allocator's dump precedes a traceback, and XLA's own log
        # (TF_CPP_VMODULE) of a run that worked is read from here too.
        log_path = os.path.join(workdir, "stderr.log")
        os.makedirs(workdir, exist_ok=True)
        with open(log_path, "w") as f:
            f.write(proc.stderr)
        if proc.returncode:
            raise SystemExit(f"error: mode {mode} failed (whole stderr: {log_path}):\n{proc.stderr[-4000:]}")
        results[mode] = _read(workdir, batch)
        print(json.dumps({"mode": mode, **results[mode]}), flush=True)  # partial results survive a timeout

    out = {"batch": batch, "steps": args.steps, **{f"{m}_{k}": v for m, r in results.items() for k, v in r.items()}}
    if "off" in results and "guide" in results:
        out["guide_overhead"] = round(1 - results["guide"]["images_per_s"] / results["off"]["images_per_s"], 4)
    if "off" in results and "dense" in results:
        # Pictures per step in the dense run vs at the guide's intervals.
        w = config.wandb
        dense_events = 2.0 / args.dense_interval
        guide_events = 1.0 / w.attention_log_interval + 1.0 / w.pca_log_interval
        extra = results["dense"]["step_s"] - results["off"]["step_s"]
        out["picture_cost_s"] = round(extra / dense_events, 4)
        out["pictures_overhead_at_guide"] = round(extra / dense_events * guide_events / results["off"]["step_s"], 5)
    print(f"{'mode':8s} {'images/s':>9s} {'step':>9s} {'input wait':>10s} {'starved':>8s} {'collate':>9s} "
          f"{'to device':>10s} {'dispatch':>9s}")
    for mode, r in results.items():
        print(f"{mode:8s} {r['images_per_s']:9.1f} {r['step_s']:9.4f} {100 * r['input_wait_share']:9.2f}% "
              f"{100 * r['device_starved_share']:7.1f}% "
              f"{r['collate_s_per_batch']:8.4f}s {100 * r['host_to_device_share']:9.2f}% {r['dispatch_s']:8.4f}s")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
