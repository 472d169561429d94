"""Parity of the objective with DINOv2's own losses (torch CPU), and its distributed form."""

import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.distributed as dist
from dinov2.loss import DINOLoss, iBOTPatchLoss, KoLeoLoss
from jax.sharding import AxisType, NamedSharding

from dinocell_jax.ssl import losses, masking

# DINOv2's KoLeoLoss uses the deprecated torch.cuda.amp.autocast.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.cuda.amp.autocast:FutureWarning")

SEEDS = (0, 1, 2)
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", autouse=True)
def _gloo_group():
    """DINOv2's iBOT Sinkhorn-Knopp calls all_reduce unconditionally: a 1-process group."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _logits(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _t(x):
    return torch.from_numpy(np.array(x))


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


# ---- DINO (CLS) loss ---------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_centering_matches_dinov2_over_steps(seed):
    """Targets and centre follow DINOLoss's lazy (reduce now, apply at next use) update."""
    rng = np.random.default_rng(seed)
    k, temp, momentum = 128, 0.05, 0.9
    ref = DINOLoss(k, center_momentum=momentum)
    center = jnp.zeros((1, k), jnp.float32)
    for _ in range(3):
        z = _logits(rng, 12, k) + 0.5  # a non-zero mean so the centre moves
        want = ref.softmax_center_teacher(_t(z), teacher_temp=temp).numpy()
        ref.update_center(_t(z))
        got = losses.softmax_centered(z, center, temp)
        np.testing.assert_allclose(got, want, **TOL)
        center = losses.update_center(center, z, momentum)
    ref.apply_center_update()
    np.testing.assert_allclose(center, ref.center.numpy(), **TOL)
    assert np.abs(np.asarray(center)).max() > 0.1


@pytest.mark.parametrize("seed", SEEDS)
def test_sinkhorn_matches_dinov2(seed):
    rng = np.random.default_rng(seed)
    z = _logits(rng, 24, 256, scale=0.1)
    for temp in (0.04, 0.07):
        want = DINOLoss(256).sinkhorn_knopp_teacher(_t(z), temp).numpy()
        got = losses.sinkhorn_knopp(jnp.asarray(z), temp)
        np.testing.assert_allclose(got, want, **TOL)
        np.testing.assert_allclose(np.sum(got, axis=1), 1.0, rtol=1e-5)
        # 3 iterations leave prototypes almost, not exactly, equally used.
        np.testing.assert_allclose(np.sum(got, axis=0), 24 / 256, rtol=0.05)


def _sinkhorn_reference_f64(z, temp, n_iterations=3):
    """REFERENCE.md's Sinkhorn-Knopp written out literally, in float64."""
    q = np.exp(z.astype(np.float64) / temp).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def test_sinkhorn_safe_for_large_logits():
    """DINOv2's exp(z/t) overflows for z/t > 88; a global shift is exact, and we never overflow."""
    rng = np.random.default_rng(3)
    z = _logits(rng, 16, 128, scale=0.1)
    temp = 0.04
    ref = DINOLoss(128)
    want = ref.sinkhorn_knopp_teacher(_t(z), temp).numpy()
    # Subtracting the global maximum leaves DINOv2's own result unchanged...
    np.testing.assert_allclose(ref.sinkhorn_knopp_teacher(_t(z - z.max()), temp).numpy(), want, **TOL)
    # ...and adding 50 (z/t ~ 1250) breaks it, but not us. (z + 50 rounds z in fp32;
    # subtracting 50 again is exact, so DINOv2 sees the same rounded logits.)
    big = z + np.float32(50.0)
    assert not np.isfinite(ref.sinkhorn_knopp_teacher(_t(big), temp).numpy()).all()
    want_big = ref.sinkhorn_knopp_teacher(_t(big - np.float32(50.0)), temp).numpy()
    np.testing.assert_allclose(losses.sinkhorn_knopp(jnp.asarray(big), temp), want_big, **TOL)
    # Logits spread over z/t in [-300, 300]: beyond fp32 exp, within float64 exp.
    wide = _logits(rng, 16, 128, scale=4.0)
    assert np.abs(wide / temp).max() > 200
    got = np.asarray(losses.sinkhorn_knopp(jnp.asarray(wide), temp))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _sinkhorn_reference_f64(wide, temp), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_dino_cross_entropy_matches_dinov2(seed):
    rng = np.random.default_rng(seed)
    s = _logits(rng, 4, 6, 64)
    t = np.asarray(jax.nn.softmax(_logits(rng, 2, 6, 64) / 0.05, axis=-1))
    ref = DINOLoss(64, student_temp=0.1)
    want = ref(list(_t(s)), list(_t(t))).item()
    got = losses.dino_cross_entropy(jnp.asarray(s, jnp.bfloat16), t, 0.1)
    s_bf16 = np.asarray(jnp.asarray(s, jnp.bfloat16).astype(jnp.float32))
    want_bf16 = ref(list(_t(s_bf16)), list(_t(t))).item()
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want_bf16, rtol=1e-5)
    np.testing.assert_allclose(losses.dino_cross_entropy(s, t, 0.1), want, rtol=1e-5)


