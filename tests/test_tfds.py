"""TFDS builders prepare ArrayRecord shards offline and read back the same records."""

import numpy as np
import pandas as pd
import tifffile

from dinocell_jax import config as config_lib
from dinocell_jax.data import pipeline, tfds_builders

SIZE = 16
META = ("source", "batch", "plate", "well", "site")


def small_config(**data):
    c = config_lib.base_config()
    c.seed = 5
    c.train.batch_size = 2
    c.data.num_fields = 8
    c.data.field_size = SIZE
    c.data.num_workers = 0
    c.data.read_threads = 2
    c.data.prefetch = 1
    for k, v in data.items():
        c.data[k] = v
    return c


def by_key(source):
    return {tuple(source[i][k] for k in META): source[i] for i in range(len(source))}


def assert_same_records(a, b):
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key]["field"], b[key]["field"])
        np.testing.assert_array_equal(a[key]["norm_low"], b[key]["norm_low"])
        np.testing.assert_array_equal(a[key]["norm_high"], b[key]["norm_high"])
        assert a[key]["label"] == b[key]["label"]


def test_synthetic_cells_prepares_both_splits_and_reads_back(tmp_path):
    c = small_config(source="synthetic", holdout=0.25, n_plates=4)
    tfds_builders.prepare("synthetic_cells", str(tmp_path), c)
    read = small_config(source="tfds:synthetic_cells", tfds_data_dir=str(tmp_path))
    for split in ("train", "holdout"):
        assert_same_records(by_key(pipeline.make_source(read, split)), by_key(pipeline.make_source(c, split)))
    batch = next(pipeline.make_iterator(read, seed=0, process_index=0, process_count=1))
    assert batch["field"].shape == (2, 5, SIZE, SIZE) and batch["field"].dtype == np.uint16
    assert batch["plate"][0].startswith("SYNTH-P")


def test_jump_cellpainting_from_loaddata_skips_unreadable_fields(tmp_path):
    rows = []
    rng = np.random.default_rng(1)
    for p, plate in enumerate(("BR01", "BR02", "BR03")):
        for well in ("A01", "B07"):
            row = {"Metadata_Source": "source_4", "Metadata_Batch": "b1", "Metadata_Plate": plate,
                   "Metadata_Well": well, "Metadata_Site": "1"}
            for stain in config_lib.CHANNELS:
                path = str(tmp_path / f"{plate}_{well}_{stain}.tif")
                tifffile.imwrite(path, rng.integers(0, 65535, (SIZE + 4, SIZE + 4), dtype=np.uint16))
                row[f"URL_Orig{stain}"] = path
            rows.append(row)
    open(rows[1]["URL_OrigDNA"], "wb").write(b"not a tiff")
    manual = tmp_path / "manual"
    manual.mkdir()
    pd.DataFrame(rows).to_csv(manual / "load_data.csv", index=False)
    pd.DataFrame({"Metadata_Plate": ["BR01", "BR02", "BR03"], "Metadata_PlateType": ["DMSO", "ORF", "DMSO"]}).to_csv(
        tmp_path / "plate.csv", index=False)

    raw = small_config(source=f"loaddata:{manual / 'load_data.csv'}", holdout=0.34, max_failure_fraction=0.5,
                       labels_csv=str(tmp_path / "plate.csv"))
    builder = tfds_builders.prepare("jump_cellpainting", str(tmp_path / "tfds"), raw, manual_dir=str(manual))
    assert builder.info.splits["train"].num_examples + builder.info.splits["holdout"].num_examples == 5

    read = small_config(source="tfds:jump_cellpainting", tfds_data_dir=str(tmp_path / "tfds"))
    for split in ("train", "holdout"):
        stored = by_key(pipeline.make_source(read, split))
        source = pipeline.make_source(raw, split)
        good = {}
        for i in range(len(source)):
            try:
                r = source[i]
            except OSError:
                continue
            good[tuple(r[k] for k in META)] = r
        assert_same_records(stored, good)
        assert all(r["field"].shape == (5, SIZE, SIZE) for r in stored.values())  # centre-cropped from SIZE + 4
        assert {r["label"] for r in stored.values()} <= {0, 1}  # DMSO, ORF
    held = pipeline.make_source(read, "holdout")
    assert len({held[i]["plate"] for i in range(len(held))}) == 1
