"""Does the pretraining learn useful, channel-invariant features? Probes of the teacher.

On labelled fields (synthetic phenotypes; JUMP compounds or plate types joined from
`data.labels_csv`), with the teacher backbone frozen:

- `eval/knn_top1`: DINO's weighted k-NN (cosine, k = `eval.knn_k`, votes
  exp(cos / 0.07)) of held-out fields against reference fields of the training
  split, on the CLS embedding of the channel-mean view (what global crop 1 of
  the multi-view strategy shows); `eval/knn_top1_channel_concat` on the 5
  single-channel embeddings concatenated (how a multi-view model is used
  downstream);
- `eval/linear_acc`: logistic regression (scikit-learn) on standardised features,
  same reference/held-out split;
- `eval/consistency/*`: `monitor.consistency.channel_consistency` on the held-out
  fields (raw cosine, centred cosine, cross-channel retrieval);
- `eval/phenotypic_activity_map` (and `..._fraction_retrieved`): JUMP's measure,
  mean average precision of each perturbation's well profiles retrieved against
  negative-control wells of the same plate, by `copairs` (optional extra `eval`).

The reference set is `eval.n_fields` fields of the training split and the query
set `eval.n_fields` fields of the held-out split (held out by plate), so the
probes also measure robustness to plate effects. Offline:

    python -m dinocell_jax.evaluate --workdir runs/demo            # latest checkpoint
    python -m dinocell_jax.evaluate --workdir runs/demo --random-init  # the baseline
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from dinocell_jax.data.sources import channel_list
from dinocell_jax.monitor.consistency import channel_consistency
from dinocell_jax.ssl import step as step_lib

log = logging.getLogger(__name__)

KNN_TEMPERATURE = 0.07  # DINO eval_knn.py: votes weighted by exp(cos / 0.07)
JUMP_NEGATIVE_CONTROL = "JCP2022_033924"  # DMSO in JUMP's compound metadata
SYNTHETIC_NEGATIVE_CONTROL = 0  # data/synthetic.py: phenotype 0 is the unperturbed control
_CACHE_BYTES = 2 << 30  # eval fields are kept in host memory below this size, else re-read
_META = ("plate", "well")


# ----------------------------------------------------------------------------- probes


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _check_probe_inputs(train_x, train_y, test_x, test_y, what: str):
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    train_y, test_y = np.asarray(train_y).reshape(-1), np.asarray(test_y).reshape(-1)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"{what}: features must be [N, D] and [M, D], got {train_x.shape} and {test_x.shape}")
    if len(train_y) != len(train_x) or len(test_y) != len(test_x):
        raise ValueError(
            f"{what}: {len(train_y)} / {len(test_y)} labels for {len(train_x)} / {len(test_x)} feature rows"
        )
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError(f"{what}: empty reference ({len(train_x)}) or query ({len(test_x)}) set")
    return train_x, train_y, test_x, test_y


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = KNN_TEMPERATURE) -> float:
    """Top-1 accuracy of DINO's weighted k-NN classifier.

    Each query's k nearest reference rows by cosine similarity vote for their
    label with weight exp(cos / temperature) (DINO's eval_knn.py; temperature 0.07),
    the label with the largest total wins.

    Args:
      train_x: [N, D] float reference features; train_y: [N] int labels.
      test_x: [M, D] float query features; test_y: [M] int labels.
      k: neighbours (clipped to N).
    Returns:
      the fraction of queries whose predicted label equals test_y (float in [0, 1]).
    """
    train_x, train_y, test_x, test_y = _check_probe_inputs(train_x, train_y, test_x, test_y, "knn_accuracy")
    classes, train_ids = np.unique(train_y, return_inverse=True)
    k = max(1, min(int(k), len(train_x)))
    sims = _unit(test_x) @ _unit(train_x).T  # [M, N]
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # [M, k], unordered: votes are a sum
    top_sims = np.take_along_axis(sims, top, axis=1)
    weights = np.exp((top_sims - 1.0) / temperature)  # shifted by the max possible cos: no overflow
    votes = np.zeros((len(test_x), len(classes)))
    np.add.at(votes, (np.arange(len(test_x))[:, None], train_ids[top]), weights)
    predicted = classes[np.argmax(votes, axis=1)]
    return float(np.mean(predicted == test_y))


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, c: float = 1.0, max_iter: int = 2000,
                          seed: int = 0) -> float:
    """Top-1 accuracy of a multinomial logistic regression on standardised features.

    The scaler (zero mean, unit variance per feature) is fitted on the reference
    set only. train_x [N, D], train_y [N], test_x [M, D], test_y [M]; returns a float
    in [0, 1] (NaN when the reference set has a single class: nothing to learn).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x, train_y, test_x, test_y = _check_probe_inputs(
        train_x, train_y, test_x, test_y, "linear_probe_accuracy"
    )
    if len(np.unique(train_y)) < 2:
        return float("nan")
    scaler = StandardScaler().fit(train_x)
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    model.fit(scaler.transform(train_x), train_y)
    return float(np.mean(model.predict(scaler.transform(test_x)) == test_y))


# ----------------------------------------------------------------------------- phenotypic activity


def well_profiles(features: np.ndarray, labels: np.ndarray, plates: Sequence[str], wells: Sequence[str]):
    """Site embeddings [N, D] -> well profiles: (profiles [W, D] float64, meta DataFrame plate/well/label).

    Each well's profile is the mean of its sites (JUMP profiles are well-level);
    then each plate's profiles are standardised by the mean and standard deviation
    of that plate's wells, so plate effects do not decide retrieval (JUMP's
    profiles are normalised per plate likewise).
    """
    frame = pd.DataFrame({"plate": np.asarray(plates, str), "well": np.asarray(wells, str),
                          "label": np.asarray(labels).astype(np.int64)})
    groups = frame.groupby(["plate", "well"], sort=True).indices
    keys = list(groups)
    profiles = np.stack([np.asarray(features, np.float64)[groups[key]].mean(axis=0) for key in keys])
    meta = pd.DataFrame({
        "plate": [p for p, _ in keys], "well": [w for _, w in keys],
        "label": [int(frame["label"].iloc[groups[key][0]]) for key in keys],
    })
    for plate in meta["plate"].unique():
        rows = (meta["plate"] == plate).to_numpy()
        block = profiles[rows]
        profiles[rows] = (block - block.mean(axis=0)) / np.maximum(block.std(axis=0), 1e-6)
    return profiles, meta


def phenotypic_activity(profiles: np.ndarray, meta: pd.DataFrame, control_label: int, *,
                        null_size: int = 1000, seed: int = 0, threshold: float = 0.05) -> dict[str, float] | None:
    """JUMP's phenotypic activity: can a perturbation's replicate wells be told from controls?

    For every non-control well profile, the average precision of ranking its
    replicates (same label, any plate) above the negative-control wells of its
    own plate, by cosine similarity (copairs' `average_precision`); mAP per
    perturbation (`mean_average_precision`, p-value against a null of `null_size`
    random rankings, Benjamini-Hochberg corrected).

    Args:
      profiles: [W, D] float well profiles; meta: columns plate, well, label (int).
      control_label: the negative-control label.
    Returns:
      `eval/phenotypic_activity_map` (mean over perturbations),
      `eval/phenotypic_activity_fraction_retrieved` (corrected p < threshold),
      `eval/phenotypic_activity_perturbations`; None when copairs is not installed
      or the wells hold no replicate pairs against controls (logged, one line).
    """
    meta = meta.reset_index(drop=True).copy()
    is_control = (meta["label"] == control_label).to_numpy()
    if not is_control.any():
        log.warning("eval: no negative-control wells (label %s) among the held-out wells; "
                    "eval/phenotypic_activity_map skipped", control_label)
        return None
    try:
        from copairs import map as copairs_map
        from copairs.matching import UnpairedException
    except ImportError:
        log.warning("eval: copairs is not installed (pip install 'dinocell_jax[eval]'); "
                    "eval/phenotypic_activity_map skipped")
        return None
    # Each control well gets its own reference index, so controls never pair as
    # replicates of one another, and perturbations pair only with controls as negatives.
    meta["reference"] = np.where(is_control, np.arange(len(meta)), -1)
    logging.getLogger("copairs").setLevel(logging.WARNING)
    try:
        ap = copairs_map.average_precision(
            meta, np.asarray(profiles, np.float64),
            pos_sameby=["label", "reference"], pos_diffby=[],
            neg_sameby=["plate"], neg_diffby=["label", "reference"],
            progress_bar=False,
        )
    except UnpairedException as e:
        log.warning("eval: %s; eval/phenotypic_activity_map skipped", e)
        return None
    ap = ap[ap["label"] != control_label].dropna(subset=["average_precision"])
    if ap.empty:
        log.warning("eval: no perturbation with replicate wells; eval/phenotypic_activity_map skipped")
        return None
    maps = copairs_map.mean_average_precision(
        ap, sameby=["label"], null_size=int(null_size), threshold=threshold, seed=seed, progress_bar=False
    )
    return {
        "eval/phenotypic_activity_map": float(maps["mean_average_precision"].mean()),
        "eval/phenotypic_activity_fraction_retrieved": float(maps["below_corrected_p"].mean()),
        "eval/phenotypic_activity_perturbations": float(len(maps)),
    }


def negative_control_id(config) -> int | None:
    """The integer label of the negative control (see `eval.negative_control`), None if unknown.

    "" means JUMP's DMSO (`JCP2022_033924`) for labelled tables and phenotype 0 for
    synthetic data; a name is looked up among the label names of `data.labels_csv`
    (ids are the sorted names, as data/labels.py assigns them); an integer string
    is an id.
    """
    name = str(config.eval.negative_control).strip()
    source = str(config.data.source)
    if source.startswith("synthetic"):
        return int(name) if name.lstrip("-").isdigit() else SYNTHETIC_NEGATIVE_CONTROL
    if name.lstrip("-").isdigit():
        return int(name)
    if not config.data.labels_csv:
        return None
    from dinocell_jax.data.labels import join_labels
    from dinocell_jax.data.sources import FileReader

    # No fields: join_labels then only reads the tables and returns the id -> name list.
    _, names = join_labels(pd.DataFrame({"plate": [], "well": []}), str(config.data.labels_csv),
                           str(config.data.label_column), FileReader.from_config(config.data))
    name = name or JUMP_NEGATIVE_CONTROL
    if name not in names:
        log.warning("eval.negative_control: %r is not a label of %s", name, config.data.labels_csv)
        return None
    return names.index(name)


# ----------------------------------------------------------------------------- embeddings


def make_embed_fn(config, models) -> Callable:
    """embed(params, field, norm_low, norm_high) -> (mean [B, D], channels [B, C, D]) fp32, unjitted.

    field uint16 [B, C, H, W], norm_low/high float32 [B, C]. The views are
    `augment.probe_views` (largest centred square resized to crops.global_size,
    standardised as the training crops). The "mean" embedding is the CLS token of
    the channel-mean view (all stains stacked as input for strategy "stacked");
    "channels" embeds each stain alone (stacked: the others zeroed), as
    step.make_metrics_fn does for the pictures.
    """
    from dinocell_jax.data import augment

    size = int(config.crops.global_size)
    stacked = config.data.strategy == "stacked"

    def embed(params, field, norm_low, norm_high):
        backbone = nnx.merge(models.backbone, params["backbone"])
        views = augment.probe_views(field, norm_low, norm_high, size, input_norm=config.data.input_norm)
        channels = views["channels"]  # [B, C, S, S, 1]
        b, c = channels.shape[:2]
        if stacked:
            full = jnp.moveaxis(channels[..., 0], 1, -1)  # [B, S, S, C]
            mean_in = full
            eye = jnp.eye(c, dtype=full.dtype)
            per_channel = (full[:, None] * eye[None, :, None, None, :]).reshape(b * c, size, size, c)
        else:
            mean_in = views["mean"]
            per_channel = channels.reshape(b * c, size, size, 1)
        mean = backbone(mean_in)["x_norm_clstoken"].astype(jnp.float32)
        per = backbone(per_channel)["x_norm_clstoken"].astype(jnp.float32).reshape(b, c, -1)
        return mean, per

    return embed


def _as_arrays(records_or_arrays) -> dict[str, np.ndarray]:
    if isinstance(records_or_arrays, Mapping):
        arrays = {k: np.asarray(records_or_arrays[k]) for k in ("field", "norm_low", "norm_high")
                  if k in records_or_arrays}
    else:
        records = list(records_or_arrays)
        if not records:
            raise ValueError("embed_fields: no fields")
        missing = [k for k in ("field", "norm_low", "norm_high") if k not in records[0]]
        if missing:
            raise ValueError(f"embed_fields: records lack {missing}; keys: {sorted(records[0])}")
        arrays = {k: np.stack([r[k] for r in records]) for k in ("field", "norm_low", "norm_high")}
    if len(arrays) != 3:
        raise ValueError(f"embed_fields: need field, norm_low, norm_high; got {sorted(arrays)}")
    field = arrays["field"]
    if field.ndim != 4:
        raise ValueError(f"embed_fields: field must be [N, C, H, W], got shape {field.shape}")
    n, c = field.shape[:2]
    for k in ("norm_low", "norm_high"):
        if arrays[k].shape != (n, c):
            raise ValueError(f"embed_fields: {k} must be [{n}, {c}], got shape {arrays[k].shape}")
    return {"field": field, "norm_low": arrays["norm_low"].astype(np.float32),
            "norm_high": arrays["norm_high"].astype(np.float32)}


class Embedder:
    """The jitted, batched embedding of fields; compiles once per batch size.

    The last batch is padded (by repeating its last field) to `batch_size`, so
    every call has the same shapes. With several devices the batch is split over
    them when it divides evenly; outputs come back replicated (readable on every
    process).
    """

    def __init__(self, config, models, batch_size: int):
        if batch_size <= 0:
            raise ValueError(f"eval.batch_size: {batch_size} must be positive")
        devices = jax.devices()
        self.batch_size = int(batch_size)
        mesh = jax.make_mesh((len(devices),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=devices)
        spec = jax.P("batch") if self.batch_size % len(devices) == 0 else jax.P()
        self.in_sharding = jax.sharding.NamedSharding(mesh, spec)
        replicated = jax.sharding.NamedSharding(mesh, jax.P())
        self._fn = jax.jit(make_embed_fn(config, models), out_shardings=(replicated, replicated))

    def __call__(self, params, records_or_arrays) -> dict[str, np.ndarray]:
        arrays = _as_arrays(records_or_arrays)
        n, b = len(arrays["field"]), self.batch_size
        means, channels = [], []
        for start in range(0, n, b):
            chunk = {k: v[start:start + b] for k, v in arrays.items()}
            rows = len(chunk["field"])
            if rows < b:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], b - rows, axis=0)]) for k, v in chunk.items()}
            chunk = jax.device_put(chunk, self.in_sharding)
            mean, per = self._fn(params, chunk["field"], chunk["norm_low"], chunk["norm_high"])
            means.append(np.asarray(jax.device_get(mean))[:rows])
            channels.append(np.asarray(jax.device_get(per))[:rows])
        return {"mean": np.concatenate(means), "channels": np.concatenate(channels)}


