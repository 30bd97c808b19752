"""`etkd report` on result JSONs holding paper numbers: the GLUE average, retention and Table 7 deltas."""

import json

import pytest

from etkd.distill import report
from etkd.distill.cli import main
from etkd.distill.errors import UserError

# Paper Table 3 rows (single numbers used for both of a task's metrics) and Tables 5/6.
ROBERTA = [63.6, 87.6, 90.2, 92.8, 91.9, 78.7, 94.8, 91.2]  # avg 86.35 (Table 7)
DISTILROBERTA = [59.3, 84.0, 86.6, 90.8, 89.4, 67.9, 92.5, 88.3]  # avg 82.375 -> Δ KD -4.6%
LSG = {"cola": {"mcc": 59.8}, "mnli": {"accuracy_m": 86.7, "accuracy_mm": 86.1},
       "mrpc": {"accuracy": 89.7, "f1": 92.5}, "qnli": {"accuracy": 93.4}, "qqp": {"accuracy": 89.8, "f1": 86.3},
       "rte": {"accuracy": 70.0}, "sst2": {"accuracy": 94.8}, "stsb": {"pearson": 90.2, "spearman": 90.0}}  # fmt: skip


def _glue(scores):
    out = {}
    for task, v in zip(report.GLUE_ORDER, scores):
        out[task] = {k: v for k in report.GLUE_COLUMNS[task]}
    return out


def _write(d, model, task, metrics, teacher=None):
    p = d / f"{model}_{task}.json"
    p.write_text(json.dumps({"task": task, "model": model, "metrics": metrics, "teacher": teacher}))


def test_glue_average_matches_paper():
    assert report.glue_average(_glue(ROBERTA)) == pytest.approx(86.35)
    assert report.glue_average(LSG) == pytest.approx(84.2, abs=0.01)  # per-task means first (Table 3)


