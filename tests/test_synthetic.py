"""Synthetic Cell Painting: determinism, metadata layout, plausible stains, separable phenotypes, speed."""

import pickle
import re
import time

import numpy as np
import pytest

from dinocell_jax import config as config_lib
from dinocell_jax.config import CHANNELS
from dinocell_jax.data import pipeline
from dinocell_jax.data.normalize import intensity_bounds, normalize_fields
from dinocell_jax.data.synthetic import SyntheticCellPainting, phenotype


def test_fields_are_deterministic_by_seed_and_index():
    ds = SyntheticCellPainting(num_fields=16, field_size=64, seed=5)
    a = ds[3]
    assert a["field"].dtype == np.uint16 and a["field"].shape == (len(CHANNELS), 64, 64)
    np.testing.assert_array_equal(a["field"], ds[3]["field"])
    np.testing.assert_array_equal(a["field"], SyntheticCellPainting(16, 64, seed=5)[3]["field"])
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(a["field"], clone[3]["field"])
    assert not np.array_equal(a["field"], ds[4]["field"])
    assert not np.array_equal(a["field"], SyntheticCellPainting(16, 64, seed=6)[3]["field"])
    np.testing.assert_array_equal(ds[-1]["field"], ds[15]["field"])
    with pytest.raises(IndexError, match="index 16"):
        ds[16]


def test_metadata_layout_supports_plate_holdout():
    ds = SyntheticCellPainting(num_fields=4 * 384 * 4 + 8, field_size=16, n_plates=4, n_phenotypes=3)
    metas = [ds.metadata(i) for i in range(len(ds))]
    assert all(re.fullmatch(r"[A-P](0[1-9]|1[0-9]|2[0-4])", m["well"]) for m in metas)
    assert all(m["source"] == "synthetic" for m in metas)
    # The plate of field i is fixed by i alone, and every plate holds every phenotype.
    assert [m["plate"] for m in metas[:8]] == [f"SYNTH-P{p:03d}" for p in (0, 1, 2, 3, 0, 1, 2, 3)]
    for plate in {m["plate"] for m in metas}:
        assert {m["label"] for m in metas if m["plate"] == plate} == {0, 1, 2}
    # Replicate plates share the plate map: a well has one label on every plate.
    labels = {}
    for m in metas:
        assert labels.setdefault(m["well"], m["label"]) == m["label"]
    keys = {(m["plate"], m["well"], m["site"]) for m in metas}
    assert len(keys) == len(ds), "plate/well/site must identify a field"
    assert metas[0]["batch"] == metas[1]["batch"] != metas[2]["batch"]
    item = ds[7]
    assert {k: v for k, v in item.items() if k != "field"} == metas[7]


def test_stains_have_camera_like_statistics():
    ds = SyntheticCellPainting(num_fields=4, field_size=128, seed=1)
    for i in range(4):
        x = ds[i]["field"].astype(np.float64)
        p1, p999 = np.percentile(x, [1, 99.9], axis=(1, 2))
        assert np.all((p1 > 150) & (p1 < 1200)), f"background counts {p1}"
        assert np.all((p999 > 1500) & (p999 < 60000)), f"bright counts {p999}"
        assert (x >= 65535).mean() < 1e-3, "saturated pixels"
        dna = x[0]
        nuclei = dna > p1[0] + 0.25 * (p999[0] - p1[0])
        assert 0.03 < nuclei.mean() < 0.5, "nuclei cover a plausible part of the field"
        # Nucleoli (RNA) sit inside nuclei; membranes (AGP) mostly outside them.
        assert x[2][nuclei].mean() > x[2][~nuclei].mean()
        assert np.corrcoef(dna.ravel(), x[2].ravel())[0, 1] > 0.1
        lo, hi = intensity_bounds(ds[i]["field"])
        v = np.asarray(normalize_fields(ds[i]["field"][None], lo[None], hi[None]))
        # Percentile normalisation leaves texture: no channel collapses to a constant.
        assert np.all(v.std(axis=(2, 3)) > 0.05)


