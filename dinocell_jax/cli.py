"""Command line of every tool: `--config file.py[:preset] [--config.a.b=v ...] [--workdir DIR]`.

The same flags as ml_collections' `config_flags`, parsed here without absl's
global flag registry (so a test, a sweep agent or a notebook can parse many
command lines in one process):

    python -m dinocell_jax.train --config configs/vits8_jump_multiview.py:patch=16 \\
        --config.optim.lr=0.0001 --config.wandb.tags=a,b --workdir runs/p16

- `--config PATH[:ARG]` loads PATH and calls its `get_config(ARG)`;
- `--config.a.b=V` (or `--config.a.b V`) overrides one key, parsed by the type of
  its current value: bool (`True`/`true`/`1`/`yes`...), int, float (`1e-4`),
  str, tuple (`(0.3,1.0)`, `[0.3, 1.0]` or `0.3,1.0`), or a dict repr for a
  nested block (what a wandb sweep with nested `parameters:` passes);
  a bare `--config.a.b` sets a bool key to True;
- `--workdir DIR`: default `config.workdir`, else `runs/<wandb.name>`, where an
  empty `wandb.name` becomes `<arch><patch>-<dataset>-<strategy>-<timestamp>`.

The config comes back locked: a later assignment to a key that does not exist
fails. Every problem raises `ConfigError` with a one-line message naming the
flag or key.
"""

from __future__ import annotations

import ast
import datetime
import difflib
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from dinocell_jax.config import ConfigError, base_config