def embed_fields(params, models, config, records_or_arrays, batch_size: int) -> dict[str, np.ndarray]:
    """CLS embeddings of fields by the backbone of `params` (the trainable tree, e.g. the teacher).

    records_or_arrays: a sequence of records (`field` uint16 [C, H, W], `norm_low`,
    `norm_high` [C]) or a dict of stacked arrays (`field` [N, C, H, W], ...).
    Returns numpy float32 `mean` [N, D] and `channels` [N, C, D] (see make_embed_fn).
    """
    return Embedder(config, models, batch_size)(params, records_or_arrays)


# ----------------------------------------------------------------------------- evaluation sets


class EvalSet:
    """Up to n fields spread evenly over one split: arrays, labels and plate/well metadata."""

    def __init__(self, source, n_fields: int, name: str):
        self.source, self.name = source, name
        n = len(source)
        if n == 0:
            raise ValueError(f"eval: the {name} split has no field")
        take = min(int(n_fields), n)
        self.indices = np.unique(np.linspace(0, n - 1, take).round().astype(np.int64))
        self._arrays = None
        records = self._read()
        self.labels = np.asarray([int(r.get("label", -1)) for r in records], np.int64)
        self.meta = {k: np.asarray([str(r.get(k, "")) for r in records], str) for k in _META}
        arrays = _as_arrays(records)
        if sum(a.nbytes for a in arrays.values()) <= _CACHE_BYTES:
            self._arrays = arrays

    def _read(self) -> list[dict]:
        from dinocell_jax.data.sources import ReadError

        records, failed = [], []
        for i in self.indices:
            try:
                records.append(self.source[int(i)])
            except ReadError as e:
                failed.append(str(e))
        if failed:
            log.warning("eval: %d of %d %s fields unreadable, skipped (first: %s)",
                        len(failed), len(self.indices), self.name, failed[0])
        if not records:
            raise ValueError(f"eval: no readable field in the {self.name} split")
        if hasattr(self, "labels") and len(records) != len(self.labels):
            raise ValueError(f"eval: the {self.name} split changed between reads "
                             f"({len(records)} readable fields, {len(self.labels)} before)")
        return records

    def arrays(self) -> dict[str, np.ndarray]:
        return self._arrays if self._arrays is not None else _as_arrays(self._read())

    def __len__(self) -> int:
        return len(self.labels)


