"""Embeddings CLI: one Parquet row per field with its metadata, the teacher's CLS embeddings
(equal to evaluate.embed_fields), per-channel columns on request, unreadable fields skipped."""


import numpy as np
import pytest

from dinocell_jax import embed
from dinocell_jax.data import pipeline
from dinocell_jax.evaluate import embed_fields
from dinocell_jax.ssl import step as step_lib
from tiny import random_checkpoint, tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = tiny_config(**{"data.num_fields": 24, "data.n_plates": 2})
    workdir = tmp_path_factory.mktemp("run")
    state = random_checkpoint(config, workdir, 5)
    return config, workdir, state


def test_parquet_rows_match_the_fields_and_the_model(run, tmp_path):
    config, workdir, state = run
    out = str(tmp_path / "emb.parquet")
    assert embed.main(["--workdir", str(workdir), "--out", out, "--per-channel", "--batch-size", "12"]) == 0
    meta, emb, footer = embed.read_embeddings(out)

    sources = {name: pipeline.make_source(config, name) for name in ("train", "holdout")}
    n = sum(len(s) for s in sources.values())
    assert len(meta) == n == config.data.num_fields
    assert footer["step"] == 5 and footer["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert sorted(emb) == ["embedding", "embedding_AGP", "embedding_DNA", "embedding_ER", "embedding_Mito",
                           "embedding_RNA"]
    assert all(v.shape == (n, 32) and v.dtype == np.float32 for v in emb.values())

    for name, source in sources.items():
        rows = meta[meta["split"] == name]
        records = [source[int(i)] for i in rows["index"]]
        assert list(rows["plate"]) == [r["plate"] for r in records]
        assert list(rows["well"]) == [r["well"] for r in records]
        want = embed_fields(state.teacher, step_lib.make_models(config), config, records, batch_size=8)
        got = rows.index.to_numpy()
        np.testing.assert_allclose(emb["embedding"][got], want["mean"], atol=1e-5)
        np.testing.assert_allclose(emb["embedding_RNA"][got], want["channels"][:, 2], atol=1e-5)
    # Different stains give different embeddings: the columns are not copies.
    assert np.abs(emb["embedding_DNA"] - emb["embedding_Mito"]).max() > 1e-3


class _FlakySource:
    def __init__(self, source, bad):
        self.source, self.bad = source, bad

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if i == self.bad:
            raise OSError(f"cannot read field {i}: truncated TIFF")
        return self.source[i]


def test_unreadable_fields_are_skipped_and_named(run):
    config, _, state = run
    source = _FlakySource(pipeline.make_source(config, "train"), bad=3)
    embedder = embed.Embedder(state.teacher, step_lib.make_models(config), config, batch_size=8, per_channel=False)
    metas, mean, channels, errors = embed.embed_source(embedder, source, indices=range(10), progress=False)
    assert [m["index"] for m in metas] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert mean.shape == (9, 32) and channels is None
    assert errors == ["field 3: OSError: cannot read field 3: truncated TIFF"]
    # The padded, batched, jitted path equals one field at a time.
    alone, _ = embedder({k: np.stack([source[4][k]]) for k in ("field", "norm_low", "norm_high")})
    np.testing.assert_allclose(mean[3], alone[0], atol=1e-5)


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert embed.main(["--workdir", str(tmp_path), "--config", "configs/demo.py", "--out", "x.parquet"]) == 2
    assert "no finished checkpoint" in capsys.readouterr().err
