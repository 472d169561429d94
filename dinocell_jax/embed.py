"""CLS embeddings of every field of a data source by a trained teacher, as Parquet.

    python -m dinocell_jax.embed --workdir runs/x --out emb.parquet
    python -m dinocell_jax.embed --workdir runs/x --config.data.source=loaddata:/data/load_data.csv \
        --out emb.parquet --per-channel --split all --batch-size 64

One row per field: its metadata (index, source, batch, plate, well, site, label:
whatever the source's records carry) and `embedding`, the teacher's CLS token of
the channel-mean view (fixed-size list of float32, D values); with
`--per-channel`, also `embedding_<stain>` for each stain seen alone, as the
multi-view model is used downstream. Views are `augment.probe_views` (largest
centred square, resized to crops.global_size, normalised as in training).
Fields are read on a thread pool one batch ahead; the model runs jitted on a
fixed batch (the last one padded) split over the local devices. Unreadable fields
are logged and left out, never embedded as black images. The Parquet footer
holds the checkpoint step, the workdir and the channel names
(`read_embeddings` gives them back).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "holdout", "all")
_ARRAY_KEYS = ("field", "norm_low", "norm_high")
_FOOTER_KEY = b"dinocell_jax"


class Embedder:
    """Jitted, batched embedding of fields by a backbone; compiles once.

    fn(field uint16 [B,C,H,W], norm_low/high float32 [B,C]) -> mean [B,D]
    (and channels [B,C,D] when per_channel) float32 numpy, B <= batch_size
    (padded to batch_size by repeating the last field; the padding is cut off).
    """

    def __init__(self, params, models, config, *, batch_size: int, per_channel: bool, devices=None):
        from dinocell_jax.evaluate import make_embed_fn

        if batch_size <= 0:
            raise ValueError(f"--batch-size {batch_size}: must be positive")
        devices = jax.local_devices() if devices is None else list(devices)
        self.batch_size, self.per_channel = int(batch_size), bool(per_channel)
        mesh = jax.make_mesh((len(devices),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
        # Split the batch over devices when it divides; otherwise every device sees it all.
        spec = jax.P("batch") if self.batch_size % len(devices) == 0 else jax.P()
        self.in_sharding = jax.sharding.NamedSharding(mesh, spec)
        replicated = jax.sharding.NamedSharding(mesh, jax.P())
        self.params = jax.device_put({"backbone": params["backbone"]}, replicated)
        embed = make_embed_fn(config, models)
        if self.per_channel:
            fn = embed
        else:
            def fn(p, field, low, high):  # XLA drops the unused per-channel forward
                return embed(p, field, low, high)[0]
        self._fn = jax.jit(fn)

    def __call__(self, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        rows, b = len(arrays["field"]), self.batch_size
        if not 0 < rows <= b:
            raise ValueError(f"Embedder: {rows} fields for a batch of {b}")
        if rows < b:
            arrays = {k: np.concatenate([v, np.repeat(v[-1:], b - rows, axis=0)]) for k, v in arrays.items()}
        arrays = jax.device_put({k: arrays[k] for k in _ARRAY_KEYS}, self.in_sharding)
        out = self._fn(self.params, arrays["field"], arrays["norm_low"], arrays["norm_high"])
        if self.per_channel:
            mean, channels = jax.device_get(out)
            return np.asarray(mean)[:rows], np.asarray(channels)[:rows]
        return np.asarray(jax.device_get(out))[:rows], None


def _read(source, index: int) -> dict | str:
    try:
        return source[index]
    except Exception as e:  # noqa: BLE001 - the message is logged and the field skipped
        return f"{type(e).__name__}: {e}"


def _meta_of(index: int, record: Mapping[str, Any]) -> dict[str, Any]:
    meta = {"index": int(index)}
    for key, value in record.items():
        if key in _ARRAY_KEYS or key == "error":
            continue
        value = value.item() if isinstance(value, np.generic) else value
        if isinstance(value, (str, int, float, bool)):
            meta[key] = value
    return meta


def embed_source(embedder: Embedder, source, *, indices: Sequence[int] | None = None, threads: int = 8,
                 progress: bool = True) -> tuple[list[dict], np.ndarray, np.ndarray | None, list[str]]:
    """Embeds `source[i]` for each index (default: all), reading one batch ahead.

    Returns (metadata rows, mean [N,D] float32, channels [N,C,D] float32 or None,
    errors): N counts the fields read; each unreadable field adds one error line
    naming its index.
    """
    from tqdm import tqdm

    indices = list(range(len(source))) if indices is None else [int(i) for i in indices]
    b = embedder.batch_size
    batches = [indices[i:i + b] for i in range(0, len(indices), b)]
    metas, means, channels, errors = [], [], [], []
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool, \
            tqdm(total=len(indices), unit="field", disable=not progress, dynamic_ncols=True) as bar:
        def submit(batch):
            return [(i, pool.submit(_read, source, i)) for i in batch]

        pending = submit(batches[0]) if batches else []
        for k in range(len(batches)):
            current = pending
            pending = submit(batches[k + 1]) if k + 1 < len(batches) else []
            records = []
            for i, future in current:
                record = future.result()
                if isinstance(record, str):
                    errors.append(f"field {i}: {record}")
                    log.warning("skipped field %d: %s", i, record)
                else:
                    records.append((i, record))
            bar.update(len(current))
            if not records:
                continue
            arrays = {key: np.stack([r[key] for _, r in records]) for key in _ARRAY_KEYS}
            mean, per = embedder(arrays)
            metas += [_meta_of(i, r) for i, r in records]
            means.append(mean)
            if per is not None:
                channels.append(per)
    if not means:
        raise RuntimeError(f"no field could be embedded ({len(errors)} unreadable; first: "
                           f"{errors[0] if errors else 'none given'})")
    return metas, np.concatenate(means), (np.concatenate(channels) if channels else None), errors


def write_parquet(path: str, metas: list[dict], mean: np.ndarray, channels: np.ndarray | None,
                  channel_names: Sequence[str], footer: Mapping[str, Any]) -> None:
    """One row per field: metadata columns, `embedding` [D] and `embedding_<stain>` [D] (float32 lists)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(pd.DataFrame(metas), preserve_index=False)
    d = mean.shape[1]

    def column(values: np.ndarray):
        flat = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, d)

    table = table.append_column("embedding", column(mean))
    if channels is not None:
        if channels.shape[1] != len(channel_names):
            raise ValueError(f"{channels.shape[1]} channel embeddings but channel names {list(channel_names)}")
        for c, name in enumerate(channel_names):
            table = table.append_column(f"embedding_{name}", column(channels[:, c]))
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[_FOOTER_KEY] = json.dumps(dict(footer)).encode()
    table = table.replace_schema_metadata(schema_meta)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(table, path)


