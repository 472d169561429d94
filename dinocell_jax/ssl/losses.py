"""The self-distillation objective: teacher targets and the DINO, iBOT and KoLeo losses.

Pure `jnp` functions with DINOv2's semantics (`dinov2/loss/*.py`; the parity
tests run that package on identical inputs). Every function computes in fp32:
logits come out of a bf16 network, but the softmaxes, Sinkhorn-Knopp, the
centre and KoLeo's distances are fp32 (REFERENCE.md, "Losses"). The [M, K]
iBOT arrays are cast inside each fused expression rather than up front.

Distribution. A reduction over the sample axis of a batch-sharded array under
`jax.jit` is already global (XLA inserts the all-reduce), so nothing here needs
a collective in the default use. Inside `jax.shard_map` the arrays are one
device's block; `update_center` and `sinkhorn_knopp` then take the mesh axis
name and `psum` their sums over it. `koleo_loss` is the exception: DINOv2
computes it on each device's batch, so call it on that batch (through
`shard_map`, or on a reshape of the batch into per-device groups).

Memory traffic. The iBOT targets are [M, K] (M ~ 15k masked tokens, K = 65536):
each fp32 pass over such an array is ~4 GB of HBM traffic. The teacher targets
are therefore kept factored (`FactoredTargets`: the teacher's logits as they
came, plus per-row and per-column log-scales) and every reduction recomputes
the fp32 values from the bf16 logits inside its own fused loop; `ibot_loss` on
factored targets is a fused cross-entropy whose backward is one elementwise pass.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


class FactoredTargets(NamedTuple):
    """Teacher target probabilities without the [N, K] fp32 matrix.

    t[n, k] = exp((f32(logits[n, k]) - shift) * inv_temp + log_row[n] + log_col[k]),
    and 0 on invalid rows (log_row = -inf, whatever their logits hold). A pytree:
    jit, shard and `stop_gradient` it like an array.
    """

    logits: jax.Array  # [N, K] the teacher head's dtype (bf16), not upcast
    shift: jax.Array  # [] fp32
    inv_temp: jax.Array  # [] fp32
    log_row: jax.Array  # [N] fp32, -inf on invalid rows
    log_col: jax.Array  # [K] fp32

    def row_valid(self) -> jax.Array:
        """[N] bool."""
        return self.log_row > -jnp.inf

    def scaled(self) -> jax.Array:
        """(z - shift) * inv_temp, [N, K] fp32, -inf on invalid rows.

        An elementwise expression of the logits: XLA fuses it into each reduction
        that consumes it instead of storing it.
        """
        x = (_f32(self.logits) - self.shift) * self.inv_temp
        return jnp.where(self.row_valid()[:, None], x, -jnp.inf)

    def probs(self) -> jax.Array:
        """t, [N, K] fp32 (materialised: for small heads and tests)."""
        log_t = self.scaled() + self.log_row[:, None] + self.log_col[None, :]
        # An invalid row is -inf + log_col, NaN where log_col = +inf (no valid row at all).
        return jnp.where(self.row_valid()[:, None], jnp.exp(log_t), 0.0)


def _logsumexp_last(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(peak, log_total), [...] fp32 each: log sum_k exp(x[..., k]) = peak + log_total.

    One pass: a variadic reduce of (running max, sum scaled to it), where
    max-then-sum reads x twice. Only over an unsharded axis (K): a variadic
    reduction across devices is left to the partitioner otherwise. The parts
    are kept apart so that (x - peak) - log_total keeps fp32 precision where
    x - (peak + log_total) would lose ulp(peak). -inf entries contribute
    nothing; a row of -inf gives peak -inf.
    """
    x = _f32(x)

    def combine(a, b):
        (m_a, s_a), (m_b, s_b) = a, b
        # The smaller side is rescaled by exp(-|m_a - m_b|); equal maxima (also
        # both -inf or both +inf) add as they are instead of producing NaN.
        scale = jnp.exp(jnp.where(m_a == m_b, 0.0, -jnp.abs(m_a - m_b)))
        a_big = m_a >= m_b
        return (
            jnp.maximum(m_a, m_b),
            jnp.where(a_big, s_a + s_b * scale, s_b + s_a * scale),
        )

    peak, total = jax.lax.reduce(
        (x, jnp.ones_like(x)), (jnp.float32(-jnp.inf), jnp.float32(0.0)), combine, (x.ndim - 1,)
    )
    return peak, jnp.log(total)


