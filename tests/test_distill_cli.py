"""The drivers end to end on tiny models (hidden 32, <= 4 layers, seq <= 64) and generated text."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_data import WORDS, generated_text, make_tokenizer_dir

from etkd.distill import distill as distill_cmd
from etkd.distill import kd_task, pretrain
from etkd.distill.data import MLMCollator
from etkd.distill.errors import UserError
from etkd.distill.losses import distillation_loss
from etkd.models import EncoderConfig, EncoderModel, make_student

VOCAB = 5 + len(WORDS)


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="etkd")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (pretrain, distill_cmd, kd_task):
        module.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def tiny_config(layers: int = 4, **kw) -> EncoderConfig:
    return EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=layers, num_heads=2, intermediate_size=64,
                         max_positions=64, **{"head": "mlm", **kw})  # fmt: skip


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    # A random teacher with BERT's 0.02 init predicts a near-uniform distribution, which leaves the KD terms
    # nothing to teach; a wider init gives it sharp, structured predictions a student can be seen to learn.
    EncoderModel(tiny_config(initializer_range=0.5)).save_pretrained(str(d))
    make_tokenizer_dir(d)
    return str(d)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "text.txt"
    f.write_text("\n".join(generated_text(400)) + "\n")
    return str(f)


def common(out, steps: int) -> list[str]:
    return ["--output-dir", str(out), "--max-steps", str(steps), "--no-progress", "--seed", "3"]


def test_student_init_copies_every_other_layer(teacher_dir):
    teacher = pretrain.load_model(teacher_dir)
    ns = argparse.Namespace(student=None, student_layers="every_other", student_attention=None,
                            student_max_positions=None)  # fmt: skip
    student = distill_cmd.build_student(teacher, ns)
    assert student.config.num_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    for key, value in s.items():
        if key.startswith("encoder.layers."):
            i, rest = key.split(".", 3)[2:]
            src = f"encoder.layers.{[0, 2][int(i)]}.{rest}"
        else:
            src = key
        assert torch.equal(value, t[src]), key
    ns.student_layers = "1,3"
    student = distill_cmd.build_student(teacher, ns)
    assert torch.equal(student.encoder.layers[1].ffn_in.weight, teacher.encoder.layers[3].ffn_in.weight)
    with pytest.raises(ValueError, match="student-layers"):
        distill_cmd.parse_layers("odd")


def test_distill_loss_falls_and_saves_both_formats(teacher_dir, corpus, tmp_path):
    out = tmp_path / "kd"
    argv = ["distill", "--teacher", teacher_dir, "--data", corpus, "--short-length", "16", "--long-length", "32",
            "--long-fraction", "0.3", "--batch-size", "8", "--lr", "3e-3", "--log-every", "6", "--save-every", "0",
            "--max-blocks", "200", *common(out, 36)]  # fmt: skip
    assert cli(argv) == 0
    result = json.loads((out / "result.json").read_text())
    losses = [r["loss"] for r in result["history"]]
    assert result["step"] == 36 and len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    assert {"mlm", "kd", "cos"} <= set(result["history"][0])
    student = EncoderModel.from_pretrained(str(out / "student"))
    assert student.config.num_layers == 2
    assert os.path.isfile(out / "student-hf" / "config.json") and os.path.isfile(
        out / "student" / "tokenizer.json"
    )
    settings = json.loads((out / "settings.json").read_text())
    assert settings["alpha"] == 2.0 and settings["beta"] == 5.0 and settings["temperature"] == 2.0
    assert settings["mlm_probability"] == 0.15  # the MLM and KL terms read masked tokens


def full_loss(student, teacher, batch, ns):
    """The objective from every position's vocabulary logits (what `etkd distill` computed before issue 29)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = student(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask)
    return distillation_loss(out.logits, t.logits, out.last_hidden_state, t.last_hidden_state, batch["labels"],
                             mask, alpha=ns.alpha, beta=ns.beta, gamma=ns.gamma, temperature=ns.temperature,
                             masked_only=ns.kd_masked_only)  # fmt: skip


