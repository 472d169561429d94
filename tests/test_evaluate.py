"""Evaluation probes: k-NN / linear separate real classes and fall to chance without them;
embeddings are batch-independent; phenotypic activity ranks active perturbations; the CLI runs."""

import json
import logging
import sys

import jax
import numpy as np
import pandas as pd
import pytest

from dinocell_jax import config as config_lib
from dinocell_jax import evaluate as ev
from dinocell_jax.ssl import optim
from dinocell_jax.ssl import step as step_lib
from dinocell_jax.ssl.schedules import Schedules
from tests.tiny import tiny_config


def copairs_available() -> bool:
    try:
        import copairs  # noqa: F401
    except ImportError:
        return False
    return True


def _clusters(rng, n_per_class, n_classes=4, dim=16, spread=0.3):
    centres = rng.normal(size=(n_classes, dim)) * 3.0
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + spread * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y


def test_probes_separate_classes_and_fall_to_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    train_x, train_y = _clusters(rng, 50)
    test_x, test_y = _clusters(np.random.default_rng(0), 50)  # same centres, same classes
    test_x = test_x + 0.3 * rng.normal(size=test_x.shape).astype(np.float32)
    assert ev.knn_accuracy(train_x, train_y, test_x, test_y, k=20) >= 0.98
    assert ev.linear_probe_accuracy(train_x, train_y, test_x, test_y) >= 0.98

    shuffled = rng.permutation(train_y)
    knn = ev.knn_accuracy(train_x, shuffled, test_x, test_y, k=20)
    linear = ev.linear_probe_accuracy(train_x, shuffled, test_x, test_y)
    # chance is 1/4; 200 queries put 3 standard deviations at about +-0.09
    assert abs(knn - 0.25) < 0.12, knn
    assert abs(linear - 0.25) < 0.12, linear


def test_knn_votes_are_similarity_weighted_as_dino():
    # One near neighbour of class 0 and two farther ones of class 1: a plain majority
    # of the 3 says 1, DINO's exp(cos/0.07) weights say 0.
    train_x = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    train_y = np.array([0, 1, 1])
    assert ev.knn_accuracy(train_x, train_y, np.array([[1.0, 0.05]]), np.array([0]), k=3) == 1.0
    # k is clipped to the reference size; a single class gives no linear probe
    assert ev.knn_accuracy(train_x, train_y, np.array([[0.0, 1.0]]), np.array([1]), k=100) == 1.0
    assert np.isnan(ev.linear_probe_accuracy(train_x, np.zeros(3, int), train_x, np.zeros(3, int)))


def test_probe_inputs_are_checked_with_shapes_in_the_message():
    with pytest.raises(ValueError, match=r"knn_accuracy: .*\(3, 2\).*\(2, 5\)"):
        ev.knn_accuracy(np.zeros((3, 2)), np.zeros(3), np.zeros((2, 5)), np.zeros(2))
    with pytest.raises(ValueError, match="linear_probe_accuracy: 2 / 2 labels for 3 / 2"):
        ev.linear_probe_accuracy(np.zeros((3, 2)), np.zeros(2), np.zeros((2, 2)), np.zeros(2))


def _activity_wells(rng, active: bool, plates=("P1", "P2"), labels=(0, 1, 2, 3), reps=4, dim=16):
    rows, feats = [], []
    shifts = {label: (rng.normal(size=dim) * 4.0 if active and label else np.zeros(dim)) for label in labels}
    for plate in plates:
        for label in labels:
            for r in range(reps):
                rows.append({"plate": plate, "well": f"{label}-{r}", "label": label})
                feats.append(shifts[label] + rng.normal(size=dim))
    return np.asarray(feats), pd.DataFrame(rows)


def test_phenotypic_activity_retrieves_active_perturbations_not_inactive_ones():
    pytest.importorskip("copairs")
    rng = np.random.default_rng(1)
    feats, meta = _activity_wells(rng, active=True)
    active = ev.phenotypic_activity(feats, meta, control_label=0, null_size=200)
    assert active["eval/phenotypic_activity_perturbations"] == 3
    assert active["eval/phenotypic_activity_map"] > 0.95
    assert active["eval/phenotypic_activity_fraction_retrieved"] == 1.0

    feats, meta = _activity_wells(rng, active=False)
    inactive = ev.phenotypic_activity(feats, meta, control_label=0, null_size=200)
    # Replicates indistinguishable from controls: AP near the positive fraction of each
    # ranking (7 replicates among 7 + 4 plate controls = 0.64), nothing significant.
    assert inactive["eval/phenotypic_activity_map"] < 0.8
    assert active["eval/phenotypic_activity_map"] - inactive["eval/phenotypic_activity_map"] > 0.2
    assert inactive["eval/phenotypic_activity_fraction_retrieved"] == 0.0


def test_phenotypic_activity_skips_without_copairs_or_controls(monkeypatch, caplog):
    rng = np.random.default_rng(2)
    feats, meta = _activity_wells(rng, active=True)
    with caplog.at_level(logging.WARNING):
        assert ev.phenotypic_activity(feats, meta, control_label=99) is None
    assert "no negative-control wells (label 99)" in caplog.text
    monkeypatch.setitem(sys.modules, "copairs", None)
    with caplog.at_level(logging.WARNING):
        assert ev.phenotypic_activity(feats, meta, control_label=0) is None
    assert "copairs is not installed" in caplog.text