def _normalise_rows(targets: FactoredTargets) -> FactoredTargets:
    """log_row chosen so each valid row of t sums to 1 (invalid rows stay -inf)."""
    peak, log_total = _logsumexp_last(targets.scaled() + targets.log_col[None, :])
    return targets._replace(log_row=jnp.where(targets.row_valid(), -(peak + log_total), -jnp.inf))


def _row_mask(n: int, valid: jax.Array | None, name: str) -> jax.Array:
    """Initial log_row: 0 on valid rows, -inf on the others, [n] fp32."""
    if valid is None:
        return jnp.zeros((n,), jnp.float32)
    valid = jnp.asarray(valid, bool)
    if valid.shape != (n,):
        raise ValueError(f"{name}: valid must be [{n}] bool, got shape {valid.shape}")
    return jnp.where(valid, 0.0, -jnp.inf)


def _teacher_logits(teacher_logits: jax.Array, name: str) -> jax.Array:
    z = jax.lax.stop_gradient(jnp.asarray(teacher_logits))
    if z.ndim != 2:
        raise ValueError(f"{name}: teacher_logits must be [N, K], got shape {z.shape}")
    return z


def centered_targets(teacher_logits: jax.Array, center: jax.Array, temp, *, valid=None) -> FactoredTargets:
    """DINOv2 momentum-centred teacher targets softmax((z - c) / temp), factored.

    teacher_logits: [N, K] any float dtype, kept as is; center: [1, K] fp32;
    temp: scalar (may be traced); valid: optional [N] bool, False rows give zeros.
    shift 0, log_col = -c / temp, log_row = -logsumexp_k((z - c) / temp).
    """
    z = _teacher_logits(teacher_logits, "centered_targets")
    inv_temp = 1.0 / _f32(temp)
    targets = FactoredTargets(
        logits=z,
        shift=jnp.float32(0.0),
        inv_temp=inv_temp,
        log_row=_row_mask(z.shape[0], valid, "centered_targets"),
        log_col=-_f32(center).reshape(-1) * inv_temp,
    )
    return _normalise_rows(targets)


def softmax_centered(teacher_logits: jax.Array, center: jax.Array, temp) -> jax.Array:
    """DINOv2 momentum-centred teacher targets (`DINOLoss.softmax_center_teacher`).

    teacher_logits: [N, K] any float dtype; center: [1, K] fp32; temp: scalar
    (a traced value is fine: the teacher temperature follows a schedule).
    Returns softmax((z - c) / temp) over K, [N, K] fp32, without gradient (a target):
    the materialised form of `centered_targets`.
    """
    return centered_targets(teacher_logits, center, temp).probs()


