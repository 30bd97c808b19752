"""Driver settings: defaults < a YAML/JSON config file (`--config`) < flags given on the command line.

Every driver flag is declared with `default=None`, so "not given" is distinguishable from "given the default";
`resolve(args, defaults)` then merges the three layers. Config-file keys use the flag's dest name
(`learning_rate`, `per_device_batch_size`; dashes are accepted too) and an unknown key is an error naming it.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a `.yaml`/`.yml`/`.json` mapping; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no such file {path!r}")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError, with their line numbers
        raise ValueError(f"--config {path}: cannot parse: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML/JSON file of settings; command-line flags win")


def resolve(args: argparse.Namespace, defaults: dict[str, Any]) -> argparse.Namespace:
    """Merge defaults, the `--config` file and the explicit flags of `args` into a new Namespace.

    `defaults` lists every setting the driver knows; keys of the config file must be among them.
    """
    merged = dict(defaults)
    config_path = getattr(args, "config", None)
    if config_path:
        file_values = load_config_file(config_path)
        unknown = sorted(set(file_values) - set(defaults))
        if unknown:
            raise ValueError(f"--config {config_path}: unknown settings {unknown}; known: {sorted(defaults)}")
        merged.update(file_values)
    for key, value in vars(args).items():
        if value is not None and key not in ("config", "func"):
            merged[key] = value
    merged["config"] = config_path
    if hasattr(args, "func"):
        merged["func"] = args.func
    return argparse.Namespace(**merged)


def dump(ns: argparse.Namespace, path: str | os.PathLike) -> None:
    """Write the resolved settings next to the outputs (JSON), so a run can be repeated with --config."""
    values = {k: v for k, v in vars(ns).items() if k not in ("func", "config") and _jsonable(v)}
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(values, f, indent=2, sort_keys=True)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False
