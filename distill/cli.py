"""The `etkd` console script: one entry point, one subcommand per driver.

Each driver module exposes `register(subparsers)`, which adds its subcommand and sets `func` (called with
the parsed args, returning an exit code). Modules are imported only when the CLI starts. Every subcommand
also takes `--debug` (tracebacks for user errors too) and `--log-level` (the stdlib `etkd` logger). A `UserError` (bad flag, config value, data file,
path), a bad value of an `ETKD_*` environment variable, and a command whose optional dependencies are not
installed (it names the extra: `pip install 'etkd[train]'`) print one line and exit 2; Ctrl-C prints one line
(naming `--resume` for a command that checkpoints) and exits 130; any other exception is a bug and shows its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import logging
import re
import sys
from collections.abc import Iterator

from etkd_kernels._env import CPU_SWITCHES, FLAGS, NYSTROM_KEEP, EnvironmentValueError, bf16_linear_mode, flag

from .errors import UserError
from .rundir import held_by_command

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


# The extras (pyproject.toml's optional-dependencies) each subcommand needs beyond the base install, checked
# before the command starts, so a missing one is said before any data or model is loaded (`missing_module`).
EXTRAS = {
    "pretrain": ("train",), "distill": ("train",), "kd-task": ("train",), "finetune": ("train",),
    "evaluate": ("train",), "data-stats": ("train",), "tune": ("train", "tune"), "bench": ("train",),
    "demo": ("train",),
}  # fmt: skip

# Import names whose distribution is named otherwise (for the missing-extra message).
DISTRIBUTION_OF = {"sklearn": "scikit-learn", "yaml": "pyyaml"}


def extra_for(module: str) -> str | None:
    """The extra of etkd's metadata (pyproject.toml's optional-dependencies) that installs `module`, preferring
    a user-facing one over `test`; None when no extra does."""
    want = DISTRIBUTION_OF.get(module, module).lower().replace("_", "-")
    extras = [extra for name, extra in _requirements() if name == want]
    return next((e for e in extras if e != "test"), extras[0] if extras else None)


def _requirements() -> list[tuple[str, str]]:
    """(distribution, extra) of every requirement of etkd's metadata that belongs to an extra."""
    out = []
    for req in importlib.metadata.requires("etkd") or ():
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        if extra:
            out.append((name, extra.group(1)))
    return out


def missing_module(command: str | None) -> str | None:
    """The import name of the first module an extra of `command` (`EXTRAS`) installs that cannot be imported
    here, None when all can (or etkd's metadata is not installed, so the extras are unknown)."""
    import importlib.util

    wanted = EXTRAS.get(command or "", ())
    if not wanted:
        return None
    try:
        requirements = _requirements()
    except importlib.metadata.PackageNotFoundError:
        return None
    import_name = {dist: module for module, dist in DISTRIBUTION_OF.items()}
    for dist, extra in requirements:
        if extra not in wanted:
            continue
        module = import_name.get(dist, dist.replace("-", "_"))
        if module in sys.modules:
            if sys.modules[module] is None:  # made unimportable
                return module
        elif importlib.util.find_spec(module) is None:
            return module
    return None


def check_environment() -> None:
    """Every etkd variable that is set (etkd_kernels/_env.py lists them), checked before a command runs; the
    cpu kernels are loaded only when a variable of theirs is set (they check their CPU_SWITCHES)."""
    import os

    from etkd_kernels.dispatch import check_name

    backend = os.environ.get("ETKD_BACKEND", "").strip()
    if backend:
        try:
            check_name(backend, f"ETKD_BACKEND={backend}")
        except ValueError as exc:
            raise EnvironmentValueError(str(exc)) from None
    for name in FLAGS:
        flag(name)
    bf16_linear_mode()  # read at the first bf16 linear layer, after the data is loaded
    if any(os.environ.get(name) for name in CPU_SWITCHES):
        from etkd_kernels import cpu

        cpu.unavailable_reason()
    if os.environ.get(
        NYSTROM_KEEP
    ):  # read per Nystrom call: a bad value would surface after the data is loaded
        from etkd_kernels.cpu.nystrom import check_keep_environment

        check_keep_environment()  # without loading the kernels


@contextlib.contextmanager
def libraries_without_progress_bars(quiet: bool) -> Iterator[None]:
    """With `quiet` (`--no-progress`), transformers' own bars ("Loading weights", "Writing model shards") and
    huggingface_hub's (downloads) are off for the block, and as they were after it."""
    try:
        if quiet:  # else not even imported
            from huggingface_hub import utils as hub
            from transformers.utils import logging as hf_logging
    except ModuleNotFoundError:  # not installed: the command cannot show their bars either
        quiet = False
    if not quiet:
        yield
        return
    hub_was_off, transformers_was_on = hub.are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' and huggingface_hub's
    try:
        yield
    finally:
        if transformers_was_on:
            hf_logging.enable_progress_bar()  # turns huggingface_hub's on too: then put back as it was
        (hub.disable_progress_bars if hub_was_off else hub.enable_progress_bars)()


def progress_off(args: argparse.Namespace) -> bool:
    """Whether the command's progress bars are off: `--no-progress`, else `progress: false` in its --config file
    (read here, before the command, so the libraries' bars go off with its own)."""
    if getattr(args, "no_progress", False):
        return True
    progress = getattr(args, "progress", None)
    if progress is None:
        from .config import file_settings

        progress = file_settings(args)[0].get("progress", (None,))[0]
    return progress is False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        check_environment()
        missing = missing_module(args.command)
        if missing is not None:  # before the command loads anything: said as the import would say it
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        quiet = progress_off(args)
        with held_by_command(), libraries_without_progress_bars(quiet):  # both undone when it ends, however
            return int(args.func(args) or 0)
    except (UserError, EnvironmentValueError) as exc:
        if args.debug:
            raise
        print(f"etkd {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        extra = extra_for(missing) if missing else None
        if extra is None or args.debug:
            raise
        print(
            f"etkd {args.command}: error: this command needs the `{extra}` extra ({missing} is not installed): "
            f"pip install 'etkd[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        again = (
            " (checkpoints are kept: run the same command with --resume to continue)"
            if hasattr(args, "resume")
            else ""
        )
        print(f"\netkd {args.command}: interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
