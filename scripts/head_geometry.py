"""Why a run's DINO loss sits at ln K: the geometry of the teacher's head over training.

    python scripts/head_geometry.py --config configs/demo.py --steps 300 --every 50
    python scripts/head_geometry.py --config configs/demo.py --steps 300 \
        --config.model.layerscale=0.0 --config.heads.weight_norm_last_layer=True

Runs the real jitted step on one device over synthetic fields and, every
`--every` steps, measures on a fixed probe batch (global crop 1 and 2 of the
same fields) with the teacher's weights:

- `cls_spread`: relative spread of the backbone CLS across fields, |c - mean| / |c|;
- `z_spread`: spread of the unit-norm head output z around its mean;
- `logit_spread_fields`: std of each prototype's logit across fields (what the
  Sinkhorn / centring targets keep: ~0 means uniform targets);
- `logit_spread_prototypes`: std of each field's logits across prototypes (what
  makes the student's softmax non-uniform);
- `cross_entropy`, `target_entropy`: crop 2's targets against crop 1's student
  softmax, and the targets' entropy, against `ln_k`.

A head that starts with ~0 spread across fields gets uniform targets from step
0; docs/BENCHMARKS.md ("Does pretraining learn?") reads these numbers. One JSON
line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dinocell_jax import cli  # noqa: E402
from dinocell_jax.data import augment  # noqa: E402
from dinocell_jax.data.normalize import intensity_bounds  # noqa: E402
from dinocell_jax.data.synthetic import SyntheticCellPainting  # noqa: E402
from dinocell_jax.ssl import losses, optim  # noqa: E402
from dinocell_jax.ssl import step as step_lib  # noqa: E402
from dinocell_jax.ssl.schedules import Schedules  # noqa: E402


def _batch(config, data, rng, step):
    b = config.train.batch_size
    fields = np.stack([data[int(i)]["field"] for i in rng.integers(0, len(data), b)])
    low, high = zip(*(intensity_bounds(f) for f in fields))
    return {"field": fields, "norm_low": np.stack(low), "norm_high": np.stack(high),
            "masks": step_lib.host_masks(config, step, b)}


def _spread(x):
    """Mean distance of the rows of x [N, D] from their mean, relative to their norm."""
    return jnp.mean(jnp.linalg.norm(x - x.mean(0), axis=-1) / jnp.linalg.norm(x, axis=-1))


def make_geometry(config, models, probe_crops):
    """Jitted params -> dict of the measures in the module docstring."""
    lc = config.loss

    @jax.jit
    def geometry(params, teacher_temp):
        backbone, dino_head, _ = models.merge(params)
        cls_1 = backbone(probe_crops[0])["x_norm_clstoken"]
        z_1 = dino_head.project(cls_1)
        z_2 = dino_head.project(backbone(probe_crops[1])["x_norm_clstoken"])
        logits_1, logits_2 = dino_head.prototypes(z_1), dino_head.prototypes(z_2)
        if lc.centering == "sinkhorn_knopp":
            targets = losses.sinkhorn_knopp(logits_2, teacher_temp)
        else:  # the centre is the running mean; a probe batch has none, so centre on itself
            targets = losses.softmax_centered(logits_2, logits_2.mean(0, keepdims=True), teacher_temp)
        log_student = jax.nn.log_softmax(logits_1 / lc.student_temp, axis=-1)
        return {
            "cls_spread": _spread(cls_1),
            "z_spread": jnp.mean(jnp.linalg.norm(z_1 - z_1.mean(0), axis=-1)),
            "logit_spread_fields": jnp.mean(jnp.std(logits_1, axis=0)),
            "logit_spread_prototypes": jnp.mean(jnp.std(logits_1, axis=1)),
            "cross_entropy": -jnp.mean(jnp.sum(targets * log_student, axis=-1)),
            "target_entropy": -jnp.mean(jnp.sum(targets * jnp.log(jnp.maximum(targets, 1e-30)), axis=-1)),
        }

    return geometry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    args, rest = parser.parse_known_args(argv)
    config, _ = cli.parse_config(rest)
    config.wandb.enabled = False

    models = step_lib.make_models(config)
    schedules = Schedules.from_config(config)
    optimizer = optim.make_optimizer(config, schedules)
    state = jax.jit(lambda k: step_lib.init_state(config, k, optimizer))(jax.random.key(config.seed))
    step = jax.jit(step_lib.make_train_step(config, models, optimizer, schedules, 1), donate_argnums=0)

    data = SyntheticCellPainting(100_000, config.data.field_size, n_phenotypes=config.data.n_phenotypes,
                                 seed=config.seed, phenotypes=config.data.phenotypes)
    rng = np.random.default_rng(config.seed)
    probe = _batch(config, data, np.random.default_rng(config.seed + 1), 0)
    views = augment.make_views(jax.random.key(1), probe["field"], probe["norm_low"], probe["norm_high"],
                               augment.AugmentConfig.from_config(config))
    geometry = make_geometry(config, models, views["global_crops"])
    ln_k = float(np.log(config.heads.out_dim))

    def report(i, metrics):
        row = {"step": i, "ln_k": round(ln_k, 4)}
        row.update({k: round(float(v), 5) for k, v in metrics.items()})
        row.update({k: round(float(v), 5) for k, v in
                    jax.device_get(geometry(state.teacher, schedules.teacher_temp(i))).items()})
        print(json.dumps(row), flush=True)
        return row

    rows = [report(0, {})]
    for i in range(args.steps):
        state, metrics = step(state, _batch(config, data, rng, i))
        if (i + 1) % args.every == 0 or i + 1 == args.steps:
            m = jax.device_get(metrics)
            rows.append(report(i + 1, {k: m[k] for k in ("loss/dino", "loss/ibot", "loss/koleo")}))
    return rows


if __name__ == "__main__":
    main()
