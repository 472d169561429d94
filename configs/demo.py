"""Demo: the whole method in minutes on a CPU, on synthetic Cell Painting fields.

A 4-block, 64-wide ViT with patch 8 on 32 px global and 16 px local crops of
64 px synthetic 5-channel fields; 1024 prototypes; the full DINO + iBOT + KoLeo
step, EMA teacher, multi-view channels, schedules, and every W&B panel of the
guide (offline: `wandb sync runs/<name>/wandb/offline-run-*` uploads it later).
About 1.5 minutes of training on 2 CPU cores (plus installs); the losses fall visibly (loss/dino from ~7.3 to
~6.8, loss/iBOT from ~3.6 to ~3.2 over the 400 steps). Where it departs from
DINOCell to get there at this scale (each commented below): per-crop input
standardisation, no LayerScale, unit-norm prototypes, a 0.02 teacher and
prototypes frozen for half the run. Run:

    python -m dinocell_jax.train --config configs/demo.py

To try the data-parallel path on one machine, simulate 8 devices:
`XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m dinocell_jax.train --config configs/demo.py`.

`configs/demo.py:recipe=features` is the variant that learns phenotype features on
these fields (the k-NN of `scripts/ssl_quality.py --recipe features`): all five
stains as one input, fewer prototypes, no KoLeo, larger crops of 2x-downscaled
fields (docs/BENCHMARKS.md, "Does pretraining learn?").
"""

from dinocell_jax import config as config_lib

RECIPES = ("demo", "features")


def get_config(arg=None):
    recipe = config_lib.parse_preset(arg, {"recipe": "demo"})["recipe"]
    if recipe not in RECIPES:
        raise config_lib.ConfigError(f"preset 'recipe': {recipe!r} is not one of {RECIPES}")
    c = config_lib.base_config()
    c.seed = 0

    m = c.model
    m.arch = "vit_custom"
    m.embed_dim, m.depth, m.num_heads = 64, 4, 4  # head dim 16
    m.patch_size = 8  # the DINOCell patch: 4x4 tokens on a 32 px global crop
    m.n_storage_tokens = 4  # keep DINOCell's token layout
    m.pos_embed = "rope"
    # No LayerScale: with 1e-5 gains a fresh 4-block net hands the head nearly the same
    # CLS for every field (LayerScale is for deep nets; docs/BENCHMARKS.md).
    m.layerscale = 0.0
    m.drop_path_rate = 0.0  # 4 blocks and 400 steps: nothing to regularise yet
    m.attention_impl = "xla"
    m.dtype = "float32"  # CPU: bf16 matmuls are emulated and slower

    h = c.heads
    h.out_dim, h.hidden_dim, h.bottleneck_dim = 1024, 256, 64
    # DINOv2's unit-norm prototypes: DINOv3's plain ones start at norm 0.16 in 64
    # dimensions, too small for the targets to differ between fields at first.
    h.weight_norm_last_layer = True

    # A sharper teacher from the start (DINOCell: 0.04 -> 0.07 over 10 epochs): the
    # small batch's Sinkhorn targets are otherwise near uniform.
    c.loss.teacher_temp = c.loss.warmup_teacher_temp = 0.02

    o = c.optim
    # A tiny model and a short run: a larger LR than DINOCell's scaled 5.6e-5, no batch scaling.
    o.lr = 1e-3
    o.scaling_rule = "none"
    o.min_lr = 1e-5
    o.epochs = 20
    o.warmup_epochs = 2
    # Prototypes frozen for the first half: a fresh student whose targets are still
    # uninformative lowers its loss fastest by flattening the prototypes against the
    # common direction of its outputs, after which nothing moves (loss/dino = ln K).
    o.freeze_last_layer_epochs = 10
    o.momentum_teacher = 0.99  # 0.996 would leave the teacher near its init after 400 steps

    t = c.train
    t.batch_size = 32  # 4 fields per device on 8 simulated devices (KoLeo needs >= 2)
    t.epoch_length = 20  # 20 x 20 = 400 steps

    cr = c.crops
    cr.global_size, cr.local_size, cr.n_local = 32, 16, 8  # 1/7 and 1/6 of 224 / 96

    d = c.data
    d.source = "synthetic"
    d.strategy = "multiview"
    # Each crop standardised per channel: the fields are mostly dark background, and
    # under the fixed (x - 0.5) / 0.25 they all look alike to a fresh network.
    d.input_norm = "instance"
    d.field_size = 64
    d.num_fields = 4096
    d.n_phenotypes = 4
    d.num_workers = 0  # in-process: on 2 cores, worker processes only compete with the step
    d.prefetch = 2

    w = c.wandb
    w.project = "dinocell-demo"
    w.group = "demo"
    w.tags = ("demo", "synthetic", "vit-custom", "patch-8", "multiview")
    w.offline = True  # no account needed
    w.log_interval = 10
    w.attention_log_interval = 100
    w.pca_log_interval = 200
    w.histogram_interval = 200
    w.probe_size = 8

    c.checkpoint.interval = 200
    c.checkpoint.keep = 2
    c.eval.interval = 200
    c.eval.n_fields = 256
    c.eval.batch_size = 32
    if recipe == "features":
        _features_recipe(c)
    return c


def _features_recipe(c) -> None:
    """What the synthetic phenotypes need to show in the CLS token (each measured against the
    demo in docs/BENCHMARKS.md). A stacked input shows every stain's morphology of the same
    cells at once (the stains' intensity ratios do not reach the network: each crop is
    standardised per channel); the rest keeps the DINO head off the uniform output."""
    c.data.strategy = "stacked"
    c.wandb.tags = tuple(t for t in c.wandb.tags if t != "multiview") + ("stacked", "features")
    c.data.downscale = 2  # more cells per crop
    c.crops.local_size = 24  # 3 x 3 tokens: a 16 px local crop is too small to say much
    c.crops.global_scale = (0.6, 1.0)  # views that overlap more: targets the student can predict
    c.crops.local_scale = (0.2, 0.5)
    c.heads.out_dim = 64  # Sinkhorn spreads the 64 global rows of a batch over fewer prototypes
    c.loss.koleo_weight = 0.0  # spreads the CLS of fields alike in phenotype apart
    c.loss.teacher_temp = c.loss.warmup_teacher_temp = 0.04
    c.optim.lr = 3e-4
    c.optim.freeze_last_layer_epochs = 1
