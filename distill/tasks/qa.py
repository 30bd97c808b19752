"""Extractive QA in SQuAD v1.1 form; HotpotQA and TriviaQA converted to it (paper Table 5).

Examples are flat: `{"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}` and,
for TriviaQA, `aliases` (every accepted answer string, used as gold answers by the metric).
Long contexts are cut into windows of `max_length` tokens overlapping by `doc_stride` tokens; an answer not
wholly inside a window is labelled at the CLS position (index 0). Answers come back through the offset
mapping: the n best start and end logits of every window, spans inside the context, end >= start, at most
`max_answer_length` tokens, best start+end score over all windows of the example.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..metrics import squad_metrics
from . import DataError, check_file, load_hf_split, read_json, read_jsonl


def _check_answers(ex: dict[str, Any], where: str, line: int | None) -> None:
    ctx = ex["context"]
    texts, starts = ex["answers"]["text"], ex["answers"]["answer_start"]
    if len(texts) != len(starts):
        raise DataError(
            where, line, f"question {ex['id']!r}: {len(texts)} answer texts but {len(starts)} starts"
        )
    for t, s in zip(texts, starts):
        if not isinstance(s, int) or not isinstance(t, str) or ctx[s : s + len(t)] != t:
            raise DataError(
                where,
                line,
                f"question {ex['id']!r}: answer {t!r} is not at answer_start {s!r} of the context",
            )


def _flat_example(obj: dict[str, Any], where: str, line: int | None) -> dict[str, Any]:
    for k in ("id", "question", "context", "answers"):
        if k not in obj:
            raise DataError(where, line, f"missing field {k!r}")
    ans = obj["answers"]
    if not isinstance(ans, dict) or "text" not in ans or "answer_start" not in ans:
        raise DataError(where, line, "answers: expected {'text': [...], 'answer_start': [...]}")
    ex = {
        "id": str(obj["id"]),
        "question": obj["question"],
        "context": obj["context"],
        "answers": {"text": list(ans["text"]), "answer_start": list(ans["answer_start"])},
    }
    if obj.get("aliases"):
        ex["aliases"] = list(obj["aliases"])
    _check_answers(ex, where, line)
    return ex


def squad_examples(data: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """Flatten a SQuAD v1.1 JSON object; errors name the JSON location (`data[i].paragraphs[j].qas[k]`)."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(path, None, "expected a SQuAD JSON object with a 'data' list")
    out = []
    for i, article in enumerate(data["data"]):
        for j, para in enumerate(article.get("paragraphs", [])):
            if not isinstance(para.get("context"), str):
                raise DataError(f"{path}: data[{i}].paragraphs[{j}]", None, "missing 'context' string")
            for k, qa in enumerate(para.get("qas", [])):
                where = f"{path}: data[{i}].paragraphs[{j}].qas[{k}]"
                if "id" not in qa or "question" not in qa:
                    raise DataError(where, None, "missing 'id' or 'question'")
                answers = qa.get("answers", [])
                if any(
                    not isinstance(a, dict) or "text" not in a or "answer_start" not in a for a in answers
                ):
                    raise DataError(where, None, "answers: expected objects with 'text' and 'answer_start'")
                obj = {
                    "id": qa["id"],
                    "question": qa["question"],
                    "context": para["context"],
                    "answers": {
                        "text": [a["text"] for a in answers],
                        "answer_start": [a["answer_start"] for a in answers],
                    },  # fmt: skip
                }
                if qa.get("aliases"):
                    obj["aliases"] = qa["aliases"]
                out.append(_flat_example(obj, where, None))
    return out


def to_squad(examples: list[dict[str, Any]], title: str = "") -> dict[str, Any]:
    """Flat examples back to a SQuAD v1.1 JSON object (one paragraph per example)."""
    data = []
    for ex in examples:
        qa = {
            "id": ex["id"],
            "question": ex["question"],
            "answers": [
                {"text": t, "answer_start": s}
                for t, s in zip(ex["answers"]["text"], ex["answers"]["answer_start"])
            ],  # fmt: skip
        }
        if ex.get("aliases"):
            qa["aliases"] = ex["aliases"]
        data.append({"title": title, "paragraphs": [{"context": ex["context"], "qas": [qa]}]})
    return {"version": "1.1", "data": data}


# Converters -------------------------------------------------------------------------------------------


def _find_all(context: str, answer: str) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(answer), context)] if answer else []