def test_dino_cross_entropy_gradient_matches_dinov2():
    rng = np.random.default_rng(7)
    s = _logits(rng, 3, 5, 32)
    t = np.asarray(jax.nn.softmax(_logits(rng, 2, 5, 32), axis=-1))
    s_t = _t(s).requires_grad_(True)
    DINOLoss(32)(list(s_t), list(_t(t))).backward()
    got = jax.grad(losses.dino_cross_entropy)(jnp.asarray(s), t, 0.1)
    np.testing.assert_allclose(got, s_t.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_dino_cross_entropy_never_builds_pairs():
    """No intermediate of S x T x B x K elements: memory stays at one crop stack."""
    S, T, B, K = 4, 2, 3, 64
    jaxpr = jax.make_jaxpr(losses.dino_cross_entropy, static_argnums=2)(
        jnp.zeros((S, B, K)), jnp.zeros((T, B, K)), 0.1
    )
    largest = max(np.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars)
    assert largest == S * B * K < S * T * B * K


# ---- iBOT (masked patch) loss -------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_ibot_sinkhorn_and_loss_match_dinov2(seed):
    """Static buffer with padding == DINOv2's dynamic slice of the first n_masked rows."""
    rng = np.random.default_rng(seed)
    n_images, grid, k, temp = 8, (6, 6), 96, 0.05
    masks = masking.sample_batch_masks(rng, n_images, grid)
    upper = masking.masked_upperbound(n_images, 36)
    n = int(masks.sum())
    assert 0 < n < upper
    tokens = jnp.zeros((n_images, 36, 4))
    _, weights, valid, _ = masking.gather_masked(tokens, masks, upper)
    teacher = _logits(rng, upper, k, scale=0.2)
    student = _logits(rng, upper, k)
    teacher[n:] = 1e4  # padding must not leak into any sum
    student[n:] = np.nan  # nor into the loss

    ref = iBOTPatchLoss(k, student_temp=0.1)
    want_probs = ref.sinkhorn_knopp_teacher(_t(teacher[:n]), temp, torch.tensor([n])).numpy()
    got_probs = np.asarray(losses.sinkhorn_knopp(jnp.asarray(teacher), temp, valid=valid))
    np.testing.assert_allclose(got_probs[:n], want_probs, **TOL)
    assert (got_probs[n:] == 0).all()

    want = ref.forward_masked(
        _t(student[:n]), _t(want_probs), student_masks_flat=_t(masks), n_masked_patches=n
    ).item()
    got = losses.ibot_loss(jnp.asarray(student), got_probs, weights, n_images, 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ---- factored targets and the fused iBOT loss ----------------------------------


def _garbage_padded(seed, m=48, k=160):
    """A static buffer: teacher logits bf16, student fp32, padded rows full of garbage."""
    rng = np.random.default_rng(seed)
    valid = rng.random(m) < 0.7
    valid[:2] = True
    garbage = np.array([np.nan, np.inf, -np.inf, 1e4], np.float32)[np.arange(m) % 4, None]
    teacher = _logits(rng, m, k, scale=0.3)
    teacher[~valid] = garbage[~valid]
    student = _logits(rng, m, k, scale=2.0)
    student[~valid] = garbage[::-1][~valid]
    teacher = jnp.asarray(teacher, jnp.bfloat16)
    weights = np.where(valid, rng.uniform(0.02, 0.5, m), 0.0).astype(np.float32)
    return teacher, student, weights, valid


def test_logsumexp_last_matches_two_pass():
    rng = np.random.default_rng(0)
    x = _logits(rng, 6, 3000, scale=30.0)
    x[1] = -np.inf
    x[2, :100] = -np.inf
    x[3, 7] = np.inf
    peak, log_total = losses._logsumexp_last(jnp.asarray(x))
    want = np.asarray(jax.nn.logsumexp(jnp.asarray(x), axis=-1))
    np.testing.assert_allclose(peak + log_total, want, rtol=1e-6)
    np.testing.assert_array_equal(peak, x.max(axis=1))


@pytest.mark.parametrize("seed", SEEDS)
def test_factored_sinkhorn_matches_dinov2_from_bf16(seed):
    """The logits are kept bf16 (no fp32 copy); the probabilities are DINOv2's on their values."""
    teacher, _, _, valid = _garbage_padded(seed)
    temp = 0.05
    targets = losses.sinkhorn_targets(teacher, temp, valid=valid)
    assert targets.logits.dtype == jnp.bfloat16
    assert np.isneginf(np.asarray(targets.log_row)[~valid]).all()
    z = np.asarray(teacher.astype(jnp.float32))[valid]
    want = DINOLoss(teacher.shape[1]).sinkhorn_knopp_teacher(_t(z), temp).numpy()
    got = np.asarray(targets.probs())
    np.testing.assert_allclose(got[valid], want, **TOL)
    assert (got[~valid] == 0).all()
    np.testing.assert_array_equal(losses.sinkhorn_knopp(teacher, temp, valid=valid), got)


def test_factored_centering_matches_dinov2_with_padding():
    teacher, _, _, valid = _garbage_padded(5)
    k, temp = teacher.shape[1], 0.05
    center = jnp.asarray(_logits(np.random.default_rng(1), 1, k, scale=0.2))
    ref = DINOLoss(k)
    ref.center = _t(center)
    z = np.asarray(teacher.astype(jnp.float32))[valid]
    want = ref.softmax_center_teacher(_t(z), teacher_temp=temp).numpy()
    got = np.asarray(losses.centered_targets(teacher, center, temp, valid=valid).probs())
    np.testing.assert_allclose(got[valid], want, **TOL)
    assert (got[~valid] == 0).all()


def _both_targets(teacher, valid):
    center = jnp.asarray(_logits(np.random.default_rng(9), 1, teacher.shape[1], scale=0.2))
    return {
        "sinkhorn": losses.sinkhorn_targets(teacher, 0.05, valid=valid),
        "centering": losses.centered_targets(teacher, center, 0.05, valid=valid),
    }


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["sinkhorn", "centering"])
def test_fused_ibot_loss_and_gradient_match_unfused(seed, mode):
    """Same value and student gradient as ibot_loss on the materialised targets; padded
    rows (garbage logits, zero weight) and a zero-weight valid row give exactly 0."""
    teacher, student, weights, valid = _garbage_padded(seed)
    student[1] = np.nan
    weights[1] = 0.0  # a real row dropped by its weight
    targets = _both_targets(teacher, valid)[mode]
    fused = jax.value_and_grad(lambda s: losses.ibot_loss(s, targets, weights, 8, 0.1))
    dense = jax.value_and_grad(lambda s: losses.ibot_loss(s, targets.probs(), weights, 8, 0.1))
    value, grad = fused(jnp.asarray(student))
    want, want_grad = dense(jnp.asarray(student))
    np.testing.assert_allclose(value, want, rtol=1e-6)
    grad, want_grad = np.asarray(grad), np.asarray(want_grad)
    live = weights != 0
    # atol: 1e-6 of the largest gradient (the dense reference rounds as much).
    np.testing.assert_allclose(grad[live], want_grad[live], rtol=1e-5, atol=1e-6 * np.abs(want_grad[live]).max())
    assert (grad[~live] == 0).all()
    # A row without a target contributes nothing even with a weight.
    weighted_padding = np.where(valid, weights, 0.3).astype(np.float32)
    value2, grad2 = jax.value_and_grad(lambda s: losses.ibot_loss(s, targets, weighted_padding, 8, 0.1))(
        jnp.asarray(student)
    )
    assert value2 == value
    np.testing.assert_array_equal(grad2, grad)


def test_fused_ibot_loss_bf16_student():
    """bf16 logits go in as they are and get a bf16 gradient; fp32 inside."""
    teacher, student, weights, valid = _garbage_padded(1)
    targets = _both_targets(teacher, valid)["sinkhorn"]
    s16 = jnp.asarray(student, jnp.bfloat16)

    def loss(s):
        return losses.ibot_loss(s, targets, weights, 8, 0.1)

    value, grad = jax.value_and_grad(loss)(s16)
    want, want_grad = jax.value_and_grad(loss)(s16.astype(jnp.float32))
    assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), want_grad, rtol=1e-2, atol=1e-5)
    assert np.isfinite(np.asarray(grad.astype(jnp.float32))).all()


