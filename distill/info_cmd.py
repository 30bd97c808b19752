"""`etkd info`: backends built and usable here, and the op x backend matrix."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("info", help="backend availability and the op x backend support matrix")
    p.set_defaults(func=run)


def run(args) -> int:
    from etkd_kernels.info import main

    return main()
