"""A tiny but complete configuration for tests: every part of the recipe, at toy size."""

from dinocell_jax import config as config_lib


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
