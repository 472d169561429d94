"""Per-iteration schedules: learning rate, weight decay, teacher momentum and temperature.

The shapes follow DINOv2's `CosineScheduler` (dinov2/utils/utils.py) and
`build_schedulers` (dinov2/train/train.py) exactly, as functions of the integer
step instead of precomputed arrays, so they trace inside `jax.jit`:

- a schedule of `total` iterations is `[freeze zeros] + linspace(start, base,
  warmup) + cosine(base -> final)`; at or past `total` it is `final`;
- `linspace` includes its end point, so the warmup reaches `base` at its last
  iteration (step `warmup - 1`) and the cosine starts again from `base`.

An "epoch" is `config.steps_per_epoch(config)` iterations (`train.epoch_length`
unless `train.steps` overrides the run length), so every schedule stretches or
shrinks with `train.steps`. Iteration counts are rounded to whole steps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dinocell_jax import config as config_lib


def _steps(epochs: float, steps_per_epoch: float) -> int:
    return int(round(epochs * steps_per_epoch))


@dataclasses.dataclass(frozen=True)
class CosineSchedule:
    """DINOv2's CosineScheduler as a traceable function of the step.

    Fields are plain Python numbers (static under jit).
    """

    base: float
    final: float
    total: int
    warmup: int = 0
    start: float = 0.0
    freeze: int = 0

    def __post_init__(self):
        if not 0 <= self.freeze + self.warmup <= self.total:
            raise ValueError(
                f"CosineSchedule: freeze {self.freeze} + warmup {self.warmup} iterations "
                f"do not fit in total {self.total}"
            )

    def __call__(self, step) -> jax.Array:
        """step: int scalar (Python or traced) -> float32 scalar."""
        step = jnp.asarray(step, jnp.float32)
        # linspace(start, base, W)[i] = start + (base - start) * i / (W - 1); W == 1 gives [start].
        warm = self.start + (self.base - self.start) * (step - self.freeze) / max(self.warmup - 1, 1)
        n_cos = self.total - self.warmup - self.freeze
        i = step - self.freeze - self.warmup
        cos = self.final + 0.5 * (self.base - self.final) * (1.0 + jnp.cos(math.pi * i / max(n_cos, 1)))
        value = jnp.where(i < 0, warm, cos)
        value = jnp.where(step < self.freeze, 0.0, value)
        return jnp.where(step >= self.total, self.final, value).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Schedules:
    """Every schedule of a run; each `f(step) -> float32 scalar` traces under jit.

    `step` is the 0-based iteration whose update is being computed (DINOv2
    reads `schedule[it]` before `optimizer.step()` of iteration `it`).
    """

    total_steps: int
    steps_per_epoch: float
    lr_schedule: CosineSchedule
    wd_schedule: CosineSchedule
    momentum_schedule: CosineSchedule
    teacher_temp_schedule: CosineSchedule
    freeze_last_layer_steps: int

    @classmethod
    def from_config(cls, config) -> "Schedules":
        total = config_lib.total_steps(config)
        spe = config_lib.steps_per_epoch(config)
        o, loss = config.optim, config.loss
        warmup = min(_steps(o.warmup_epochs, spe), total)
        temp_steps = _steps(loss.warmup_teacher_temp_epochs, spe)
        return cls(
            total_steps=total,
            steps_per_epoch=spe,
            # peak from the batch-size scaling rule; min_lr is not scaled (DINOv2 apply_scaling_rules_to_cfg).
            lr_schedule=CosineSchedule(config_lib.peak_lr(config), o.min_lr, total, warmup=warmup, start=0.0),
            wd_schedule=CosineSchedule(o.weight_decay, o.weight_decay_end, total),
            momentum_schedule=CosineSchedule(o.momentum_teacher, o.final_momentum_teacher, total),
            # DINOv2: total = warmup = warmup_teacher_temp_epochs, so the value is constant afterwards.
            teacher_temp_schedule=CosineSchedule(
                loss.teacher_temp, loss.teacher_temp, temp_steps, warmup=temp_steps, start=loss.warmup_teacher_temp
            ),
            freeze_last_layer_steps=_steps(o.freeze_last_layer_epochs, spe),
        )

    def lr(self, step) -> jax.Array:
        """Base learning rate (before layer-wise and last-layer multipliers), float32 []."""
        return self.lr_schedule(step)

    def wd(self, step) -> jax.Array:
        """Base weight decay (before the per-parameter mask), float32 []."""
        return self.wd_schedule(step)

    def teacher_momentum(self, step) -> jax.Array:
        """EMA momentum m of `teacher = m * teacher + (1 - m) * student`, float32 []."""
        return self.momentum_schedule(step)

    def teacher_temp(self, step) -> jax.Array:
        """Teacher softmax / Sinkhorn-Knopp temperature, float32 []."""
        return self.teacher_temp_schedule(step)

    def last_layer_lr_mult(self, step) -> jax.Array:
        """0 during the first `optim.freeze_last_layer_epochs` epochs, then 1; float32 []."""
        return jnp.where(jnp.asarray(step) < self.freeze_last_layer_steps, 0.0, 1.0).astype(jnp.float32)

    def epoch(self, step) -> jax.Array:
        """Fractional schedule epoch of a step (the `training/epoch` metric), float32 []."""
        return (jnp.asarray(step, jnp.float32) / self.steps_per_epoch).astype(jnp.float32)
