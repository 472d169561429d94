"""Command line, overrides as sweep agents pass them, presets, and every config file."""

import datetime
import json
import math
import os

import pytest

from dinocell_jax import cli
from dinocell_jax import config as config_lib
from dinocell_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
JUMP = os.path.join(ROOT, "configs", "vits8_jump_multiview.py")
JUMP_FILES = ("vits8_jump_multiview.py", "vits8_jump_average.py", "vits16_jump_multiview.py")


def test_overrides_as_a_sweep_agent_passes_them():
    config, workdir = cli.parse_config([
        "--config", DEMO,
        "--config.optim.lr=0.0001",
        "--config.wandb.offline=False",
        "--config.model.qkv_bias=true",
        "--config.crops.global_scale=(0.3,1.0)",
        "--config.crops.local_scale", "[0.1, 0.5]",
        "--config.train.steps=20",
        "--config.wandb.tags=vit-small,patch-8",
        "--config.data.channels.DNA=3",
        "--config.mesh.fsdp_rules=(('.*kernel', 'fsdp'), ('.*', ''))",
        "--config.optim.weight_decay=1",
        "--config.wandb.name", "my-run",
    ])
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)
    assert config.wandb.offline is False and config.model.qkv_bias is True
    assert config.crops.global_scale == (0.3, 1.0) and config.crops.local_scale == (0.1, 0.5)
    assert config.train.steps == 20 and config.data.channels.DNA == 3
    assert config.wandb.tags == ("vit-small", "patch-8")
    assert config.mesh.fsdp_rules == ((".*kernel", "fsdp"), (".*", ""))
    assert config.optim.weight_decay == 1.0 and isinstance(config.optim.weight_decay, float)
    assert workdir == os.path.join("runs", "my-run") == config.workdir
    assert config_lib.total_steps(config) == 20


@pytest.mark.parametrize("argv, names", [
    (["--config.nope=1"], "config.nope"),
    (["--config.optim.nope=1"], "config.optim.nope"),
    (["--config.optim.lr=abc"], "config.optim.lr"),
    (["--config.train.steps=1.5"], "config.train.steps"),
    (["--config.wandb.offline=maybe"], "config.wandb.offline"),
    (["--config.crops.global_scale=(0.3,x)"], "config.crops.global_scale[1]"),
    (["--config.optim.lr.x=1"], "config.optim.lr.x"),
    (["--config.optim=3"], "config.optim"),
    (["--bogus"], "--bogus"),
    (["--workdir"], "--workdir"),
])
def test_override_errors_name_the_key(argv, names):
    with pytest.raises(ConfigError) as e:
        cli.parse_config(["--config", DEMO, *argv])
    message = str(e.value)
    assert names in message and "\n" not in message, message


def test_unknown_key_suggests_the_near_one():
    with pytest.raises(ConfigError, match="did you mean 'config.optim.lr'"):
        cli.parse_config(["--config", DEMO, "--config.optim.lrr=1"])


@pytest.mark.parametrize("spec, names", [
    ("configs/missing.py", "configs/missing.py"),
    (f"{JUMP}:pach=16", "'pach'"),
    (f"{JUMP}:patch=big", "'patch'"),
    (f"{DEMO}:x=1", "'x'"),
])
def test_bad_config_file_or_preset_names_it(spec, names):
    with pytest.raises(ConfigError) as e:
        cli.parse_config(["--config", spec])
    assert names in str(e.value)


def test_config_file_errors_are_reported_with_the_path(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="broken.py: RuntimeError: boom"):
        cli.parse_config(["--config", str(broken)])
    no_fn = tmp_path / "nofn.py"
    no_fn.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        cli.parse_config(["--config", str(no_fn)])


def test_config_is_locked():
    config, _ = cli.parse_config(["--config", DEMO])
    with pytest.raises(AttributeError):
        config.optim.nope = 1


