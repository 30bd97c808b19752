"""Data for the drivers: text sources, tokenisation, packing, MLM masking, classification records.

- `TextSource`: HF `datasets` by name (config/split, optionally streamed) or local `.txt` (one document per
  non-empty line) / `.jsonl` (one JSON object per line, `text_field`) / `.parquet` files or directories
  of them. Local files never touch the network. A corrupt line or a missing field raises an error naming
  file and line, or, with `on_error="skip"`, is skipped and counted (`source.skipped`).
- `pack_sequences`: documents -> `[CLS] tokens [SEP]` blocks, each block `long_length` tokens with
  probability `long_fraction`, else `short_length` (the paper's mix of short and long contexts).
- `MLMCollator`: pads, and masks 15% of real non-special tokens: 80% -> [MASK], 10% -> random, 10% kept.
- `load_classification` + `ClassificationCollator`: jsonl/parquet with text (+ text_pair) and a label.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .errors import DataError
from .hub import check_hub_name, looks_like_path
from .tasks import iter_lines

TEXT_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------
# Text sources.


def list_files(path: str | os.PathLike, flag: str = "--data") -> list[str]:
    """A file, or every supported file under a directory (recursively, sorted); `flag` is the option that named
    `path`, for the error when it does not exist."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith(TEXT_EXTENSIONS):
            raise DataError(f"{path}: unsupported file type; expected one of {TEXT_EXTENSIONS}")
        return [path]
    if os.path.isdir(path):
        found = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if name.endswith(TEXT_EXTENSIONS)
        )
        if not found:
            raise DataError(f"{path}: no {'/'.join(TEXT_EXTENSIONS)} files in this directory")
        return found
    raise DataError(f"{flag} {path}: no such file or directory")


def looks_local(source: str) -> bool:
    """A path (that may be mistyped), not an HF dataset name: exists, has a data file extension, or can only
    be a path (`./x`, `/x`, `a/b/c`, `dir/x` with an existing `dir`)."""
    return os.path.exists(source) or source.endswith(TEXT_EXTENSIONS) or looks_like_path(source)


class _Skips:
    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
        self.on_error, self.count = on_error, 0

    def __call__(self, message: str) -> None:
        if self.on_error == "raise":
            raise DataError(message + " (pass --skip-bad-records to skip such records)")
        self.count += 1


