"""A tiny but complete configuration for tests: every part of the recipe, at toy size; and the
test processes' XLA flags."""

import os

from dinocell_jax import config as config_lib

# The tests compile many small programs and run few steps of each: without LLVM's
# optimisation passes XLA compiles about twice as fast (the tiny training step: ~29 s ->
# ~16 s on 2 cores) and runs about twice as slow.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
DEVICES_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS of a test process (conftest's, and the short trainer runs' subprocesses):
    `devices` simulated CPU devices, compiled fast."""
    return f"{DEVICES_FLAG}={devices} {FAST_COMPILE_FLAG}"


def training_env(devices: int | None = 8) -> dict:
    """The environment for a subprocess that trains for hundreds of steps: XLA at full
    optimisation, on `devices` simulated CPU devices (None: the one real CPU device)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if f != FAST_COMPILE_FLAG and not f.startswith(DEVICES_FLAG)]
    if devices is not None:
        flags.append(f"{DEVICES_FLAG}={devices}")
    return dict(os.environ, XLA_FLAGS=" ".join(flags))


def tiny_config(**overrides):
    c = config_lib.base_config()
    c.model.arch = "vit_custom"
    c.model.embed_dim = 32
    c.model.depth = 2
    c.model.num_heads = 2
    c.model.patch_size = 4
    c.model.n_storage_tokens = 1
    c.model.dtype = "float32"
    c.heads.out_dim = 64
    c.heads.hidden_dim = 32
    c.heads.bottleneck_dim = 16
    c.crops.global_size = 16
    c.crops.local_size = 8
    c.crops.n_local = 2
    c.data.field_size = 32
    c.data.num_fields = 64
    c.data.num_workers = 0
    c.train.batch_size = 16
    c.train.steps = 4
    c.train.progress_bar = False
    c.optim.epochs = 2
    c.optim.warmup_epochs = 1
    c.wandb.enabled = False
    c.wandb.log_interval = 2
    c.wandb.attention_log_interval = 2
    c.wandb.pca_log_interval = 4
    c.wandb.probe_size = 4
    c.checkpoint.interval = 1000
    c.loss.koleo_group_size = 8
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def random_checkpoint(config, workdir, step):
    """Writes `workdir` as a finished run: config.json and one checkpoint at `step` of a
    random TrainState (teacher differs from student). Returns that state."""
    import json

    import jax
    import numpy as np

    from dinocell_jax import checkpoint as ckpt_lib
    from dinocell_jax.ssl import optim
    from dinocell_jax.ssl import step as step_lib
    from dinocell_jax.ssl.schedules import Schedules

    optimizer = optim.make_optimizer(config, Schedules.from_config(config))
    abstract = jax.eval_shape(lambda k: step_lib.init_state(config, k, optimizer), jax.random.key(0))
    rng = np.random.default_rng(0)

    def fill(a):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        return (0.2 * rng.normal(size=a.shape)).astype(a.dtype)  # small: keeps activations tame

    state = jax.tree.map(fill, abstract).replace(step=np.int32(step))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict()))
    ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), config)
    ckpt.save(step, state, {}, ckpt_lib.run_metadata(config, None))
    ckpt.close()
    return state
