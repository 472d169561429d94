"""Host input throughput: fields/s per CPU core for JUMP-sized fields through the full host path.

Writes `--unique` fields of 5 x 1080 x 1080 uint16 TIFFs (CPJUMP1's size, Phenix
names) with a LoadData table (and illumination functions unless --no_illum) to a
temporary folder, then times `pipeline.make_iterator` over them: TIFF decode at
16 bits, illumination division, downscale, percentile bounds, centre crop, and with
workers the hand-over through shared memory; batches stay unstacked as the
trainer's (`--stack` stacks them). `--field_size 1080` is the DINOCell config's
(no crop). Files are read from the page cache after the first pass, so this is the
CPU cost of a field, not the disk's or the network's.

    python scripts/benchmark_input.py                       # one core (no workers, one thread)
    python scripts/benchmark_input.py --workers 4 --threads 2
    python scripts/benchmark_input.py --gpu_fields_per_s 400  # also: cores needed to feed that rate

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import tifffile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dinocell_jax import config as config_lib  # noqa: E402
from dinocell_jax.data import pipeline  # noqa: E402


def write_fields(root: str, n: int, size: int, illum: bool) -> str:
    rng = np.random.default_rng(0)
    rows = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for stain in config_lib.CHANNELS if illum else ():
        fn = 1.0 + 0.5 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2)  # vignetting-like, >= 1 as CellProfiler's
        np.save(os.path.join(root, f"P1_Illum{stain}.npy"), fn)
    for i in range(n):
        row = {"Metadata_Plate": "P1", "Metadata_Well": f"A{i + 1:02d}", "Metadata_Site": "1"}
        for c, stain in enumerate(config_lib.CHANNELS):
            # Camera-like counts: offset + Poisson-ish signal, so percentiles do real work.
            plane = (100 + rng.gamma(2.0, 400.0, (size, size))).astype(np.uint16)
            name = f"r01c{i + 1:02d}f01p01-ch{c + 1}sk1fk1fl1.tiff"
            tifffile.imwrite(os.path.join(root, name), plane)
            row[f"FileName_Orig{stain}"], row[f"PathName_Orig{stain}"] = name, root
            if illum:
                row[f"FileName_Illum{stain}"], row[f"PathName_Illum{stain}"] = f"P1_Illum{stain}.npy", root
        rows.append(row)
    table = os.path.join(root, "load_data_with_illum.csv" if illum else "load_data.csv")
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unique", type=int, default=8, help="distinct fields written (read repeatedly)")
    p.add_argument("--fields", type=int, default=64, help="fields timed")
    p.add_argument("--size", type=int, default=1080, help="field side written (CPJUMP1: 1080)")
    p.add_argument("--field_size", type=int, default=1024, help="data.field_size")
    p.add_argument("--downscale", type=int, default=1, help="data.downscale")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="data.num_workers (0: in-process)")
    p.add_argument("--threads", type=int, default=1, help="data.read_threads")
    p.add_argument("--no_illum", action="store_true")
    p.add_argument("--stack", action="store_true",
                   help="stack each batch into one array on the host (the trainer does not: it sends fields unstacked)")
    p.add_argument("--gpu_fields_per_s", type=float, default=0.0, help="fields/s one GPU's step consumes")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-input-") as root:
        table = write_fields(root, args.unique, args.size, not args.no_illum)
        c = config_lib.base_config()
        c.train.batch_size = args.batch
        c.data.update(dict(source=f"loaddata:{table}", holdout=0.0, field_size=args.field_size,
                           downscale=args.downscale, num_workers=args.workers, read_threads=args.threads,
                           prefetch=2))
        it = pipeline.make_iterator(c, seed=0, process_index=0, process_count=1, stack_fields=args.stack)
        next(it)  # warm: page cache, worker start-up, illumination cache
        cpu0, t0 = time.process_time(), time.perf_counter()
        n = 0
        while n < args.fields:
            n += len(next(it)["field"])
        wall = time.perf_counter() - t0
        main_cpu = time.process_time() - cpu0
    cores = args.workers * args.threads if args.workers else args.threads
    per_s = n / wall
    result = {
        "benchmark": "input",
        "field": [5, args.size, args.size],
        "field_size": args.field_size,
        "downscale": args.downscale,
        "illumination": not args.no_illum,
        "stacked": args.stack,
        "workers": args.workers,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "fields": n,
        "fields_per_s": round(per_s, 2),
        "fields_per_s_per_core": round(per_s / min(cores, os.cpu_count() or cores), 2),
        # CPU seconds of this process (all its threads) per field: with no workers, the
        # whole host cost of a field, robust to other load on the machine.
        "main_process_cpu_s_per_field": round(main_cpu / n, 4),
        "stats": it.stats(),
    }
    if args.workers == 0:
        result["fields_per_cpu_s"] = round(n / main_cpu, 2)
    if args.gpu_fields_per_s > 0:
        per_core = result.get("fields_per_cpu_s", result["fields_per_s_per_core"])
        result["cores_to_feed_gpu"] = round(args.gpu_fields_per_s / per_core, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