def test_tables_markdown_and_csv(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    for model, scores in (("RoBERTa", ROBERTA), ("DistilRoBERTa", DISTILROBERTA)):
        for task, m in _glue(scores).items():
            _write(d, model, task, m, teacher="RoBERTa" if model == "DistilRoBERTa" else None)
    for model, m in (("RoBERTa", 92.47), ("Longformer", 92.24)):
        _write(d, model, "squad", {"exact_match": 80.0, "f1": m})
    for model, f1 in (("Longformer", 73.48), ("Longformer-KD", 64.96)):
        _write(d, model, "hotpotqa", {"exact_match": 50.0, "f1": f1})
    _write(
        d,
        "Longformer",
        "conll2003",
        {"f1": 93.8, "f1_PER": 96.2, "f1_ORG": 91.5, "f1_LOC": 96.8, "f1_MISC": 90.5},
    )
    (d / "Longformer_squad_predictions.json").write_text("{}")  # ignored
    out = tmp_path / "rep"
    assert (
        main(
            [
                "report",
                str(d),
                "--base",
                "RoBERTa",
                "--kd",
                "DistilRoBERTa",
                "--convert",
                "Longformer",
                "--convert-kd",
                "Longformer-KD",
                "--pair",
                "Longformer-KD=Longformer",
                "--out-dir",
                str(out),
            ]
        )
        == 0
    )
    md = (out / "report.md").read_text()
    assert "| RoBERTa | 63.6 | 87.6 / 87.6 | 90.2 / 90.2 |" in md and "86.35" in md
    assert "96.2 | 91.5 | 96.8 | 90.5 | 93.8" in md
    delta = (out / "delta.csv").read_text().splitlines()
    assert delta[0] == "Model,GLUE,SQuAD1.1,HotpotQA,CoNLL-2003"
    assert delta[1].startswith("RoBERTa,86.35,92.47,-,")
    assert delta[2].startswith("Δ KD,-4.6%")  # paper Table 7
    assert delta[4].split(",")[3] == "-11.6%"  # Convert+KD vs Convert on HotpotQA (Table 7)
    assert delta[3].split(",")[3] == "73.48"
    ret = (out / "retention.csv").read_text()
    assert "Longformer-KD / Longformer" in ret and "88.4%" in ret  # 64.96 / 73.48
    assert "DistilRoBERTa / RoBERTa" in ret and "95.4%" in ret  # 82.375 / 86.35 (teacher from the JSON)
    assert (out / "glue.csv").is_file() and (out / "qa.csv").is_file() and (out / "ner.csv").is_file()


def test_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"task": \n')
    with pytest.raises(UserError, match=r"bad\.json:2"):
        report.load_results([str(bad)])
    with pytest.raises(UserError, match="missing does not exist"):
        report.load_results([str(tmp_path / "missing")])
    _write(tmp_path, "A", "rte", {"accuracy": 70.0})
    assert (
        main(["report", str(tmp_path / "A_rte.json"), "--pair", "A=B", "--out-dir", str(tmp_path / "o")]) == 2
    )
    assert "no results for model 'B'" in capsys.readouterr().err


def _finetune_result(d, model, task, splits, teacher=None):
    """A result JSON as `etkd finetune` wrote it before it added `splits`: suffixed flat metrics."""
    metrics = {f"{k}_{s}": v for s, m in splits.items() for k, v in m.items()}
    p = d / f"{model}.json"
    p.write_text(json.dumps({"task": task, "model": model, "teacher": teacher, "metrics": metrics,
                             "eval_sets": {s: {"source": f"{s}.txt", "num_examples": 3} for s in splits}}))  # fmt: skip
    return p


NER_DEV = {"f1": 81.45, "f1_PER": 90.0, "f1_ORG": 70.0, "f1_LOC": 85.0, "f1_MISC": 60.0}
NER_TEST = {"f1": 77.34, "f1_PER": 88.0, "f1_ORG": 66.0, "f1_LOC": 80.0, "f1_MISC": 55.0}


def test_split_suffixed_metrics_give_per_split_tables(tmp_path, capsys):
    d = tmp_path / "res"
    d.mkdir()
    _finetune_result(d, "teacher", "conll2003", {"dev": NER_DEV, "test": NER_TEST})
    _finetune_result(d, "student", "conll2003", {"dev": {**NER_DEV, "f1": 72.0}, "test": {**NER_TEST, "f1": 70.0}},
                     teacher="teacher")  # fmt: skip
    out = tmp_path / "rep"
    assert main(["report", str(d), "--out-dir", str(out)]) == 0  # auto: test is preferred
    md = (out / "report.md").read_text()
    assert "(test split)" in md and "(dev split)" not in md
    assert "| teacher | 88.0 | 66.0 | 80.0 | 55.0 | 77.3 |" in md
    assert "| student / teacher | 90.5% |" in md  # 70.0 / 77.34, retention per split
    assert main(["report", str(d), "--split", "dev", "--out-dir", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| teacher | 90.0 | 70.0 | 85.0 | 60.0 | 81.5 |" in md and "88.4%" in md  # 72.0 / 81.45
    assert main(["report", str(d), "--split", "all", "--out-dir", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "(dev split)" in md and "(test split)" in md
    assert (out / "ner_dev.csv").is_file() and (out / "retention_test.csv").is_file()
    capsys.readouterr()
    assert main(["report", str(d), "--split", "train", "--out-dir", str(out)]) == 2
    assert "--split train: no result has this split (splits seen: dev, test)" in capsys.readouterr().err


def test_missing_split_or_metrics_name_the_file(tmp_path, capsys):
    d = tmp_path / "res"
    d.mkdir()
    _finetune_result(d, "teacher", "conll2003", {"dev": NER_DEV, "test": NER_TEST})
    late = _finetune_result(d, "student", "conll2003", {"dev": NER_DEV}, teacher="teacher")
    assert main(["report", str(d), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{late}: student / conll2003 has no split 'test' (splits: dev)" in err
    assert main(["report", str(d), "--allow-missing", "--out-dir", str(tmp_path / "o")]) == 0
    assert "| student | - | - | - | - | - |" in (tmp_path / "o" / "report.md").read_text()
    odd = d / "odd.json"
    odd.write_text(json.dumps({"task": "sst2", "model": "odd", "metrics": {"acc": 90.0}}))
    assert main(["report", str(odd), "--out-dir", str(tmp_path / "o")]) == 2
    assert "odd.json: odd / sst2 split 'eval' has none of the keys ['accuracy'] (keys: ['acc'])" in (
        capsys.readouterr().err
    )


def test_mnli_matched_and_mismatched_are_one_split():
    r = {"task": "mnli", "metrics": {"accuracy_m": 80.0, "accuracy_mm": 81.0},
         "eval_sets": {"m": {}, "mm": {}}}  # fmt: skip
    assert report.split_metrics(r) == {"eval": {"accuracy_m": 80.0, "accuracy_mm": 81.0}}
    r = {"task": "mnli", "metrics": {"accuracy_dev_m": 80.0, "accuracy_dev_mm": 81.0},
         "eval_sets": {"dev_m": {}, "dev_mm": {}}}  # fmt: skip
    assert report.split_metrics(r) == {"dev": {"accuracy_m": 80.0, "accuracy_mm": 81.0}}
    r = {"task": "mnli", "metrics": {}, "splits": {"m": {"accuracy": 80.0}, "mm": {"accuracy": 81.0}}}
    assert report.split_metrics(r) == {"eval": {"accuracy_m": 80.0, "accuracy_mm": 81.0}}
