"""The `etkd` console script: one entry point, one subcommand per driver.

Each driver module exposes `register(subparsers)`, which adds its subcommand and sets `func` (called with
the parsed args, returning an exit code). Modules are imported only when the CLI starts.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="etkd", description="efficient-attention kernels and KD drivers")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that driver is not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