def test_apply_overrides_from_wandb_config():
    config = cli.load_config(DEMO)
    cli.apply_overrides(config, {
        "config.optim.lr": 3e-4,  # flat sweep parameter names keep the "config." prefix
        "train.batch_size": 64.0,  # q-uniform sweeps hand integral floats
        "crops": {"n_local": 4, "local_scale": [0.1, 0.3]},  # nested sweep parameters
        "wandb.offline": "true",
        "optim.layerwise_decay": 1,
    })
    assert config.optim.lr == 3e-4 and config.train.batch_size == 64 and isinstance(config.train.batch_size, int)
    assert config.crops.n_local == 4 and config.crops.local_scale == (0.1, 0.3)
    assert config.wandb.offline is True and config.optim.layerwise_decay == 1.0
    with pytest.raises(ConfigError, match="config.optim.nope"):
        cli.apply_overrides(config, {"optim.nope": 1})
    with pytest.raises(ConfigError, match="config.train.batch_size"):
        cli.apply_overrides(config, {"train.batch_size": 2.5})
    with pytest.raises(ConfigError, match="config.model.dtype"):
        cli.apply_overrides(config, {"model.dtype": 3})
    cli.apply_overrides(config, {"model.residual_dtype": "bfloat16"})
    config_lib.validate(config, 1)
    cli.apply_overrides(config, {"model.residual_dtype": "bf16"})
    with pytest.raises(ConfigError, match="config.model.residual_dtype"):
        config_lib.validate(config, 1)
    cli.apply_overrides(config, {"model.residual_dtype": "bfloat16", "train.stop_after": 0})
    with pytest.raises(ConfigError, match="config.train.stop_after: 0 must be a step > 0"):
        config_lib.validate(config, 1)
    cli.apply_overrides(config, {"train.stop_after": -1, "train.trace_from": 10, "train.trace_steps": 0})
    with pytest.raises(ConfigError, match="config.train.trace_steps: 0 must be >= 1"):
        config_lib.validate(config, 1)
    cli.apply_overrides(config, {"train.trace_steps": 5, "train.steps_in_flight": 0})
    with pytest.raises(ConfigError, match="config.train.steps_in_flight: 0 must be >= 1"):
        config_lib.validate(config, 1)
    cli.apply_overrides(config, {"train.steps_in_flight": 2, "data.phenotypes": "shared"})
    config_lib.validate(config, 1)
    cli.apply_overrides(config, {"data.phenotypes": "ratios"})
    with pytest.raises(ConfigError, match="config.data.phenotypes: 'ratios' is not one of"):
        config_lib.validate(config, 1)


def test_presets_apply():
    config, _ = cli.parse_config(["--config", f"{JUMP}:patch=16,strategy=average,gpus=8,lr=1e-4"])
    assert config.model.patch_size == 16 and config.data.strategy == "average"
    assert config.train.batch_size == 640 and config.optim.lr == 1e-4
    assert {"patch-16", "average"} <= set(config.wandb.tags)
    assert config_lib.peak_lr(config) == pytest.approx(1e-4 * math.sqrt(640 / 1024))
    config, _ = cli.parse_config(["--config", f"{JUMP}:input_norm=instance"])
    assert config.data.input_norm == "instance" and "instance-norm" in config.wandb.tags
    assert cli.load_config(JUMP).data.input_norm == "fixed"


def test_derived_configs_differ_from_the_recipe_only_where_named():
    base = cli.load_config(JUMP).to_dict()
    expected = {"vits8_jump_average.py": {("data", "strategy"): "average"},
                "vits16_jump_multiview.py": {("model", "patch_size"): 16}}
    for name, diff in expected.items():
        other = cli.load_config(os.path.join(ROOT, "configs", name)).to_dict()
        changed = {(s, k): other[s][k] for s in base if isinstance(base[s], dict)
                   for k in base[s] if base[s][k] != other[s][k] and (s, k) != ("wandb", "tags")}
        assert changed == diff, name
        assert other["wandb"]["group"] == base["wandb"]["group"]  # comparison runs share a group
    # presets still apply on top of a derived file, and override its own choice
    config = cli.load_config(os.path.join(ROOT, "configs", "vits16_jump_multiview.py") + ":patch=8,gpus=2")
    assert config.model.patch_size == 8 and config.train.batch_size == 160