def _labelled(emb: np.ndarray, labels: np.ndarray):
    keep = labels >= 0
    return emb[keep], labels[keep]


def probe_metrics(reference: Mapping[str, np.ndarray], reference_labels: np.ndarray,
                  query: Mapping[str, np.ndarray], query_labels: np.ndarray, *, k: int, seed: int = 0) -> dict:
    """k-NN and linear probe metrics of embeddings (mean [N, D], channels [N, C, D]); unlabelled (-1) rows dropped."""
    out: dict[str, float] = {}
    ref_x, ref_y = _labelled(reference["mean"], reference_labels)
    qry_x, qry_y = _labelled(query["mean"], query_labels)
    out["eval/n_reference"], out["eval/n_query"] = float(len(ref_y)), float(len(qry_y))
    if len(ref_y) == 0 or len(qry_y) == 0 or len(np.unique(ref_y)) < 2:
        log.info("eval: fewer than 2 labelled classes in the reference set; k-NN and linear probes skipped "
                 "(set data.labels_csv for real data)")
        return out
    out["eval/n_classes"] = float(len(np.unique(ref_y)))
    out["eval/knn_top1"] = knn_accuracy(ref_x, ref_y, qry_x, qry_y, k=k)
    out["eval/linear_acc"] = linear_probe_accuracy(ref_x, ref_y, qry_x, qry_y, seed=seed)
    ref_c, _ = _labelled(reference["channels"].reshape(len(reference_labels), -1), reference_labels)
    qry_c, _ = _labelled(query["channels"].reshape(len(query_labels), -1), query_labels)
    out["eval/knn_top1_channel_concat"] = knn_accuracy(ref_c, ref_y, qry_c, qry_y, k=k)
    return out