def test_well_profiles_average_sites_and_standardise_per_plate():
    feats = np.array([[1.0, 0.0], [3.0, 0.0], [10.0, 2.0], [20.0, 4.0]])
    profiles, meta = ev.well_profiles(feats, [1, 1, 0, 0], ["P", "P", "P", "P"], ["A01", "A01", "A02", "A03"])
    assert list(meta["well"]) == ["A01", "A02", "A03"] and list(meta["label"]) == [1, 0, 0]
    raw = np.array([[2.0, 0.0], [10.0, 2.0], [20.0, 4.0]])
    np.testing.assert_allclose(profiles, (raw - raw.mean(0)) / raw.std(0))


def test_negative_control_id_by_source_and_label_table(tmp_path):
    c = tiny_config()
    assert ev.negative_control_id(c) == ev.SYNTHETIC_NEGATIVE_CONTROL
    c.data.source = "folder:/nowhere"
    assert ev.negative_control_id(c) is None  # no labels: no mAP
    table = tmp_path / "well.csv"
    pd.DataFrame({"Metadata_Plate": ["P1", "P1", "P1"], "Metadata_Well": ["A01", "A02", "A03"],
                  "Metadata_JCP2022": ["JCP2022_085227", "JCP2022_033924", "JCP2022_012345"]}).to_csv(table, index=False)
    c.data.labels_csv = str(table)
    assert ev.negative_control_id(c) == 1  # sorted names: 012345, 033924, 085227
    c.eval.negative_control = "JCP2022_085227"
    assert ev.negative_control_id(c) == 2


@pytest.fixture(scope="module")
def tiny_run():
    c = tiny_config()
    c.data.num_fields = 256  # 64 held-out fields: 16 wells, 4 replicate wells per phenotype
    c.eval.n_fields = 32
    c.eval.batch_size = 8
    c.eval.map_null_size = 100
    config_lib.validate(c, jax.device_count())
    models = step_lib.make_models(c)
    optimizer = optim.make_optimizer(c, Schedules.from_config(c))
    state = jax.jit(lambda k: step_lib.init_state(c, k, optimizer))(jax.random.key(0))
    return c, models, state.teacher


def test_embed_fields_is_batch_independent_and_compiles_once(tiny_run):
    c, models, params = tiny_run
    rng = np.random.default_rng(0)
    field = rng.integers(100, 4000, size=(5, 5, 32, 32)).astype(np.uint16)
    field[4] = field[4, :1]  # all 5 stains identical: every single-channel view is the mean view
    arrays = {"field": field, "norm_low": np.full((5, 5), 100.0, np.float32),
              "norm_high": np.full((5, 5), 4000.0, np.float32)}
    embedder = ev.Embedder(c, models, batch_size=8)  # 8 devices: one field each
    a = embedder(params, arrays)  # 5 fields: one padded batch
    b = ev.embed_fields(params, models, c, [{k: v[i] for k, v in arrays.items()} for i in range(5)], batch_size=16)
    assert a["mean"].shape == (5, 32) and a["channels"].shape == (5, 5, 32)
    assert a["mean"].dtype == np.float32
    np.testing.assert_allclose(a["mean"], b["mean"], atol=1e-5)
    np.testing.assert_allclose(a["channels"], b["channels"], atol=1e-5)
    for ch in range(5):
        np.testing.assert_allclose(a["channels"][4, ch], a["mean"][4], atol=1e-5)
    assert not np.allclose(a["channels"][0, 0], a["channels"][0, 1])
    embedder(params, {k: v[:3] for k, v in arrays.items()})
    assert embedder._fn._cache_size() == 1  # the padded last batch did not recompile
    with pytest.raises(ValueError, match=r"norm_low must be \[5, 5\]"):
        embedder(params, {**arrays, "norm_low": arrays["norm_low"][:, :3]})


def test_evaluate_on_synthetic_fields_reports_every_metric(tiny_run):
    c, models, params = tiny_run
    metrics = ev.evaluate(params, models, c)
    assert metrics["eval/n_reference"] == 32 and metrics["eval/n_query"] == 32
    assert metrics["eval/n_classes"] == c.data.n_phenotypes
    for key in ("eval/knn_top1", "eval/linear_acc", "eval/knn_top1_channel_concat",
                "eval/consistency/retrieval_top1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert len([k for k in metrics if k.startswith("eval/consistency/ch") and "_vs_ch" in k]) == 10
    assert -1.0 <= metrics["eval/consistency/average_centered"] <= 1.0
    if copairs_available():
        assert metrics["eval/phenotypic_activity_perturbations"] == 3  # phenotypes 1-3 against 0
        assert 0.0 <= metrics["eval/phenotypic_activity_map"] <= 1.0


def test_cli_evaluates_the_random_baseline_and_reports_a_missing_checkpoint(tiny_run, tmp_path, capsys):
    c, _, _ = tiny_run
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(c)))
    assert ev.main(["--workdir", str(workdir)]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert ev.main(["--workdir", str(workdir), "--random-init", "--config.eval.n_fields=16"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    printed = json.loads(line)
    assert printed["step"] == 0 and printed["random_init"] is True
    assert printed["eval/n_query"] == 16
    saved = json.loads((workdir / "eval" / "random_init.json").read_text())
    assert saved == printed
    assert ev.main(["--workdir", str(workdir), "--bogus"]) == 2
    assert "--bogus: unknown argument" in capsys.readouterr().err
