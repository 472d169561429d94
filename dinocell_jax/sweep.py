"""W&B sweeps over the config: parameters named like config keys become `--config.*` overrides.

A sweep YAML (configs/sweeps/*.yaml) runs

    command: [${env}, ${interpreter}, -m, dinocell_jax.train, --config, configs/demo.py, ${args}]

and names its parameters by config path, `config.optim.lr`, so the agent's
`${args}` expands each sampled value to `--config.optim.lr=0.001`, which
`cli.parse_config` applies with type checks (an unknown key fails with its name).
A parameter named `config` swaps the config file itself (`--config=FILE[:PRESET]`
after the fixed one: the last `--config` wins), which is how the patch / strategy
comparison sweeps over presets.

`wandb agent` also writes the sampled values to a YAML file named by
`WANDB_SWEEP_PARAM_PATH` (what `wandb.config` is filled from). `apply_agent`
reads it, so a command without `${args}` gets the same overrides, and gives an
agent's run its own workdir and the agent's run id. Offline check of sweep files
(no server, no account):

    python -m dinocell_jax.sweep check configs/sweeps/*.yaml
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import yaml

from dinocell_jax import cli
from dinocell_jax import config as config_lib
from dinocell_jax.config import ConfigError

PARAM_PATH_ENV = "WANDB_SWEEP_PARAM_PATH"  # wandb.env.SWEEP_PARAM_PATH
SWEEP_ID_ENV = "WANDB_SWEEP_ID"
RUN_ID_ENV = "WANDB_RUN_ID"
CONFIG_FILE_PARAM = "config"  # the config file (+preset); only through ${args}
METHODS = ("grid", "random", "bayes")
TRAIN_MODULE = "dinocell_jax.train"
_RUN_ID_FILE = "wandb_run_id"  # monitor/logger.py reads the run id from here
_VALUE_KEYS = ("value", "values", "distribution", "min", "max", "parameters")


class SweepError(ValueError):
    """A sweep file that cannot work; the message names the file and the key."""


# ----------------------------------------------------------------------------- sweep files


def validate_sweep(sweep: Mapping[str, Any], where: str = "sweep") -> None:
    """Checks what `wandb sweep` and our trainer need; SweepError names the key."""
    if not isinstance(sweep, Mapping):
        raise SweepError(f"{where}: a sweep is a mapping of keys, got {type(sweep).__name__}")
    method = sweep.get("method")
    if method not in METHODS:
        raise SweepError(f"{where}: method: {method!r} is not one of {METHODS}")
    metric = sweep.get("metric")
    if not isinstance(metric, Mapping) or not metric.get("name") or metric.get("goal") not in ("minimize", "maximize"):
        raise SweepError(f"{where}: metric: needs a name and goal minimize|maximize, got {metric!r}")
    command = sweep.get("command")
    if not isinstance(command, list) or "${args}" not in command:
        raise SweepError(f"{where}: command: must be a list containing ${{args}}, got {command!r}")
    if TRAIN_MODULE not in command:
        raise SweepError(f"{where}: command: does not run -m {TRAIN_MODULE}: {command!r}")
    params = sweep.get("parameters")
    if not isinstance(params, Mapping) or not params:
        raise SweepError(f"{where}: parameters: none given")
    for name, spec in params.items():
        if name != CONFIG_FILE_PARAM and not name.startswith("config."):
            raise SweepError(f"{where}: parameters.{name}: names must be config keys, e.g. config.optim.lr")
        if not isinstance(spec, Mapping) or not any(k in spec for k in _VALUE_KEYS):
            raise SweepError(f"{where}: parameters.{name}: needs one of {_VALUE_KEYS}")
        if method == "grid" and not ("value" in spec or "values" in spec):
            raise SweepError(f"{where}: parameters.{name}: a grid sweep takes value or values only")


def load_sweep(path: str) -> dict[str, Any]:
    """A sweep YAML, validated."""
    if not os.path.isfile(path):
        raise SweepError(f"sweep file {path!r} does not exist")
    with open(path) as f:
        try:
            sweep = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise SweepError(f"{path}: invalid YAML: {e}") from None
    validate_sweep(sweep, path)
    return sweep


def _candidates(spec: Mapping[str, Any]) -> list[Any]:
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    if "parameters" in spec:  # nested block: arrives as a dict
        nested = {k: _candidates(v) for k, v in spec["parameters"].items()}
        return [dict(zip(nested, combo)) for combo in itertools.product(*nested.values())]
    lo, hi = spec.get("min"), spec.get("max")
    if lo is None or hi is None:
        raise SweepError(f"distribution {spec.get('distribution')!r} needs min and max: {dict(spec)}")
    distribution = str(spec.get("distribution", ""))
    # wandb infers int_uniform from integer bounds when no distribution is named
    if distribution.startswith("int") or (not distribution and isinstance(lo, int) and isinstance(hi, int)):
        return [int(lo), int(hi)]
    return [float(lo), float(hi)]


def sample_parameters(sweep: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Parameter sets that cover the sweep's corners: every grid point; for random and
    bayes, every listed value and the ends of every range (each set as the agent
    would hand it over: {name: value})."""
    candidates = {name: _candidates(spec) for name, spec in sweep["parameters"].items()}
    if sweep["method"] == "grid":
        return [dict(zip(candidates, combo)) for combo in itertools.product(*candidates.values())]
    width = max(len(v) for v in candidates.values())
    return [{name: values[i % len(values)] for name, values in candidates.items()} for i in range(width)]


