"""GLUE readers: HF column names, the original release's columns and labels, malformed files."""

import json

import pytest

from etkd.distill.tasks import DataError, glue


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_and_tsv_in_hf_and_original_forms(tmp_path):
    f = _write(tmp_path / "mnli.jsonl", "\n".join(json.dumps(r) for r in [
        {"premise": "a cat", "hypothesis": "an animal", "label": "entailment"},
        {"premise": "a cat", "hypothesis": "a dog", "label": 2},
    ]) + "\n")  # fmt: skip
    ex = glue.read_glue_file(f, "mnli")
    assert ex == [{"text_a": "a cat", "text_b": "an animal", "label": 0},
                  {"text_a": "a cat", "text_b": "a dog", "label": 2}]  # fmt: skip
    # MRPC as released: Quality, two ids, two strings; a bare quote must not swallow the next line.
    f = _write(
        tmp_path / "mrpc.tsv",
        'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said "hi\tHi\n0\t3\t4\tx\ty\n',
    )
    ex = glue.read_glue_file(f, "mrpc")
    assert [e["label"] for e in ex] == [1, 0] and ex[0]["text_a"] == 'He said "hi'
    f = _write(tmp_path / "cola.tsv", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")  # header-less
    assert [(e["text_a"], e["label"]) for e in glue.read_glue_file(f, "cola")] == [("The cat sat.", 1),
                                                                                   ("Cat the sat.", 0)]  # fmt: skip
    f = _write(tmp_path / "stsb.csv", 'sentence1,sentence2,score\n"a, b",c,3.8\n')
    assert glue.read_glue_file(f, "stsb") == [{"text_a": "a, b", "text_b": "c", "label": 3.8}]
    assert glue.get_task("stsb").is_regression and glue.get_task("mnli").num_labels == 3


MALFORMED = [
    # (file, content or None for a missing file, task, the error it must name)
    (
        "bad.jsonl",
        '{"sentence": "ok", "label": 1}\n{"sentence": "broken", \n',
        "sst2",
        r"bad\.jsonl:2: invalid JSON",
    ),
    ("bad.tsv", "sentence\tlabel\ngood\t1\nno label here\n", "sst2", r"bad\.tsv:3: expected 2 fields"),
    ("lab.tsv", "sentence1\tsentence2\tlabel\na\tb\tmaybe\n", "rte", r"lab\.tsv:2: label"),
    ("col.jsonl", '{"text": "x", "label": 1}\n', "sst2", r"col\.jsonl:1: missing text column"),
    ("nope.tsv", None, "sst2", r"nope\.tsv: no such file"),
]


@pytest.mark.parametrize("name,content,task,error", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_name_file_and_line(tmp_path, name, content, task, error):
    f = tmp_path / name if content is None else _write(tmp_path / name, content)
    with pytest.raises(DataError, match=error):
        glue.read_glue_file(f, task)
