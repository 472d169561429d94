"""Real sources: LoadData tables, microscope folders, field finishing, held-out split, labels."""

import gzip
import os

import numpy as np
import pandas as pd
import pytest
import tifffile

from dinocell_jax import config as config_lib
from dinocell_jax.data import pipeline, sources
from dinocell_jax.data.normalize import intensity_bounds
from dinocell_jax.data.sources import DataError, ReadError, parse_image_name

STAINS = config_lib.CHANNELS  # DNA, ER, RNA, AGP, Mito
SIZE = 24


def make_config(source, **data):
    c = config_lib.base_config()
    c.data.source = source
    c.data.field_size = SIZE
    c.data.holdout = 0.0
    c.data.normalization = "minmax"
    c.data.num_workers = 0
    c.data.read_threads = 2
    for k, v in data.items():
        c.data[k] = v
    return c


def plane(seed, size=SIZE):
    """A distinct uint16 plane per seed, using the high bits (full 16-bit depth)."""
    return np.random.default_rng(seed).integers(0, 65535, (size, size), dtype=np.uint16, endpoint=True)


def write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tifffile.imwrite(path, array)
    return path


def test_loaddata_pathname_form_keeps_plates_apart_and_reads_16_bits(tmp_path):
    rows, expected = [], {}
    # Two plates share well and site names; "0042" must stay a string (not 42).
    for plate in ("BR00116991", "0042"):
        for site in ("1", "2"):
            row = {"Metadata_Source": "source_4", "Metadata_Batch": "B1", "Metadata_Plate": plate,
                   "Metadata_Well": "A01", "Metadata_Site": site}
            planes = []
            for c, stain in enumerate(STAINS):
                arr = plane(hash((plate, site, stain)) % 2**32)
                name = f"{plate}_A01_s{site}_{stain}.tiff"
                write(str(tmp_path / "images" / plate / name), arr)
                # Relative PathName: resolved against the table's folder.
                row[f"PathName_Orig{stain}"] = f"images/{plate}"
                row[f"FileName_Orig{stain}"] = name
                planes.append(arr)
            rows.append(row)
            expected[(plate, site)] = np.stack(planes)
    pd.DataFrame(rows).to_csv(tmp_path / "load_data.csv", index=False)

    src = pipeline.make_source(make_config(f"loaddata:{tmp_path / 'load_data.csv'}"))
    assert len(src) == 4
    seen = set()
    for i in range(len(src)):
        r = src[i]
        assert r["field"].dtype == np.uint16 and r["field"].shape == (5, SIZE, SIZE)
        np.testing.assert_array_equal(r["field"], expected[(r["plate"], r["site"])])
        assert r["field"].max() > 255  # not crushed to 8 bits
        np.testing.assert_allclose(r["norm_low"], r["field"].reshape(5, -1).min(1))
        assert (r["source"], r["batch"], r["well"], r["label"]) == ("source_4", "B1", "A01", -1)
        seen.add((r["plate"], r["site"]))
    assert seen == set(expected)


def test_loaddata_url_form_divides_by_illumination_exactly(tmp_path):
    rng = np.random.default_rng(0)
    row = {"Metadata_Plate": "P1", "Metadata_Well": "B02", "Metadata_Site": "3"}
    raw, illum = [], []
    for stain in STAINS:
        arr = plane(len(raw))
        path = write(str(tmp_path / f"img_{stain}.tif"), arr)
        row[f"URL_Orig{stain}"] = "file://" + path
        fn = rng.uniform(1.0, 3.0, (SIZE, SIZE))  # CellProfiler rescales illumination functions to >= 1
        np.save(tmp_path / f"P1_Illum{stain}.npy", fn)
        row[f"FileName_Illum{stain}"] = f"P1_Illum{stain}.npy"
        row[f"PathName_Illum{stain}"] = str(tmp_path)
        raw.append(arr)
        illum.append(fn)
    pd.DataFrame([row]).to_csv(tmp_path / "load_data_with_illum.csv", index=False)

    corrected = pipeline.make_source(make_config(f"loaddata:{tmp_path}"))[0]  # a folder: picks *_with_illum
    want = np.rint(np.divide(np.stack(raw), np.stack(illum), dtype=sources.CORRECTION_DTYPE)).astype(np.uint16)
    np.testing.assert_array_equal(corrected["field"], want)
    # float32 against float64: only quotients at a half apart, by one count.
    in_float64 = np.rint(np.stack(raw) / np.stack(illum))
    off = np.abs(corrected["field"] - in_float64)
    assert off.max() <= 1 and np.mean(off > 0) < 1e-3
    assert corrected["site"] == "3"

    plain = pipeline.make_source(make_config(f"loaddata:{tmp_path}", illumination=False))[0]
    np.testing.assert_array_equal(plain["field"], np.stack(raw))