@pytest.mark.parametrize("mode", ["sinkhorn", "centering"])
def test_fused_ibot_loss_sharded_jit_equals_unsharded(mesh, mode):
    """Targets, loss and gradient with the buffer's rows over 8 devices == on one."""
    teacher, student, weights, valid = _garbage_padded(2, m=64)
    valid[8:16] = False  # one device holds padding only
    weights[8:16] = 0.0

    def value_and_grad(teacher, student, weights, valid):
        targets = _both_targets(teacher, valid)[mode]
        return jax.value_and_grad(lambda s: losses.ibot_loss(s, targets, weights, 8, 0.1))(student)

    want, want_grad = jax.jit(value_and_grad)(teacher, student, weights, valid)
    rows = NamedSharding(mesh, jax.P("data"))
    args = [jax.device_put(a, rows) for a in (teacher, student, weights, valid)]
    got, got_grad = jax.jit(value_and_grad, out_shardings=(None, rows))(*args)
    assert len(got_grad.sharding.device_set) == 8
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6 * np.abs(want_grad).max())


# ---- KoLeo -------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_koleo_matches_dinov2_with_gradient(seed):
    rng = np.random.default_rng(seed)
    x = _logits(rng, 16, 32)
    x_t = _t(x).requires_grad_(True)
    want = KoLeoLoss()(x_t)
    want.backward()
    got, grad = jax.value_and_grad(losses.koleo_loss)(jnp.asarray(x))
    np.testing.assert_allclose(got, want.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, x_t.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_koleo_rewards_spread():
    """Collapsed features are penalised: the loss is large for near-duplicates."""
    rng = np.random.default_rng(0)
    spread = _logits(rng, 16, 8)
    collapsed = np.ones((16, 8), np.float32) + 1e-3 * _logits(rng, 16, 8)
    assert losses.koleo_loss(collapsed) > losses.koleo_loss(spread) + 3.0


# ---- distributed: 8 devices --------------------------------------------------


def _padded_batch(seed, n=64, k=128):
    rng = np.random.default_rng(seed)
    z = _logits(rng, n, k, scale=0.3)
    valid = rng.random(n) < 0.7
    valid[8:16] = False  # one device holds padding only
    z[~valid] = 50.0
    return z, valid


@pytest.mark.parametrize("seed", (0, 1))
def test_sinkhorn_sharded_jit_equals_gathered(mesh, seed):
    z, valid = _padded_batch(seed)
    want = np.asarray(losses.sinkhorn_knopp(jnp.asarray(z[valid]), 0.05))
    rows = NamedSharding(mesh, jax.P("data"))
    fn = jax.jit(
        lambda z, v: losses.sinkhorn_knopp(z, 0.05, valid=v), in_shardings=(rows, rows), out_shardings=rows
    )
    got = fn(jax.device_put(z, rows), jax.device_put(valid, rows))
    assert len(got.sharding.device_set) == 8
    got = np.asarray(got)
    np.testing.assert_allclose(got[valid], want, **TOL)
    assert (got[~valid] == 0).all()


@pytest.mark.parametrize("seed", (0, 1))
def test_sinkhorn_shard_map_equals_gathered(mesh, seed):
    z, valid = _padded_batch(seed)
    want = np.asarray(losses.sinkhorn_knopp(jnp.asarray(z[valid]), 0.05))

    def per_device(axis_name):
        return jax.jit(
            jax.shard_map(
                lambda z, v: losses.sinkhorn_knopp(z, 0.05, valid=v, axis_name=axis_name),
                mesh=mesh, in_specs=(jax.P("data"), jax.P("data")), out_specs=jax.P("data"),
            )
        )

    got = np.asarray(per_device("data")(z, valid))
    np.testing.assert_allclose(got[valid], want, **TOL)
    assert (got[~valid] == 0).all()
    # Without the psum each device normalises its own prototypes: a different answer.
    local = np.asarray(per_device(None)(z, valid))
    assert np.abs(local[valid] - want).max() > 1e-3


def test_update_center_global_under_shard_map_and_jit(mesh):
    z, valid = _padded_batch(4)
    center = jnp.full((1, z.shape[1]), 0.2, jnp.float32)
    want = 0.2 * 0.9 + 0.1 * z[valid].mean(axis=0, keepdims=True)
    sharded = jax.jit(
        jax.shard_map(
            lambda c, z, v: losses.update_center(c, z, 0.9, valid=v, axis_name="data"),
            mesh=mesh, in_specs=(jax.P(), jax.P("data"), jax.P("data")), out_specs=jax.P(),
        )
    )
    np.testing.assert_allclose(sharded(center, z, valid), want, **TOL)
    rows = NamedSharding(mesh, jax.P("data"))
    plain = jax.jit(lambda c, z: losses.update_center(c, z, 0.9))(center, jax.device_put(z, rows))
    np.testing.assert_allclose(plain, 0.2 * 0.9 + 0.1 * z.mean(axis=0, keepdims=True), **TOL)


def test_edge_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"valid must be \[4\]"):
        losses.sinkhorn_knopp(jnp.zeros((4, 8)), 0.1, valid=jnp.ones(5, bool))
    with pytest.raises(ValueError, match="koleo_loss"):
        losses.koleo_loss(jnp.zeros((1, 8)))
    with pytest.raises(ValueError, match="equal B, K"):
        losses.dino_cross_entropy(jnp.zeros((2, 3, 8)), jnp.zeros((2, 4, 8)), 0.1)