_ARCH_SHORT = {"vit_tiny": "vitt", "vit_small": "vits", "vit_base": "vitb", "vit_custom": "vit"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def load_config_module(path: str):
    """Imports a config file by path (configs/ is not a package); ConfigError names the path."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    name = "dinocell_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error inside a user's config file is reported as its own
        raise ConfigError(f"--config: {path}: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"--config: {path} has no get_config(arg=None)")
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path.py` or `path.py:arg` -> the (locked) ConfigDict its get_config(arg) returns."""
    path, sep, arg = spec.partition(".py:")
    path = path + ".py" if sep else spec
    module = load_config_module(path)
    try:
        config = module.get_config(arg) if sep else module.get_config()
    except ConfigError as e:
        raise ConfigError(f"--config {spec}: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--config {spec}: get_config failed: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config {spec}: get_config returned {type(config).__name__}, not a ConfigDict")
    config.lock()
    return config


def _scalar(key: str, value: Any, kind: type) -> Any:
    """Converts `value` (a string from a command line, or a typed wandb.config value) to `kind`."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config.{key}: {value!r} is not a boolean (true/false)")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"config.{key}: {value!r} is not an integer")
        if isinstance(value, float) and value.is_integer():  # sweeps may hand 64.0
            return int(value)
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise ConfigError(f"config.{key}: {value!r} is not an integer") from None
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value).strip())
        except ValueError:
            raise ConfigError(f"config.{key}: {value!r} is not a number") from None
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"config.{key}: {value!r} is not a string")
        return value
    return value


def _parse_sequence(key: str, value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, str):
        return [value]
    text = value.strip()
    if text in ("", "()", "[]"):
        return []
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        # unquoted words, e.g. --config.wandb.tags=vit-small,patch-8
        return [part.strip() for part in text.strip("()[]").split(",") if part.strip()]
    return list(parsed) if isinstance(parsed, (list, tuple)) else [parsed]


def _convert(key: str, current: Any, value: Any) -> Any:
    """Parses/casts `value` to the type of `current` (recursing into tuples such as mesh.fsdp_rules)."""
    if current is None:
        return value
    if isinstance(current, (tuple, list)):
        items = _parse_sequence(key, value)
        kinds = {type(x) for x in current}
        if len(kinds) == 1:  # homogeneous tuples keep their element type: (0.4, 1.0) <- "(1,1)"
            template = current[0]
            items = [_convert(f"{key}[{i}]", template, x) for i, x in enumerate(items)]
        return tuple(items)
    for kind in (bool, int, float, str):
        if isinstance(current, kind):
            return _scalar(key, value, kind)
    return value


def _children(node: ml_collections.ConfigDict) -> list[str]:
    return sorted(node.keys())


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"config.{key}: config.{prefix} is a value, not a block of keys")
        if part not in node:
            near = difflib.get_close_matches(part, _children(node), n=1)
            hint = f"; did you mean 'config.{'.'.join(parts[:depth] + near[:1])}'?" if near else ""
            where = f"config.{prefix}" if prefix else "the config"
            raise ConfigError(f"config.{key}: no such key in {where}{hint}")
        if depth < len(parts) - 1:
            node = node[part]
    leaf, current = parts[-1], node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                raise ConfigError(f"config.{key}: is a block of keys; give a dict or set config.{key}.<name>") from None
        if not isinstance(value, Mapping):
            raise ConfigError(f"config.{key}: is a block of keys; {value!r} is not a dict")
        for sub, sub_value in value.items():
            _set(config, f"{key}.{sub}", sub_value)
        return
    converted = _convert(key, current, value)
    try:
        node[leaf] = converted
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"config.{key}: cannot set {converted!r}: {e}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Sets dotted keys (`"optim.lr"` or `"config.optim.lr"`, as sweep parameters are named) in place.

    Values may be typed (wandb.config) or strings (command line); both are
    converted by the type of the current value. Returns `config`.
    """
    for key, value in overrides.items():
        key = key[len("config."):] if key.startswith("config.") else key
        _set(config, key, value)
    return config


def auto_run_name(config, now: datetime.datetime | None = None) -> str:
    """`<arch><patch>-<dataset>-<strategy>-<timestamp>`, e.g. `vits8-jump-multiview-20250101-120000`."""
    now = now or datetime.datetime.now()
    scheme, _, rest = config.data.source.partition(":")
    dataset = {"synthetic": "synthetic", "tfds": rest.split("/")[0] or "tfds"}.get(scheme, "jump")
    arch = _ARCH_SHORT.get(config.model.arch, config.model.arch)
    return f"{arch}{config.model.patch_size}-{dataset}-{config.data.strategy}-{now:%Y%m%d-%H%M%S}"


def _config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
    """A run's resolved `config.json` laid over base_config(), for tools given only --workdir."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--config: missing, and the workdir has no {path}")
    with open(path) as f:
        saved = json.load(f)
    config = base_config()
    config.lock()
    try:
        apply_overrides(config, saved)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    return config


def _usage() -> str:
    return (
        "usage: python -m dinocell_jax.<tool> --config PATH.py[:PRESET] [--config.KEY=VALUE ...] [--workdir DIR]\n"
        "Each config file's docstring holds the command that runs it; keys are in dinocell_jax/config.py."
    )


def parse_known_config(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str, list[str]]:
    """parse_config for tools with flags of their own: also returns the arguments it did not consume."""
    spec, workdir, overrides, rest = None, None, [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, inline = arg.partition("=")
        has_next = i + 1 < len(args) and not args[i + 1].startswith("--")
        if flag in ("-h", "--help"):
            print(_usage())
            raise SystemExit(0)
        if flag in ("--config", "--workdir"):
            if not eq and not has_next:
                raise ConfigError(f"{flag}: needs a value")
            value = inline if eq else args[i + 1]
            i += 1 if eq else 2
            if flag == "--config":
                spec = value
            else:
                workdir = value
            continue
        if flag.startswith("--config."):
            if eq:
                overrides.append((flag[len("--config."):], inline))
                i += 1
            elif has_next:
                overrides.append((flag[len("--config."):], args[i + 1]))
                i += 2
            else:
                overrides.append((flag[len("--config."):], "true"))  # absl-style bare boolean flag
                i += 1
            continue
        rest.append(arg)
        i += 1

    if spec is not None:
        config = load_config(spec)
    elif workdir is not None:
        config = _config_from_workdir(workdir)
    else:
        raise ConfigError("--config: missing (e.g. --config configs/demo.py)")
    for key, value in overrides:
        _set(config, key, value)

    workdir = workdir or config.workdir
    if not workdir:
        # A fresh run directory, named as the run. With a workdir given, an empty
        # wandb.name is left to the logger: it reuses the name stored there on resume.
        config.wandb.name = config.wandb.name or auto_run_name(config)
        workdir = os.path.join("runs", config.wandb.name)
    config.workdir = workdir
    return config, workdir, rest


def parse_config(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
    """argv (without the program name) -> (locked config, workdir); ConfigError names the bad flag or key."""
    config, workdir, rest = parse_known_config(argv)
    if rest:
        raise ConfigError(f"{rest[0]}: unknown argument. {_usage().splitlines()[0]}")
    return config, workdir


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dinocell_jax.cli --config ...` prints the resolved config (a dry run of the flags)."""
    try:
        config, workdir = parse_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(config.to_json_best_effort(indent=2, sort_keys=True))
    print(f"workdir: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def pop_flag(rest: list[str], name: str, *, value: bool = True) -> Any:
    """Removes a tool's own flag from `rest` (what `parse_known_config` left).

    `--name v` or `--name=v` -> "v"; a boolean flag (value=False) -> True; absent
    -> None (False for a boolean flag).
    """
    for i, arg in enumerate(rest):
        flag, eq, inline = arg.partition("=")
        if flag != name:
            continue
        if not value:
            del rest[i]
            return True
        if eq:
            del rest[i]
            return inline
        if i + 1 >= len(rest):
            raise ConfigError(f"{name}: needs a value")
        got = rest[i + 1]
        del rest[i:i + 2]
        return got
    return None if value else False
