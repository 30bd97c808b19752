"""The `etkd` console script: one entry point, one subcommand per driver.

Each driver module exposes `register(subparsers)`, which adds its subcommand and sets `func` (called with
the parsed args, returning an exit code). Modules are imported only when the CLI starts. Every subcommand
also takes `--debug` (tracebacks for user errors too) and `--log-level` (the stdlib `etkd` logger). A `UserError` (bad flag, config value, data file,
path) prints one line and exits 2; any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import UserError

# Driver modules, in the order their subcommands are listed by --help.
COMMANDS = (
    "etkd.distill.info_cmd",
    "etkd.distill.convert",
    "etkd.distill.pretrain",
    "etkd.distill.distill",
    "etkd.distill.kd_task",
    "etkd.distill.finetune",
    "etkd.distill.report",
    "etkd.distill.data_stats",
    "etkd.distill.tune",
    "etkd.benchmarks.bench",
    "etkd.distill.demo",
)


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes (added as an argparse parent)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("general")
    g.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="level of the `etkd` log on stderr (default: info)")  # fmt: skip
    return p


class _Subcommands:
    """The subparsers action, giving every subcommand the common options."""

    def __init__(self, action):
        self._action, self._common = action, common_options()

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        kwargs["parents"] = [*kwargs.get("parents", ()), self._common]
        return self._action.add_parser(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="etkd", description="efficient-attention kernels and KD drivers")
    sub = _Subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that driver is not part of this build
                continue
            raise
        module.register(sub)
    return parser


def setup_logging(level: str) -> None:
    """The `etkd` logger (stdlib logging) on stderr at `level`; its records also reach the root logger."""
    log = logging.getLogger("etkd")
    log.setLevel(level.upper())
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("[etkd] %(levelname)s: %(message)s"))
        log.addHandler(handler)


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is at the time (redirections after start-up included)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"etkd {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
