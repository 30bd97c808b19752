"""Typed driver settings: defaults < a YAML/JSON config file (`--config`) < flags given on the command line.

The argparse flags are the schema. Every driver flag is declared with `default=None`, so "not given" is
told apart from "given the default"; `finish(parser, defaults)` (the last call of each driver's `register`)
records every setting's kind (int / float / str / bool / list), choices and dest, and shows its default in
`--help`. `resolve(args, defaults)` merges the three layers: a config-file key is a flag's dest
(`learning_rate`) or its name (`learning-rate`, or an old spelling such as `lr`); each file value is checked
against its flag's kind and choices, and every merged value against `RANGES`. A bad value is a `UserError`
naming the key and `file:line` (`--flag` for command-line values).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from .errors import UserError

# Allowed ranges, by setting: (low, high, low_inclusive[, high_inclusive: True if left out]). Checked on the merged
# values.
RANGES: dict[str, tuple[float | None, float | None, bool] | tuple[float | None, float | None, bool, bool]] = {
    "max_steps": (1, None, True),
    "per_device_batch_size": (1, None, True),
    "eval_batch_size": (1, None, True),
    "grad_accum_steps": (1, None, True),
    "learning_rate": (0, None, False),
    "weight_decay": (0, None, True),
    "warmup_ratio": (0, 1, True),
    "save_every": (0, None, True),
    "log_every": (1, None, True),
    "keep_checkpoints": (0, None, True),
    "max_grad_norm": (0, None, True),
    # 0 = the clean text (distill's cosine and all-token KL terms); pretrain and --alpha refuse it. 1 would leave no
    # token unselected (the collator needs p < 1).
    "mlm_probability": (0, 1, True, False),
    "long_fraction": (0, 1, True),
    "short_length": (2, None, True),
    "long_length": (2, None, True),
    "max_length": (2, None, True),
    "max_blocks": (1, None, True),
    "limit": (1, None, True),
    "temperature": (0, None, False),
    "delta": (0, None, True),
    "relation": (0, None, True),
    "relation_heads": (1, None, True),
    "relation_layer": (1, None, True),
    "lam": (0, 1, True),
    "ner_group_sentences": (1, None, True),
    "ner_stride": (0, None, True),
    "global_prefix": (0, None, True),
    "doc_stride": (0, None, True),
}
KINDS = ("int", "float", "str", "bool", "list")


@dataclass(frozen=True)
class Spec:
    """What a setting accepts: `kind` one of KINDS, `item` the kind of a list's items, `choices`, `flag`."""

    kind: str
    flag: str
    item: str = "str"
    choices: tuple[Any, ...] | None = None


def _kind_of(action: argparse.Action) -> tuple[str, str]:
    t = {int: "int", float: "float"}.get(action.type, "str")
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "bool", "str"
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        return "list", t
    return t, t


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML/JSON file of settings; command-line flags win")


def finish(parser: argparse.ArgumentParser, defaults: dict[str, Any], **set_defaults: Any) -> None:
    """Record the schema of `parser`'s settings (for `resolve`) and add each default to its `--help`."""
    specs: dict[str, Spec] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config", "debug", "log_level"):
            continue
        kind, item = _kind_of(action)
        flag = max(action.option_strings, key=len)
        if action.help != argparse.SUPPRESS:
            specs.setdefault(
                action.dest, Spec(kind, flag, item, tuple(action.choices) if action.choices else None)
            )
            default = defaults.get(action.dest)
            if (
                action.dest in defaults
                and default is not None
                and kind != "bool"
                and "default:" not in (action.help or "")
            ):
                action.help = f"{action.help or ''} (default: {default})".strip()
        else:
            specs.setdefault(
                action.dest, Spec(kind, flag, item, tuple(action.choices) if action.choices else None)
            )
    aliases, negated = {}, set()
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                name = opt[2:].replace("-", "_")
                aliases[name] = action.dest
                if isinstance(action, argparse._StoreFalseAction) and name != action.dest:
                    negated.add(name)  # `no_progress: true` in a file means progress false, as the flag does
    parser.set_defaults(_specs=specs, _aliases=aliases, _negated=negated, **set_defaults)


def _line_numbers(text: str) -> dict[str, int]:
    """Top-level key -> line (1-based) of a YAML (or JSON, which is YAML) mapping; {} when unparsable."""
    try:
        import yaml

        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except Exception:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}