def _features(field):
    x = field.astype(np.float64)
    p1 = np.percentile(x, 1, axis=(1, 2))
    signal = x.mean(axis=(1, 2)) - p1
    dna_p = np.percentile(x[0], 99.5)
    foreground = (x[0] > p1[0] + 0.25 * (dna_p - p1[0])).mean()
    return np.r_[np.log(signal[1:] / signal[0]), foreground]


def test_phenotypes_are_separable_across_plates():
    ds = SyntheticCellPainting(num_fields=400, field_size=128, n_phenotypes=4, n_plates=4, seed=3)
    idx = range(0, 400, 5)
    feats = np.stack([_features(ds[i]["field"]) for i in idx])
    labels = np.array([ds.metadata(i)["label"] for i in idx])
    assert set(labels) == {0, 1, 2, 3}
    z = (feats - feats.mean(0)) / feats.std(0)
    correct = 0
    for i in range(len(z)):
        rest = np.arange(len(z)) != i
        centroids = np.stack([z[rest & (labels == k)].mean(0) for k in range(4)])
        correct += np.argmin(((centroids - z[i]) ** 2).sum(1)) == labels[i]
    accuracy = correct / len(z)
    print(f"leave-one-out nearest-centroid accuracy on 5 image features: {accuracy:.2f}")
    assert accuracy > 0.85


def test_generation_speed_is_reported():
    ds = SyntheticCellPainting(num_fields=32, field_size=256)
    ds[0]  # builds the texture bank once per process
    start = time.perf_counter()
    for i in range(1, 21):
        ds[i]
    ms = (time.perf_counter() - start) / 20 * 1e3
    print(f"synthetic 5x256x256 field: {ms:.1f} ms")
    assert ms < 250, "an order of magnitude slower than expected"


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="n_channels"):
        SyntheticCellPainting(4, n_channels=6)
    with pytest.raises(ValueError, match="num_fields"):
        SyntheticCellPainting(0)
    assert SyntheticCellPainting(2, 32, n_channels=3)[0]["field"].shape == (3, 32, 32)


def test_shared_phenotypes_differ_only_in_what_every_stain_draws():
    control = phenotype(0, "shared")
    for label in range(8):  # the hand-made four and four drawn ones
        shared, specific = phenotype(label, "shared"), phenotype(label, "stain_specific")
        assert (shared.chromatin, shared.punctate, shared.gains) == (control.chromatin, control.punctate,
                                                                     control.gains), label
        if label < 3 or label >= 4:  # the same cell and nucleus geometry as the stain-specific label
            for trait in ("spacing", "cell_radius", "nucleus", "aspect", "confluence"):
                assert getattr(shared, trait) == getattr(specific, trait), (label, trait)
    # Label 3 (mito/ER stress in the stain-specific set) becomes small, dense, round cells.
    assert phenotype(3, "shared").spacing < min(phenotype(k, "shared").spacing for k in range(3))
    assert len({phenotype(k, "shared") for k in range(4)}) == 4

    # Rendered from the chosen set: the control's wells are the same field, the others not.
    stain_specific = SyntheticCellPainting(num_fields=64, field_size=32, n_phenotypes=4, seed=2)
    shared_set = SyntheticCellPainting(num_fields=64, field_size=32, n_phenotypes=4, seed=2, phenotypes="shared")
    by_label = {stain_specific.metadata(i)["label"]: i for i in range(64)}
    assert np.array_equal(stain_specific[by_label[0]]["field"], shared_set[by_label[0]]["field"])
    assert not np.array_equal(stain_specific[by_label[3]]["field"], shared_set[by_label[3]]["field"])
    with pytest.raises(ValueError, match="phenotypes='ratios' is not one of"):
        SyntheticCellPainting(4, phenotypes="ratios")
    # The trainer's source draws from the configured set.
    config = config_lib.base_config()
    config.data.phenotypes = "shared"
    assert pipeline.make_source(config, "train").generator.phenotypes == "shared"
