"""Sweep files expand as `wandb agent` expands them and parse into the intended config; no server."""

import glob
import os

import pytest
import yaml

from dinocell_jax import cli, sweep
from dinocell_jax.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = sorted(glob.glob(os.path.join(REPO, "configs", "sweeps", "*.yaml")))


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # sweep commands name config files relative to the repository


def test_there_are_sweeps_for_every_method():
    methods = {yaml.safe_load(open(p))["method"] for p in SWEEPS}
    assert methods == {"grid", "random", "bayes"}


@pytest.mark.parametrize("path", SWEEPS, ids=os.path.basename)
def test_every_sweep_parameter_set_reaches_the_config(path):
    checked = sweep.check_sweep(path)
    assert checked
    for params, config in checked:
        for name, value in params.items():
            if name == sweep.CONFIG_FILE_PARAM:
                continue
            node = config
            for part in name.split(".")[1:]:
                node = node[part]
            assert node == (pytest.approx(value) if isinstance(value, float) else value), name


def test_agent_expansion_gives_dotted_overrides_that_cli_applies():
    spec = sweep.load_sweep("configs/sweeps/demo_lr_grid.yaml")
    params = {"config.optim.lr": 0.003, "config.wandb.offline": False, "config.wandb.group": "demo-lr-grid",
              "config.eval.interval": 100}
    command = sweep.agent_command(spec, params)
    assert command[:4] == ["/usr/bin/env", "python", "-m", "dinocell_jax.train"]
    assert command[4:6] == ["--config", "configs/demo.py"]
    assert "--config.optim.lr=0.003" in command and "--config.wandb.offline=False" in command
    config, workdir = cli.parse_config(sweep.train_argv(command))
    assert config.optim.lr == 0.003 and config.wandb.offline is False and config.eval.interval == 100
    assert workdir == os.path.join("runs", config.wandb.name)


def test_comparison_sweep_swaps_the_preset_and_its_tags():
    spec = sweep.load_sweep("configs/sweeps/jump_compare.yaml")
    command = sweep.agent_command(spec, {"config": "configs/vits8_jump_multiview.py:patch=16,strategy=average",
                                         "config.train.steps": 20000})
    config, _ = cli.parse_config(sweep.train_argv(command))
    assert config.model.patch_size == 16 and config.data.strategy == "average"
    assert set(config.wandb.tags) == {"vit-small", "patch-16", "average", "jump"}
    assert config.wandb.group == "jump-vits-pretraining" and config.train.steps == 20000


def _write_sweep(tmp_path, params, **extra):
    spec = {"method": "grid", "metric": {"name": "eval/knn_top1", "goal": "maximize"},
            "command": ["${env}", "${interpreter}", "-m", "dinocell_jax.train", "--config",
                        os.path.join(REPO, "configs", "demo.py"), "${args}"],
            "parameters": params} | extra
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_an_unknown_sweep_parameter_fails_with_its_name(tmp_path):
    path = _write_sweep(tmp_path, {"config.optim.lrr": {"values": [0.1]}})
    with pytest.raises(sweep.SweepError, match=r"config\.optim\.lrr: no such key.*did you mean 'config\.optim\.lr'"):
        sweep.check_sweep(path)
    path = _write_sweep(tmp_path, {"config.optim.lr": {"values": ["fast"]}})
    with pytest.raises(sweep.SweepError, match=r"config\.optim\.lr: 'fast' is not a number"):
        sweep.check_sweep(path)
    assert sweep.main(["check", path]) == 1


@pytest.mark.parametrize("change, message", [
    ({"method": "hyperopt"}, "method: 'hyperopt' is not one of"),
    ({"metric": {"name": "eval/knn_top1"}}, "metric: needs a name and goal"),
    ({"command": ["python", "-m", "dinocell_jax.train"]}, r"must be a list containing \$\{args\}"),
    ({"parameters": {"lr": {"values": [1]}}}, "parameters.lr: names must be config keys"),
    ({"parameters": {"config.optim.lr": {"min": 0.1, "max": 1.0}}}, "a grid sweep takes value or values only"),
])
def test_malformed_sweeps_name_the_key(tmp_path, change, message):
    path = _write_sweep(tmp_path, {"config.optim.lr": {"values": [0.1]}}, **change)
    with pytest.raises(sweep.SweepError, match=message):
        sweep.load_sweep(path)


def test_random_sweeps_sample_range_ends_and_listed_values():
    spec = {"method": "random", "parameters": {
        "config.optim.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
        "config.train.batch_size": {"min": 16, "max": 64},
        "config.loss.koleo_weight": {"values": [0.0, 0.1, 0.2]},
    }}
    samples = sweep.sample_parameters(spec)
    assert [s["config.optim.lr"] for s in samples] == [1e-5, 1e-3, 1e-5]
    assert [s["config.train.batch_size"] for s in samples] == [16, 64, 16]
    assert [s["config.loss.koleo_weight"] for s in samples] == [0.0, 0.1, 0.2]


def _agent_environment(tmp_path, args):
    """What `wandb agent` sets up before starting a run: the parameter file and ids."""
    from wandb.sdk.lib import config_util

    param_path = tmp_path / "wandb" / "sweep-abc" / "config-run123.yaml"
    config_util.save_config_file_from_dict(str(param_path), {k: {"value": v} for k, v in args.items()})
    return {sweep.PARAM_PATH_ENV: str(param_path), sweep.SWEEP_ID_ENV: "abc", sweep.RUN_ID_ENV: "run123"}


def test_agent_values_in_wandb_config_are_applied_and_the_run_gets_its_own_workdir(tmp_path, monkeypatch):
    environ = _agent_environment(tmp_path, {"config.optim.lr": 0.002, "config.wandb.tags": ["a", "b"],
                                            "config.heads": {"out_dim": 512}, "config": "configs/demo.py"})
    config, workdir = cli.parse_config(["--config", "configs/demo.py"])
    monkeypatch.chdir(tmp_path)
    new_workdir = sweep.apply_agent(config, workdir, environ)
    assert config.optim.lr == 0.002 and config.wandb.tags == ("a", "b") and config.heads.out_dim == 512
    assert new_workdir == os.path.join("runs", "sweep-abc", "run123") == config.workdir
    assert (tmp_path / new_workdir / "wandb_run_id").read_text().strip() == "run123"

    explicit = sweep.apply_agent(config, "/somewhere/mine", environ | {sweep.RUN_ID_ENV: ""})
    assert explicit == "/somewhere/mine"  # a workdir the user chose is kept


def test_agent_values_with_an_unknown_key_fail_with_its_name(tmp_path):
    environ = _agent_environment(tmp_path, {"config.optim.lrr": 0.002})
    config, workdir = cli.parse_config(["--config", "configs/demo.py"])
    with pytest.raises(ConfigError, match=r"sweep parameter config\.optim\.lrr: no such key"):
        sweep.apply_agent(config, workdir, environ)


def test_outside_an_agent_nothing_changes():
    config, workdir = cli.parse_config(["--config", "configs/demo.py"])
    before = config.to_dict()
    assert sweep.apply_agent(config, workdir, {}) == workdir
    assert config.to_dict() == before
    assert sweep.agent_params({}) == {}
    with pytest.raises(sweep.SweepError, match="no such file"):
        sweep.agent_params({sweep.PARAM_PATH_ENV: "/nonexistent/config.yaml"})