def make_evaluator(config, models) -> Callable[[Any], dict[str, float]]:
    """evaluator(params) -> metrics; reads the evaluation fields once and compiles once.

    params: the trainable tree (`{"backbone", ...}`, e.g. `state.teacher`). Metric
    keys are listed in the module docstring; all values are Python floats.
    """
    from dinocell_jax.data import pipeline

    e = config.eval
    started = time.perf_counter()
    reference = EvalSet(pipeline.make_source(config, "train"), e.n_fields, "train")
    query = EvalSet(pipeline.make_source(config, "holdout"), e.n_fields, "holdout")
    log.info("eval: %d reference and %d held-out fields read in %.1f s",
             len(reference), len(query), time.perf_counter() - started)
    embedder = Embedder(config, models, e.batch_size)
    channel_names = [c.name for c in channel_list(config.data)]  # the planes' order in a field
    control = negative_control_id(config) if (query.labels >= 0).any() else None

    def evaluator(params) -> dict[str, float]:
        t0 = time.perf_counter()
        ref = embedder(params, reference.arrays())
        qry = embedder(params, query.arrays())
        out = probe_metrics(ref, reference.labels, qry, query.labels, k=e.knn_k, seed=config.seed)
        if qry["channels"].shape[1] >= 2 and len(channel_names) == qry["channels"].shape[1]:
            consistency = channel_consistency(qry["channels"], qry["mean"], channel_names)
            out |= {f"eval/{k}": v for k, v in consistency.items()}
        if control is not None:
            labelled = query.labels >= 0
            profiles, meta = well_profiles(qry["mean"][labelled], query.labels[labelled],
                                           query.meta["plate"][labelled], query.meta["well"][labelled])
            activity = phenotypic_activity(profiles, meta, control, null_size=e.map_null_size, seed=config.seed)
            out |= activity or {}
        out["eval/seconds"] = time.perf_counter() - t0
        return {k: float(v) for k, v in out.items()}

    return evaluator