def load_config_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, int]]:
    """({key: value}, {key: line}) of a `.yaml`/`.yml`/`.json` mapping; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"--config: no such file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise UserError(f"--config {path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError, with their line numbers
        raise UserError(f"--config {path}: cannot parse: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}, _line_numbers(text)


_KIND_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "list": "a list"}  # fmt: skip


def check_value(key: str, value: Any, spec: Spec, where: str) -> Any:
    """`value` converted to `spec`'s kind, or a UserError `where: key: expected ..., got ...`."""

    def bad(kind: str) -> UserError:
        return UserError(f"{where}: {key}: expected {_KIND_WORDS[kind]}, got {value!r}")

    def one(v: Any, kind: str) -> Any:
        if v is None:
            return None
        if kind == "bool":
            if isinstance(v, bool):
                return v
            raise bad(kind)
        if isinstance(v, bool):
            raise bad(kind)
        if kind == "int":
            if isinstance(v, int):
                return v
            if isinstance(v, float) and v.is_integer():
                return int(v)
            if isinstance(v, str):
                try:
                    return int(v.strip())
                except ValueError:
                    pass
            raise bad(kind)
        if kind == "float":
            if isinstance(v, (int, float)):
                out = float(v)
            elif isinstance(v, str):  # PyYAML reads 1e-3 (no dot) as a string
                try:
                    out = float(v.strip())
                except ValueError:
                    raise bad(kind) from None
            else:
                raise bad(kind)
            if not math.isfinite(out):
                raise bad(kind)
            return out
        if isinstance(v, (int, float, str)):
            return str(v)
        raise bad(kind)

    if spec.kind == "list":
        items = value if isinstance(value, list) else [value]
        out = [one(v, spec.item) for v in items]
    else:
        out = one(value, spec.kind)
    for v in out if isinstance(out, list) else [out]:
        if spec.choices is not None and v is not None and v not in spec.choices:
            raise UserError(f"{where}: {key}: expected one of {list(spec.choices)}, got {v!r}")
    return out


def check_range(key: str, value: Any, where: str) -> None:
    if key not in RANGES or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, low_inclusive, *rest = RANGES[key]
    high_inclusive = rest[0] if rest else True
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise UserError(f"{where}: expected {'>=' if low_inclusive else '>'} {low}, got {value!r}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise UserError(f"{where}: expected {'<=' if high_inclusive else '<'} {high}, got {value!r}")


def resolve(args: argparse.Namespace, defaults: dict[str, Any]) -> argparse.Namespace:
    """Merge `defaults`, the `--config` file and the explicit flags of `args` into a new Namespace, every
    value type- and range-checked. `defaults` lists every setting the driver knows."""
    specs: dict[str, Spec] = getattr(args, "_specs", {})
    merged = dict(defaults)
    source = {k: "default" for k in defaults}
    config_path = getattr(args, "config", None)
    if config_path:
        settings, unknown = file_settings(args, defaults)
        if unknown:
            raise UserError(f"--config {config_path}: unknown settings {unknown}; known: {sorted(defaults)}")
        for key, (value, where) in settings.items():
            merged[key], source[key] = value, where
    for key, value in vars(args).items():
        if value is not None and not key.startswith("_") and key not in ("config", "func"):
            merged[key] = value
            source[key] = specs[key].flag if key in specs else f"--{key.replace('_', '-')}"
    for key, value in merged.items():
        check_range(key, value, source.get(key, key))
    merged["config"] = config_path
    for key in ("func", "command", "debug", "log_level"):
        if hasattr(args, key):
            merged[key] = getattr(args, key)
    return argparse.Namespace(**merged)


def file_settings(
    args: argparse.Namespace, known: Container[str] | None = None
) -> tuple[dict[str, tuple[Any, str]], list[str]]:
    """The `--config` file of `args` (a parsed driver command) as {dest: (checked value, "file:line: key")}, None
    values left out, and the file's keys whose dest is not in `known` (every key is known when None); ({}, [])
    without --config. `resolve` merges these; `etkd`'s main reads `progress` from them before the command starts."""
    specs: dict[str, Spec] = getattr(args, "_specs", {})
    aliases: dict[str, str] = getattr(args, "_aliases", {})
    negated: set[str] = getattr(args, "_negated", set())
    config_path = getattr(args, "config", None)
    if not config_path:
        return {}, []
    values, lines = load_config_file(config_path)
    out, unknown = {}, []
    for raw_key, value in values.items():
        name = raw_key.replace("-", "_")
        key = aliases.get(name, name)
        where = f"{config_path}:{lines[raw_key]}" if raw_key in lines else str(config_path)
        if known is not None and key not in known:
            unknown.append(raw_key)
            continue
        spec = specs.get(key)
        if spec is not None:
            value = check_value(raw_key, value, spec, where)
        if value is not None:
            out[key] = (not value if name in negated else value, f"{where}: {raw_key}")
    return out, unknown


def settings_of(ns: argparse.Namespace) -> dict[str, Any]:
    """The JSON-able settings of a resolved namespace (what `settings.json` holds)."""
    out = {}
    for k, v in vars(ns).items():
        if k.startswith("_") or k in ("func", "config", "debug", "log_level", "command"):
            continue
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out
