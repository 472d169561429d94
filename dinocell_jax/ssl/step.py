"""The training step: TrainState, the DINO + iBOT + KoLeo objective, and the probe metrics.

`train_step(state, batch) -> (state, metrics)` is one pure function under
`jax.jit`: device-side crops, teacher and student forwards, the losses of
DINOv2's SSLMetaArch, per-module clipping, AdamW, the EMA teacher. It returns
a small dict of scalars; `metrics_fn` computes the pictures' raw material
(attention, features, per-channel embeddings) on a fixed probe batch and is
only called at the visual intervals.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from dinocell_jax import parallel
from dinocell_jax.data import augment
from dinocell_jax.data.sources import channel_list
from dinocell_jax.models import heads as heads_lib
from dinocell_jax.models import vit as vit_lib
from dinocell_jax.ssl import losses, masking, optim
from dinocell_jax.ssl.schedules import Schedules

Params = dict[str, Any]


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], iterations done
    student: Params  # {"backbone", "dino_head"[, "ibot_head"]} fp32 pure dicts
    teacher: Params  # same structure, EMA of the student
    opt_state: Any
    center: dict[str, jax.Array]  # {"dino": [1,K], "ibot": [1,K]} fp32, momentum centering only
    rng: jax.Array  # key; the step's randomness is fold_in(rng, step)


def input_channels(config) -> int:
    """Channels of the model's input: 1 (a channel or the channel mean) or all planes stacked."""
    if config.data.strategy == "stacked":
        return len(channel_list(config.data))
    return 1


@dataclasses.dataclass(frozen=True)
class Models:
    """Static half of the model: graphdefs and the derived sizes the step needs."""

    backbone: Any
    dino_head: Any
    ibot_head: Any  # the DINO head's graphdef when the heads are shared
    vit: vit_lib.ViTConfig
    separate_ibot_head: bool

    def merge(self, params: Params):
        backbone = nnx.merge(self.backbone, params["backbone"])
        dino_head = nnx.merge(self.dino_head, params["dino_head"])
        ibot_params = params["ibot_head"] if self.separate_ibot_head else params["dino_head"]
        ibot_head = nnx.merge(self.ibot_head, ibot_params)
        return backbone, dino_head, ibot_head


def _build(config, key: jax.Array) -> tuple[nnx.GraphDef, Params]:
    """Module graphdefs and fresh fp32 params (call under eval_shape or jit)."""
    vit_cfg = vit_lib.vit_config_from(config.model, input_channels(config))
    k_backbone, k_dino, k_ibot = jax.random.split(key, 3)
    backbone = vit_lib.VisionTransformer(vit_cfg, rngs=nnx.Rngs(k_backbone))
    h = config.heads

    def head(k):
        return heads_lib.DINOHead(
            vit_cfg.embed_dim, h.out_dim, h.hidden_dim, h.bottleneck_dim, h.n_layers,
            h.weight_norm_last_layer, config.model.dtype, rngs=nnx.Rngs(k),
        )

    modules = {"backbone": backbone, "dino_head": head(k_dino)}
    if h.separate_ibot_head:
        modules["ibot_head"] = head(k_ibot)
    graphdefs, params = {}, {}
    for name, module in modules.items():
        graphdefs[name], state = nnx.split(module, nnx.Param)
        params[name] = nnx.to_pure_dict(state)
    return graphdefs, params


def make_models(config) -> Models:
    graphdefs, _ = jax.eval_shape(lambda k: _build(config, k), jax.random.key(0))
    vit_cfg = vit_lib.vit_config_from(config.model, input_channels(config))
    separate = bool(config.heads.separate_ibot_head)
    return Models(
        backbone=graphdefs["backbone"], dino_head=graphdefs["dino_head"],
        ibot_head=graphdefs["ibot_head"] if separate else graphdefs["dino_head"],
        vit=vit_cfg, separate_ibot_head=separate,
    )