def evaluate(params, models, config) -> dict[str, float]:
    """All evaluation metrics of `params` (the trainable tree) on the configured data; see make_evaluator."""
    return make_evaluator(config, models)(params)


# ----------------------------------------------------------------------------- command line


def restore_params(config, workdir: str, step: int | None = None, *, random_init: bool = False):
    """(teacher params, step) from `<workdir>/checkpoints` (or a fresh init: the random baseline)."""
    from dinocell_jax import checkpoint as ckpt_lib
    from dinocell_jax import parallel
    from dinocell_jax.ssl import optim
    from dinocell_jax.ssl.schedules import Schedules

    optimizer = optim.make_optimizer(config, Schedules.from_config(config))

    def init(key):
        return step_lib.init_state(config, key, optimizer)

    key = jax.random.key(config.seed)
    mesh = parallel.make_mesh(config)
    abstract = jax.eval_shape(init, key)
    shardings = parallel.state_shardings(abstract, mesh, config)
    if random_init:
        return jax.jit(init, out_shardings=shardings)(key).teacher, 0
    directory = os.path.join(workdir, "checkpoints")
    checkpointer = ckpt_lib.Checkpointer(directory, config)
    try:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"--workdir {workdir}: no checkpoint in {directory} (use --random-init "
                                    "for the untrained baseline)")
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
        state, _, _ = checkpointer.restore(abstract, step)
    finally:
        checkpointer.close()
    return state.teacher, int(jax.device_get(state.step))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dinocell_jax.evaluate --workdir W [--config F] [--config.k=v] [--step N] [--random-init] [--out F]`.

    Prints one JSON line of metrics (with `step`) and writes it to `--out`
    (default `<workdir>/eval/step_<N>.json`, `random_init.json` for the baseline).
    """
    from dinocell_jax import cli
    from dinocell_jax.config import ConfigError

    logging.getLogger("dinocell_jax").setLevel(logging.INFO)  # not Orbax's per-file INFO lines
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config, workdir, rest = cli.parse_known_config(args)
        step = cli.pop_flag(rest, "--step", value=True)
        random_init = cli.pop_flag(rest, "--random-init", value=False)
        out_path = cli.pop_flag(rest, "--out", value=True)
        if rest:
            raise ConfigError(f"{rest[0]}: unknown argument (evaluate takes --workdir, --config, --config.*, "
                              "--step, --random-init, --out)")
        step = None if step is None else int(step)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        params, done = restore_params(config, workdir, step, random_init=random_init)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = {"step": done, "random_init": bool(random_init)}
    metrics |= evaluate(params, step_lib.make_models(config), config)
    out_path = out_path or os.path.join(workdir, "eval", "random_init.json" if random_init else f"step_{done}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    print(json.dumps(metrics, sort_keys=True))
    return 0


if __name__ == "__main__":
    # Here, not in main(): main() also runs inside tests and notebooks that own the handlers.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())
