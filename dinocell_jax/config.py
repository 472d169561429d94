"""The configuration surface: every key, its default, and validation.

`base_config()` holds every key a run reads, with the DINOCell values of
../shared/REFERENCE.md as defaults (each with its origin). Config files under
`configs/` start from it and change what they need; the config is locked so an
override of a key that does not exist fails, and `validate()` checks values
against each other before any JAX work.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")  # canonical order of the 5 fluorescent stains
STRATEGIES = ("multiview", "average", "stacked")
INPUT_NORMS = ("fixed", "instance")
PHENOTYPE_SETS = ("stain_specific", "shared")  # data.phenotypes, synthetic.phenotype
ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_custom")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = ""  # set by --workdir; derived from wandb.name when empty

    c.model = m = ml_collections.ConfigDict()
    m.arch = "vit_small"  # 384 wide, 12 blocks, 6 heads (DINOCell ViT-S)
    m.patch_size = 8  # DINOCell: patch 8 -> 28x28 tokens on a 224 crop
    m.embed_dim = 384  # used only by arch=vit_custom
    m.depth = 12  # used only by arch=vit_custom
    m.num_heads = 6  # used only by arch=vit_custom
    m.mlp_ratio = 4.0
    m.qkv_bias = True
    m.layerscale = 1e-5  # DINOv2/v3 LayerScale init; 0 disables LayerScale
    m.n_storage_tokens = 4  # DINOv3 registers; DINOv2 default is 0
    m.pos_embed = "rope"  # "rope" (DINOv3, DINOCell) | "learned" (DINOv2)
    m.pos_embed_size = 224  # crop size the learned position grid is made for
    m.rope_base = 100.0  # DINOv3 RoPE base
    m.drop_path_rate = 0.1  # DINOv2/v3 ViT-S, uniform over blocks
    m.mask_k_bias = False
    m.attention_impl = "xla"  # "xla" | "cudnn" (GPU flash attention)
    m.dtype = "bfloat16"  # compute dtype; params, optimiser state and loss math stay fp32
    m.residual_dtype = "float32"  # the blocks' residual stream; bfloat16 is 5-8% faster, DINOv3's (see vit.ViTConfig)
    m.remat = False  # recompute block activations in the backward pass (~1/3 more backbone compute, far less memory)
    m.remat_mlp = False  # recompute only the MLPs' GELU in the backward pass (one elementwise pass, less memory)
    m.init_from = ""  # DINOv2/DINOv3 .pth state dict to continue pretraining from

    c.heads = h = ml_collections.ConfigDict()
    h.out_dim = 65536  # prototypes (DINOv2/v3)
    h.hidden_dim = 2048
    h.bottleneck_dim = 256
    h.n_layers = 3
    h.weight_norm_last_layer = False  # DINOv3 plain last layer; DINOv2 uses weight norm
    h.separate_ibot_head = True  # DINOCell: separate_head true

    c.loss = l = ml_collections.ConfigDict()
    l.dino_weight = 1.0
    l.ibot_weight = 1.0
    l.koleo_weight = 0.1  # applied to each of the 2 global crops
    l.student_temp = 0.1
    l.teacher_temp = 0.07
    l.warmup_teacher_temp = 0.04
    l.warmup_teacher_temp_epochs = 10
    l.centering = "sinkhorn_knopp"  # DINOv3/DINOCell; "centering" = DINOv2 momentum centre
    l.center_momentum = 0.9
    l.mask_sample_probability = 0.5  # half of the global crops get an iBOT mask
    l.mask_ratio_min = 0.1
    l.mask_ratio_max = 0.5
    # KoLeo neighbourhoods: DINOv2 uses each device's batch (0 = batch / devices);
    # a fixed size makes the step independent of the device count.
    l.koleo_group_size = 0

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 2e-4  # REFERENCE: 5e-5 x 4, then x sqrt(batch/1024) -> 5.59e-5 at batch 80
    o.scaling_rule = "sqrt_wrt_1024"  # "sqrt_wrt_1024" | "linear_wrt_256" | "none"
    o.min_lr = 1e-6  # not scaled
    o.warmup_epochs = 10
    o.epochs = 90  # 90 x 1000 iterations
    o.weight_decay = 0.04
    o.weight_decay_end = 0.2
    o.layerwise_decay = 0.9
    o.patch_embed_lr_mult = 0.2
    o.clip_grad = 3.0  # per module: backbone, DINO head, iBOT head; 0 disables
    o.freeze_last_layer_epochs = 1
    o.adamw_beta1 = 0.9
    o.adamw_beta2 = 0.999
    o.momentum_teacher = 0.996
    o.final_momentum_teacher = 1.0

    c.train = t = ml_collections.ConfigDict()
    t.batch_size = 80  # global batch of fields (DINOCell: 80 per GPU)
    t.epoch_length = 1000  # OFFICIAL_EPOCH_LENGTH
    t.steps = -1  # > 0 overrides epochs * epoch_length; schedules stretch to it
    # > 0: this run ends at that step (a checkpoint, exit 0) while the schedules still span the
    # whole run; a later run with a larger value, or without it, goes on from there. For jobs
    # with a time limit, and short test runs that stop in the middle of a longer schedule.
    t.stop_after = -1
    t.max_bad_steps = 10  # consecutive non-finite steps before the run stops
    t.progress_bar = True
    # Share of each GPU's memory JAX's allocator may take (XLA_PYTHON_CLIENT_MEM_FRACTION,
    # which wins when set). JAX's own 0.75 leaves an 80 GB H100 59 GiB, less than the DINOCell
    # trainer's 73.9 GiB peak at batch 128 per GPU (54.8 with model.remat_mlp:
    # docs/BENCHMARKS.md, thirteenth session; see parallel.configure_gpu_backend).
    t.device_memory_fraction = 0.95
    # XLA's Triton GEMM fusions; off, cuBLAS runs every matmul: +7.8% on an H200
    # (docs/BENCHMARKS.md, nineteenth session; parallel.configure_gpu_backend).
    t.triton_gemm = False
    # >= 0: a jax.profiler trace of trace_steps steps from this step into <workdir>/trace (the
    # devices' kernels and copies, the host's threads; monitor.system.StepTrace).
    t.trace_from = -1
    t.trace_steps = 5
    # Also trace every Python call: it shows which Python code holds a thread, but slows that
    # code several-fold (a batch-128 step's mask drawing took 80 ms in such a trace on an H200
    # host, ~11 ms untraced on a 2-core machine), so the host's timing is no longer a real run's.
    t.trace_python = False
    # Steps the loop may have dispatched past the last one whose metrics it has read: after
    # dispatching step n it reads step n - steps_in_flight's (the read waits for that step).
    # 1 leaves the host one step's device time to dispatch the next; 2 gives it two, to absorb
    # slow dispatches (XLA re-recording the CUDA graph took up to 330 ms at batch 128 on an H200
    # host against a 0.32 s step: docs/BENCHMARKS.md, sixteenth session), at the cost of one more
    # batch held on the devices. It did not help there (323 images/s against 336-347 with 1,
    # seventeenth session).
    t.steps_in_flight = 1

    c.crops = cr = ml_collections.ConfigDict()
    cr.global_size = 224
    cr.local_size = 96
    cr.n_local = 8
    cr.global_scale = (0.4, 1.0)
    cr.local_scale = (0.05, 0.4)
    cr.flip_p = 0.5  # horizontal and vertical flips, each
    cr.rot90 = True  # free for microscopy
    cr.jitter_p = 0.8  # brightness/contrast jitter
    cr.brightness = 0.4
    cr.contrast = 0.4
    cr.blur_p_global = (1.0, 0.1)  # DINOv2: global 1 always blurred, global 2 rarely
    cr.blur_p_local = 0.5
    cr.solarize_p = 0.2  # global 2 only (DINOv2)

    c.data = d = ml_collections.ConfigDict()
    d.source = "synthetic"  # synthetic | loaddata:<csv|parquet> | folder:<dir> | tfds:<name>
    d.strategy = "multiview"  # multiview | average | stacked
    d.local_mean_p = 0.3  # multiview: a local crop is the channel mean with this probability
    # stacked: global crop 2 and each local crop show one random stain alone (the other
    # input channels zero) with this probability; the multi-view twist on a stacked input.
    d.stacked_single_p = 0.0
    # Channel number of each stain in the microscope's files (JUMP channel_mapping.csv,
    # CPJUMP1/source_4); brightfield planes are read only when data.brightfield is set.
    d.channels = ml_collections.ConfigDict({"DNA": 5, "ER": 4, "RNA": 3, "AGP": 2, "Mito": 1})
    d.brightfield = ""  # e.g. "6,7,8" to add brightfield planes
    d.normalization = "percentile"  # percentile | minmax
    d.percentile_low = 0.1
    d.percentile_high = 99.9
    # Network inputs from the [0, 1] intensities: "fixed" (x - 0.5) / 0.25 for every
    # image (DINOCell; keeps absolute brightness), or "instance": each crop's channels
    # standardised to zero mean, unit spread (OpenPhenom, Cell-DINO). Mostly-background
    # fields look alike to a fresh network under "fixed" (see docs/BENCHMARKS.md);
    # "instance" drops brightness, so brightness/contrast jitter only acts via clipping.
    d.input_norm = "fixed"
    d.downscale = 1  # integer downscale of fields on the host
    d.field_size = 256  # synthetic: square field side; real data: fields are cropped/padded to it
    d.num_fields = 4096  # synthetic: fields per epoch of the generator
    d.n_phenotypes = 4  # synthetic
    # synthetic: "stain_specific" phenotypes differ also in what one stain alone shows
    # (chromatin, mitochondria, stain ratios); "shared" ones only in what every stain draws.
    d.phenotypes = "stain_specific"
    d.holdout = 0.1  # fraction of plates (wells when one plate) held out
    d.holdout_by = "plate"
    d.labels_csv = ""  # optional CSV keyed by plate/well with label columns
    d.label_column = ""
    d.num_workers = 4
    d.prefetch = 2  # batches of fields buffered by the readers
    d.device_prefetch = 2  # batches put on the devices ahead of the step, by a thread
    d.max_failure_fraction = 0.01  # stop when more fields than this fail to read
    d.cache_dir = ""  # bounded cache for s3:// reads
    d.cache_max_gb = 50.0  # size bound of data.cache_dir; least recently used files go first
    d.s3_endpoint_url = ""  # S3-compatible endpoint (MinIO, a test server); "" = AWS
    d.s3_anonymous = True  # the Cell Painting Gallery is public: unsigned requests
    d.read_retries = 4  # attempts per remote file, exponential backoff between them
    d.retry_backoff_s = 0.5
    d.read_threads = 8  # decoding threads of each reading process: the trainer, or each worker
    d.illumination = True  # divide by FileName_Illum* functions when a LoadData table has them
    d.path_remap = ""  # "FROM=TO;...": re-root LoadData paths, e.g. s3://cellpainting-gallery/=/data/cpg/
    d.failure_check_after = 100  # fields read before data.max_failure_fraction is enforced
    d.n_plates = 4  # synthetic
    d.tfds_data_dir = ""  # data.source=tfds:<name>: where the prepared dataset lives

    c.wandb = w = ml_collections.ConfigDict()
    w.enabled = True
    w.project = "dinocell-ssl-pretraining"
    w.entity = ""
    w.name = ""  # auto: <arch><patch>-<dataset>-<strategy>-<timestamp>
    w.group = ""
    w.tags = ()
    w.notes = ""
    w.log_interval = 100
    w.attention_log_interval = 1000
    w.pca_log_interval = 5000
    w.log_attention_maps = True
    w.log_feature_pca = True
    w.log_gradients = True
    w.log_model_checkpoints = False  # large files
    w.histogram_interval = 0  # weight/gradient histograms; 0 = off
    w.offline = False
    w.resume = "allow"
    w.grad_norm_high = 10.0  # guide: > 10 potential instability
    w.grad_norm_low = 1e-3  # guide: < 0.001 vanishing
    w.probe_size = 8  # fields in the fixed probe batch of the pictures

    c.checkpoint = k = ml_collections.ConfigDict()
    k.interval = 10000  # the guide's checkpoint interval
    k.keep = 3
    k.keep_every = 0  # also keep every K-th step; 0 = off
    k.resume_from = ""

    c.eval = e = ml_collections.ConfigDict()
    e.interval = 0  # 0 = off
    e.knn_k = 20
    e.n_fields = 256
    e.batch_size = 32
    e.val_batches = 4  # held-out global batches for val/loss/*
    # Phenotypic-activity mAP: the negative-control label ("" = JUMP's DMSO JCP2022_033924,
    # or phenotype 0 of synthetic data), and the size of copairs' null distribution.
    e.negative_control = ""
    e.map_null_size = 1000

    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = -1  # -1: all devices not used by the other axes
    ms.fsdp = 1
    # (regex over parameter paths, mesh axis of the largest dim); first match wins.
    ms.fsdp_rules = ((".*", "fsdp"),)

    # Multi-process launches (parallel.initialize): empty / -1 = from the launcher's
    # environment (JAX_* variables, SLURM srun, Open MPI); see README "Multi-host".
    c.distributed = ds = ml_collections.ConfigDict()
    ds.coordinator_address = ""  # host:port of process 0
    ds.num_processes = -1
    ds.process_id = -1
    ds.local_device_ids = ""  # "0,1": this process's GPUs; "" = its local rank's GPU, or all with one task per node
    ds.initialization_timeout = 300  # s for every process to reach the coordinator (JAX default)
    ds.heartbeat_timeout = 100  # s without heartbeats before a process is declared dead (JAX default)
    ds.shutdown_timeout = 120  # s the processes wait for each other at shutdown (JAX: 300); bounds a failed job's exit
    ds.barrier_timeout = 600  # s at our barriers (start, exit); covers a slow final checkpoint
    ds.cpu_collectives = "gloo"  # cross-process collectives of the CPU backend (tests, CPU clusters)
    return c


def total_steps(config) -> int:
    if config.train.steps > 0:
        return int(config.train.steps)
    return int(config.optim.epochs * config.train.epoch_length)


def steps_per_epoch(config) -> float:
    """Iterations of one schedule "epoch"; shrinks with `train.steps` so schedules stretch to it."""
    return total_steps(config) / config.optim.epochs


def peak_lr(config) -> float:
    rule, batch = config.optim.scaling_rule, config.train.batch_size
    if rule == "sqrt_wrt_1024":
        return config.optim.lr * math.sqrt(batch / 1024)
    if rule == "linear_wrt_256":
        return config.optim.lr * batch / 256
    if rule == "none":
        return config.optim.lr
    raise ConfigError(f"optim.scaling_rule: unknown rule {rule!r}")


def _fail(key: str, msg: str):
    raise ConfigError(f"config.{key}: {msg}")


def validate(config, n_devices: int) -> None:
    """Checks values against each other; raises ConfigError naming the key."""
    m, c, d = config.model, config.crops, config.data
    if m.arch not in ARCHS:
        _fail("model.arch", f"{m.arch!r} is not one of {ARCHS}")
    if m.pos_embed not in ("rope", "learned"):
        _fail("model.pos_embed", f"{m.pos_embed!r} is not 'rope' or 'learned'")
    if m.attention_impl not in ("xla", "cudnn"):
        _fail("model.attention_impl", f"{m.attention_impl!r} is not 'xla' or 'cudnn'")
    for key in ("dtype", "residual_dtype"):
        if m[key] not in ("float32", "bfloat16", "float16"):
            _fail(f"model.{key}", f"{m[key]!r} is not float32, bfloat16 or float16")
    for key in ("global_size", "local_size"):
        size = c[key]
        if size <= 0 or size % m.patch_size:
            _fail(f"crops.{key}", f"{size} is not a positive multiple of model.patch_size={m.patch_size}")
    if m.pos_embed == "learned" and m.pos_embed_size % m.patch_size:
        _fail("model.pos_embed_size", f"{m.pos_embed_size} is not a multiple of model.patch_size={m.patch_size}")
    for key in ("global_scale", "local_scale"):
        lo, hi = c[key]
        if not 0 < lo <= hi <= 1:
            _fail(f"crops.{key}", f"{c[key]} must satisfy 0 < min <= max <= 1")
    if d.strategy not in STRATEGIES:
        _fail("data.strategy", f"{d.strategy!r} is not one of {STRATEGIES}")
    for key in ("local_mean_p", "stacked_single_p"):
        if not 0 <= d[key] <= 1:
            _fail(f"data.{key}", f"{d[key]} is not a probability in [0, 1]")
    if d.phenotypes not in PHENOTYPE_SETS:
        _fail("data.phenotypes", f"{d.phenotypes!r} is not one of {PHENOTYPE_SETS}")
    if d.input_norm not in INPUT_NORMS:
        _fail("data.input_norm", f"{d.input_norm!r} is not one of {INPUT_NORMS}")
    if config.loss.centering not in ("sinkhorn_knopp", "centering"):
        _fail("loss.centering", f"{config.loss.centering!r} is not 'sinkhorn_knopp' or 'centering'")
    if config.train.batch_size <= 0 or config.train.batch_size % n_devices:
        _fail("train.batch_size", f"{config.train.batch_size} is not divisible by the {n_devices} devices")
    if config.mesh.fsdp < 1 or n_devices % config.mesh.fsdp:
        _fail("mesh.fsdp", f"{config.mesh.fsdp} does not divide the {n_devices} devices")
    if config.mesh.data not in (-1, n_devices // config.mesh.fsdp):
        _fail("mesh.data", f"{config.mesh.data} x mesh.fsdp={config.mesh.fsdp} != {n_devices} devices")
    if config.train.trace_from >= 0 and config.train.trace_steps < 1:
        _fail("train.trace_steps", f"{config.train.trace_steps} must be >= 1 (steps to trace from train.trace_from)")
    if config.train.steps_in_flight < 1:
        _fail("train.steps_in_flight", f"{config.train.steps_in_flight} must be >= 1 (dispatched steps not yet read)")
    if d.device_prefetch < 1:
        _fail("data.device_prefetch", f"{d.device_prefetch} must be >= 1 (batches on the devices ahead of the step)")
    if d.field_size < c.global_size:
        _fail("data.field_size", f"{d.field_size} is smaller than crops.global_size={c.global_size}")
    if not 0 <= config.loss.mask_ratio_min <= config.loss.mask_ratio_max <= 1:
        _fail("loss.mask_ratio_min", "need 0 <= mask_ratio_min <= mask_ratio_max <= 1")
    group = config.loss.koleo_group_size
    if group < 0 or (group and config.train.batch_size % group) or group == 1:
        _fail("loss.koleo_group_size", f"{group} must be 0 or a divisor (> 1) of train.batch_size")
    if not group and config.train.batch_size // n_devices < 2:
        _fail("train.batch_size", "KoLeo needs at least 2 fields per device (or set loss.koleo_group_size)")
    if total_steps(config) <= 0:
        _fail("train.steps", "the run has no steps (optim.epochs x train.epoch_length <= 0)")
    if config.train.stop_after == 0 or config.train.stop_after < -1:
        _fail("train.stop_after", f"{config.train.stop_after} must be a step > 0, or -1 for the whole run")
    o = config.optim
    if o.epochs <= 0:
        _fail("optim.epochs", f"{o.epochs} must be positive (an epoch is total steps / optim.epochs)")
    for key in ("warmup_epochs", "freeze_last_layer_epochs"):
        if not 0 <= o[key] <= o.epochs:
            _fail(f"optim.{key}", f"{o[key]} is not within [0, optim.epochs={o.epochs}]")
    if config.loss.warmup_teacher_temp_epochs < 0:
        _fail("loss.warmup_teacher_temp_epochs", "must be >= 0")
    if not 0 < o.layerwise_decay <= 1:
        _fail("optim.layerwise_decay", f"{o.layerwise_decay} is not in (0, 1]")
    for key in ("adamw_beta1", "adamw_beta2"):
        if not 0 <= o[key] < 1:
            _fail(f"optim.{key}", f"{o[key]} is not in [0, 1)")
    if o.lr <= 0 or o.min_lr < 0 or o.clip_grad < 0:
        _fail("optim.lr", f"need lr > 0, min_lr >= 0, clip_grad >= 0 (got {o.lr}, {o.min_lr}, {o.clip_grad})")
    for key in ("log_interval", "attention_log_interval", "pca_log_interval"):
        if config.wandb[key] <= 0:
            _fail(f"wandb.{key}", f"{config.wandb[key]} must be positive")
    peak_lr(config)


def parse_preset(arg: str | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """A config file's `get_config(arg)` argument, ml_collections style `key=val,key=val`.

    `defaults` names every preset the file accepts and its default (bool, int,
    float or str); values are cast to the default's type (bool: true/false).
    Returns the defaults updated by `arg`; ConfigError names an unknown preset
    or a bad value.
    """
    out = dict(defaults)
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f"preset {key!r}: unknown; this config accepts {sorted(defaults)}")
        if not eq:
            raise ConfigError(f"preset {key!r}: needs a value ({key}=...)")
        kind, value = type(defaults[key]), value.strip()
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = kind(value)
        except ValueError:
            raise ConfigError(f"preset {key!r}: {value!r} is not a {kind.__name__}") from None
    return out


def to_dict(config) -> dict[str, Any]:
    """Plain JSON-able dict of the resolved config (tuples become lists)."""
    return config.to_dict()