def test_loaddata_parquet_reads_numbers_as_strings_and_names_missing_columns(tmp_path):
    row = {"Metadata_Plate": 1234, "Metadata_Well": "C03", "Metadata_Site": 7}
    for c, stain in enumerate(STAINS):
        row[f"URL_Orig{stain}"] = write(str(tmp_path / f"{stain}.tif"), plane(c))
    pd.DataFrame([row]).to_parquet(tmp_path / "load_data.parquet")
    r = pipeline.make_source(make_config(f"loaddata:{tmp_path / 'load_data.parquet'}"))[0]
    assert (r["plate"], r["site"]) == ("1234", "7")

    del row["URL_OrigMito"]
    pd.DataFrame([row]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="URL_OrigMito"):
        pipeline.make_source(make_config(f"loaddata:{tmp_path / 'bad.csv'}"))


def test_parse_image_names_of_three_microscopes():
    guid = "3F2504E0-4F89-11D3-9A0C-0305E82C3301"
    assert parse_image_name("r03c12f09p01-ch10sk1fk1fl1.tiff") == sources.ParsedName("phenix", "C12", "9", 10)
    assert parse_image_name("HTS_A01_s2_w1" + guid + ".tif") == sources.ParsedName("imagexpress", "A01", "2", 1)
    # A GUID that starts with digits does not eat the channel, nor the channel the GUID.
    assert parse_image_name("HTS_P24_s1_w10" + "12345678" * 4 + ".tif").channel == 10
    assert parse_image_name("HTS_P24_s1_w3.tif").channel == 3
    assert parse_image_name("HTS_A01_s1_w1_thumb" + guid + ".tif") is None
    cv = parse_image_name("BR00117035_K06_T0001F003L01A02Z01C10.tif")
    assert (cv.plate, cv.well, cv.site, cv.channel) == ("BR00117035", "K06", "3", 10)
    assert parse_image_name("notes.txt") is None and parse_image_name("img_001.tif") is None


# Stain -> channel number with two-digit channels, so a sort by name would mix them up.
TEN_CHANNELS = {"DNA": 10, "ER": 9, "RNA": 2, "AGP": 1, "Mito": 3}


def _folder_case(tmp_path, scheme):
    """Writes 2 plates x 1 well x 2 sites of one scheme; returns {(plate, site): [5,H,W] in stain order}."""
    expected = {}
    guid = "3F2504E0-4F89-11D3-9A0C-0305E82C3301"
    for plate in ("BR001", "BR002"):
        plate_dir = tmp_path / "source_4" / "images" / "2020_batch" / "images" / f"{plate}__2020-11-05T19_51_35-Measurement1"
        for site in (1, 2):
            planes = {}
            for ch in sorted(set(TEN_CHANNELS.values()) | {4}):  # channel 4 is not wanted: ignored
                arr = plane(hash((plate, site, ch, scheme)) % 2**32)
                if scheme == "phenix":
                    name = f"Images/r01c01f{site:02d}p01-ch{ch}sk1fk1fl1.tiff"
                elif scheme == "imagexpress":
                    name = f"HTS_A01_s{site}_w{ch}{guid}.tif"
                else:
                    name = f"{plate}_A01_T0001F{site:03d}L01A{ch:02d}Z01C{ch:02d}.tif"
                write(str(plate_dir / name), arr)
                planes[ch] = arr
            expected[(plate, str(site))] = np.stack([planes[TEN_CHANNELS[s]] for s in STAINS])
    return expected