def init_state(config, key: jax.Array, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state; jit it with out_shardings so it is born sharded."""
    k_params, k_rng = jax.random.split(key)
    _, params = _build(config, k_params)
    k = config.heads.out_dim
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        student=params,
        # The teacher starts as an exact copy of the student (DINOv2).
        teacher=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        center={"dino": jnp.zeros((1, k), jnp.float32), "ibot": jnp.zeros((1, k), jnp.float32)},
        rng=k_rng,
    )


def sharded_init(config, optimizer: optax.GradientTransformation, mesh):
    """(abstract, init): the TrainState as ShapeDtypeStructs carrying their shardings,
    and `init(key)` jitted to produce it already sharded (no full copy on one device).

    `abstract` is also the target a checkpoint restores into.
    """
    def init(key):
        return init_state(config, key, optimizer)

    shapes = jax.eval_shape(init, jax.random.key(0))
    shardings = parallel.state_shardings(shapes, mesh, config)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    return abstract, jax.jit(init, out_shardings=shardings)


def shardings_of(abstract):
    return jax.tree.map(lambda a: a.sharding, abstract)


def _tree_norm(tree) -> jax.Array:
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def _teacher_targets(config, logits, temp, center, valid=None):
    """Teacher targets, factored (`losses.FactoredTargets`), and the centre for the next step."""
    if config.loss.centering == "sinkhorn_knopp":
        return losses.sinkhorn_targets(logits, temp, valid=valid), center
    targets = losses.centered_targets(logits, center, temp, valid=valid)
    new_center = losses.update_center(center, logits, config.loss.center_momentum, valid=valid)
    return targets, new_center


def device_group_size(config, n_devices: int) -> int:
    """Samples per device group, DINOv2's per-GPU batch: the KoLeo neighbourhoods and
    the sets iBOT masks are drawn for (and gathered from) are each device's samples.

    `loss.koleo_group_size` fixes it, which makes the step independent of how the
    batch is laid out on devices (8 devices and 1 device give the same step).
    """
    if config.loss.koleo_group_size > 0:
        return int(config.loss.koleo_group_size)
    return config.train.batch_size // n_devices


def mask_upperbound(config, group: int) -> int:
    """Static rows of one device group's iBOT buffer (its 2 x group global crops)."""
    upper = masking.masked_upperbound(
        2 * group, (config.crops.global_size // config.model.patch_size) ** 2,
        (config.loss.mask_ratio_min, config.loss.mask_ratio_max), config.loss.mask_sample_probability,
    )
    return max(int(upper), 1)


def _gather_masked_by_group(tokens, masks, group: int, upper: int):
    """`masking.gather_masked` within each device group: tokens [R, N, D] and masks
    [R, N] in group rows (`to_group_rows`, R = 2 x batch) -> buffer [G*U, D], weights,
    valid [G*U].

    Each group's buffer holds only its own samples' masked tokens, so the iBOT head and
    loss stay sharded with the batch (one global buffer would gather every device's
    tokens onto every device).
    """
    rows, n, d = tokens.shape
    n_groups = rows // (2 * group)

    def gather(t, m):
        return masking.gather_masked(t, m, upper)[:3]

    if n_groups == parallel.active_devices():  # a group per device (or one, on one): gather on each
        return parallel.per_device(gather)(tokens, masks)
    # Groups spanning devices (a fixed `loss.koleo_group_size`, as in the layout tests).
    buffer, weights, valid = jax.vmap(gather)(tokens.reshape(n_groups, 2 * group, n, d),
                                              masks.reshape(n_groups, 2 * group, n))
    return buffer.reshape(n_groups * upper, d), weights.reshape(-1), valid.reshape(-1)


def to_group_rows(x: jax.Array, groups: int) -> jax.Array:
    """Crops `[n, B, ...]` -> rows `[n * B, ...]` in DINOv2's per-GPU collate order: the
    batch's `groups` device groups one after another, each group's crops crop-major
    (crop 0 of its samples, then crop 1, ...).

    Each device's rows stay contiguous, so the sharded batch axis stays the leading
    one (a plain crop-major flatten of [n, B] interleaves the devices' shards), and on
    one device (one group) it is the plain crop-major flatten. Sample-major rows (image
    b's crops next to each other) made XLA lay the GPU residual stream out batch-minor,
    drop path's scatters strided: one H100 ran at 174 instead of 300 images/s
    (docs/BENCHMARKS.md).
    """
    n, b = x.shape[:2]
    x = x.reshape((n, groups, b // groups) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((n * b,) + x.shape[3:])


def from_group_rows(x: jax.Array, n: int, groups: int) -> jax.Array:
    """The inverse of `to_group_rows`: rows `[n * B, ...]` -> `[n, B, ...]`."""
    b = x.shape[0] // n
    x = x.reshape((groups, n, b // groups) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((n, b) + x.shape[3:])


def ssl_loss(params, teacher, center, views, masks, temps, models: Models, config, drop_key, group):
    """The SSLMetaArch objective. Returns (total, (metrics, new_center)).

    views: global_crops [2,B,G,G,C], local_crops [L,B,S,S,C]; masks [B,2,N] bool;
    group: samples per device group (`device_group_size`). drop_key None turns drop
    path off.

    The networks see the crops in group rows (`to_group_rows`): each device's
    samples' crops together, so each device keeps its own rows.
    """
    backbone_t, dino_t, ibot_t = models.merge(jax.lax.stop_gradient(teacher))
    backbone_s, dino_s, ibot_s = models.merge(params)
    lc = config.loss
    g = views["global_crops"]
    n_global, b = g.shape[0], g.shape[1]
    n_local = views["local_crops"].shape[0]
    groups = b // group
    globals_flat = to_group_rows(g, groups)
    masks_flat = to_group_rows(jnp.swapaxes(masks, 0, 1), groups)  # [B, 2, N] -> as globals_flat
    upper = mask_upperbound(config, group)

    # ---- teacher: the two global crops, unmasked
    out_t = backbone_t(globals_flat)
    t_cls = out_t["x_norm_clstoken"]
    # Swap each image's two crops so student crop A is matched with teacher crop B (DINOv2).
    t_cls = to_group_rows(from_group_rows(t_cls, n_global, groups)[::-1], groups)
    t_patch, _, t_valid = _gather_masked_by_group(out_t["x_norm_patchtokens"], masks_flat, group, upper)
    t_dino_logits = dino_t(t_cls).astype(jnp.float32)
    # The iBOT logits stay in the head's dtype: [M, K] with K = 65536, the targets
    # are kept factored and the loss reads them in its fused passes.
    t_ibot_logits = ibot_t(t_patch)
    t_dino, new_dino_center = _teacher_targets(config, t_dino_logits, temps["teacher"], center["dino"])
    t_ibot, new_ibot_center = _teacher_targets(
        config, t_ibot_logits, temps["teacher"], center["ibot"], valid=t_valid
    )
    t_dino = jax.lax.stop_gradient(t_dino.probs())
    t_ibot = jax.lax.stop_gradient(t_ibot)

    # ---- student: masked global crops, then local crops
    k_global, k_local = (None, None) if drop_key is None else jax.random.split(drop_key)
    out_g = backbone_s(globals_flat, masks_flat, drop_path_key=k_global)
    out_l = backbone_s(to_group_rows(views["local_crops"], groups), drop_path_key=k_local)
    s_cls_g = out_g["x_norm_clstoken"]
    s_patch, weights, _ = _gather_masked_by_group(out_g["x_norm_patchtokens"], masks_flat, group, upper)
    s_dino_g = dino_s(s_cls_g).astype(jnp.float32)
    s_dino_l = dino_s(out_l["x_norm_clstoken"]).astype(jnp.float32)
    s_ibot = ibot_s(s_patch)

    # ---- losses, with DINOv2's term counts: 2 cross-view global pairs, L x 2 local pairs
    n_terms = (n_global - 1) * n_global + n_local * n_global
    dino_local = losses.dino_cross_entropy(
        from_group_rows(s_dino_l, n_local, groups), from_group_rows(t_dino, n_global, groups), lc.student_temp
    ) / n_terms
    dino_global = losses.dino_cross_entropy(
        s_dino_g[None], t_dino[None], lc.student_temp
    ) * n_global / n_terms
    dino = dino_local + dino_global
    ibot = losses.ibot_loss(s_ibot, t_ibot, weights, n_global * b, lc.student_temp)
    cls32 = from_group_rows(s_cls_g.astype(jnp.float32), n_global, groups).reshape(n_global, groups, group, -1)
    koleo_per_crop = jax.vmap(jax.vmap(losses.koleo_loss))(cls32).mean(axis=1)  # [2]
    koleo = lc.koleo_weight * jnp.sum(koleo_per_crop)
    total = lc.dino_weight * dino + lc.ibot_weight * ibot + koleo
    metrics = {
        "loss/dino": dino,
        "loss/dino_local": dino_local,
        "loss/dino_global": dino_global,
        "loss/ibot": ibot,
        "loss/koleo": koleo,
        "loss/total": total,
    }
    return total, (metrics, {"dino": new_dino_center, "ibot": new_ibot_center})


def make_train_step(config, models: Models, optimizer, schedules: Schedules, n_devices: int,
                    augment_on_device: bool = True):
    """train_step(state, batch) -> (state, metrics); jit it with shardings and donation.

    With augment_on_device off the batch carries ready-made crops instead of
    fields (`global_crops` [B,2,G,G,C], `local_crops` [B,L,S,S,C]): the
    benchmark uses it to time the model alone.
    """
    aug_cfg = augment.AugmentConfig.from_config(config)
    group = device_group_size(config, n_devices)
    clip = float(config.optim.clip_grad)  # <= 0: no clipping, norms still returned
    log_gradients = bool(config.wandb.log_gradients)
    hist_every = int(config.wandb.histogram_interval)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step = state.step
        key = jax.random.fold_in(state.rng, step)
        k_aug, k_drop = jax.random.split(key)
        if augment_on_device:
            views = augment.make_views(
                k_aug, parallel.join_rows(batch["field"]), batch["norm_low"], batch["norm_high"], aug_cfg
            )
        else:
            views = {k: jnp.swapaxes(batch[k], 0, 1) for k in ("global_crops", "local_crops")}
        temps = {"teacher": schedules.teacher_temp(step)}
        grad_fn = jax.value_and_grad(ssl_loss, has_aux=True)
        (_, (metrics, new_center)), grads = grad_fn(
            state.student, state.teacher, state.center, views, batch["masks"], temps,
            models, config, k_drop, group,
        )
        # Statistics of the raw gradients: what the clip threshold and the guide's
        # health thresholds act on.
        grad_metrics = optim.gradient_stats(grads) if log_gradients else {
            "gradients/global_norm": _tree_norm(grads)
        }
        if hist_every > 0:
            # Gradient histograms only on the steps that log them (the cond skips the
            # counting elsewhere); zeros otherwise, so the output shape is fixed.
            def count(g):
                return {k.replace("weights/", "gradients/"): v for k, v in param_histograms(g).items()}

            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(count, grads))
            grad_metrics["histograms"] = jax.lax.cond(
                (step + 1) % hist_every == 0, count, lambda g: zeros, grads
            )
        grads, pre_clip = optim.clip_by_module(grads, clip)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.student)
        student = optax.apply_updates(state.student, updates)

        # A non-finite loss or gradient skips the whole update (params, moments,
        # teacher, centres); the host counts them and stops after too many in a row.
        finite = jnp.isfinite(metrics["loss/total"]) & jnp.all(
            jnp.stack([jnp.isfinite(n) for n in pre_clip.values()])
        )

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        student = keep(student, state.student)
        # The moments stay, the update count advances: the optimiser's schedules
        # follow the iteration (as logged), skipped or not.
        opt_state = keep(opt_state, state.opt_state)._replace(count=opt_state.count)
        m = schedules.teacher_momentum(step)
        teacher = jax.tree.map(
            lambda t, s: jnp.where(finite, t * m + s * (1 - m), t), state.teacher, student
        )
        center = keep(new_center, state.center)

        metrics |= {
            "training/lr": schedules.lr(step),
            "training/wd": schedules.wd(step),
            "training/teacher_momentum": m,
            "training/teacher_temp": temps["teacher"],
            "training/last_layer_lr_mult": schedules.last_layer_lr_mult(step),
            "training/nonfinite": 1 - finite.astype(jnp.int32),
            "params/norm": _tree_norm(student),
            "params/update_norm": _tree_norm(updates),
        }
        metrics |= grad_metrics
        metrics |= {f"gradients/{name}_norm_preclip": n for name, n in pre_clip.items()}
        new_state = state.replace(
            step=step + 1, student=student, teacher=teacher, opt_state=opt_state,
            center=center,
        )
        return new_state, metrics

    return train_step


def make_metrics_fn(config, models: Models):
    """metrics_fn(params, probe) -> arrays for the pictures and consistency metrics.

    probe: field uint16 [P,C,H,W], norm_low/high [P,C]. Returns (fp32):
    images [P,S,S] (the channel-mean view the model sees), attention
    [P,heads,h,w] (last block, CLS query over patch keys, storage excluded, each
    row renormalised over patches), cls [P,D], patch [P,h,w,D], channel_cls
    [P,C,D] (each stain alone as input), mean_cls [P,D].
    """
    size = config.crops.global_size
    grid = size // config.model.patch_size
    n_skip = 1 + config.model.n_storage_tokens
    stacked = config.data.strategy == "stacked"

    def metrics_fn(params: Params, probe: dict) -> dict:
        backbone = nnx.merge(models.backbone, params["backbone"])
        views = augment.probe_views(probe["field"], probe["norm_low"], probe["norm_high"], size,
                                    input_norm=config.data.input_norm)
        mean_view = views["mean"]  # [P,S,S,1]
        channels = views["channels"]  # [P,C,S,S,1]
        p, c = channels.shape[:2]
        if stacked:
            # All stains stacked as input channels; "channel c alone" zeroes the others.
            full = jnp.moveaxis(channels[..., 0], 1, -1)  # [P,S,S,C]
            model_in = full
            eye = jnp.eye(c, dtype=full.dtype)
            per_channel = (full[:, None] * eye[None, :, None, None, :]).reshape(p * c, size, size, c)
        else:
            model_in = mean_view
            per_channel = channels.reshape(p * c, size, size, 1)
        out = backbone(model_in, return_attention=True)
        attn = out["attention"][:, :, 0, n_skip:].astype(jnp.float32)  # [P,heads,N]
        attn = attn / jnp.sum(attn, axis=-1, keepdims=True)
        per = backbone(per_channel)["x_norm_clstoken"].reshape(p, c, -1)
        return {
            "images": mean_view[..., 0].astype(jnp.float32),
            "attention": attn.reshape(p, attn.shape[1], grid, grid),
            "cls": out["x_norm_clstoken"].astype(jnp.float32),
            "patch": out["x_norm_patchtokens"].astype(jnp.float32).reshape(p, grid, grid, -1),
            "channel_cls": per.astype(jnp.float32),
            "mean_cls": out["x_norm_clstoken"].astype(jnp.float32),
        }

    return metrics_fn


def make_eval_loss(config, models: Models, n_devices: int):
    """eval_loss(state, batch) -> the objective's metrics on held-out fields, no update.

    The teacher plays both roles and drop path is off: validation measures the
    model, not the regulariser.
    """
    aug_cfg = augment.AugmentConfig.from_config(config)
    group = device_group_size(config, n_devices)
    schedules = Schedules.from_config(config)

    def eval_loss(state: TrainState, batch: dict) -> dict:
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0x5EED)
        views = augment.make_views(key, batch["field"], batch["norm_low"], batch["norm_high"], aug_cfg)
        temps = {"teacher": schedules.teacher_temp(state.step)}
        _, (metrics, _) = ssl_loss(
            state.teacher, state.teacher, state.center, views, batch["masks"], temps,
            models, config, None, group,
        )
        return metrics

    return eval_loss


def host_masks(config, step: int, group: int) -> np.ndarray:
    """iBOT masks [B,2,N] bool of the global batch of a step, deterministic by (seed, step).

    Drawn per device group of `group` samples (`device_group_size`), as DINOv2's
    collate draws them per GPU: each group's 2 x group crops get the stratified
    ratios, so each group's masked count stays under `mask_upperbound(config, group)`.
    Every process draws the whole batch's masks (cheap) and keeps its rows.
    """
    batch_size = config.train.batch_size
    rng = np.random.default_rng([config.seed, 0x1B07, int(step)])
    grid = config.crops.global_size // config.model.patch_size
    masks = [
        masking.sample_batch_masks(
            rng, 2 * group, (grid, grid),
            (config.loss.mask_ratio_min, config.loss.mask_ratio_max),
            config.loss.mask_sample_probability,
        ).reshape(group, 2, -1)
        for _ in range(batch_size // group)
    ]
    return np.concatenate(masks)


def param_histograms(params: Params, bins: int = 64) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Histograms of each module's values (parameters or gradients), counted on the device.

    Returns {"weights/<module>": (counts [bins], edges [bins+1])}: a few hundred
    numbers cross to the host instead of the arrays.
    """
    out = {}
    for name, tree in params.items():
        values = jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in jax.tree.leaves(tree)])
        lo, hi = jnp.min(values), jnp.max(values)
        edges = jnp.linspace(lo, jnp.where(hi > lo, hi, lo + 1), bins + 1)
        counts = jnp.histogram(values, edges)[0]
        out[f"weights/{name}"] = (counts, edges)
    return out