def read_embeddings(path: str) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """(metadata DataFrame, {column: float32 [N,D]} of the embedding columns, footer dict) of a file."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    emb_cols = [n for n in table.column_names if n == "embedding" or n.startswith("embedding_")]
    embeddings = {}
    for name in emb_cols:
        col = table.column(name).combine_chunks()
        embeddings[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32)
    meta = table.drop_columns(emb_cols).to_pandas()
    footer = json.loads((table.schema.metadata or {}).get(_FOOTER_KEY, b"{}"))
    return meta, embeddings, footer


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dinocell_jax.embed --workdir W --out F.parquet [--per-channel] [--split train|holdout|all]
    [--batch-size N] [--step N] [--limit N] [--config.data.source=...]`."""
    from dinocell_jax import checkpoint as ckpt_lib
    from dinocell_jax.config import ConfigError
    from dinocell_jax.data import pipeline
    from dinocell_jax.data.sources import channel_list
    from dinocell_jax import cli
    from dinocell_jax.export import load_tool_config
    from dinocell_jax.ssl import step as step_lib

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config, workdir, rest = load_tool_config(args)
        out = cli.pop_flag(rest, "--out")
        per_channel = cli.pop_flag(rest, "--per-channel", value=False)
        split = cli.pop_flag(rest, "--split") or "all"
        batch_size = int(cli.pop_flag(rest, "--batch-size") or config.eval.batch_size)
        step = cli.pop_flag(rest, "--step")
        limit = cli.pop_flag(rest, "--limit")
        if rest:
            raise ConfigError(f"{rest[0]}: unknown argument (embed takes --workdir, --out, --per-channel, --split, "
                              "--batch-size, --step, --limit, --config, --config.*)")
        if not out:
            raise ConfigError("--out: missing (e.g. --out embeddings.parquet)")
        if split not in SPLITS:
            raise ConfigError(f"--split {split!r}: not one of {SPLITS}")
        state, _ = ckpt_lib.restore_trained(config, workdir, None if step is None else int(step))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = int(jax.device_get(state.step))
    embedder = Embedder(state.teacher, step_lib.make_models(config), config, batch_size=batch_size,
                        per_channel=per_channel)
    metas, means, channels, errors = [], [], [], []
    for name in (("train", "holdout") if split == "all" else (split,)):
        source = pipeline.make_source(config, name)
        indices = range(len(source)) if limit is None else range(min(int(limit), len(source)))
        m, mean, per, err = embed_source(embedder, source, indices=indices, threads=int(config.data.read_threads))
        metas += [{**row, "split": name} for row in m]
        means.append(mean)
        channels += [per] if per is not None else []
        errors += [f"{name} {e}" for e in err]
    names = [c.name for c in channel_list(config.data)]
    footer = {"step": done, "workdir": os.path.abspath(workdir), "data_source": str(config.data.source),
              "channels": names, "per_channel": bool(per_channel), "skipped": len(errors)}
    write_parquet(out, metas, np.concatenate(means), np.concatenate(channels) if channels else None, names, footer)
    print(f"wrote {out}: {len(metas)} fields x {means[0].shape[1]} dims (step {done})"
          + (f", per channel {names}" if per_channel else "") + (f"; {len(errors)} unreadable, skipped" if errors else ""))
    return 0


if __name__ == "__main__":
    # Here, not in main(): main() also runs inside tests and notebooks that own the handlers.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())
