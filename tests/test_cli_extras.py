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


@pytest.mark.parametrize("setting", ["progress: false", "no-progress: true", "no_progress: true"])
def test_progress_off_in_a_config_file_silences_the_libraries_too(tmp_path, monkeypatch, setting):
    """`progress: false` in a --config file turns the libraries' bars off as `--no-progress` does (only the flag
    did); `no-progress: true`, the flag's own name, means the same (it read as progress true)."""
    pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    from etkd.distill import pretrain
    from etkd.distill.config import resolve

    seen = {}

    def run(args):
        seen["bars"] = hf_logging.is_progress_bar_enabled()
        seen["progress"] = resolve(args, pretrain.DEFAULTS).progress
        return 0

    monkeypatch.setattr(pretrain, "run", run)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"{setting}\n")
    assert hf_logging.is_progress_bar_enabled()
    assert cli.main(["pretrain", "--config", str(cfg), "--output-dir", str(tmp_path / "out")]) == 0
    assert seen == {"bars": False, "progress": False}
    assert hf_logging.is_progress_bar_enabled()  # as it was before the command
    cfg.write_text("progress: true\n")
    assert cli.main(["pretrain", "--config", str(cfg), "--output-dir", str(tmp_path / "out2")]) == 0
    assert seen == {"bars": True, "progress": True}


def _tiny_hf_roberta(path) -> str:
    transformers = pytest.importorskip("transformers")
    from test_data import WORDS, make_tokenizer_dir

    cfg = transformers.RobertaConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=34, pad_token_id=0)  # fmt: skip
    transformers.RobertaModel(cfg).save_pretrained(path)
    make_tokenizer_dir(path)
    return str(path)


def test_convert_takes_no_progress(tmp_path, capfd):
    """`etkd convert --no-progress`: no bars from transformers while it loads and writes (the flag did not exist)."""
    source = _tiny_hf_roberta(tmp_path / "hf")
    argv = ["convert", "--from", source, "--to", "longformer", "--max-positions", "64", "--window", "8",
            "--format", "hf"]  # fmt: skip
    capfd.readouterr()
    assert cli.main([*argv, "--out", str(tmp_path / "loud")]) == 0
    loud = capfd.readouterr().err
    assert cli.main([*argv, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    quiet = capfd.readouterr().err
    assert "Loading weights" in loud, loud  # what the flag silences is there without it
    assert "Loading weights" not in quiet and "it/s]" not in quiet, quiet


def test_finetune_says_one_step_in_the_singular(tmp_path, capsys):
    pytest.importorskip("accelerate")
    import json

    import torch
    from test_data import WORDS, make_tokenizer_dir

    from etkd.models import EncoderConfig, EncoderModel

    torch.manual_seed(0)
    model = tmp_path / "tiny"
    cfg = EncoderConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                        max_positions=64)  # fmt: skip
    EncoderModel(cfg).save_pretrained(str(model))
    make_tokenizer_dir(model)
    rows = [{"sentence": " ".join(WORDS[i : i + 4]), "label": i % 2} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for steps, said in ((1, "sst2: 1 step, loss"), (2, "sst2: 2 steps, loss")):
        argv = ["finetune", "--task", "sst2", "--model", str(model), "--train-file", str(tmp_path / "train.jsonl"),
                "--output-dir", str(tmp_path / f"run{steps}"), "--max-steps", str(steps), "--batch-size", "4",
                "--no-progress", "--save-every", "0"]  # fmt: skip
        assert cli.main(argv) == 0
        assert said in capsys.readouterr().out


def test_a_bad_nystrom_keep_value_is_said_before_the_command_starts(tmp_path, monkeypatch, capsys):
    """ETKD_CPU_NYSTROM_KEEP is checked by `etkd`'s environment check, before any input is read (it was an error
    only at the first Nystrom call, after the data was loaded)."""
    monkeypatch.setenv("ETKD_CPU_NYSTROM_KEEP", "sometimes")
    argv = ["convert", "--from", str(tmp_path / "missing"), "--to", "nystrom", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "etkd convert: error: ETKD_CPU_NYSTROM_KEEP=sometimes: expected auto, none, k1, k3, k1,k3"
    ], err
    monkeypatch.setenv("ETKD_CPU_NYSTROM_KEEP", "k1")
    assert cli.main(argv) == 2
    assert (
        "--from" in capsys.readouterr().err
    )  # a good value: on to the command, which refuses the missing input
