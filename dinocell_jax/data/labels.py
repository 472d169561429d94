"""Labels for the evaluation probes, joined to fields by plate (and well).

JUMP's metadata tables: `well.csv.gz` (Metadata_Source, Metadata_Plate,
Metadata_Well, Metadata_JCP2022) and `plate.csv.gz` (Metadata_Source,
Metadata_Batch, Metadata_Plate, Metadata_PlateType); any CSV/parquet keyed by
`Metadata_Plate` (or `plate`) and optionally `Metadata_Well` (or `well`) works
too. Label strings become integer ids in sorted order of the whole table, so the
same compound has the same id in the training and the held-out split.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd

from dinocell_jax.data.sources import DataError, FileReader

log = logging.getLogger(__name__)

DEFAULT_COLUMNS = ("Metadata_JCP2022", "Metadata_PlateType", "label")
_KEYS = {"plate": ("Metadata_Plate", "plate"), "well": ("Metadata_Well", "well")}


def _read(path: str, reader: FileReader) -> pd.DataFrame:
    data = io.BytesIO(reader.read_bytes(path))
    try:
        if path.endswith(".parquet"):
            return pd.read_parquet(data).astype(str)
        compression = "gzip" if path.endswith(".gz") else None
        return pd.read_csv(data, dtype=str, keep_default_na=False, compression=compression)
    except Exception as e:
        raise DataError(f"cannot parse label table {path}: {type(e).__name__}: {e}") from e


def _keyed(table: pd.DataFrame, path: str) -> pd.DataFrame:
    renamed = {}
    for key, names in _KEYS.items():
        found = next((n for n in names if n in table.columns), None)
        if found:
            renamed[found] = f"_{key}"
    if "_plate" not in renamed.values():
        raise DataError(f"label table {path} has no Metadata_Plate (or plate) column; columns: {sorted(table.columns)}")
    return table.rename(columns=renamed)


def join_labels(meta: pd.DataFrame, spec: str, column: str, reader: FileReader) -> tuple[np.ndarray, list[str]]:
    """Label id of each field.

    Args:
      meta: the fields, with str columns `plate` and `well`.
      spec: comma-separated label tables (csv, csv.gz, parquet; local or s3://).
      column: the label column; "" picks the first of Metadata_JCP2022,
        Metadata_PlateType, label found in the tables.
    Returns:
      ids int32 [N] (-1 where a field has no label) and the label names (id -> name).
    """
    tables = [_keyed(_read(p.strip(), reader), p.strip()) for p in spec.split(",") if p.strip()]
    if not tables:
        raise DataError("data.labels_csv is empty")
    columns = set().union(*(t.columns for t in tables))
    if not column:
        column = next((c for c in DEFAULT_COLUMNS if c in columns), "")
        if not column:
            raise DataError(f"data.label_column: none of {DEFAULT_COLUMNS} in {spec}; set it to one of {sorted(columns)}")
    owner = next((t for t in tables if column in t.columns), None)
    if owner is None:
        raise DataError(f"data.label_column={column!r} is in none of {spec}; columns: {sorted(columns)}")
    keys = [k for k in ("_plate", "_well") if k in owner.columns]
    labels = owner[keys + [column]]
    duplicated = labels.duplicated(keys)
    if duplicated.any():
        log.warning("label table: %d rows repeat a %s key; the first is used", int(duplicated.sum()), "/".join(keys))
        labels = labels[~duplicated]
    names = sorted({v for v in labels[column] if v})
    index = {name: i for i, name in enumerate(names)}
    left = pd.DataFrame({"_plate": meta["plate"].astype(str).to_numpy(), "_well": meta["well"].astype(str).to_numpy()})
    joined = left.merge(labels, on=keys, how="left")
    values = joined[column].fillna("").to_numpy()
    ids = np.fromiter((index.get(v, -1) for v in values), np.int32, count=len(values))
    return ids, names
