"""The whole training step learns: on two visually distinct kinds of field, DINO separates them.

A guard against a step that runs and stays finite but cannot learn (targets or
gradients wired wrong): 120 steps on fields that differ only in where a bright
block sits. With DINOv1-style stabilisers (momentum centering, weight-normed
prototypes, no LayerScale, teacher temperature 0.04) the DINO loss falls well
below ln(K) and teacher features of the two kinds move apart.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dinocell_jax.data import augment
from dinocell_jax.ssl import step as step_lib
from test_step import _setup
from tiny import tiny_config

STEPS = 120


def _fields(config, step, rng):
    b, f = config.train.batch_size, config.data.field_size
    fields = rng.integers(900, 1100, (b, 5, f, f)).astype(np.uint16)
    kind = np.arange(b) % 2
    for i in range(b):
        rows, cols = (slice(0, f // 2), slice(0, f // 2)) if kind[i] else (slice(f // 2, f), slice(f // 2, f))
        fields[i, :, rows, cols] += 5000
    return {
        "field": fields,
        "norm_low": np.full((b, 5), 800.0, np.float32),
        "norm_high": np.full((b, 5), 7000.0, np.float32),
        "masks": step_lib.host_masks(config, step, step_lib.device_group_size(config, 1)),
    }, kind


def test_dino_separates_two_kinds_of_field():
    config = tiny_config(**{
        "train.steps": STEPS, "optim.epochs": 30, "optim.warmup_epochs": 1, "optim.lr": 1e-3,
        "optim.scaling_rule": "none", "optim.momentum_teacher": 0.99,
        "model.embed_dim": 64, "model.num_heads": 4, "model.layerscale": 0.0,
        "heads.out_dim": 256, "heads.hidden_dim": 256, "heads.bottleneck_dim": 64,
        "heads.weight_norm_last_layer": True, "loss.centering": "centering",
        "loss.teacher_temp": 0.04, "loss.warmup_teacher_temp": 0.04,
        "data.strategy": "average", "crops.global_scale": (0.6, 1.0), "crops.flip_p": 0.0, "crops.rot90": False,
        "crops.blur_p_global": (0.0, 0.0), "crops.blur_p_local": 0.0, "crops.solarize_p": 0.0, "crops.jitter_p": 0.0,
    })
    _, state, _, _, fn = _setup(config, jax.devices()[:1])
    step = jax.jit(fn)
    rng = np.random.default_rng(0)
    losses = []
    for i in range(STEPS):
        batch, kind = _fields(config, i, rng)
        state, metrics = step(state, jax.device_put(batch))
        losses.append(float(metrics["loss/dino"]))
    assert np.mean(losses[-10:]) < np.log(config.heads.out_dim) - 0.25, losses[-10:]

    models = step_lib.make_models(config)
    backbone = nnx.merge(models.backbone, state.teacher["backbone"])
    views = augment.probe_views(jnp.asarray(batch["field"]), batch["norm_low"], batch["norm_high"],
                                config.crops.global_size)["mean"]
    cls = backbone(views)["x_norm_clstoken"]
    z = np.asarray(cls / jnp.linalg.norm(cls, axis=-1, keepdims=True))
    between = (z[kind == 0] @ z[kind == 1].T).mean()
    within = (z[kind == 0] @ z[kind == 0].T).mean()
    assert between < 0.95 < within, (between, within)