def iter_records(path: str, skips: _Skips, fields: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Rows of one local file as dicts holding `fields` (for .txt: {"text": line}), bad rows -> `skips`."""
    if path.endswith(".txt"):
        for _, line in iter_lines(path, lambda lineno, message: skips(f"{path}:{lineno}: {message}")):
            if line.strip():
                yield {"text": line.rstrip("\r\n")}
    elif path.endswith((".jsonl", ".json")):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    skips(f"{path}:{lineno}: invalid JSON ({exc})")
                    continue
                if not isinstance(row, dict):
                    skips(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                    continue
                missing = [k for k in fields if row.get(k) is None]
                if missing:
                    skips(f"{path}:{lineno}: missing field {missing[0]!r} (fields: {sorted(row)})")
                    continue
                yield row
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        missing = [k for k in fields if k not in names]
        if missing:
            raise DataError(f"{path}: missing column {missing[0]!r} (columns: {names})")
        row_index = 0
        for batch in pf.iter_batches(batch_size=4096, columns=list(fields)):
            for row in batch.to_pylist():
                row_index += 1
                bad = [k for k in fields if row.get(k) is None]
                if bad:
                    skips(f"{path}: row {row_index}: missing value for field {bad[0]!r}")
                    continue
                yield row
    else:
        raise DataError(f"{path}: unsupported file type; expected one of {TEXT_EXTENSIONS}")


class TextSource:
    """Re-iterable stream of document strings from local files or an HF dataset name.

    `sources`: paths (files/dirs) or HF dataset names, read in order. `config`/`split` go to
    `datasets.load_dataset` for names; `streaming` streams names instead of downloading them whole
    (local files are always read lazily).
    """

    def __init__(
        self,
        sources: str | Iterable[str],
        *,
        text_field: str = "text",
        config: str | None = None,
        split: str = "train",
        streaming: bool = False,
        on_error: str = "raise",
    ):
        self.sources = [sources] if isinstance(sources, str) else list(sources)
        if not self.sources:
            raise ValueError("data: expected at least one file, directory or dataset name")
        self.text_field, self.config, self.split, self.streaming = text_field, config, split, streaming
        self._skips = _Skips(on_error)
        for s in self.sources:  # fail fast on a missing local path or an unknown / unreachable dataset
            if looks_local(s):
                list_files(s)
            else:
                check_hub_name(s, "--data", "dataset")

    @property
    def skipped(self) -> int:
        return self._skips.count

    def __iter__(self) -> Iterator[str]:
        for source in self.sources:
            if looks_local(source):
                for path in list_files(source):
                    fields = ("text",) if path.endswith(".txt") else (self.text_field,)
                    for row in iter_records(path, self._skips, fields):
                        yield row[fields[0]]
            else:
                yield from self._iter_hub(source)

    def _iter_hub(self, name: str) -> Iterator[str]:
        import datasets

        try:
            ds = datasets.load_dataset(name, self.config, split=self.split, streaming=self.streaming)
        except (OSError, ValueError) as exc:  # not cached offline, unknown config or split, ...
            raise DataError(
                f"--data {name}: cannot load this dataset ({' '.join(str(exc).split())[:200]})"
            ) from None
        for i, row in enumerate(ds):
            text = row.get(self.text_field)
            if not isinstance(text, str):
                self._skips(f"{name} ({self.split}): row {i}: missing text field {self.text_field!r}")
                continue
            yield text


# ----------------------------------------------------------------------------------------------------------
# Tokenisation and packing.


def _special(tokenizer, *names: str) -> int:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"tokenizer: needs one of {names}")


def pack_sequences(
    texts: Iterable[str],
    tokenizer,
    *,
    short_length: int = 512,
    long_length: int | None = None,
    long_fraction: float = 0.0,
    seed: int = 0,
    tokenize_batch: int = 256,
) -> Iterator[list[int]]:
    """Concatenate documents (separated by [SEP]) and cut `[CLS] ... [SEP]` blocks.

    Each block is `long_length` tokens with probability `long_fraction`, else `short_length` (specials
    included); the final partial block is dropped. Deterministic for a given seed.
    """
    long_length = long_length or short_length
    if short_length < 3 or long_length < short_length:
        raise ValueError(f"lengths: need 3 <= short_length <= long_length, got {short_length}, {long_length}")
    if not 0.0 <= long_fraction <= 1.0:
        raise ValueError(f"long_fraction: expected a value in [0, 1], got {long_fraction}")
    cls_id = _special(tokenizer, "cls_token_id", "bos_token_id")
    sep_id = _special(tokenizer, "sep_token_id", "eos_token_id")
    rng = random.Random(seed)

    def target() -> int:
        return (long_length if rng.random() < long_fraction else short_length) - 2

    buf: list[int] = []
    want = target()
    batch: list[str] = []

    def flush(docs: list[str]) -> Iterator[list[int]]:
        nonlocal buf, want
        for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
            if not ids:
                continue
            buf.extend(ids)
            buf.append(sep_id)
            while len(buf) >= want:
                yield [cls_id, *buf[:want], sep_id]
                buf = buf[want:]
                want = target()

    for text in texts:
        batch.append(text)
        if len(batch) >= tokenize_batch:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


class PackedStream(torch.utils.data.IterableDataset):
    """Packed blocks computed on the fly (corpora larger than memory); a new packing seed every epoch."""

    def __init__(self, texts: Iterable[str], tokenizer, seed: int = 0, **pack_kwargs: Any):
        self.texts, self.tokenizer, self.seed, self.pack_kwargs = texts, tokenizer, seed, pack_kwargs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return pack_sequences(self.texts, self.tokenizer, seed=self.seed + self.epoch, **self.pack_kwargs)


def build_mlm_dataset(
    texts: Iterable[str], tokenizer, *, streaming: bool = False, seed: int = 0, max_blocks: int | None = None,
    progress: bool = False, **pack_kwargs: Any,
) -> Any:  # fmt: skip
    """A list of packed blocks (map-style, shuffled per epoch by `train`) or a `PackedStream`. `progress`: a
    bar counting packed blocks (packing a large corpus takes a while before the first step)."""
    from tqdm.auto import tqdm

    if streaming:
        return PackedStream(texts, tokenizer, seed=seed, **pack_kwargs)
    blocks = []
    bar = tqdm(desc="pack", unit="block", total=max_blocks, disable=not progress, dynamic_ncols=True)
    for block in pack_sequences(texts, tokenizer, seed=seed, **pack_kwargs):
        blocks.append(block)
        bar.update(1)
        if max_blocks is not None and len(blocks) >= max_blocks:
            break
    bar.close()
    if not blocks:
        raise DataError("data: no complete block could be packed; give more text or a smaller short_length")
    return blocks


# ----------------------------------------------------------------------------------------------------------
# Masking.


class MLMCollator:
    """Pad a list of id sequences and mask them for MLM.

    Returns {"input_ids", "attention_mask" (bool), "labels" (-100 where not masked)}. A real, non-special
    token is selected with probability `mlm_probability`; a selected token becomes [MASK] with probability
    0.8, a random non-special token with 0.1 and stays itself with 0.1. Uses the global torch RNG (so
    `train`'s checkpoints make it resumable) unless a generator is given.
    """

    def __init__(
        self,
        *,
        pad_token_id: int,
        mask_token_id: int,
        special_ids: Iterable[int],
        vocab_size: int,
        mlm_probability: float = 0.15,
        generator: torch.Generator | None = None,
    ):
        if not 0.0 <= mlm_probability < 1.0:  # 0: pad only, nothing masked (cosine-only distillation)
            raise ValueError(f"mlm_probability: expected a value in [0, 1), got {mlm_probability}")
        self.pad, self.mask, self.p = pad_token_id, mask_token_id, mlm_probability
        self.special = torch.tensor(
            sorted(set(special_ids) | {pad_token_id, mask_token_id}), dtype=torch.long
        )
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        allowed[self.special[self.special < vocab_size]] = False
        self.random_pool = allowed.nonzero().flatten()
        self.generator = generator

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs: Any) -> MLMCollator:
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("tokenizer: MLM needs a mask token and a pad token")
        return cls(
            pad_token_id=tokenizer.pad_token_id,
            mask_token_id=tokenizer.mask_token_id,
            special_ids=tokenizer.all_special_ids,
            vocab_size=len(tokenizer),
            **kwargs,
        )

    def __call__(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        seqs = [
            torch.as_tensor(e["input_ids"] if isinstance(e, dict) else e, dtype=torch.long) for e in examples
        ]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad, dtype=torch.long)
        real = torch.zeros((len(seqs), length), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            real[i, : len(s)] = True
        input_ids, labels = self.mask_tokens(ids, real)
        return {"input_ids": input_ids, "attention_mask": real, "labels": labels}

    def mask_tokens(self, ids: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.generator
        candidates = real & ~torch.isin(ids, self.special)
        selected = (torch.rand(ids.shape, generator=g) < self.p) & candidates
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        u = torch.rand(ids.shape, generator=g)
        to_mask = selected & (u < 0.8)
        to_random = selected & (u >= 0.8) & (u < 0.9)
        pick = torch.randint(len(self.random_pool), ids.shape, generator=g)
        out = torch.where(to_mask, torch.full_like(ids, self.mask), ids)
        out = torch.where(to_random, self.random_pool[pick], out)
        return out, labels


# ----------------------------------------------------------------------------------------------------------
# Classification (task-specific KD).


def load_classification(
    path: str,
    *,
    text_field: str = "text",
    text_pair_field: str | None = None,
    label_field: str = "label",
    label_names: list[str] | None = None,
    on_error: str = "raise",
    flag: str = "--train-file",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records {"text", "text_pair"?, "label"} from local jsonl/parquet files (`flag`: the option naming `path`).

    Labels: ints are class ids; strings are mapped through `label_names` (sorted unique names by default);
    floats make a regression task (STS-B style; `kd-task` Platt-scales them). Returns (records, info) with
    info = {"num_labels", "label_names", "regression", "skipped"}.
    """
    skips = _Skips(on_error)
    fields = (text_field, label_field) + ((text_pair_field,) if text_pair_field else ())
    rows = []
    for file in list_files(path, flag):
        if file.endswith(".txt"):
            raise DataError(f"{file}: classification data must be .jsonl or .parquet with a label field")
        rows.extend(iter_records(file, skips, fields))
    if not rows:
        raise DataError(f"{path}: no usable records")
    labels = [r[label_field] for r in rows]
    regression = any(isinstance(v, float) for v in labels)
    if regression:
        names, mapped = None, [float(v) for v in labels]
    elif all(isinstance(v, str) for v in labels):
        names = list(label_names) if label_names else sorted(set(labels))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise DataError(f"{path}: labels {unknown} are not in label_names {names}")
        mapped = [index[v] for v in labels]
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        names = list(label_names) if label_names else None
        mapped = [int(v) for v in labels]
        if min(mapped) < 0:
            raise DataError(f"{path}: negative class id {min(mapped)}")
    else:
        raise DataError(
            f"{path}: field {label_field!r} mixes types; expected all ints, all strings or floats"
        )
    records = []
    for r, y in zip(rows, mapped):
        rec = {"text": str(r[text_field]), "label": y}
        if text_pair_field:
            rec["text_pair"] = str(r[text_pair_field])
        records.append(rec)
    num_labels = 2 if regression else (len(names) if names else max(mapped) + 1)
    info = {"num_labels": num_labels, "label_names": names, "regression": regression, "skipped": skips.count}
    return records, info


class ClassificationCollator:
    """Tokenise, pad and stack classification records: input_ids, attention_mask, token_type_ids, labels."""

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [r["text"] for r in records]
        pairs = [r["text_pair"] for r in records] if "text_pair" in records[0] else None
        enc = self.tokenizer(
            texts, pairs, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"].bool()}
        if "token_type_ids" in enc:
            batch["token_type_ids"] = enc["token_type_ids"]
        labels = [r["label"] for r in records]
        dtype = torch.float32 if isinstance(labels[0], float) else torch.long
        batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch
