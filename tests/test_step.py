"""The jitted training step: device-count invariance, one compile, finite updates."""


import chex
import jax
import numpy as np
import pytest

from dinocell_jax import parallel
from dinocell_jax.data.normalize import intensity_bounds
from dinocell_jax.data.synthetic import SyntheticCellPainting
from dinocell_jax.ssl import optim
from dinocell_jax.ssl import step as step_lib
from dinocell_jax.ssl.schedules import Schedules
from tiny import tiny_config


def _host_batch(config, step):
    data = SyntheticCellPainting(num_fields=64, field_size=config.data.field_size, seed=1)
    rows = [data[(step * config.train.batch_size + i) % len(data)] for i in range(config.train.batch_size)]
    fields = np.stack([r["field"] for r in rows])
    bounds = [intensity_bounds(f) for f in fields]
    return {
        "field": fields,
        "norm_low": np.stack([b[0] for b in bounds]),
        "norm_high": np.stack([b[1] for b in bounds]),
        "masks": step_lib.host_masks(config, step, step_lib.device_group_size(config, 1)),
    }


def _setup(config, devices):
    mesh = parallel.make_mesh(config, devices)
    models = step_lib.make_models(config)
    schedules = Schedules.from_config(config)
    optimizer = optim.make_optimizer(config, schedules)
    abstract, init = step_lib.sharded_init(config, optimizer, mesh)
    shardings = step_lib.shardings_of(abstract)
    state = init(jax.random.key(0))
    batch_sh = parallel.batch_sharding(mesh)
    fn = step_lib.make_train_step(config, models, optimizer, schedules, len(devices))
    return mesh, state, shardings, batch_sh, fn


