"""Issue 18: the drivers as a user meets them. One test (or more) per numbered case of the issue: output
folders (lock, earlier runs, --resume/--overwrite), inputs checked before any work, typed config values,
encoding errors with their line, one-line user errors with exit 2, and the friction list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_data import WORDS, generated_text, make_tokenizer_dir

from etkd.distill.cli import build_parser, main
from etkd.distill.errors import UserError
from etkd.models import EncoderConfig, EncoderModel

VOCAB = 5 + len(WORDS)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny MLM model with its tokenizer, a model config, and a corpus."""
    d = tmp_path_factory.mktemp("core")
    cfg = EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        max_positions=64, head="mlm")  # fmt: skip
    torch.manual_seed(0)
    EncoderModel(cfg).save_pretrained(d / "model")
    make_tokenizer_dir(d / "model")
    (d / "model.json").write_text(json.dumps(cfg.to_dict()))
    (d / "corpus.txt").write_text("\n".join(generated_text(120)) + "\n")
    return d


def pretrain_args(env, out, steps=2, *extra):
    return ["pretrain", "--model", str(env / "model"), "--data", str(env / "corpus.txt"), "--output-dir", str(out),
            "--max-steps", str(steps), "--short-length", "16", "--max-blocks", "32", "--batch-size", "4",
            "--save-every", "1", "--no-progress", "--seed", "0", *extra]  # fmt: skip


def run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# 1. Output folders -----------------------------------------------------------------------------------------