@pytest.mark.parametrize("scheme", ["phenix", "imagexpress", "cv8000"])
def test_folder_groups_by_plate_well_site_and_places_channels_by_number(tmp_path, scheme):
    expected = _folder_case(tmp_path, scheme)
    src = pipeline.make_source(make_config(f"folder:{tmp_path}", channels=TEN_CHANNELS))
    assert len(src) == 4  # two plates with the same well/site names stay apart
    for i in range(len(src)):
        r = src[i]
        assert (r["source"], r["batch"], r["well"]) == ("source_4", "2020_batch", "A01")
        np.testing.assert_array_equal(r["field"], expected[(r["plate"], r["site"])])


def test_folder_missing_channel_and_brightfield_on_request(tmp_path):
    expected = _folder_case(tmp_path, "phenix")
    victim = next(tmp_path.rglob("r01c01f02p01-ch9sk1fk1fl1.tiff"))
    victim.unlink()
    src = pipeline.make_source(make_config(f"folder:{tmp_path}", channels=TEN_CHANNELS))
    errors = []
    for i in range(len(src)):
        try:
            src[i]
        except ReadError as e:
            errors.append(str(e))
    assert len(errors) == 1
    assert "missing channel ER (channel 9)" in errors[0] and "well=A01/site=2" in errors[0]
    assert str(victim.parent) in errors[0]  # names where the other planes are
    # Brightfield planes come only on request, after the stains.
    with_bf = pipeline.make_source(make_config(f"folder:{tmp_path}", channels=TEN_CHANNELS, brightfield="4"))
    r = with_bf[0]
    assert r["field"].shape == (6, SIZE, SIZE)
    np.testing.assert_array_equal(r["field"][:5], expected[(r["plate"], r["site"])])


def test_finish_field_downscales_then_bounds_then_crops_or_pads():
    c = make_config("synthetic", field_size=6, downscale=2, normalization="minmax")
    field = np.arange(5 * 16 * 16, dtype=np.uint16).reshape(5, 16, 16)
    out, low, high = sources.finish_field(field, c.data)
    small = field.reshape(5, 8, 2, 8, 2).mean(axis=(2, 4))
    np.testing.assert_array_equal(out, np.rint(small[:, 1:7, 1:7]).astype(np.uint16))
    # Bounds describe the whole (downscaled) field, not the crop.
    np.testing.assert_allclose(low, np.rint(small).reshape(5, -1).min(1))
    np.testing.assert_allclose(high, np.rint(small).reshape(5, -1).max(1))

    c.data.field_size, c.data.downscale = 10, 1
    tiny = np.arange(5 * 6 * 6, dtype=np.uint16).reshape(5, 6, 6) + 1
    padded, low, _ = sources.finish_field(tiny, c.data)
    assert padded.shape == (5, 10, 10) and padded.min() >= 1  # mirrored, no black border
    np.testing.assert_array_equal(padded[:, 2:8, 2:8], tiny)
    np.testing.assert_array_equal(padded[:, 1, 2:8], tiny[:, 0])
    lo_ref, _ = intensity_bounds(tiny, "minmax", 0.1, 99.9)
    np.testing.assert_allclose(low, lo_ref)