def update_center(
    center: jax.Array,
    teacher_logits: jax.Array,
    momentum,
    *,
    valid: jax.Array | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """The next DINOv2 centre: `center * m + mean_batch(z) * (1 - m)`.

    center: [1, K] fp32; teacher_logits: [..., K] (all leading axes are samples);
    valid: optional bool of the leading shape, False rows (padding) are left out
    of the mean; axis_name: inside `jax.shard_map`, the mesh axis the batch is
    split over (the mean is then over all devices' samples, as DINOv2's
    all-reduce). Returns [1, K] fp32.

    DINOv2 applies the update lazily, at the next `softmax_center_teacher`, so
    step t's targets use the centre made from steps < t: call `softmax_centered`
    with the old centre, then this, and carry the result to the next step.
    """
    z = jax.lax.stop_gradient(_f32(teacher_logits))
    z = z.reshape(-1, z.shape[-1])
    if valid is None:
        total = jnp.sum(z, axis=0, keepdims=True)
        count = jnp.asarray(z.shape[0], jnp.float32)
    else:
        keep = jnp.asarray(valid).reshape(-1)
        if keep.shape[0] != z.shape[0]:
            raise ValueError(f"update_center: valid has {keep.shape[0]} rows, teacher_logits {z.shape[0]}")
        total = jnp.sum(jnp.where(keep[:, None], z, 0.0), axis=0, keepdims=True)
        count = jnp.sum(keep.astype(jnp.float32))
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
        count = jax.lax.psum(count, axis_name)
    mean = total / jnp.maximum(count, 1.0)
    return _f32(center) * momentum + mean * (1.0 - momentum)


def _logsumexp_rows(x: jax.Array, axis_name: str | None) -> jax.Array:
    """log sum_b exp(x[b, k]) over the sample axis 0 (all devices with axis_name): [K].

    Rows of -inf (padding) contribute nothing; a column with no finite entry gives -inf.
    """
    peak = jnp.max(x, axis=0)
    if axis_name is not None:
        peak = jax.lax.pmax(peak, axis_name)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    total = jnp.sum(jnp.exp(x - peak), axis=0)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return jnp.log(total) + peak


def sinkhorn_targets(
    teacher_logits: jax.Array,
    temp,
    *,
    n_iterations: int = 3,
    valid: jax.Array | None = None,
    axis_name: str | None = None,
) -> FactoredTargets:
    """`sinkhorn_knopp`'s targets, factored: its log-domain potentials, not the matrix.

    Same arguments and guarantees as `sinkhorn_knopp`; the logits are kept in
    their dtype and each pass re-reads them (the [N, K] fp32 matrix is never
    stored): log_row = log a, log_col = log c, shift = the global maximum.
    """
    z = _teacher_logits(teacher_logits, "sinkhorn_knopp")
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp: n_iterations must be >= 1, got {n_iterations}")
    log_a = _row_mask(z.shape[0], valid, "sinkhorn_knopp")
    # The global shift is exact (see sinkhorn_knopp) and keeps z / t well resolved in
    # fp32: dividing logits near 50 by 0.04 first would round away ~1e-4 of each exponent.
    peak = jnp.max(jnp.where(log_a[:, None] > -jnp.inf, _f32(z), -jnp.inf))
    if axis_name is not None:
        peak = jax.lax.pmax(peak, axis_name)
    # log a_b (per sample) is log_row, log c_k (per prototype) log_col; a padded row
    # keeps log a = -inf.
    targets = FactoredTargets(
        logits=z,
        shift=jnp.where(jnp.isfinite(peak), peak, 0.0),
        inv_temp=1.0 / _f32(temp),
        log_row=log_a,
        log_col=jnp.zeros(z.shape[1:], jnp.float32),
    )
    for _ in range(n_iterations):
        log_c = -_logsumexp_rows(targets.scaled() + targets.log_row[:, None], axis_name)
        targets = _normalise_rows(targets._replace(log_col=log_c))
    return targets


def sinkhorn_knopp(
    teacher_logits: jax.Array,
    temp,
    *,
    n_iterations: int = 3,
    valid: jax.Array | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Sinkhorn-Knopp teacher targets (DINOv2 `sinkhorn_knopp_teacher`, DINOv3 default).

    teacher_logits: [N, K] any float dtype (N samples, K prototypes); temp: scalar;
    valid: optional [N] bool, False rows (unused slots of a static buffer) take
    no part in any sum and come out as zeros; axis_name: inside `jax.shard_map`,
    the mesh axis the samples are split over (the prototype sums are then over
    all devices, DINOv2's all-reduce). Without it, under `jax.jit` with the
    samples sharded, the sums are global already. Returns [N, K] fp32, each
    valid row a distribution over K, without gradient (a target). The materialised
    form of `sinkhorn_targets`.

    The reference iterates on Q = exp(z / t).T: Q /= sum(Q); then n times:
    Q /= rowsum (over all samples), Q /= K, Q /= colsum (per sample), Q /= B;
    finally Q *= B. Every step is a rescaling of all rows or all columns by
    positive factors, so Q = diag(c) exp(z / t).T diag(a) throughout, and the
    constants (the total, K, B) cancel: each normalisation divides out whatever
    scale the previous one left. The result is therefore determined by
    log c_k = -logsumexp_b(z_bk / t + log a_b) and
    log a_b = -logsumexp_k(z_bk / t + log c_k), iterated in that order from
    a = 1; the final exp(z / t + log a + log c) has columns summing to 1, as the
    reference's Q * B. This is the same sequence of operations in the log domain.
    DINOv2 takes exp(z / t) directly, which overflows fp32 once z / t > 88
    (z > 3.5 at t = 0.04) and then returns NaN. Subtracting the global maximum
    of the valid logits first only rescales Q by a constant, which the first
    normalisation divides out (the parity tests check this on DINOv2 itself);
    we do that, and iterate in the log domain, where no column can underflow to
    zero either: the result is finite for any finite logits.
    """
    return sinkhorn_targets(
        teacher_logits, temp, n_iterations=n_iterations, valid=valid, axis_name=axis_name
    ).probs()


def dino_cross_entropy(student_logits: jax.Array, teacher_probs: jax.Array, student_temp) -> jax.Array:
    """DINOv2 `DINOLoss.forward`: sum over all (student, teacher) pairs of
    -mean_b sum_k t[b, k] * log_softmax(s[b] / student_temp)[k].

    student_logits: [S, B, K] any float dtype (S crops of the same B images);
    teacher_probs: [T, B, K]. Returns a scalar fp32 (a sum over S x T pairs, not a
    mean: divide by the number of loss terms as DINOv2's meta-architecture does).
    The cross-entropy is bilinear in (t, log_softmax(s)), so the S x T sum equals
    the one cross term of sum_t t and sum_s log_softmax(s): [B, K] at most, never
    [S, T, B, K]. DINOv2's global loss pairs crop A with teacher crop B and B
    with A only: pass S = T = 1 with the teacher's crop halves swapped; that is a
    mean over 2B samples, so multiply by 2 for the two terms.
    """
    s = _f32(student_logits)
    t = _f32(teacher_probs)
    if s.ndim != 3 or t.ndim != 3 or s.shape[1:] != t.shape[1:]:
        raise ValueError(
            f"dino_cross_entropy: need student [S,B,K] and teacher [T,B,K] with equal B, K; "
            f"got {s.shape} and {t.shape}"
        )
    log_p = jnp.sum(jax.nn.log_softmax(s / student_temp, axis=-1), axis=0)
    return -jnp.sum(jnp.sum(t, axis=0) * log_p) / s.shape[1]


@jax.custom_vjp
def _factored_cross_entropy(student_logits: jax.Array, targets: FactoredTargets, inv_temp: jax.Array) -> jax.Array:
    """ce[m] = -sum_k t[m, k] log_softmax(s[m] * inv_temp)[k], [M] fp32; 0 on invalid rows.

    Fused: t is recomputed from its factors inside each reduction, the student
    logits are read in their dtype, and the backward is one elementwise pass
    (the autodiff of log_softmax would store and re-read [M, K] fp32 arrays).
    Rows with a zero cotangent get exactly zero gradient, whatever they hold.
    """
    return _factored_cross_entropy_fwd(student_logits, targets, inv_temp)[0]


def _factored_cross_entropy_fwd(s, targets, inv_temp):
    # ce = lse * sum_k t - sum_k t * s / tau: sibling reductions XLA can fuse into one pass.
    peak, log_total = _logsumexp_last(_f32(s) * inv_temp)
    t = targets.probs()
    mass = jnp.sum(t, axis=-1)
    ce = (peak + log_total) * mass - jnp.sum(t * _f32(s), axis=-1) * inv_temp
    # Padded rows may hold anything: 0 * inf is NaN.
    ce = jnp.where(targets.row_valid(), ce, 0.0)
    return ce, (s, targets, inv_temp, peak, log_total, mass)


def _factored_cross_entropy_bwd(residuals, g):
    s, targets, inv_temp, peak, log_total, mass = residuals
    keep = (g != 0) & targets.row_valid()
    softmax = jnp.exp((_f32(s) * inv_temp - peak[:, None]) - log_total[:, None])
    grad = (g * inv_temp)[:, None] * (softmax * mass[:, None] - targets.probs())
    # The targets are constants (stop_gradient upstream): no cotangent for them.
    return jnp.where(keep[:, None], grad, 0.0).astype(s.dtype), None, None


_factored_cross_entropy.defvjp(_factored_cross_entropy_fwd, _factored_cross_entropy_bwd)


def ibot_loss(
    student_logits: jax.Array,
    teacher: jax.Array | FactoredTargets,
    weights: jax.Array,
    n_images,
    student_temp,
) -> jax.Array:
    """DINOv2 `iBOTPatchLoss.forward_masked` over a static buffer of masked tokens.

    student_logits: [M, K] any float dtype (M = the buffer's `upperbound` rows),
    passed as the head returned it; teacher: [M, K] probabilities or
    `FactoredTargets` (the training step's: a fused cross-entropy that never
    builds an [M, K] fp32 array, its gradient in student_logits' dtype);
    weights: [M] fp32, 1 / (masked tokens of the token's image), 0 for padded rows
    (as `masking.gather_masked` returns); n_images: the number of global-crop
    images, masked or not (DINOv2 divides by all of them). Returns a scalar fp32:
    -sum_m w_m sum_k t[m, k] log_softmax(s[m] / student_temp)[k] / n_images.
    """
    s = jnp.asarray(student_logits)
    w = _f32(weights)
    t_shape = teacher.logits.shape if isinstance(teacher, FactoredTargets) else jnp.shape(teacher)
    if s.shape != t_shape or s.ndim != 2 or w.shape != s.shape[:1]:
        raise ValueError(
            f"ibot_loss: need student [M,K], teacher [M,K], weights [M]; got {s.shape}, {t_shape}, {w.shape}"
        )
    if isinstance(teacher, FactoredTargets):
        per_token = _factored_cross_entropy(s, teacher, 1.0 / _f32(student_temp))
    else:
        log_p = jax.nn.log_softmax(_f32(s) / student_temp, axis=-1)
        per_token = -jnp.sum(_f32(teacher) * log_p, axis=-1)
    # Padded rows may hold anything; a zero weight must not turn inf/NaN into the loss.
    per_token = jnp.where(w != 0, per_token * w, 0.0)
    return jnp.sum(per_token) / n_images


def koleo_loss(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """DINOv2 `KoLeoLoss` (Kozachenko-Leonenko entropy estimator) of one batch.

    x: [B, D] any float dtype, B >= 2 (DINOv2: the student's CLS tokens of one
    global crop on one device). L2-normalises each row (norm floored at eps),
    takes each row's nearest neighbour by the largest dot product with the
    diagonal excluded, and returns -mean_b log(||x_b - x_nn(b) + eps||_2 + eps),
    a scalar fp32 (`nn.PairwiseDistance(eps)` adds eps to the difference).

    The batch defines the neighbourhoods: DINOv2 applies it per device, so the
    caller passes each device's batch (`jax.shard_map`, or `jax.vmap` over a
    reshape into per-device groups), not the global batch.
    """
    x = _f32(x)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss: x must be [B, D] with B >= 2, got shape {x.shape}")
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    # -1 on the diagonal as DINOv2 (not -inf): a row's only neighbour at -1 ties with itself.
    dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, dots)
    nearest = jnp.argmax(dots, axis=1)
    distances = jnp.linalg.norm(x - x[nearest] + eps, axis=-1)
    return -jnp.mean(jnp.log(distances + eps))