def test_second_live_writer_is_refused_with_the_holders_pid(env, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from etkd.distill.rundir import claim
            claim({str(out)!r}, {{"seed": 1}})
            print("held", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run(pretrain_args(env, out), capsys)
        assert code == 2 and f"another etkd run is writing there (pid {holder.pid} on" in err
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert json.loads((out / "settings.json").read_text()) == {"seed": 1}  # untouched by the refused run


def test_earlier_run_refused_unless_resume_same_settings_or_overwrite(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(pretrain_args(env, out, 2), capsys)[0] == 0
    code, err = run(pretrain_args(env, out, 2), capsys)
    assert (
        code == 2
        and "holds an earlier run (settings.json); --resume continues it, --overwrite replaces it" in err
    )
    code, err = run(pretrain_args(env, out, 4, "--resume", "--learning-rate", "0.002"), capsys)
    assert code == 2 and "learning_rate: 0.0001 -> 0.002" in err and "max_steps: 2 -> 4" in err
    old_log = (out / "log.jsonl").read_text()
    assert run(pretrain_args(env, out, 2, "--resume"), capsys)[0] == 0  # same settings: resumes (at its end)
    assert (out / "log.jsonl").read_text() == old_log
    assert math_finite(json.loads((out / "result.json").read_text())["loss"])
    assert run(pretrain_args(env, out, 3, "--overwrite"), capsys)[0] == 0
    steps = sorted(os.listdir(out / "checkpoints"))
    assert steps == ["step_00000002", "step_00000003"]  # the new run's, nothing of the old one
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((out / "settings.json").read_text())["max_steps"] == 3
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("x")
    code, err = run(pretrain_args(env, stranger, 2, "--overwrite"), capsys)
    assert code == 2 and "not empty and not an etkd run folder (thesis.tex)" in err
    assert (stranger / "thesis.tex").exists()


def math_finite(x) -> bool:
    return isinstance(x, float) and x == x and abs(x) != float("inf")


def test_kill_during_final_write_then_resume_reports_the_real_loss(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(pretrain_args(env, out, 2), capsys)[0] == 0
    loss = json.loads((out / "result.json").read_text())["loss"]
    import shutil

    shutil.rmtree(out / "final")  # as if killed while writing final/
    os.remove(out / "result.json")
    assert run(pretrain_args(env, out, 2, "--resume"), capsys)[0] == 0
    assert json.loads((out / "result.json").read_text())["loss"] == loss
    assert (out / "final" / "model.safetensors").is_file()


# 2. Inputs and outputs checked before the first step ---------------------------------------------------------


def test_bad_inputs_fail_before_any_work(env, tmp_path, capsys, monkeypatch):
    ner = tmp_path / "ner.txt"
    ner.write_text("john B-PER\nsat O\n\nmary B-PER\n")
    (tmp_path / "empty.txt").write_text("")
    ft = ["finetune", "--task", "conll2003", "--model", env / "model", "--train-file", ner, "--max-steps", "1",
          "--no-progress"]  # fmt: skip
    code, err = run([*ft, "--eval-file", tmp_path / "empty.txt", "--output-dir", tmp_path / "a"], capsys)
    assert code == 2 and "empty.txt: no examples" in err and not (tmp_path / "a").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run(
        [*ft, "--eval-file", ner, "--output", blocker / "r.json", "--output-dir", tmp_path / "b"], capsys
    )
    assert code == 2 and "--output" in err and "cannot write there" in err and not (tmp_path / "b").exists()
    code, err = run(
        ["finetune", "--task", "sst2", "--model", tmp_path / "nope" / "m", "--train-file", ner], capsys
    )
    assert code == 2 and "nope/m: no such folder" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run(["finetune", "--task", "sst2", "--model", "nope-org/m", "--train-file", ner], capsys)
    assert (
        code == 2 and "--model nope-org/m: not a local path, not in the cache, and offline mode is on" in err
    )
    code, err = run(["convert", "--from", tmp_path / "missing_dir", "--to", "longformer", "--out", tmp_path / "c"],
                    capsys)  # fmt: skip
    assert code == 2 and "--from" in err and "missing_dir: no such folder" in err
    code, err = run(pretrain_args(env, tmp_path / "d")[:3] + ["--data", "corpus/trian.txt", "--output-dir",
                                                                tmp_path / "d"], capsys)  # fmt: skip
    assert code == 2 and "--data corpus/trian.txt: no such file or directory" in err


# 3. Typed config values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, message",
    [
        ("max_steps: ten", "run.yaml:2: max_steps: expected an integer, got 'ten'"),
        ("max_steps: 2.5", "run.yaml:2: max_steps: expected an integer, got 2.5"),
        ("max_steps: 0", "run.yaml:2: max_steps: expected >= 1, got 0"),
        (
            "mixed_precision: fp8",
            "run.yaml:2: mixed_precision: expected one of ['no', 'bf16', 'fp16'], got 'fp8'",
        ),
        ("max_stepz: 3", "unknown settings ['max_stepz']"),
    ],
)
def test_config_values_are_typed_with_key_and_line(env, tmp_path, capsys, line, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"learning_rate: 1e-3\n{line}\n")
    args = ["pretrain", "--config", cfg, "--model", env / "model", "--data", env / "corpus.txt", "--output-dir",
            tmp_path / "o", "--short-length", "16", "--max-blocks", "16", "--no-progress"]  # fmt: skip
    code, err = run(args, capsys)
    assert code == 2 and message in err, err


def test_yaml_string_numbers_are_numbers_in_every_driver(env, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 1e-3\nmax_steps: 2\n")  # PyYAML reads 1e-3 as a string
    assert run(["pretrain", "--config", cfg, "--model", env / "model", "--data", env / "corpus.txt", "--output-dir",
                tmp_path / "pt", "--short-length", "16", "--max-blocks", "16", "--no-progress"], capsys)[0] == 0  # fmt: skip
    assert json.loads((tmp_path / "pt" / "settings.json").read_text())["learning_rate"] == 0.001
    assert run(
        ["finetune", "--config", cfg, "--task", "sst2", "--model", "x", "--max-steps", "0"], capsys
    ) == (2, "etkd finetune: error: --max-steps: expected >= 1, got 0\n")


# 4. Encoding errors keep their place ------------------------------------------------------------------------


def test_bad_bytes_are_reported_at_their_line(env, tmp_path, capsys, caplog):
    from etkd.distill.tasks import DataError, ner

    conll = tmp_path / "latin1.txt"
    conll.write_bytes("john B-PER\n\nM\xfcller B-PER\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:3: not valid UTF-8 \(byte 0xfc at column 2\)"):
        ner.read_conll(conll)
    text = tmp_path / "text.txt"
    lines = generated_text(40)
    text.write_bytes(
        ("\n".join(lines[:5]) + "\ncaf\xe9 " + lines[5] + "\n" + "\n".join(lines[6:]) + "\n").encode(
            "latin-1"
        )
    )
    args = pretrain_args(env, tmp_path / "o")
    args[args.index("--data") + 1] = str(text)
    code, err = run(args, capsys)
    assert code == 2 and "text.txt:6: not valid UTF-8 (byte 0xe9 at column 4)" in err
    with caplog.at_level("WARNING", logger="etkd"):
        assert run([*args, "--skip-bad-records"], capsys)[0] == 0
    assert "--data: skipped 1 bad records" in caplog.text


# 5. One clear line, exit 2; tracebacks with --debug ----------------------------------------------------------


def test_user_errors_are_one_line_and_exit_2(env, tmp_path, capsys):
    code, err = run(["pretrain", "--model", env / "model", "--output-dir", tmp_path / "o"], capsys)
    assert (
        code == 2 and err == "etkd pretrain: error: --data: required (files, directories or dataset names)\n"
    )
    with pytest.raises(UserError, match="--data: required"):
        main(["pretrain", "--model", str(env / "model"), "--output-dir", str(tmp_path / "o"), "--debug"])


# 6. Friction -----------------------------------------------------------------------------------------------


def test_convert_carries_the_tokenizer(env, tmp_path, capsys):
    out = tmp_path / "long"
    assert run(["convert", "--from", env / "model", "--to", "longformer", "--max-positions", "128", "--window", "16",
                "--out", out], capsys)[0] == 0  # fmt: skip
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == VOCAB and tok.model_max_length == 128
    # the next step finds it without --tokenizer
    assert run(["distill", "--teacher", out, "--data", env / "corpus.txt", "--output-dir", tmp_path / "kd",
                "--max-steps", "1", "--short-length", "16", "--max-blocks", "8", "--batch-size", "2",
                "--no-progress"], capsys)[0] == 0  # fmt: skip


def test_one_flag_per_concept_hidden_aliases_and_defaults_in_help(capsys):
    parser = build_parser()
    for cmd in ("pretrain", "distill", "kd-task", "finetune"):
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        text = capsys.readouterr().out
        for flag in ("--learning-rate", "--grad-accum-steps", "--backend", "--output-dir", "--overwrite"):
            assert flag in text, (cmd, flag)
        for old in ("--lr ", "--grad-accum ", "--attention-backend"):
            assert old not in text, (cmd, old)
        assert "(default: " in text
        a = parser.parse_args([cmd, "--lr", "0.5", "--grad-accum", "3", "--attention-backend", "reference"])
        b = parser.parse_args(
            [cmd, "--learning-rate", "0.5", "--grad-accum-steps", "3", "--backend", "reference"]
        )
        assert (a.learning_rate, a.grad_accum_steps, a.backend) == (
            b.learning_rate,
            b.grad_accum_steps,
            b.backend,
        )
    a = parser.parse_args(["kd-task", "--train", "t.jsonl", "--eval", "e.jsonl"])
    assert (a.train_file, a.eval_file) == ("t.jsonl", ["e.jsonl"])  # --eval-file is repeatable


def test_finetune_is_on_the_driver_core(tmp_path):
    """finetune takes the core's training and model flags (one dest each: per_device_batch_size), its
    TrainConfig comes from core.train_config with finetune's own defaults, and an old config-file key
    (batch_size) is a hidden alias of the one spelling."""
    import argparse

    from etkd.distill import core, finetune
    from etkd.distill.config import resolve

    parser = build_parser()
    ns = parser.parse_args(["finetune", "--batch-size", "4", "--lr", "1e-3"])
    assert ns.per_device_batch_size == 4 and "batch_size" not in vars(ns)
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("batch_size: 6\ngrad_accum: 2\n")
    merged = resolve(parser.parse_args(["finetune", "--config", str(cfg)]), finetune.DEFAULTS)
    assert (merged.per_device_batch_size, merged.grad_accum_steps) == (6, 2)
    train_cfg = core.train_config(argparse.Namespace(**{**finetune.DEFAULTS, "stop_at_step": 5}))
    assert (train_cfg.per_device_batch_size, train_cfg.learning_rate, train_cfg.stop_at_step) == (16, 3e-5, 5)
    assert set(core.TRAIN_DEFAULTS) <= set(finetune.DEFAULTS)
    assert not hasattr(finetune, "BACKENDS") and not hasattr(core, "BACKENDS")


def test_tokenizer_that_does_not_fit_the_model_is_refused(env, tmp_path, capsys):
    from transformers import BertTokenizer

    small = tmp_path / "tok"
    BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"])}
                  ).save_pretrained(small)  # fmt: skip
    cfg = EncoderConfig(vocab_size=500, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                        max_positions=64, head="mlm")  # fmt: skip
    EncoderModel(cfg).save_pretrained(tmp_path / "big")
    code, err = run(["pretrain", "--model", tmp_path / "big", "--tokenizer", small, "--data", env / "corpus.txt",
                     "--output-dir", tmp_path / "o"], capsys)  # fmt: skip
    assert code == 2 and "6 tokens, but the model's vocab_size is 500: not this model's tokenizer" in err


def test_unknown_ner_types_are_rejected_unless_labels_allow_them(env, tmp_path, capsys):
    ner = tmp_path / "ner.txt"
    ner.write_text("john B-PER\nsat O\n\nthe O\ncat B-FOO\n\nmary B-PER\n")
    base = ["finetune", "--task", "conll2003", "--model", env / "model", "--train-file", ner, "--eval-file", ner,
            "--max-steps", "1", "--batch-size", "2", "--no-progress"]  # fmt: skip
    code, err = run([*base, "--output-dir", tmp_path / "a"], capsys)
    assert code == 2 and "ner.txt:4: entity type 'FOO' (tag 'B-FOO')" in err and "--labels FOO" in err
    assert run([*base, "--labels", "FOO", "--output-dir", tmp_path / "b"], capsys)[0] == 0
    saved = json.loads((tmp_path / "b" / "model" / "config.json").read_text())["extra"]["labels"]
    assert "B-FOO" in saved and len(saved) == 10


def test_kd_task_reads_the_sentence_column_and_reports_percentages(env, tmp_path, capsys):
    rows = [{"sentence": t, "label": int("cat" in t)} for t in generated_text(16, seed=2)]
    f = tmp_path / "sst.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run(["kd-task", "--teacher", env / "model", "--train-file", f, "--eval-file", f, "--max-steps", "1",
                "--batch-size", "4", "--max-length", "24", "--output-dir", tmp_path / "kd", "--no-progress"],
               capsys)[0] == 0  # fmt: skip
    acc = json.loads((tmp_path / "kd" / "results.json").read_text())["runs"][0]["accuracy"]
    assert 0.0 <= acc <= 100.0 and acc * 16 / 100 == pytest.approx(
        round(acc * 16 / 100)
    )  # a share of 16, in %


def test_kd_task_missing_files_name_their_own_flag(env, tmp_path, capsys):
    rows = [{"sentence": t, "label": int("cat" in t)} for t in generated_text(4, seed=2)]
    f = tmp_path / "sst.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["kd-task", "--teacher", env / "model", "--max-steps", "1", "--no-progress"]
    code, err = run([*base, "--train-file", tmp_path / "nope.jsonl", "--output-dir", tmp_path / "a"], capsys)
    assert code == 2 and f"--train-file {tmp_path / 'nope.jsonl'}: no such file or directory" in err, err
    code, err = run([*base, "--train-file", f, "--eval-file", tmp_path / "dev.jsonl", "--output-dir",
                     tmp_path / "b"], capsys)  # fmt: skip
    assert code == 2 and f"--eval-file {tmp_path / 'dev.jsonl'}: no such file or directory" in err, err


def test_progress_on_packing_and_evaluation_and_no_shared_tensor_note(env, tmp_path, capfd, caplog):
    with caplog.at_level("INFO"):  # pytest's handler on the root logger would show accelerate's note
        assert main(pretrain_args(env, tmp_path / "pt", 2)[:-3] + ["--seed", "0"]) == 0  # progress on
    err = capfd.readouterr().err
    assert "pack:" in err and "Removed shared tensor" not in err + caplog.text
    ner = tmp_path / "ner.txt"
    ner.write_text("john B-PER\nsat O\n\nmary B-PER\n")
    assert (
        main(["evaluate", "--task", "conll2003", "--model", str(env / "model"), "--eval-file", str(ner)]) == 0
    )
    assert "evaluate:" in capfd.readouterr().err


def test_log_level_filters_the_etkd_log(env, tmp_path, capsys):
    rows = [{"sentence": t, "label": int("cat" in t)} for t in generated_text(8, seed=3)]
    f = tmp_path / "sst.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["kd-task", "--teacher", env / "model", "--train-file", f, "--max-steps", "1", "--batch-size", "4",
            "--max-length", "24", "--no-progress"]  # fmt: skip
    assert run([*base, "--output-dir", tmp_path / "a"], capsys) == (
        0,
        "[etkd] INFO: --text-field: using 'sentence'\n",
    )
    assert run([*base, "--output-dir", tmp_path / "b", "--log-level", "warning"], capsys) == (0, "")


def test_data_names_are_paths_or_reachable_datasets(env, tmp_path, capsys, monkeypatch):
    """A mistyped local path never becomes a hub dataset name; a real name is probed once, clearly."""
    from etkd.distill.data import TextSource

    (tmp_path / "corpus").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--data corpus/wiki: no such file or directory"):
        TextSource("corpus/wiki")  # `corpus` exists here: a path, not owner/name
    monkeypatch.setattr(
        "huggingface_hub.repo_exists", lambda *a, **k: (_ for _ in ()).throw(OSError("no route"))
    )
    with pytest.raises(
        UserError, match="--data someone/corpus: not a local path, and the hub could not be reached"
    ):
        TextSource("someone/corpus")
    monkeypatch.setattr("huggingface_hub.repo_exists", lambda *a, **k: False)
    with pytest.raises(UserError, match="--data someone/corpus: no such local path or hub dataset"):
        TextSource("someone/corpus")


def test_convert_argument_errors_are_user_errors(env, tmp_path, capsys):
    code, err = run(["convert", "--from", env / "model", "--to", "longformer", "--window", "7", "--out",
                     tmp_path / "x"], capsys)  # fmt: skip
    assert code == 2 and err.startswith("etkd convert: error: convert: ") and "window" in err
