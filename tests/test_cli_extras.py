"""A command whose extra is not installed says so before it loads anything (`distill.cli.EXTRAS`)."""

from __future__ import annotations

import subprocess
import sys

from etkd.distill import cli

TRAIN = ("accelerate", "datasets", "seqeval", "scipy", "sklearn", "matplotlib")


def test_every_command_named_in_extras_exists_and_is_satisfied_here():
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(cli.EXTRAS) <= set(commands), set(cli.EXTRAS) - set(commands)
    assert {e for extras in cli.EXTRAS.values() for e in extras} <= {e for _, e in cli._requirements()}
    assert all(cli.missing_module(c) is None for c in commands)  # the test environment has every extra


def test_missing_train_extra_is_said_before_any_input_is_read(tmp_path):
    """Without the `train` extra, kd-task and finetune name it at once: before they would read the teacher /
    model or the data (here missing, which they would otherwise report first), let alone load a model."""
    code = (
        f"import sys\nfor m in {TRAIN!r}: sys.modules[m] = None\n"
        "from etkd.distill.cli import main\nsys.exit(main(sys.argv[1:]))"
    )
    gone = str(tmp_path / "missing")
    for argv in (
        ["kd-task", "--teacher", gone, "--train-file", f"{gone}.jsonl", "--output-dir", str(tmp_path / "a")],
        ["finetune", "--task", "sst2", "--model", gone, "--train-file", f"{gone}.jsonl"],
    ):
        res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, res.stderr
        assert len(lines) == 1 and lines[0].startswith(f"etkd {argv[0]}: error: this command needs the `train` "
                                                       "extra (accelerate is not installed)"), res.stderr  # fmt: skip
        assert "pip install 'etkd[train]'" in lines[0]
    assert not (tmp_path / "a").exists()