def _run(config, devices, n_steps):
    mesh, state, shardings, batch_sh, fn = _setup(config, devices)
    step = jax.jit(fn, in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0)
    history = []
    for i in range(n_steps):
        batch = jax.device_put(_host_batch(config, i), batch_sh)
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def test_eight_devices_equal_one_device():
    # KoLeo groups are fixed-size and drop path (whose subsets are per device
    # under a mesh, as DINOv2's per GPU) is off: the rest must not depend on layout.
    config = tiny_config(**{"model.drop_path_rate": 0.0})
    state8, hist8 = _run(config, jax.devices(), 2)
    state1, hist1 = _run(config, jax.devices()[:1], 2)
    for a, b in zip(hist8, hist1):
        for key in ("loss/dino", "loss/ibot", "loss/koleo", "loss/total"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-6, err_msg=key)
    chex.assert_trees_all_close(state8.student, state1.student, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(state8.teacher, state1.teacher, rtol=1e-4, atol=1e-6)


def test_step_compiles_once_losses_are_finite_and_a_nonfinite_step_is_skipped():
    config = tiny_config()
    mesh, state, shardings, batch_sh, fn = _setup(config, jax.devices())
    traced = chex.assert_max_traces(fn, n=1)
    step = jax.jit(traced, in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0)
    for i in range(3):
        state, metrics = step(state, jax.device_put(_host_batch(config, i), batch_sh))
    metrics = jax.device_get(metrics)
    assert int(state.step) == 3
    for key in ("loss/dino", "loss/ibot", "loss/koleo", "loss/total", "gradients/global_norm"):
        assert np.isfinite(metrics[key]), key
    # DINO + iBOT + KoLeo with the recipe's weights make the total.
    np.testing.assert_allclose(
        metrics["loss/total"], metrics["loss/dino"] + metrics["loss/ibot"] + metrics["loss/koleo"], rtol=1e-5
    )
    # The DINO loss of K prototypes starts near log(K) (uniform teacher and student).
    assert 0.5 * np.log(64) < metrics["loss/dino"] < 1.5 * np.log(64)

    # A batch that makes the loss NaN: the same executable skips the update, counts the step.
    batch = _host_batch(config, 3)
    batch["norm_low"] = np.full_like(batch["norm_low"], np.nan)  # NaN crops -> NaN loss
    before = jax.device_get(state)
    after, metrics = step(state, jax.device_put(batch, batch_sh))
    after = jax.device_get(after)
    assert int(metrics["training/nonfinite"]) == 1
    chex.assert_trees_all_equal(before.student, after.student)
    chex.assert_trees_all_equal(before.teacher, after.teacher)
    assert int(after.step) == 4


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_both_teacher_target_modes_run(centering):
    config = tiny_config(**{"loss.centering": centering, "heads.separate_ibot_head": centering == "centering"})
    _, hist = _run(config, jax.devices(), 1)
    assert np.isfinite(hist[0]["loss/total"])


def test_masked_tokens_gathered_on_each_device():
    # One device group per device (the default group size): each device gathers its own
    # masked tokens, with no collective, into the same buffer the reference (a gather
    # per group, no mesh) builds.
    group, n_devices, n_patches, dim = 2, 8, 16, 4
    rng = np.random.default_rng(0)
    rows = 2 * group * n_devices
    tokens = rng.standard_normal((rows, n_patches, dim)).astype(np.float32)
    masks = rng.random((rows, n_patches)) < 0.3
    upper = int(masks.reshape(n_devices, -1).sum(1).max())
    want = step_lib._gather_masked_by_group(tokens, masks, group, upper)
    mesh = jax.make_mesh((n_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.NamedSharding(mesh, jax.P("data"))
    gather = jax.jit(lambda t, m: step_lib._gather_masked_by_group(t, m, group, upper))
    with jax.set_mesh(mesh):
        t, m = jax.device_put(tokens, sharding), jax.device_put(masks, sharding)
        got = gather(t, m)
        hlo = gather.lower(t, m).compile().as_text()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert got[0].sharding.spec[0] is not None  # the buffer stays split over the devices
    for collective in ("all-reduce", "all-gather", "all-to-all", "collective-permute"):
        assert collective not in hlo, collective


def test_group_rows_keep_each_group_together_and_invert():
    """Rows are DINOv2's per-GPU collate: group by group, crop-major inside a group;
    one group is the plain crop-major flatten (the layout XLA keeps row-major on GPU)."""
    crops, batch, groups = 3, 8, 4
    x = np.arange(crops * batch).reshape(crops, batch, 1)  # value = crop * batch + sample
    rows = np.asarray(step_lib.to_group_rows(x, groups))[:, 0]
    per_group = batch // groups
    for g in range(groups):
        block = rows[g * crops * per_group:(g + 1) * crops * per_group].reshape(crops, per_group)
        np.testing.assert_array_equal(block % batch, np.tile(np.arange(g * per_group, (g + 1) * per_group), (crops, 1)))
        np.testing.assert_array_equal(block // batch, np.repeat(np.arange(crops)[:, None], per_group, 1))
    np.testing.assert_array_equal(step_lib.from_group_rows(step_lib.to_group_rows(x, groups), crops, groups), x)
    np.testing.assert_array_equal(step_lib.to_group_rows(x, 1), x.reshape(crops * batch, 1))


@pytest.mark.parametrize("group", [4, 16])  # four device groups of 4 images; one group
def test_dino_pairs_each_student_crop_with_the_other_crops_of_its_own_image(group):
    """The DINO loss of `ssl_loss`, whatever the row order inside, is DINOv2's written
    per crop: student global crop A against teacher crop B of the same image (and B
    against A), every local crop against both teacher crops."""
    import jax.numpy as jnp

    # Sharp temperatures: a fresh head's logits differ little between images, and a
    # mispaired loss must differ by more than rounding.
    config = tiny_config(**{"model.drop_path_rate": 0.0, "loss.student_temp": 0.002})
    b, n_local, temp = config.train.batch_size, config.crops.n_local, 0.002
    models = step_lib.make_models(config)
    state = step_lib.init_state(config, jax.random.key(0), optim.make_optimizer(config, Schedules.from_config(config)))
    rng = np.random.default_rng(0)
    g, s, c = config.crops.global_size, config.crops.local_size, step_lib.input_channels(config)
    views = {"global_crops": jnp.asarray(rng.normal(size=(2, b, g, g, c)), jnp.float32),
             "local_crops": jnp.asarray(rng.normal(size=(n_local, b, s, s, c)), jnp.float32)}
    n = (g // config.model.patch_size) ** 2
    _, (metrics, _) = step_lib.ssl_loss(state.student, state.teacher, state.center, views,
                                        jnp.zeros((b, 2, n), bool), {"teacher": temp}, models, config, None, group)

    backbone_t, dino_t, _ = models.merge(state.teacher)
    backbone_s, dino_s, _ = models.merge(state.student)
    teacher = [dino_t(backbone_t(x)["x_norm_clstoken"]) for x in views["global_crops"]]
    # Row i*B + j: the target for student crop i of image j, from teacher crop 1 - i.
    targets, _ = step_lib._teacher_targets(config, jnp.concatenate(teacher[::-1]), temp, state.center["dino"])
    t = targets.probs().reshape(2, b, -1)

    def ce(student_logits, target):
        log_p = jax.nn.log_softmax(student_logits / config.loss.student_temp, axis=-1)
        return -jnp.mean(jnp.sum(target * log_p, axis=-1))

    s_global = [dino_s(backbone_s(x)["x_norm_clstoken"]) for x in views["global_crops"]]
    s_local = [dino_s(backbone_s(x)["x_norm_clstoken"]) for x in views["local_crops"]]
    expected = (sum(ce(s_global[i], t[i]) for i in range(2))
                + sum(ce(sl, t[i]) for sl in s_local for i in range(2))) / (2 + 2 * n_local)
    np.testing.assert_allclose(metrics["loss/dino"], expected, rtol=1e-5)
