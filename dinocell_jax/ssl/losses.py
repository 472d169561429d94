"""The self-distillation objective: teacher targets and the DINO, iBOT and KoLeo losses.

Pure `jnp` functions with DINOv2's semantics (`dinov2/loss/*.py`; the parity
tests run that package on identical inputs). Every function casts its inputs
to fp32 first: logits come out of a bf16 network, but the softmaxes,
Sinkhorn-Knopp, the centre and KoLeo's distances are fp32 (REFERENCE.md,
"Losses").

Distribution. A reduction over the sample axis of a batch-sharded array under
`jax.jit` is already global (XLA inserts the all-reduce), so nothing here needs
a collective in the default use. Inside `jax.shard_map` the arrays are one
device's block; `update_center` and `sinkhorn_knopp` then take the mesh axis
name and `psum` their sums over it. `koleo_loss` is the exception: DINOv2
computes it on each device's batch, so call it on that batch (through
`shard_map`, or on a reshape of the batch into per-device groups).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def softmax_centered(teacher_logits: jax.Array, center: jax.Array, temp) -> jax.Array:
    """DINOv2 momentum-centred teacher targets (`DINOLoss.softmax_center_teacher`).

    teacher_logits: [N, K] any float dtype; center: [1, K] fp32; temp: scalar
    (a traced value is fine: the teacher temperature follows a schedule).
    Returns softmax((z - c) / temp) over K, [N, K] fp32, without gradient (a target).
    """
    z = jax.lax.stop_gradient(_f32(teacher_logits))
    return jax.nn.softmax((z - _f32(center)) / temp, axis=-1)


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
    valid row a distribution over K, without gradient (a target).

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
    z = jax.lax.stop_gradient(_f32(teacher_logits))
    if z.ndim != 2:
        raise ValueError(f"sinkhorn_knopp: teacher_logits must be [N, K], got shape {z.shape}")
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp: n_iterations must be >= 1, got {n_iterations}")
    if valid is not None:
        valid = jnp.asarray(valid, bool)
        if valid.shape != z.shape[:1]:
            raise ValueError(f"sinkhorn_knopp: valid must be [{z.shape[0]}] bool, got shape {valid.shape}")
        z = jnp.where(valid[:, None], z, -jnp.inf)
    # The global shift is exact (see above) and keeps z / t well resolved in fp32:
    # dividing logits near 50 by 0.04 first would round away ~1e-4 of each exponent.
    peak = jnp.max(z)
    if axis_name is not None:
        peak = jax.lax.pmax(peak, axis_name)
    x = (z - jnp.where(jnp.isfinite(peak), peak, 0.0)) / temp
    # log a_b (per sample), log c_k (per prototype); a padded row keeps log a = -inf.
    log_a = jnp.zeros(z.shape[:1], jnp.float32)
    if valid is not None:
        log_a = jnp.where(valid, log_a, -jnp.inf)
    for _ in range(n_iterations):
        log_c = -_logsumexp_rows(x + log_a[:, None], axis_name)
        log_a = -jax.nn.logsumexp(x + log_c[None, :], axis=1)
        if valid is not None:
            log_a = jnp.where(valid, log_a, -jnp.inf)
    q = jnp.exp(x + log_a[:, None] + log_c[None, :])
    if valid is not None:
        # With no valid sample anywhere log_c is +inf and -inf + inf is NaN.
        q = jnp.where(valid[:, None], q, 0.0)
    return q


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


def ibot_loss(
    student_logits: jax.Array, teacher_probs: jax.Array, weights: jax.Array, n_images, student_temp
) -> jax.Array:
    """DINOv2 `iBOTPatchLoss.forward_masked` over a static buffer of masked tokens.

    student_logits, teacher_probs: [M, K] (M = the buffer's `upperbound` rows);
    weights: [M] fp32, 1 / (masked tokens of the token's image), 0 for padded rows
    (as `masking.gather_masked` returns); n_images: the number of global-crop
    images, masked or not (DINOv2 divides by all of them). Returns a scalar fp32:
    -sum_m w_m sum_k t[m, k] log_softmax(s[m] / student_temp)[k] / n_images.
    """
    s = _f32(student_logits)
    t = _f32(teacher_probs)
    w = _f32(weights)
    if s.shape != t.shape or s.ndim != 2 or w.shape != s.shape[:1]:
        raise ValueError(
            f"ibot_loss: need student [M,K], teacher [M,K], weights [M]; got {s.shape}, {t.shape}, {w.shape}"
        )
    per_token = jnp.sum(t * jax.nn.log_softmax(s / student_temp, axis=-1), axis=-1)
    # Padded rows may hold anything; a zero weight must not turn inf/NaN into the loss.
    per_token = jnp.where(w != 0, per_token * w, 0.0)
    return -jnp.sum(per_token) / n_images


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
