"""The grain pipeline: exact resume, per-process sharding, bad input counted and skipped, no TensorFlow."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import tifffile

from dinocell_jax import config as config_lib
from dinocell_jax.data import pipeline
from dinocell_jax.data.sources import DataError

SIZE = 16


def synthetic_config(**data):
    c = config_lib.base_config()
    c.seed = 3
    c.train.batch_size = 4
    c.data.source = "synthetic"
    c.data.num_fields = 20
    c.data.field_size = SIZE
    c.data.holdout = 0.0
    c.data.num_workers = 0
    c.data.read_threads = 2
    c.data.prefetch = 1
    for k, v in data.items():
        c.data[k] = v
    return c


def keys(batch):
    return list(zip(batch["plate"], batch["well"], batch["site"]))


def test_batches_have_the_contract_shapes_and_types():
    c = synthetic_config()
    it = pipeline.make_iterator(c, seed=0, process_index=0, process_count=1)
    b = next(it)
    assert b["field"].shape == (4, 5, SIZE, SIZE) and b["field"].dtype == np.uint16
    assert b["norm_low"].shape == (4, 5) and b["norm_low"].dtype == np.float32
    assert np.all(b["norm_high"] > b["norm_low"])
    assert b["label"].dtype == np.int32 and b["label"].shape == (4,)
    assert b["plate"].dtype.kind == "U" and b["site"].shape == (4,)
    assert it.stats()["fields_read"] == 4 and it.stats()["fields_skipped"] == 0


def test_resume_from_saved_state_sees_the_same_batches():
    c = synthetic_config()
    reference = pipeline.make_iterator(c, seed=7, process_index=0, process_count=1)
    expected = [next(reference) for _ in range(9)]  # 20 fields / 4: crosses two epoch boundaries

    first = pipeline.make_iterator(c, seed=7, process_index=0, process_count=1)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    resumed = pipeline.make_iterator(c, seed=7, process_index=0, process_count=1)
    resumed.set_state(state)
    for want in expected[4:]:
        got = next(resumed)
        assert keys(got) == keys(want)
        np.testing.assert_array_equal(got["field"], want["field"])
        np.testing.assert_array_equal(got["norm_high"], want["norm_high"])
    assert resumed.stats()["fields_read"] == 9 * 4

    # Each epoch is a new order of the same fields.
    epoch1 = sum((keys(b) for b in expected[:5]), [])
    epoch2 = sum((keys(b) for b in expected[5:]), [])
    assert len(set(epoch1)) == 20 and len(set(epoch2)) == 16 and set(epoch2) <= set(epoch1)
    assert epoch1[:16] != epoch2
    other_seed = next(pipeline.make_iterator(c, seed=8, process_index=0, process_count=1))
    assert keys(other_seed) != keys(expected[0])


def test_resume_with_worker_processes():
    c = synthetic_config(num_workers=2, num_fields=12)
    first = pipeline.make_iterator(c, seed=2, process_index=0, process_count=1)
    seen = [keys(next(first)) for _ in range(2)]
    state = json.loads(json.dumps(first.get_state()))
    expected = [keys(next(first)) for _ in range(2)]  # the uninterrupted continuation
    first.close()
    resumed = pipeline.make_iterator(c, seed=2, process_index=0, process_count=1)
    resumed.set_state(state)
    assert [keys(next(resumed)) for _ in range(2)] == expected
    flat = [k for b in seen + expected for k in b]
    assert len(set(flat[:12])) == 12  # workers split one epoch without repeats
    resumed.close()


def test_worker_processes_deliver_the_fields_read_in_process():
    # Workers write finished fields straight into shared memory (sources._new_field);
    # the trainer must get the very fields an in-process reader makes, unstacked too.
    def fields_by_key(workers, stack):
        it = pipeline.make_iterator(synthetic_config(num_workers=workers, num_fields=12), seed=5,
                                    process_index=0, process_count=1, stack_fields=stack)
        out = {}
        for _ in range(3):
            batch = next(it)
            assert isinstance(batch["field"], np.ndarray if stack else list)
            out.update({k: np.array(f) for k, f in zip(keys(batch), batch["field"])})
        it.close()
        return out

    in_process, from_workers = fields_by_key(0, True), fields_by_key(2, False)
    assert sorted(in_process) == sorted(from_workers) and len(in_process) == 12
    for k, field in in_process.items():
        assert field.shape == (5, SIZE, SIZE)
        np.testing.assert_array_equal(from_workers[k], field)


def test_two_processes_read_disjoint_halves_that_cover_the_epoch():
    c = synthetic_config()
    seen = []
    for p in range(2):
        it = pipeline.make_iterator(c, seed=1, process_index=p, process_count=2, num_epochs=1)
        batches = list(it)
        assert all(b["field"].shape[0] == 2 for b in batches)  # batch_size 4 over 2 processes
        seen.append({k for b in batches for k in keys(b)})
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 20 and len(seen[0]) == len(seen[1]) == 10


def test_holdout_split_is_disjoint_from_train():
    c = synthetic_config(holdout=0.25, n_plates=4)
    train, held = pipeline.make_source(c, "train"), pipeline.make_source(c, "holdout")
    assert len(train) + len(held) == 20
    train_plates = {train[i]["plate"] for i in range(len(train))}
    held_plates = {held[i]["plate"] for i in range(len(held))}
    assert len(held_plates) == 1 and not train_plates & held_plates


# ----------------------------------------------------------------------------- bad input

STAINS = config_lib.CHANNELS


def bad_input_table(tmp_path):
    """8 fields of one plate: 3 good, and one each of corrupt, truncated, missing file,
    missing channel and wrong shape. Returns (csv, {well: good field}, {bad well: path})."""
    rows, good, bad = [], {}, {}
    rng = np.random.default_rng(0)
    cases = ["good", "corrupt", "good", "truncated", "missing_file", "good", "missing_channel", "wrong_shape"]
    for w, case in enumerate(cases):
        well = f"A{w + 1:02d}"
        row = {"Metadata_Plate": "P1", "Metadata_Well": well, "Metadata_Site": "1"}
        planes = []
        for c, stain in enumerate(STAINS):
            size = SIZE // 2 if (case == "wrong_shape" and c == 2) else SIZE
            arr = rng.integers(1000, 60000, (size, size), dtype=np.uint16)
            path = str(tmp_path / f"{well}_{stain}.tif")
            tifffile.imwrite(path, arr)
            planes.append(arr)
            row[f"URL_Orig{stain}"] = path
        victim = row["URL_OrigER"]
        if case == "corrupt":
            with open(victim, "wb") as f:
                f.write(b"II*\x00" + b"\xff" * 64)
        elif case == "truncated":
            data = open(victim, "rb").read()
            open(victim, "wb").write(data[: len(data) // 2])
        elif case == "missing_file":
            os.remove(victim)
        elif case == "missing_channel":
            row["URL_OrigER"] = ""
        if case == "good":
            good[well] = np.stack(planes)
        else:
            bad[well] = victim if case != "wrong_shape" else row["URL_OrigRNA"]
        rows.append(row)
    csv = tmp_path / "load_data.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, good, bad


def bad_config(csv, **data):
    c = synthetic_config(source=f"loaddata:{csv}", normalization="minmax", **data)
    c.train.batch_size = 1
    return c


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_fields_are_counted_logged_and_skipped_never_replaced(tmp_path, caplog, workers):
    csv, good, bad = bad_input_table(tmp_path)
    c = bad_config(csv, max_failure_fraction=1.0, num_workers=workers)
    it = pipeline.make_iterator(c, seed=0, process_index=0, process_count=1, num_epochs=1)
    with caplog.at_level(logging.WARNING, logger="dinocell_jax.data.pipeline"):
        batches = list(it)
    assert sorted(b["well"][0] for b in batches) == sorted(good)
    for b in batches:
        np.testing.assert_array_equal(b["field"][0], good[b["well"][0]])  # never a substitute image
    assert it.stats()["fields_skipped"] == 5 and it.stats()["fields_read"] == 3
    lines = [r.getMessage() for r in caplog.records if "skipped field" in r.getMessage()]
    assert len(lines) == 5
    for well, path in bad.items():
        if well == "A07":  # the missing channel has no path: the field and its other planes are named
            assert any("missing channel ER" in line and "well=A07" in line for line in lines)
        else:
            assert any(path in line for line in lines), path
    assert any("shape" in line for line in lines)


def test_too_many_failures_stop_the_run_with_a_clear_message(tmp_path):
    csv, _, _ = bad_input_table(tmp_path)
    c = bad_config(csv, max_failure_fraction=0.2, failure_check_after=4)
    it = pipeline.make_iterator(c, seed=0, process_index=0, process_count=1)
    with pytest.raises(DataError, match=r"could not be read, more than data.max_failure_fraction=0.2"):
        for _ in range(20):
            next(it)
    assert it.stats()["fields_skipped"] >= 2


def test_tensorflow_is_never_imported_on_the_training_path(tmp_path):
    from dinocell_jax.data import tfds_builders

    c = synthetic_config(num_fields=6, holdout=0.0)
    tfds_builders.prepare("synthetic_cells", str(tmp_path / "tfds"), c)
    # A stand-in `tensorflow` on the path: this machine has none, the GPU machines may;
    # importing it (even inside a try) leaves a mark, so the test fails where TF would load.
    fake = tmp_path / "fake_tf" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import sys\nprint('TENSORFLOW IMPORTED', flush=True)\nraise ImportError('stand-in')\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path / "fake_tf")!r})
        from dinocell_jax import config as config_lib
        from dinocell_jax.data import pipeline
        for source in ("synthetic", "tfds:synthetic_cells"):
            c = config_lib.base_config()
            c.train.batch_size = 2
            c.data.update(dict(source=source, num_fields=6, field_size={SIZE}, holdout=0.0, num_workers=0,
                               tfds_data_dir={str(tmp_path / "tfds")!r}))
            batch = next(pipeline.make_iterator(c, seed=0, process_index=0, process_count=1))
            assert batch["field"].shape == (2, 5, {SIZE}, {SIZE}), batch["field"].shape
        loaded = [m for m in sys.modules if m.split(".")[0] == "tensorflow"]
        print("LOADED", loaded)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "LOADED []" in out.stdout and "TENSORFLOW IMPORTED" not in out.stdout


def _record(i, shape, dtype=np.uint16):
    return {"field": np.full(shape, i, dtype), "norm_low": np.zeros(shape[0]), "norm_high": np.ones(shape[0]),
            "label": i, "source": "s", "batch": "b", "plate": "P1", "well": f"A{i + 1:02d}", "site": "1"}


def test_collate_stacks_fields_in_order():
    records = [_record(i, (5, 8, 8)) for i in range(8)]
    batch = pipeline.collate(records)
    np.testing.assert_array_equal(batch["field"], np.stack([r["field"] for r in records]))
    assert batch["field"].dtype == np.uint16 and list(batch["well"]) == [f"A{i + 1:02d}" for i in range(8)]


def test_collate_names_a_field_of_another_shape():
    records = [_record(0, (5, 16, 16)), _record(1, (5, 16, 8))]
    with pytest.raises(DataError, match=r"field P1/A02/1 is uint16\[5, 16, 8\].*\[5, 16, 16\]"):
        pipeline.collate(records)