def convert_hotpotqa(records: list[dict[str, Any]], yes_no: bool = True) -> tuple[list[dict[str, Any]], int]:
    """HotpotQA (original JSON or HF `hotpot_qa`) -> flat SQuAD examples; returns (examples, skipped).

    The context is every paragraph as "title: sentences"; with `yes_no` it starts with "yes no " so the
    comparison questions answered yes/no become extractive. Questions whose answer never occurs in the
    context are skipped (counted).
    """
    out, skipped = [], 0
    for r in records:
        ctx = r.get("context")
        if isinstance(ctx, dict):  # HF: {"title": [...], "sentences": [[...], ...]}
            paras = list(zip(ctx["title"], ctx["sentences"]))
        elif isinstance(ctx, list):  # original: [[title, [sentences]], ...]
            paras = [(p[0], p[1]) for p in ctx]
        else:
            raise ValueError(f"hotpotqa record {r.get('_id', r.get('id'))!r}: no 'context' paragraphs")
        prefix = "yes no " if yes_no else ""
        context = prefix + "\n".join(f"{t}: {''.join(s)}" for t, s in paras)
        answer = r["answer"]
        starts = _find_all(context, answer)
        if answer in ("yes", "no") and yes_no:
            starts = [0 if answer == "yes" else 4]
        if not starts:
            skipped += 1
            continue
        qid = str(r.get("_id", r.get("id")))
        out.append({"id": qid, "question": r["question"], "context": context,
                    "answers": {"text": [answer], "answer_start": [starts[0]]}})  # fmt: skip
    return out, skipped


