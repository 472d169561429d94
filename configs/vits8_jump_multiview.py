"""DINOCell: ViT-S/8 DINO + iBOT + KoLeo on JUMP Cell Painting, multi-view channel strategy.

Every number of DINOCell's `dinov3_vits8_jump_s3_multiview.yaml` (see
../shared/REFERENCE.md), written out here with its origin even where it equals
the base default, so this file is the recipe. Run (one GPU, batch 80):

    python -m dinocell_jax.train --config configs/vits8_jump_multiview.py \\
        --config.data.source=loaddata:/data/jump/load_data_with_illum.csv \\
        --config.wandb.project=dinocell-ssl-pretraining --config.wandb.entity=my-team

Presets (`file.py:key=val,...`):
    gpus=8          global batch 80 x gpus (DINOCell: 80 per GPU; LR follows by sqrt(batch/1024))
    patch=16        ViT-S/16 (configs/vits16_jump_multiview.py)
    strategy=average  every crop from the channel mean (configs/vits8_jump_average.py)
    lr=1e-4         base LR before the sqrt_wrt_1024 scaling (DINOCell 2e-4 = 5e-5 x 4)
    input_norm=instance  each crop's channels standardised (OpenPhenom, Cell-DINO) instead of
                    DINOCell's fixed (x - 0.5) / 0.25; tagged "instance-norm"
e.g. 8 GPUs, patch 16: `--config configs/vits8_jump_multiview.py:gpus=8,patch=16`.

`data.source` is a LoadData CSV/parquet of CPJUMP1 (cellpainting-gallery
`cpg0000-jump-pilot/source_4/workspace/load_data_csv/<batch>/<plate>/load_data_with_illum.csv`),
a `folder:` of Phenix TIFFs or a `tfds:` dataset built from them; the default
path below is a placeholder and must exist. Shorten any run with
`--config.train.steps=N` (schedules stretch to it).
"""

from dinocell_jax import config as config_lib

PRESETS = {"gpus": 1, "patch": 8, "strategy": "multiview", "lr": 2e-4, "input_norm": "fixed"}
_ARCH_TAG = {"vit_small": "vit-small", "vit_base": "vit-base", "vit_tiny": "vit-tiny"}


