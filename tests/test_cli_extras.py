"""What `etkd`'s CLI does around every command: a missing extra is said before anything loads
(`distill.cli.EXTRAS`); the run folder's lock is released when the command ends; `--no-progress` silences the
libraries' bars too."""

from __future__ import annotations

import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("ending", ["returns", "user_error", "interrupted", "nested"])
def test_a_command_releases_its_run_folder_lock_when_it_ends(tmp_path, monkeypatch, ending):
    """The `.etkd.lock` a command claims is released and its file closed when the command ends, however it ends;
    the demo and `etkd tune` run many commands in one process and kept every run's lock (and open file) to the
    process's end (ResourceWarning: unclosed file). A command run by another (`nested`, as the demo runs
    finetune) releases its own lock only."""
    import warnings

    from etkd.distill import core, pretrain
    from etkd.distill.errors import UserError

    outer, inner = tmp_path / "outer", tmp_path / "inner"

    def run(args):
        if ending == "nested" and args.output_dir == str(outer):
            core.start_run(args)
            assert cli.main(["pretrain", "--output-dir", str(inner)]) == 0
            assert _free(inner) and not _free(outer)  # the inner command's lock only
            return 0
        core.start_run(args)
        assert not _free(args.output_dir)  # held while the command runs
        if ending == "user_error":
            raise UserError("refused after the folder was claimed")
        if ending == "interrupted":
            raise KeyboardInterrupt
        return 0

    monkeypatch.setattr(pretrain, "run", run)  # `register` reads it when the parser is built
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        code = cli.main(["pretrain", "--output-dir", str(outer)])
    assert code == {"returns": 0, "nested": 0, "user_error": 2, "interrupted": 130}[ending]
    assert _free(outer)


def _free(directory) -> bool:
    """Whether another open file of `directory`'s lock can take it (flock locks belong to an open file)."""
    import fcntl

    with open(f"{directory}/.etkd.lock") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_no_progress_silences_transformers_bars_for_the_command_only(tmp_path, capfd):
    """`--no-progress` also turns off transformers' own bars ("Loading weights" of an HF teacher, "Writing model
    shards" of the saved student) while the command runs; they are on again after it."""
    transformers = pytest.importorskip("transformers")
    from test_data import WORDS, generated_text, make_tokenizer_dir
    from transformers.utils import logging as hf_logging

    cfg = transformers.RobertaConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=34, pad_token_id=0)  # fmt: skip
    transformers.RobertaForMaskedLM(cfg).save_pretrained(tmp_path / "hf")
    make_tokenizer_dir(tmp_path / "hf")
    (tmp_path / "corpus.txt").write_text("\n".join(generated_text(40)) + "\n")
    capfd.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    argv = ["distill", "--teacher", str(tmp_path / "hf"), "--data", str(tmp_path / "corpus.txt"), "--output-dir",
            str(tmp_path / "out"), "--max-steps", "1", "--short-length", "16", "--batch-size", "4", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err and "it/s]" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # as it was before the command