def test_jump_recipe_carries_the_reference_numbers():
    c = cli.load_config(JUMP)
    assert config_lib.peak_lr(c) == pytest.approx(5.59e-5, rel=1e-3)
    assert config_lib.total_steps(c) == 90_000
    assert (c.model.patch_size, c.model.n_storage_tokens, c.model.drop_path_rate) == (8, 4, 0.1)
    assert (c.heads.out_dim, c.heads.separate_ibot_head) == (65536, True)
    assert (c.optim.clip_grad, c.optim.layerwise_decay, c.optim.patch_embed_lr_mult) == (3.0, 0.9, 0.2)
    assert (c.crops.global_scale, c.crops.local_scale, c.crops.n_local) == ((0.4, 1.0), (0.05, 0.4), 8)
    assert (c.data.field_size, c.data.local_mean_p, c.checkpoint.interval) == (1080, 0.3, 10000)
    assert dict(c.data.channels) == {"DNA": 5, "ER": 4, "RNA": 3, "AGP": 2, "Mito": 1}
    # DINOv3's compute precision: bf16 compute and residual stream, fp32 parameters.
    assert (c.model.dtype, c.model.residual_dtype) == ("bfloat16", "bfloat16")


@pytest.mark.parametrize("name, devices", [("demo.py", 8), ("demo.py:recipe=features", 8)]
                         + [(f, 1) for f in JUMP_FILES] + [(f + ":gpus=8", 8) for f in JUMP_FILES])
def test_every_config_loads_and_validates(name, devices):
    config, workdir = cli.parse_config(["--config", os.path.join(ROOT, "configs", name)])
    config_lib.validate(config, devices)
    assert workdir.startswith("runs" + os.sep) and config.wandb.name in workdir


def test_config_docstrings_hold_their_command():
    for name in ("demo.py",) + JUMP_FILES:
        module = cli.load_config_module(os.path.join(ROOT, "configs", name))
        assert f"python -m dinocell_jax.train --config configs/{name}" in module.__doc__, name


def test_demo_is_small():
    c = cli.load_config(DEMO)
    assert c.model.arch == "vit_custom" and c.model.embed_dim <= 96 and c.model.depth <= 4
    assert c.train.batch_size % 8 == 0 and config_lib.total_steps(c) <= 600
    assert c.model.dtype == "float32" and c.wandb.offline and c.data.source == "synthetic"


def test_demo_features_recipe_is_the_demo_with_stacked_inputs():
    demo, features = cli.load_config(DEMO), cli.load_config(DEMO + ":recipe=features")
    assert (demo.data.strategy, features.data.strategy) == ("multiview", "stacked")
    assert (features.heads.out_dim, features.loss.koleo_weight, features.data.downscale) == (64, 0.0, 2)
    assert features.model.to_dict() == demo.model.to_dict() and features.train.to_dict() == demo.train.to_dict()
    with pytest.raises(config_lib.ConfigError, match="'recipe': 'fast' is not one of"):
        cli.load_config(DEMO + ":recipe=fast")


def test_auto_run_name_and_workdir():
    config = cli.load_config(JUMP)
    now = datetime.datetime(2025, 1, 2, 3, 4, 5)
    assert cli.auto_run_name(config, now) == "vits8-jump-multiview-20250102-030405"  # the guide's form
    config, workdir = cli.parse_config(["--config", JUMP])
    assert workdir == os.path.join("runs", config.wandb.name) and config.wandb.name.startswith("vits8-jump-multiview-")
    config, workdir = cli.parse_config(["--config", JUMP, "--workdir=/tmp/x"])
    # Not re-stamped: resuming in /tmp/x keeps the name the logger stored there.
    assert workdir == "/tmp/x" and config.wandb.name == ""
    _, workdir = cli.parse_config(["--config", JUMP, "--config.workdir=/tmp/y"])
    assert workdir == "/tmp/y"


def test_workdir_config_json_round_trips(tmp_path):
    config, _ = cli.parse_config(["--config", f"{JUMP}:patch=16", "--config.optim.lr=3e-4",
                                  "--workdir", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps(config_lib.to_dict(config)))
    restored, workdir = cli.parse_config(["--workdir", str(tmp_path)])
    assert restored.to_dict() == config.to_dict() and workdir == str(tmp_path)
    with pytest.raises(ConfigError, match="--config: missing"):
        cli.parse_config([])


def test_parse_known_config_leaves_tool_flags():
    config, _, rest = cli.parse_known_config(["--config", DEMO, "--out", "e.parquet", "--config.seed=3"])
    assert rest == ["--out", "e.parquet"] and config.seed == 3
