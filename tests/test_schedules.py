"""Schedules match DINOv2's CosineScheduler / build_schedulers iteration by iteration."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinocell_jax import config as config_lib
from dinocell_jax.ssl.schedules import CosineSchedule, Schedules

dinov2_utils = pytest.importorskip("dinov2.utils.utils")


def _dinov2_schedules(config):
    """DINOv2's build_schedulers, fed our config (peak LR already scaled)."""
    cs = dinov2_utils.CosineScheduler
    o, loss = config.optim, config.loss
    ep = config.train.epoch_length
    total = o.epochs * ep
    lr = dict(
        base_value=config_lib.peak_lr(config), final_value=o.min_lr, total_iters=total,
        warmup_iters=o.warmup_epochs * ep, start_warmup_value=0,
    )
    last = cs(**lr)
    last.schedule[: o.freeze_last_layer_epochs * ep] = 0
    return dict(
        lr=cs(**lr),
        wd=cs(o.weight_decay, o.weight_decay_end, total),
        teacher_momentum=cs(o.momentum_teacher, o.final_momentum_teacher, total),
        teacher_temp=cs(
            loss.teacher_temp, loss.teacher_temp, loss.warmup_teacher_temp_epochs * ep,
            warmup_iters=loss.warmup_teacher_temp_epochs * ep, start_warmup_value=loss.warmup_teacher_temp,
        ),
        last_layer_lr=last,
    )


STEPS = [0, 1, 2, 499, 999, 1000, 1001, 5000, 9998, 9999, 10000, 10001, 30000, 45000, 89998, 89999, 90000, 120000]


def test_default_config_matches_dinov2_cosine_scheduler():
    config = config_lib.base_config()
    ours, ref = Schedules.from_config(config), _dinov2_schedules(config)
    steps = jnp.asarray(STEPS)
    got = {name: np.asarray(jax.jit(jax.vmap(getattr(ours, name)))(steps)) for name in
           ("lr", "wd", "teacher_momentum", "teacher_temp")}
    got["last_layer_lr"] = got["lr"] * np.asarray(jax.vmap(ours.last_layer_lr_mult)(steps))
    for name, values in got.items():
        want = np.array([ref[name][s] for s in STEPS])
        np.testing.assert_allclose(values, want, rtol=2e-5, atol=1e-9, err_msg=name)


def test_reference_numbers():
    config = config_lib.base_config()
    s = Schedules.from_config(config)
    peak = 2e-4 * math.sqrt(80 / 1024)
    assert peak == pytest.approx(5.59e-5, rel=1e-3)  # REFERENCE.md: 5.59e-5 at batch 80
    assert float(s.lr(0)) == 0.0
    assert float(s.lr(9999)) == pytest.approx(peak, rel=1e-6)  # last warmup step reaches the peak
    assert float(s.lr(5000)) == pytest.approx(peak * 5000 / 9999, rel=1e-5)
    assert float(s.lr(90000)) == pytest.approx(1e-6)
    assert float(s.wd(0)) == pytest.approx(0.04) and float(s.wd(90000)) == pytest.approx(0.2)
    assert float(s.wd(45000)) == pytest.approx(0.12, rel=1e-5)  # cosine midpoint
    assert float(s.teacher_momentum(0)) == pytest.approx(0.996)
    assert float(s.teacher_momentum(89999)) == pytest.approx(1.0, abs=1e-6)
    assert float(s.teacher_temp(0)) == pytest.approx(0.04)
    assert float(s.teacher_temp(9999)) == pytest.approx(0.07)
    assert float(s.teacher_temp(50000)) == pytest.approx(0.07)
    assert [float(s.last_layer_lr_mult(i)) for i in (0, 999, 1000, 50000)] == [0.0, 0.0, 1.0, 1.0]
    assert float(s.epoch(2500)) == pytest.approx(2.5)


def test_train_steps_stretch_every_schedule():
    config = config_lib.base_config()
    config.train.steps = 900  # 1/100 of the run: an epoch is 10 iterations
    short, full = Schedules.from_config(config), Schedules.from_config(config_lib.base_config())
    assert short.total_steps == 900 and short.steps_per_epoch == pytest.approx(10.0)
    for name in ("wd", "teacher_momentum"):
        for i in (0, 300, 450, 899):
            assert float(getattr(short, name)(i)) == pytest.approx(float(getattr(full, name)(i * 100)), rel=1e-5)
    assert float(short.lr(99)) == pytest.approx(config_lib.peak_lr(config), rel=1e-6)  # warmup = 10 epochs
    assert float(short.teacher_temp(99)) == pytest.approx(0.07)
    assert float(short.last_layer_lr_mult(9)) == 0.0 and float(short.last_layer_lr_mult(10)) == 1.0


@pytest.mark.parametrize("kw", [dict(warmup=1), dict(warmup=3, freeze=2), dict(warmup=0)])
def test_cosine_schedule_edge_cases_match_dinov2(kw):
    total = 12
    ours = CosineSchedule(1.0, 0.1, total, start=0.5, **kw)
    ref = dinov2_utils.CosineScheduler(
        1.0, 0.1, total, warmup_iters=kw.get("warmup", 0), start_warmup_value=0.5, freeze_iters=kw.get("freeze", 0)
    )
    for i in range(total + 3):
        assert float(ours(i)) == pytest.approx(ref[i], rel=1e-6, abs=1e-7), i


def test_schedule_rejects_warmup_longer_than_run():
    with pytest.raises(ValueError, match="warmup"):
        CosineSchedule(1.0, 0.0, 5, warmup=6)