def build(gpus: int = 1, patch: int = 8, strategy: str = "multiview", lr: float = 2e-4,
          input_norm: str = "fixed"):
    """The DINOCell recipe with the preset values applied."""
    if gpus < 1:
        raise config_lib.ConfigError(f"preset 'gpus': {gpus} must be >= 1")
    c = config_lib.base_config()

    m = c.model
    m.arch = "vit_small"  # ViT-S: 384 wide, 12 blocks, 6 heads, ~21.7M params
    m.patch_size = patch  # DINOCell: 8 -> 28x28 tokens on a 224 crop
    m.layerscale = 1e-5  # DINOv2/v3 LayerScale init
    m.n_storage_tokens = 4  # DINOv3 registers, DINOCell keeps them
    m.pos_embed = "rope"  # DINOv3 axial 2D RoPE
    m.rope_base = 100.0  # DINOv3
    m.drop_path_rate = 0.1  # DINOv2/v3 ViT-S, uniform
    m.attention_impl = "cudnn"  # flash attention on GPU (docs: 1.3-2.4x over XLA); "xla" on CPU
    m.dtype = "bfloat16"  # compute dtype; params and loss math stay fp32
    # DINOv3 trains with compute_precision.param_dtype bf16: FSDP2 casts every parameter,
    # LayerScale gammas and tokens included, to bf16 for the step, so its residual stream is
    # bf16. Ours too (params stay fp32); 7% faster on an H100 (docs/BENCHMARKS.md).
    m.residual_dtype = "bfloat16"

    h = c.heads
    h.out_dim = 65536  # prototypes, DINOv2/v3
    h.hidden_dim = 2048
    h.bottleneck_dim = 256
    h.n_layers = 3
    h.weight_norm_last_layer = False  # DINOv3: plain last layer
    h.separate_ibot_head = True  # DINOCell: separate_head: true

    loss = c.loss
    loss.dino_weight = 1.0
    loss.ibot_weight = 1.0
    loss.koleo_weight = 0.1  # DINOv2/v3, on each of the 2 global crops
    loss.student_temp = 0.1
    loss.warmup_teacher_temp = 0.04  # -> 0.07 linearly over 10 epochs
    loss.teacher_temp = 0.07
    loss.warmup_teacher_temp_epochs = 10
    loss.centering = "sinkhorn_knopp"  # DINOv3 / DINOCell
    loss.mask_sample_probability = 0.5  # iBOT: half of the global crops masked
    loss.mask_ratio_min, loss.mask_ratio_max = 0.1, 0.5  # iBOT stratified ratios

    o = c.optim
    o.lr = lr  # 5e-5 x 4 (DINOCell); x sqrt(batch/1024) -> 5.59e-5 at batch 80
    o.scaling_rule = "sqrt_wrt_1024"  # DINOv2/v3
    o.min_lr = 1e-6  # not scaled
    o.warmup_epochs = 10
    o.epochs = 90  # x 1000 iterations = 90k
    o.weight_decay, o.weight_decay_end = 0.04, 0.2  # cosine
    o.layerwise_decay = 0.9  # block i: 0.9^(12-i); embeddings 0.9^13
    o.patch_embed_lr_mult = 0.2
    o.clip_grad = 3.0  # per module: backbone, DINO head, iBOT head
    o.freeze_last_layer_epochs = 1
    o.adamw_beta1, o.adamw_beta2 = 0.9, 0.999
    o.momentum_teacher, o.final_momentum_teacher = 0.996, 1.0  # cosine

    t = c.train
    t.batch_size = 80 * gpus  # DINOCell: 80 per GPU
    t.epoch_length = 1000  # OFFICIAL_EPOCH_LENGTH

    cr = c.crops
    cr.global_size, cr.local_size, cr.n_local = 224, 96, 8  # DINOv2: 2 x 224 + 8 x 96
    cr.global_scale = (0.4, 1.0)  # DINOCell (DINOv2 default 0.32)
    cr.local_scale = (0.05, 0.4)

    d = c.data
    d.source = "loaddata:/data/jump/load_data_with_illum.csv"  # placeholder: override with a real file
    d.strategy = strategy  # DINOCell: multiview (global 1 = mean, global 2 = one channel)
    d.local_mean_p = 0.3  # DINOCell: a local crop is the channel mean with p 0.3
    # JUMP channel_mapping.csv, source_4 (CPJUMP1): Mito 1, AGP 2, RNA 3, ER 4, DNA 5
    d.channels = {"DNA": 5, "ER": 4, "RNA": 3, "AGP": 2, "Mito": 1}
    d.brightfield = ""  # planes 6-8 dropped, as others pretraining on JUMP do
    d.normalization = "percentile"  # full 16-bit range, per image, then clip to [0, 1]
    d.percentile_low, d.percentile_high = 0.1, 99.9
    d.input_norm = input_norm  # DINOCell: fixed (x - 0.5) / 0.25 of the [0, 1] intensities
    d.field_size = 1080  # CPJUMP1 fields are 1080x1080 16-bit (Phenix binning 2)
    d.downscale = 1
    d.holdout, d.holdout_by = 0.1, "plate"  # validation loss and probes on unseen plates
    # The host only reads and decodes TIFFs (16 cores per GPU); crops run on the device.
    # One decoding thread per worker: more oversubscribe the cores (measured on the H100
    # host, docs/BENCHMARKS.md); raise data.read_threads for s3:// reads, which wait on the network.
    d.num_workers = 14
    d.read_threads = 1
    d.prefetch = 4

    w = c.wandb
    w.project = "dinocell-ssl-pretraining"  # the guide's project
    w.name = ""  # auto: vits8-jump-multiview-<timestamp>
    # One group for the guide's comparisons (patch 8 vs 16, average vs multi-view, LRs);
    # tags as the guide's example. They follow the presets, not raw --config.model.*
    # overrides: change patch and strategy through the presets.
    w.group = "jump-vits-pretraining"
    w.tags = (_ARCH_TAG[m.arch], f"patch-{patch}", strategy, "jump") + (
        ("instance-norm",) if input_norm == "instance" else ())
    w.log_interval = 100  # guide
    w.attention_log_interval = 1000  # guide
    w.pca_log_interval = 5000  # guide
    w.log_attention_maps = w.log_feature_pca = w.log_gradients = True
    w.log_model_checkpoints = False  # guide: large files, enable deliberately
    w.resume = "allow"

    c.checkpoint.interval = 10000  # the guide's interval (the original saved every 2500)
    c.checkpoint.keep = 3
    c.eval.interval = 5000  # kNN probe and validation loss with the PCA pictures
    return c


def get_config(arg=None):
    return build(**config_lib.parse_preset(arg, PRESETS))