@pytest.mark.parametrize("downscale, dtype", [(1, np.uint16), (2, np.uint16), (3, np.uint16), (1, np.int32), (2, np.float32)])
def test_finish_field_divides_by_illumination_in_blocks_as_on_the_whole_plane(downscale, dtype):
    # 150 rows: several row blocks, and with downscale 3 none left over; odd widths drop a column.
    # Signed and float planes may hold negative values, which must still clip to 0.
    rng = np.random.default_rng(downscale)
    raw = (100 + rng.gamma(2.0, 400.0, (2, 150, 97))).astype(dtype)
    if dtype != np.uint16:
        raw[0, :40] -= 2000
        assert raw[0].min() < 0
    illum = [rng.uniform(1.0, 3.0, (150, 97)), rng.uniform(0.001, 0.01, (150, 97))]  # 2nd: > 16 bits
    c = make_config("synthetic", field_size=150 // downscale, downscale=downscale)
    out, _, _ = sources.finish_field(list(raw), c.data, illum)
    for ch in range(2):
        whole = sources.downscale(np.divide(raw[ch], illum[ch], dtype=sources.CORRECTION_DTYPE)[None], downscale)[0]
        want = sources.crop_or_pad(sources._to_uint16(whole)[None], 150 // downscale)[0]
        np.testing.assert_array_equal(out[ch], want)
    assert out[1].max() == 65535  # the overflowing channel was scaled as a whole
    assert (out[0] == 0).any() == (dtype != np.uint16)


@pytest.mark.parametrize("with_illumination", [False, True])
def test_finish_field_smaller_than_the_downscale_is_an_error_naming_its_shape(with_illumination):
    raw = np.ones((2, 1, 40), np.uint16)  # one row: nothing left after a 2 x 2 block mean
    illum = [np.ones((1, 40))] * 2 if with_illumination else None
    c = make_config("synthetic", field_size=20, downscale=2)
    with pytest.raises(ReadError, match=r"field of shape \(2, 1, 40\) is smaller than data.downscale=2"):
        sources.finish_field(list(raw), c.data, illum)


def test_holdout_by_plate_is_disjoint_stable_and_falls_back_to_wells():
    meta = pd.DataFrame({
        "source": "s", "batch": "b",
        "plate": [f"P{i % 10}" for i in range(200)],
        "well": [f"A{i % 7:02d}" for i in range(200)],
        "site": "1",
    })
    held = sources.holdout_mask(meta, 0.2, "plate")
    assert meta.plate[held].nunique() == 2
    assert not set(meta.plate[held]) & set(meta.plate[~held])
    # Stable under row order: the same plates are held out.
    shuffled = meta.sample(frac=1.0, random_state=0)
    assert set(shuffled.plate[sources.holdout_mask(shuffled, 0.2, "plate")]) == set(meta.plate[held])
    one = meta.assign(plate="P0")
    by_well = sources.holdout_mask(one, 0.3, "plate")
    assert one.well[by_well].nunique() == 2 and not set(one.well[by_well]) & set(one.well[~by_well])


def test_labels_join_jump_metadata_tables(tmp_path):
    with gzip.open(tmp_path / "well.csv.gz", "wt") as f:
        pd.DataFrame({"Metadata_Source": "source_4", "Metadata_Plate": ["P1", "P1", "P2"],
                      "Metadata_Well": ["A01", "A02", "A01"],
                      "Metadata_JCP2022": ["JCP2022_033924", "JCP2022_000001", "JCP2022_000001"]}).to_csv(f, index=False)
    pd.DataFrame({"Metadata_Plate": ["P1", "P2"], "Metadata_PlateType": ["TARGET2", "COMPOUND"]}).to_csv(
        tmp_path / "plate.csv", index=False)
    from dinocell_jax.data.labels import join_labels

    meta = pd.DataFrame({"plate": ["P1", "P1", "P2", "P3"], "well": ["A01", "A02", "A01", "A01"]})
    reader = sources.FileReader()
    spec = f"{tmp_path / 'well.csv.gz'},{tmp_path / 'plate.csv'}"
    ids, names = join_labels(meta, spec, "", reader)
    assert names == ["JCP2022_000001", "JCP2022_033924"]
    assert ids.tolist() == [1, 0, 0, -1]
    ids, names = join_labels(meta, spec, "Metadata_PlateType", reader)
    assert [names[i] if i >= 0 else None for i in ids] == ["TARGET2", "TARGET2", "COMPOUND", None]
    with pytest.raises(DataError, match="nope"):
        join_labels(meta, spec, "nope", reader)


def test_channel_config_errors_name_the_key():
    c = make_config("synthetic", brightfield="6")
    with pytest.raises(DataError, match="data.brightfield"):
        sources.channel_list(c.data, by_name=True)
    c.data.brightfield = ""
    c.data.channels = {"DNA": 1, "ER": 1}
    with pytest.raises(DataError, match="data.channels"):
        sources.channel_list(c.data)
