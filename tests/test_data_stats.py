"""`etkd data-stats`: Table 1 length summary, Table 9 tag shares (hand-computed) and the PNG."""

import json
import math

import pytest

from etkd.distill import data_stats
from etkd.distill.cli import main


def _conll(path, lengths):
    lines = []
    for n in lengths:
        lines += ["-DOCSTART- O", ""]
        lines += [f"w{i} {'B-PER' if i == 0 else ('I-PER' if i == 1 else 'O')}" for i in range(n)] + [""]
    path.write_text("\n".join(lines))
    return path


def test_length_summary_by_hand():
    s = data_stats.length_summary([1, 2, 3, 4, 600])
    assert s["mean"] == 122.0 and s["min"] == 1 and s["max"] == 600
    # squares of deviations: 121² + 120² + 119² + 118² + 478² = 285610, ddof=1 -> / 4
    assert s["std"] == pytest.approx(math.sqrt(285610 / 4))
    assert (s["25%"], s["50%"], s["75%"]) == (2.0, 3.0, 4.0)
    assert s[">512"] == pytest.approx(0.2) and s[">4096"] == 0.0


def test_tag_distribution_by_hand():
    d = data_stats.tag_distribution(["O", "O", "O", "B-PER", "I-PER", "B-LOC"])
    assert list(d) == ["O", "B-PER", "I-PER", "B-LOC", "Total"]
    assert d["O"] == {"count": 3, "p": 0.5, "p1": None}
    assert d["B-PER"]["p"] == pytest.approx(1 / 6) and d["B-PER"]["p1"] == pytest.approx(1 / 3)
    assert d["Total"]["count"] == 6


def test_cli_writes_tables_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = _conll(tmp_path / "a.txt", [1, 2, 3, 4, 600])
    b = _conll(tmp_path / "b.txt", [5, 5, 7])
    out = tmp_path / "stats"
    assert (
        main(["data-stats", str(a), str(b), "--names", "A,B", "--unit", "document", "--out-dir", str(out)])
        == 0
    )
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["A"]["length"]["mean"] == 122.0 and stats["B"]["length"]["max"] == 7
    assert stats["A"]["tags"]["B-PER"]["count"] == 5 and stats["A"]["tags"]["I-PER"]["count"] == 4
    md = (out / "data_stats.md").read_text()
    assert "| mean | 122.0 | 5.7 |" in md and "| > 512 | 20.0% | 0.0% |" in md
    assert (out / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.txt"
    bad.write_text("x O\ny\n")
    assert main(["data-stats", str(bad), "--out-dir", str(out)]) == 2  # a user error: one line, exit 2
    assert "bad.txt:2: expected a token and a tag" in capsys.readouterr().err


def test_cli_without_out_dir_writes_nothing(tmp_path, monkeypatch, capsys):
    a = _conll(tmp_path / "a.txt", [1, 2, 3])
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["data-stats", str(a)]) == 0
    assert list(work.iterdir()) == []  # a user who did not ask for files gets none in the current folder
    assert "| mean | 2.0 |" in capsys.readouterr().out