def agent_command(sweep: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    """The command line `wandb agent` runs for `params`, macros expanded as the agent does."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(sweep["command"]))
    macros = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros |= {"interpreter": ["python"], "program": [str(sweep.get("program", ""))], "env": ["/usr/bin/env"]}
    argv: list[str] = []
    for chunk in map(str, command):
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += list(macros.get(chunk[2:-1]) or [])
        else:
            argv.append(chunk)
    return argv


def train_argv(command: Sequence[str]) -> list[str]:
    """The trainer's own arguments in an expanded command (what follows `-m dinocell_jax.train`)."""
    command = list(command)
    if TRAIN_MODULE not in command:
        raise SweepError(f"command does not run -m {TRAIN_MODULE}: {command}")
    return command[command.index(TRAIN_MODULE) + 1:]


def check_sweep(path: str) -> list[tuple[dict[str, Any], ml_collections.ConfigDict]]:
    """Expands and parses every representative parameter set of a sweep file.

    Returns [(params, resolved config)]; raises SweepError naming the file and the
    parameter set, with cli's ConfigError message (e.g. an unknown key).
    """
    sweep = load_sweep(path)
    out = []
    for params in sample_parameters(sweep):
        argv = train_argv(agent_command(sweep, params))
        try:
            config, _ = cli.parse_config(argv)
            # Device-independent checks only: the agent's machine decides the device count.
            config_lib.validate(config, 1)
        except ConfigError as e:
            raise SweepError(f"{path}: parameters {params}: {e}") from e
        out.append((params, config))
    return out


# ----------------------------------------------------------------------------- inside an agent's run


def agent_params(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The sampled values of the running sweep agent ({} outside one), from `WANDB_SWEEP_PARAM_PATH`."""
    environ = os.environ if environ is None else environ
    path = environ.get(PARAM_PATH_ENV, "")
    if not path:
        return {}
    if not os.path.isfile(path):
        raise SweepError(f"{PARAM_PATH_ENV}={path}: no such file (was this run started by `wandb agent`?)")
    with open(path) as f:
        try:
            loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise SweepError(f"{PARAM_PATH_ENV}={path}: invalid YAML: {e}") from None
    params = {}
    for name, entry in loaded.items():
        if name == "wandb_version" or name.startswith("_"):
            continue
        params[name] = entry["value"] if isinstance(entry, Mapping) and "value" in entry else entry
    return params


def apply_agent(config: ml_collections.ConfigDict, workdir: str, environ: Mapping[str, str] | None = None) -> str:
    """Inside a `wandb agent` run: apply its sampled values and return the run's workdir.

    Call after `cli.parse_config`, before the workdir is used. Outside an agent it
    returns `workdir` untouched. Inside one:
    - every parameter but `config` is applied as an override (ConfigError names
      an unknown key); the `config` file parameter must come through ${args};
    - an automatic workdir (`runs/<wandb.name>`) becomes `runs/sweep-<id>/<run id>`,
      so concurrent agents never share one, and the agent's run id is stored in
      it, so the W&B run the trainer opens is the one the sweep expects.
    """
    environ = os.environ if environ is None else environ
    params = agent_params(environ)
    sweep_id, run_id = environ.get(SWEEP_ID_ENV, ""), environ.get(RUN_ID_ENV, "")
    if not params and not sweep_id:
        return workdir
    overrides = {k: v for k, v in params.items() if k != CONFIG_FILE_PARAM}
    try:
        cli.apply_overrides(config, overrides)
    except ConfigError as e:
        raise ConfigError(f"sweep parameter {e}") from e
    if sweep_id and run_id and workdir == os.path.join("runs", config.wandb.name):
        workdir = os.path.join("runs", f"sweep-{sweep_id}", run_id)
        config.workdir = workdir
    if run_id:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, _RUN_ID_FILE), "w") as f:
            f.write(run_id + "\n")
    return workdir


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dinocell_jax.sweep check FILE.yaml ...`: expand and parse each sweep's corners."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "check":
        print("usage: python -m dinocell_jax.sweep check configs/sweeps/FILE.yaml [...]", file=sys.stderr)
        return 2
    failed = 0
    for path in args[1:]:
        try:
            checked = check_sweep(path)
        except SweepError as e:
            print(f"FAIL {e}", file=sys.stderr)
            failed += 1
            continue
        for params, config in checked:
            shown = " ".join(f"{k}={v}" for k, v in params.items())
            print(f"ok   {path}: {shown} -> group={config.wandb.group!r} tags={list(config.wandb.tags)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
