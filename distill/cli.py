"""The `etkd` console script: one entry point, one subcommand per driver."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="etkd", description="efficient-attention kernels and KD drivers")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backend availability and the op x backend support matrix")
    args = parser.parse_args(argv)
    if args.command == "info":
        from etkd_kernels.info import main as info_main

        return info_main()
    return 1


if __name__ == "__main__":
    sys.exit(main())
