"""Metrics against hand-computed values (GLUE formulas, SQuAD normalisation/EM/F1, seqeval entity F1): the
libraries compute them (scipy.stats, sklearn.metrics, seqeval); these pin our calling conventions (argument
order, percent scale, what a constant or single-class input gives)."""

import math

import pytest

from etkd.distill import metrics as M


def test_binary_classification_metrics_by_hand():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]  # tp=2 fp=1 tn=2 fn=0
    assert M.accuracy(preds, labels) == pytest.approx(4 / 5)
    assert M.f1_binary(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 4 / sqrt(3*2*3*2)
    assert M.matthews_corrcoef(preds, labels) == pytest.approx(4 / 6)
    assert M.matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0  # one predicted class: defined as 0
    assert M.f1_binary([0, 0], [0, 0]) == 0.0


def test_multiclass_mcc_by_hand():
    preds, labels = [0, 1, 2, 0], [0, 1, 1, 2]
    # c=2, s=4, sum p_k t_k = 2*1 + 1*2 + 1*1 = 5 -> (8-5) / sqrt((16-6)(16-6)) = 0.3
    assert M.matthews_corrcoef(preds, labels) == pytest.approx(0.3)
    # positive class 2: tp 1, fp 0, fn 1 -> 2/3; and with fp 1, fn 0 -> 2/3
    assert M.f1_binary([2, 0, 0], [2, 2, 0], positive=2) == pytest.approx(2 / 3)
    assert M.f1_binary([2, 2, 0], [2, 0, 0], positive=2) == pytest.approx(2 / 3)


def test_correlations_by_hand():
    # dx = (-1.5,-.5,.5,1.5), dy = (-3,-1,0,4): sxy = 11, sxx = 5, syy = 26
    assert M.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    # tie-averaged ranks (1,2.5,2.5,4) vs (1,3,2,4): sxy = 4.5, sxx = 4.5, syy = 5
    assert M.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert M.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear
    assert M.pearson([1, 2, 3, 4], [1, 4, 9, 16]) < 0.99
    # a constant side: 0 (not NaN), so a report table always has a number
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0 and M.spearman([1, 2, 3], [5, 5, 5]) == 0.0


def test_glue_metrics_are_percentages_per_task():
    assert M.glue_metrics("mrpc", [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]) == pytest.approx(
        {"accuracy": 80.0, "f1": 80.0}
    )
    assert set(M.glue_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.5, 2.9])) == {"pearson", "spearman"}
    assert M.glue_metrics("cola", [1, 1, 0, 0, 1], [1, 0, 0, 0, 1])["mcc"] == pytest.approx(100 * 4 / 6)
    with pytest.raises(ValueError, match="task"):
        M.glue_metrics("nope", [1], [1])
    with pytest.raises(ValueError, match="equal lengths"):
        M.accuracy([1, 0], [1])


def test_squad_normalisation_em_f1_by_hand():
    assert M.normalize_answer("The  Cat!") == "cat"
    assert M.normalize_answer("an apple, a pear") == "apple pear"
    assert M.squad_exact_match("the Cat.", "cat") == 1.0
    # pred {cat, sat}, truth {cat, sat, down}: P = 1, R = 2/3 -> F1 = 0.8
    assert M.squad_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert M.squad_f1("dog", "cat") == 0.0
    refs = {"q1": ["cat sat", "the cat"], "q2": ["blue"], "q3": ["x"]}
    preds = {"q1": "The cat", "q2": "light blue"}  # q3 missing counts as 0
    out = M.squad_metrics(preds, refs)
    assert out["exact_match"] == pytest.approx(100 * 1 / 3)
    # q1: max(F1 vs "cat sat" = 2/3, vs "the cat" = 1) = 1; q2: P = 1/2, R = 1 -> 2/3
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_ner_entity_metrics_by_hand():
    pytest.importorskip("seqeval")
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    m = M.ner_metrics(true, pred)
    # gold entities: PER, LOC, ORG; predicted: PER, ORG (right), ORG (wrong) -> P = 2/3, R = 2/3
    assert m["precision"] == pytest.approx(200 / 3)
    assert m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["f1_PER"] == pytest.approx(100.0)
    assert m["f1_LOC"] == 0.0
    assert m["f1_ORG"] == pytest.approx(100 * 2 * 0.5 * 1 / 1.5)  # P = 1/2, R = 1
    assert m["accuracy"] == pytest.approx(100 * 5 / 6)
    # conlleval rule: an I- tag after O starts an entity
    assert M.ner_metrics([["O", "I-PER"]], [["O", "I-PER"]])["f1_PER"] == pytest.approx(100.0)