def convert_triviaqa(
    records: list[dict[str, Any]], evidence_dir: str | os.PathLike | None = None, max_chars: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """TriviaQA (HF `trivia_qa` rc records, or original `Data` entries with `evidence_dir`) -> flat SQuAD.

    The context is the question's Wikipedia evidence (then web evidence) joined, cut at `max_chars`;
    gold answers are every alias found in it (first occurrence), all aliases kept for the metric.
    Questions with no alias in the context are skipped (counted).
    """
    out, skipped = [], 0
    for r in records:
        if "Question" in r:  # original format
            qid, question, ans = r["QuestionId"], r["Question"], r["Answer"]
            aliases = [ans.get("Value", "")] + list(ans.get("Aliases", []))
            docs = []
            for kind, sub in (("EntityPages", "wikipedia"), ("SearchResults", "web")):
                for page in r.get(kind, []):
                    if evidence_dir is None:
                        raise DataError(f"triviaqa question {qid!r}: the original format names its evidence "
                                        "files; give --evidence-dir (the folder with wikipedia/ and web/)")  # fmt: skip
                    file = os.path.join(evidence_dir, sub, page["Filename"])
                    if not os.path.isfile(file):
                        raise DataError(f"triviaqa question {qid!r}: evidence file {file} not found "
                                        f"(--evidence-dir {evidence_dir}: expected {sub}/{page['Filename']})")  # fmt: skip
                    with open(file, encoding="utf-8") as f:
                        docs.append(f.read())
        else:  # HF rc
            qid, question, ans = r["question_id"], r["question"], r["answer"]
            aliases = [ans.get("value", "")] + list(ans.get("aliases", []))
            docs = list(r.get("entity_pages", {}).get("wiki_context", []))
            docs += list(r.get("search_results", {}).get("search_context", []))
        context = "\n".join(docs)
        if max_chars is not None:
            context = context[:max_chars]
        aliases = list(dict.fromkeys(a for a in aliases if a))
        texts, starts = [], []
        for a in aliases:
            found = _find_all(context, a)
            if found:
                texts.append(a)
                starts.append(found[0])
        if not texts:
            skipped += 1
            continue
        out.append({"id": str(qid), "question": question, "context": context,
                    "answers": {"text": texts, "answer_start": starts}, "aliases": aliases})  # fmt: skip
    return out, skipped


def read_qa_file(
    path: str | os.PathLike, task: str = "squad", evidence_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Flat examples of a local file: SQuAD v1.1 JSON, flat JSONL (HF squad columns), or raw
    HotpotQA / TriviaQA (JSON or JSONL), converted."""
    path = check_file(path)
    if path.endswith(".jsonl"):
        records = [(line, obj) for line, obj in read_jsonl(path)]
        if records and "context" in records[0][1] and "answers" in records[0][1]:
            return [_flat_example(obj, path, line) for line, obj in records]
        raw = [obj for _, obj in records]
    else:
        data = read_json(path)
        if isinstance(data, dict) and "data" in data:
            return squad_examples(data, path)
        raw = data["Data"] if isinstance(data, dict) and "Data" in data else data
        if not isinstance(raw, list):
            raise DataError(
                path, None, "expected SQuAD JSON ('data'), TriviaQA JSON ('Data') or a list of records"
            )
    if task == "hotpotqa":
        examples, _ = convert_hotpotqa(raw)
    elif task == "triviaqa":
        try:
            examples, _ = convert_triviaqa(raw, evidence_dir)
        except DataError as exc:  # a question's evidence: say which file named it
            raise DataError(path, None, str(exc)) from None
    else:
        raise DataError(
            path, None, f"task {task!r}: expected SQuAD v1.1 JSON or flat JSONL with context/answers"
        )
    return examples


def load_qa_hf(task: str, name: str, split: str, config: str | None = None) -> list[dict[str, Any]]:
    ds = load_hf_split(name, config, split)
    rows = [dict(r) for r in ds]
    if task == "hotpotqa":
        return convert_hotpotqa(rows)[0]
    if task == "triviaqa":
        return convert_triviaqa(rows)[0]
    return [_flat_example(r, f"{name}[{split}]", i) for i, r in enumerate(rows)]


# Features ---------------------------------------------------------------------------------------------


def _questions(examples, tokenizer, max_query_length: int) -> list[str]:
    """Questions stripped of leading space and cut to `max_query_length` tokens."""
    qs = [e["question"].lstrip() for e in examples]
    enc = tokenizer(qs, add_special_tokens=False, return_offsets_mapping=True, verbose=False)  # cut below
    out = []
    for q, offs in zip(qs, enc["offset_mapping"]):
        out.append(q[: offs[max_query_length - 1][1]] if len(offs) > max_query_length else q)
    return out


def encode(
    examples: list[dict[str, Any]],
    tokenizer,
    max_length: int,
    doc_stride: int = 128,
    max_query_length: int = 64,
    train: bool = True,
) -> list[dict[str, Any]]:
    """Windowed features: input_ids, attention_mask, [token_type_ids], global_attention_mask (CLS and
    question), and for training `start_positions`/`end_positions`; for evaluation `example_index` and
    `offset_mapping` (None outside the context)."""
    if not examples:
        return []
    if tokenizer.padding_side != "right":
        raise ValueError("tokenizer: QA features assume padding_side='right' (question first)")
    enc = tokenizer(
        _questions(examples, tokenizer, max_query_length),
        [e["context"] for e in examples],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    feats = []
    for i in range(len(enc["input_ids"])):
        ex_i = enc["overflow_to_sample_mapping"][i]
        seq_ids = enc.sequence_ids(i)
        offsets = enc["offset_mapping"][i]
        f = {k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        f["global_attention_mask"] = [int(j == 0 or s == 0) for j, s in enumerate(seq_ids)]
        ctx = [j for j, s in enumerate(seq_ids) if s == 1]
        if train:
            ans = examples[ex_i]["answers"]
            start = end = 0
            if ans["text"] and ctx:
                a0 = ans["answer_start"][0]
                a1 = a0 + len(ans["text"][0])
                if offsets[ctx[0]][0] <= a0 and offsets[ctx[-1]][1] >= a1:
                    start = next(j for j in ctx if offsets[j][1] > a0)
                    end = next(j for j in reversed(ctx) if offsets[j][0] < a1)
            f["start_positions"], f["end_positions"] = start, end
        else:
            f["example_index"] = ex_i
            f["offset_mapping"] = [tuple(o) if s == 1 else None for o, s in zip(offsets, seq_ids)]
        feats.append(f)
    return feats


def postprocess(
    examples: list[dict[str, Any]],
    features: list[dict[str, Any]],
    start_logits: list,
    end_logits: list,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """Best answer text per example id (empty string when no window has a valid span)."""
    best: dict[int, tuple[float, str]] = {}
    for f, sl, el in zip(features, start_logits, end_logits):
        offs = f["offset_mapping"]
        n = len(offs)
        sl, el = list(sl)[:n], list(el)[:n]
        top_s = sorted(range(n), key=lambda j: sl[j], reverse=True)[:n_best]
        top_e = sorted(range(n), key=lambda j: el[j], reverse=True)[:n_best]
        ctx = examples[f["example_index"]]["context"]
        for s in top_s:
            for e in top_e:
                if offs[s] is None or offs[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(sl[s]) + float(el[e])
                cur = best.get(f["example_index"])
                if cur is None or score > cur[0]:
                    best[f["example_index"]] = (score, ctx[offs[s][0] : offs[e][1]])
    return {ex["id"]: best.get(i, (0.0, ""))[1] for i, ex in enumerate(examples)}


def compute_metrics(examples: list[dict[str, Any]], predictions: dict[str, str]) -> dict[str, float]:
    refs = {ex["id"]: ex.get("aliases") or ex["answers"]["text"] for ex in examples}
    return squad_metrics(predictions, refs)