@pytest.mark.parametrize(
    "alpha, beta, masked_only",
    [(2.0, 5.0, False),  # KL over every real token: the student's logits everywhere, the teacher's too
     (2.0, 5.0, True),  # KL over the masked tokens: both models' logits there only
     (2.0, 0.0, False),  # no KL: the student's logits at the masked tokens, no teacher head
     (0.0, 0.0, False)],  # cosine only: no vocabulary logits at all
)  # fmt: skip
def test_distill_step_reads_logits_only_where_the_loss_does(teacher_dir, alpha, beta, masked_only):
    """Issue 29: the driver's step computes vocabulary logits only where a term reads them; its loss, each
    term and the student's gradients equal those of the objective on full logits for the same batch."""
    teacher = pretrain.load_model(teacher_dir).eval()
    torch.manual_seed(1)
    student = make_student(teacher).eval()  # eval: no dropout, so both computations see the same network
    ids = torch.randint(5, VOCAB, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 14:] = False  # padding: in no term
    labels = torch.where((torch.rand(3, 20) < 0.3) & mask, ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ns = argparse.Namespace(alpha=alpha, beta=beta, gamma=1.0, temperature=2.0, kd_masked_only=masked_only)

    calls = []
    hook = student.head.decoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    loss, logs = distill_cmd.make_loss(teacher, ns)(student, batch)
    hook.remove()
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    ref, ref_logs = full_loss(student, teacher, batch, ns)
    ref_grads = torch.autograd.grad(ref, list(student.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert logs.keys() == ref_logs.keys()
    for k in logs:
        torch.testing.assert_close(logs[k], ref_logs[k], rtol=1e-5, atol=1e-6)
    # atol from the gradients' scale (max |grad| ~ 17 here): a gradient that is ~0 (one 32-vector's max is 1.7e-6)
    # is rounding noise of that scale, which the two routes sum in different orders (1.2e-6 apart under
    # MKL_ENABLE_INSTRUCTIONS=AVX2); a wrong gradient is off by far more
    atol = 1e-6 * max([1.0] + [r.abs().max().item() for r in ref_grads if r is not None and r.numel()])
    for g, r in zip(grads, ref_grads):
        if r is not None and g is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=atol)
        else:  # a head the loss does not read gets no gradient either way (or a zero one from the 0-row path)
            assert (g is None or not g.abs().any()) and (r is None or not r.abs().any())
    # How many rows the student's vocabulary decoder saw.
    expected = int(mask.sum()) if beta and not masked_only else int((labels != -100).sum()) if alpha else 0
    assert calls == [expected]


def test_teacher_forward_bf16_and_chunks(teacher_dir):
    """--teacher-precision bf16 runs the teacher in bf16 autocast (close to fp32, not equal); a sequence
    longer than the teacher's positions runs in chunks, its logits rows still in row-major order."""
    teacher = pretrain.load_model(teacher_dir).eval()
    ids = torch.randint(5, VOCAB, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    pos = torch.rand(2, 40) < 0.5
    logits, hidden, states = distill_cmd.teacher_forward(teacher, ids, mask, pos)
    assert states == ()
    with torch.no_grad():
        full = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(logits, full.logits[pos])
    torch.testing.assert_close(hidden, full.last_hidden_state)
    assert not logits.is_inference() and not hidden.is_inference()
    _, _, states = distill_cmd.teacher_forward(teacher, ids, mask, None, layers=[2, 4])  # --delta's states
    assert len(states) == 2 and not states[0].is_inference()
    torch.testing.assert_close(states[0], full.hidden_states[2])
    torch.testing.assert_close(states[1], full.last_hidden_state)
    lb, hb, _ = distill_cmd.teacher_forward(teacher, ids, mask, pos, precision="bf16")
    # The linear layers ran in bf16 (rounded results); LayerNorm and the head's bias add keep fp32.
    assert not torch.equal(hb.float(), hidden) and not torch.equal(lb.float(), logits)
    for low, ref in ((hb, hidden), (lb, logits)):  # bf16 rounding through 4 wide-init layers: ~4% in norm
        assert ((low.float() - ref).norm() / ref.norm()).item() < 0.1
    # 100 tokens > the teacher's 64 positions: two chunks, each seeing only itself.
    ids = torch.randint(5, VOCAB, (2, 100))
    mask = torch.ones(2, 100, dtype=torch.bool)
    pos = torch.rand(2, 100) < 0.5
    logits, hidden, states = distill_cmd.teacher_forward(teacher, ids, mask, pos, layers=[1])
    with torch.no_grad():
        parts = [teacher(input_ids=ids[:, a:b], attention_mask=mask[:, a:b], output_hidden_states=True)
                 for a, b in ((0, 64), (64, 100))]  # fmt: skip
    full = torch.cat([p.logits for p in parts], 1)
    torch.testing.assert_close(logits, full[pos])
    torch.testing.assert_close(hidden, torch.cat([p.last_hidden_state for p in parts], 1))
    torch.testing.assert_close(states[0], torch.cat([p.hidden_states[1] for p in parts], 1))


def _term_falls(teacher_dir, corpus, tmp_path, flag: str, key: str):
    """A cosine-only distill run (4 -> 2 layers, 24 steps) with `flag` 1: its logged term `key` falls by 20 % or
    more over the 4 log lines and the loss is cos + that term. Returns the run's folder and its argv."""
    out = tmp_path / "kd"
    argv = ["distill", "--teacher", teacher_dir, "--data", corpus, "--short-length", "16", "--batch-size", "8",
            "--lr", "3e-3", "--log-every", "6", "--save-every", "0", "--max-blocks", "200", "--alpha", "0",
            "--beta", "0", flag, "1", *common(out, 24)]  # fmt: skip
    assert cli(argv) == 0
    history = json.loads((out / "result.json").read_text())["history"]
    values = [r[key] for r in history]
    assert len(values) == 4 and values[-1] < 0.8 * values[0], values
    assert all(r["loss"] == pytest.approx(r["cos"] + r[key], rel=1e-6) for r in history)
    return out, argv


def test_distill_per_layer_hidden_loss_falls_and_checks_its_student(teacher_dir, corpus, tmp_path):
    """--delta: TinyBERT's per-layer hidden-state MSE (4 -> 2 layers: student layers 1, 2 learn teacher
    layers 2, 4); logged as "hid", falling; with the cosine-only weights it needs no MLM head and no masking.
    A student it cannot pair (more layers than the teacher) is a UserError naming --delta."""
    out, argv = _term_falls(teacher_dir, corpus, tmp_path, "--delta", "hid")
    settings = json.loads((out / "settings.json").read_text())
    assert settings["delta"] == 1.0 and settings["mlm_probability"] == 0.0
    deep = tmp_path / "deep"
    torch.manual_seed(0)
    EncoderModel(tiny_config(layers=5)).save_pretrained(str(deep))
    with pytest.raises(UserError, match=r"--delta: the student has more layers \(5\) than the teacher \(4\)"):
        cli([*argv, "--student", str(deep), "--overwrite"])
    with pytest.raises(UserError, match="--delta: expected >= 0, got -1.0"):
        cli([*argv[: -len(common(out, 24)) - 1], "-1", *common(out, 1), "--overwrite"])


@pytest.mark.parametrize("pre_norm", [False, True])
def test_layer_qkv_are_the_projections_the_layer_computes(pre_norm):
    """--relation's Q/K/V come from a layer's input (hidden_states[i]) through its own projections (after its
    LayerNorm in a pre-norm model): the same tensors the layer's forward computes."""
    torch.manual_seed(0)
    model = EncoderModel(tiny_config(pre_norm=pre_norm)).eval()
    seen = []
    attn = model.encoder.layers[2].attn
    attend = attn.attend

    def spy(module, x, q, k, v, *rest):  # the (b, h, s, hd) q, k, v the layer hands its attention pattern
        seen.append((q, k, v))
        return attend(module, x, q, k, v, *rest)

    attn.attend = spy
    ids = torch.randint(5, VOCAB, (2, 9))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        qkv = distill_cmd.layer_qkv(model, 2, out.hidden_states[2])
    assert len(seen) == 1
    for got, heads in zip(qkv, seen[0]):
        assert got.shape == (2, 9, 32)
        torch.testing.assert_close(got, heads.transpose(1, 2).reshape(2, 9, 32), rtol=0, atol=0)


def test_distill_attention_relations_fall_and_check_their_flags(teacher_dir, corpus, tmp_path):
    """--relation: MiniLMv2's Q/K/V relation KL of the student's last layer vs the teacher's last layer (4 -> 2
    layers, 2 relation heads by default), logged as "rel", falling, the loss cos + rel; a layer or head count
    that does not fit is a UserError naming its flag."""
    _, argv = _term_falls(teacher_dir, corpus, tmp_path, "--relation", "rel")
    for flags, message in (
        (["--relation-layer", "5"], r"--relation-layer: expected a teacher layer 1 to 4, got 5"),
        (
            ["--relation-heads", "3"],
            r"--relation-heads: expected a divisor of the teacher's hidden size 32, got 3",
        ),
        (["--relation", "-1"], r"--relation: expected >= 0, got -1.0"),
        (["--relation-heads", "0"], r"--relation-heads: expected >= 1, got 0"),
    ):
        with pytest.raises(UserError, match=message):
            cli([*argv, *flags, "--overwrite"])


def test_distill_into_longer_longformer_student(teacher_dir, corpus, tmp_path):
    # Teacher: full attention, 64 positions. Student: Longformer, 128 positions; 96-token blocks make the
    # teacher run in chunks.
    out = tmp_path / "long"
    argv = ["distill", "--teacher", teacher_dir, "--data", corpus, "--student-attention", "longformer",
            "--student-max-positions", "128", "--student-window", "16", "--short-length", "32",
            "--long-length", "96", "--long-fraction", "0.5", "--batch-size", "2", "--max-blocks", "40",
            "--kd-masked-only", "--teacher-precision", "bf16", *common(out, 3)]  # fmt: skip
    assert cli(argv) == 0
    student = EncoderModel.from_pretrained(str(out / "student"))
    assert student.config.attention == "longformer" and student.config.max_tokens >= 96


def test_pretrain_config_file_and_cli_resume(corpus, tmp_path):
    tok = make_tokenizer_dir(tmp_path / "tok")
    model_cfg = tmp_path / "model.json"
    model_cfg.write_text(json.dumps(tiny_config(layers=2, head=None).to_dict()))
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text("learning_rate: 0.002\nshort_length: 16\nper_device_batch_size: 4\nsave_every: 2\n"
                       "max_blocks: 64\nlog_every: 1\n")  # fmt: skip
    base = ["pretrain", "--config", str(run_cfg), "--model-config", str(model_cfg), "--data", corpus,
            "--tokenizer", tok]  # fmt: skip

    assert cli([*base, *common(tmp_path / "ref", 6)]) == 0
    assert cli([*base, *common(tmp_path / "run", 6), "--stop-at-step", "3"]) == 0  # "killed" after step 3
    assert not (tmp_path / "run" / "final").exists()
    assert cli([*base, *common(tmp_path / "run", 6), "--resume"]) == 0
    ref = EncoderModel.from_pretrained(str(tmp_path / "ref" / "final"))
    res = EncoderModel.from_pretrained(str(tmp_path / "run" / "final"))
    for (k, a), b in zip(ref.state_dict().items(), res.state_dict().values()):
        assert torch.equal(a, b), k
    settings = json.loads((tmp_path / "ref" / "settings.json").read_text())
    assert settings["learning_rate"] == 0.002 and settings["max_steps"] == 6  # file, then CLI
    # The interrupted run logged step 3 after its last checkpoint (step 2); the resumed run replayed it.
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_kd_task_lambda_sweep_classification(teacher_dir, tmp_path):
    texts = generated_text(48, seed=5)
    rows = [{"text": t, "label": "animal" if ("cat" in t or "dog" in t) else "other"} for t in texts]
    train_f = write_jsonl(tmp_path / "train.jsonl", rows[:32])
    eval_f = write_jsonl(tmp_path / "dev.jsonl", rows[32:])
    out = tmp_path / "task"
    argv = ["kd-task", "--teacher", teacher_dir, "--train", train_f, "--eval", eval_f, "--loss", "taylor-mse",
            "--lambda-sweep", "0.2,0.8", "--batch-size", "8", "--max-length", "24", "--lr", "1e-3",
            *common(out, 4)]  # fmt: skip
    assert cli(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["lambda"] for r in res["runs"]] == [0.2, 0.8] and res["metric"] == "accuracy"
    assert all(0.0 <= r["accuracy"] <= 100.0 for r in res["runs"]) and res["label_names"] == [
        "animal",
        "other",
    ]
    student = EncoderModel.from_pretrained(str(out / "lambda_0.2" / "student"))
    assert student.config.head == "sequence_classification" and student.config.num_labels == 2


def test_kd_task_platt_regression_taylor(teacher_dir, tmp_path):
    rows = [{"a": t, "b": u, "score": float(i % 6)} for i, (t, u) in
            enumerate(zip(generated_text(16, 1), generated_text(16, 2)))]  # fmt: skip
    f = write_jsonl(tmp_path / "sts.jsonl", rows)
    out = tmp_path / "sts"
    argv = ["kd-task", "--teacher", teacher_dir, "--train", f, "--eval", f, "--text-field", "a",
            "--text-pair-field", "b", "--label-field", "score", "--loss", "taylor", "--lambda", "0.5",
            "--batch-size", "8", "--max-length", "32", *common(out, 2)]  # fmt: skip
    assert cli(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["regression"] and res["metric"] == "pearson" and len(res["runs"]) == 1
    assert -100.0 <= res["runs"][0]["pearson"] <= 100.0  # percentages, as every etkd metric


def test_bad_inputs_are_clear_errors(teacher_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat", "label": 1}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        cli(["kd-task", "--teacher", teacher_dir, "--train", str(bad), *common(tmp_path / "x", 1)])
    with pytest.raises(UserError, match="--teacher .*missing: no such folder"):
        cli(
            [
                "distill",
                "--teacher",
                str(tmp_path / "missing"),
                "--data",
                str(bad),
                *common(tmp_path / "y", 1),
            ]
        )
    with pytest.raises(ValueError, match="lambda-sweep"):
        cli(["kd-task", "--teacher", teacher_dir, "--train", str(bad), "--lambda-sweep", "0.5,2",
             "--skip-bad-records", *common(tmp_path / "z", 1)])  # fmt: skip


def test_mlm_head_is_added_only_on_request(corpus, tmp_path, caplog):
    """Issue 20: pretrain / distill from an encoder without an MLM head: a clear error naming
    --add-mlm-head; with it, a fresh tied head (logged)."""
    bare = tmp_path / "bare"
    torch.manual_seed(0)
    EncoderModel(tiny_config(layers=2, head=None)).save_pretrained(str(bare))
    make_tokenizer_dir(bare)
    data = ["--data", corpus, "--short-length", "16", "--max-blocks", "32", "--batch-size", "4"]
    argv = ["pretrain", "--model", str(bare), *data, *common(tmp_path / "pt", 2)]
    with pytest.raises(
        UserError, match="--model: needs an MLM head, this checkpoint has head=None; --add-mlm-head"
    ):
        cli(argv)
    with caplog.at_level("WARNING", logger="etkd"):
        assert cli([*argv, "--add-mlm-head"]) == 0
    assert "adding a fresh MLM head" in caplog.text
    m = EncoderModel.from_pretrained(str(tmp_path / "pt" / "final"))
    assert m.config.head == "mlm" and m.head.decoder.weight is m.encoder.embeddings.word.weight
    argv = ["distill", "--teacher", str(bare), *data, *common(tmp_path / "kd", 2)]
    with pytest.raises(UserError, match="--teacher: needs an MLM head"):
        cli(argv)
    caplog.clear()
    assert cli([*argv, "--add-mlm-head", "--beta", "0", "--overwrite"]) == 0  # nothing reads its logits
    assert "soft-target term (--beta) distils noise" not in caplog.text
    assert cli([*argv, "--add-mlm-head", "--overwrite"]) == 0
    assert "soft-target term (--beta) distils noise" in caplog.text
    assert EncoderModel.from_pretrained(str(tmp_path / "kd" / "student")).config.head == "mlm"
    # The cosine-only variant reads no vocabulary logits: no MLM head needed, none added, the student headless.
    caplog.clear()
    with caplog.at_level("WARNING", logger="etkd"):
        assert cli([*argv, "--alpha", "0", "--beta", "0", "--log-every", "1", "--overwrite"]) == 0
    assert "MLM head" not in caplog.text
    result = json.loads((tmp_path / "kd" / "result.json").read_text())
    assert [set(r) >= {"cos"} and "mlm" not in r and "kd" not in r for r in result["history"]] == [True, True]
    assert EncoderModel.from_pretrained(str(tmp_path / "kd" / "student")).config.head is None
    # ... and its input is the clean text: nothing masked unless --mlm-probability asks for it.
    assert json.loads((tmp_path / "kd" / "settings.json").read_text())["mlm_probability"] == 0.0
    collate = MLMCollator(
        pad_token_id=0, mask_token_id=4, special_ids=[1, 2], vocab_size=VOCAB, mlm_probability=0
    )
    batch = collate([[1, 7, 8, 9, 2], [1, 7, 2]])
    assert (
        batch["input_ids"].tolist() == [[1, 7, 8, 9, 2], [1, 7, 2, 0, 0]] and (batch["labels"] == -100).all()
    )


def test_mlm_probability_0_is_taken_where_a_term_reads_unmasked_tokens(teacher_dir, corpus, tmp_path):
    """`--mlm-probability 0` typed out is the cosine-only default and a KL over every (clean) token; it is
    refused, naming the term, where a loss reads only masked tokens (MLM, --kd-masked-only, pretrain)."""
    data = ["--data", corpus, "--short-length", "16", "--max-blocks", "16", "--batch-size", "4"]
    argv = ["distill", "--teacher", teacher_dir, *data, *common(tmp_path / "kd", 1), "--mlm-probability", "0"]
    for weights in (["--alpha", "0", "--beta", "0"], ["--alpha", "0"]):
        assert cli([*argv, *weights, "--overwrite"]) == 0
        assert json.loads((tmp_path / "kd" / "settings.json").read_text())["mlm_probability"] == 0.0
    with pytest.raises(UserError, match=r"--mlm-probability 0: the MLM term \(--alpha 2\) reads only masked"):
        cli([*argv, "--overwrite"])
    with pytest.raises(
        UserError, match="--mlm-probability 0: --kd-masked-only's soft-target term reads only"
    ):
        cli([*argv, "--alpha", "0", "--kd-masked-only", "--overwrite"])
    with pytest.raises(UserError, match="--mlm-probability 0: the masked-LM loss reads only masked tokens"):
        cli(
            ["pretrain", "--model", teacher_dir, *data, *common(tmp_path / "pt", 1), "--mlm-probability", "0"]
        )
    with pytest.raises(UserError, match=r"--mlm-probability: expected >= 0, got -0.1"):
        cli([*argv[:-1], "-0.1", "--overwrite"])
    # 1 would select every token: refused by the range check, not by the collator's ValueError later
    with pytest.raises(UserError, match=r"--mlm-probability: expected < 1, got 1.0"):
        cli([*argv[:-1], "1", "--overwrite"])


def test_distill_at_lr_near_0_saves_the_student_it_started_from(teacher_dir, corpus, tmp_path):
    """The baseline of `make kd-effect` (make_student(teacher), no distillation) is what `etkd distill` starts
    from: with lr -> 0 (1e-30; 0 is refused) and so no decoupled weight decay either, its saved student is that
    model (a step of ~1e-30 only shows on weights that are 0)."""
    argv = ["distill", "--teacher", teacher_dir, "--data", corpus, "--short-length", "16", "--max-blocks", "16",
            "--batch-size", "4", "--lr", "1e-30", "--weight-decay", "0.01", *common(tmp_path / "kd", 2)]  # fmt: skip
    assert cli(argv) == 0
    saved = EncoderModel.from_pretrained(str(tmp_path / "kd" / "student")).state_dict()
    start = make_student(pretrain.load_model(teacher_dir)).state_dict()
    assert saved.keys() == start.keys()
    for k, v in start.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=1e-25, msg=k)


# ---- the `etkd` console script as users run it: one line and exit 2 for user errors, 130 for Ctrl-C ------------

ETKD = str(Path(sys.executable).with_name("etkd"))


def _etkd(*argv: str, **env: str) -> subprocess.Popen:
    full = {**os.environ, **env}
    # SIGINT at its default: a shell starts background jobs (`pytest ... &`) with SIGINT ignored, which the
    # child would inherit, and the Ctrl-C test's SIGINT would then never arrive.
    return subprocess.Popen(
        [ETKD, *argv], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


@pytest.mark.parametrize(
    "name, value",
    [
        ("ETKD_BACKEND", "nonsense"),
        ("ETKD_CPU_ISA", "avx9"),
        ("ETKD_CPU_GEMM", "fast"),
        ("ETKD_CPU_BF16", "amx"),
        ("ETKD_JIT", "yes"),
        ("ETKD_CHECK_FINITE", "2"),
        ("ETKD_CPU_PROFILE", "on"),
    ],
)
def test_bad_environment_value_is_one_line_exit_2(name, value):
    proc = _etkd("info", **{name: value})
    out, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"etkd info: error: {name}={value}: "), err


def test_missing_extra_is_named_in_one_line_and_base_install_runs_info(tmp_path):
    """Without the `train` extra (its modules made unimportable) `etkd --help` and `etkd info` work, and a
    command that needs it says which extra to install."""
    train = ("accelerate", "datasets", "seqeval", "scipy", "sklearn", "matplotlib")
    code = (
        f"import sys\nfor m in {train!r}: sys.modules[m] = None\n"
        "from etkd.distill.cli import main\nsys.exit(main(sys.argv[1:]))"
    )

    def run(*argv):
        return subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300
        )

    assert run("--help").returncode == 0
    info = run("info")
    assert info.returncode == 0 and "cpu: available" in info.stdout, info.stderr
    data = tmp_path / "text.txt"
    data.write_text("\n".join(generated_text(20)) + "\n")
    model_cfg = tmp_path / "model.json"
    model_cfg.write_text(json.dumps(tiny_config(layers=2, head=None).to_dict()))
    res = run("pretrain", "--model-config", str(model_cfg), "--data", str(data),
              "--tokenizer", make_tokenizer_dir(tmp_path / "tok"), *common(tmp_path / "out", 2))  # fmt: skip
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert lines[-1].startswith("etkd pretrain: error: this command needs the `train` extra"), res.stderr
    assert "pip install 'etkd[train]'" in lines[-1] and "Traceback" not in res.stderr


def test_ctrl_c_is_one_line_naming_resume_and_the_resumed_log_has_each_step_once(tmp_path):
    tok = make_tokenizer_dir(tmp_path / "tok")
    data = tmp_path / "text.txt"
    data.write_text("\n".join(generated_text(200)) + "\n")
    model_cfg = tmp_path / "model.json"
    model_cfg.write_text(json.dumps(tiny_config(layers=2, head=None).to_dict()))
    out = tmp_path / "run"
    argv = ["pretrain", "--model-config", str(model_cfg), "--data", str(data), "--tokenizer", tok,
            "--short-length", "16", "--batch-size", "2", "--save-every", "3", "--log-every", "1", "--max-blocks", "64",
            *common(out, 100000)]  # fmt: skip
    proc = _etkd(*argv, OMP_NUM_THREADS="1")
    log = out / "log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 5) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("etkd pretrain: interrupted") and "--resume" in last, err

    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    resume_from = int(ckpts[-1].removeprefix("step_"))
    stop = resume_from + 4
    assert cli([*argv, "--resume", "--stop-at-step", str(stop)]) == 0
    logged = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert logged == list(range(1, stop + 1)), logged


def test_written_model_files_follow_the_umask(tmp_path):
    """safetensors creates its files 0600; what etkd writes gets the mode the user's umask gives."""
    old = os.umask(0o027)
    try:
        model = EncoderModel(tiny_config(layers=2))
        model.save_pretrained(str(tmp_path / "ours"))
        from etkd.hf import save_hf_attention, to_hf_attention

        save_hf_attention(to_hf_attention(model), str(tmp_path / "hf"))
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and len(files) >= 4
    for p in files:
        assert oct(p.stat().st_mode & 0o777) == oct(0o640), p


def test_check_relation_defaults_and_refusals():
    """--relation's defaults are the teacher's last layer and its attention heads; an LSG student (whose layers
    also attend to global tokens the relations would leave out) and a head count that does not divide the
    student's hidden size are UserErrors naming the flag."""
    teacher = EncoderModel(tiny_config())
    ns = argparse.Namespace(relation_layer=None, relation_heads=None)
    distill_cmd.check_relation(teacher, EncoderModel(tiny_config(layers=2)), ns)
    assert (ns.relation_layer, ns.relation_heads) == (4, 2)
    lsg = EncoderModel(tiny_config(layers=2, attention="lsg"))
    with pytest.raises(UserError, match="--relation: an LSG model's layers also attend to its global tokens"):
        distill_cmd.check_relation(teacher, lsg, argparse.Namespace(relation_layer=None, relation_heads=None))
    narrow = EncoderModel(EncoderConfig(vocab_size=VOCAB, hidden_size=24, num_layers=2, num_heads=2,
                                        intermediate_size=48, max_positions=64))  # fmt: skip
    with pytest.raises(
        UserError, match="--relation-heads: expected a divisor of the student's hidden size 24, got 16"
    ):
        distill_cmd.check_relation(
            teacher, narrow, argparse.Namespace(relation_layer=None, relation_heads=16)
        )
