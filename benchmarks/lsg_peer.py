"""lsg-converter's LSG models as the oracle, run in the side environment (`make lsg-env`: .venv-lsg with
transformers==4.40.2 tokenizers==0.19.1 lsg-converter==0.1.9 and the pinned torch; lsg-converter's model files
do not import under transformers 5). This file imports no etkd code.

    .venv-lsg/bin/python benchmarks/lsg_peer.py run DIR       # DIR: an LSG checkpoint + inputs.safetensors
    .venv-lsg/bin/python benchmarks/lsg_peer.py record tests/data/lsg_golden --minilm MINILM_DIR
    .venv-lsg/bin/python benchmarks/lsg_peer.py bench '<json spec>'  # one `etkd bench` row

`run` loads DIR with transformers' Auto class and `trust_remote_code=True` (so it uses the model file inside
DIR, as any user of the checkpoint would), runs it in eval mode on inputs.safetensors (`input_ids`,
`attention_mask`, `cotangent`), backpropagates sum(output * cotangent) and writes DIR/peer.safetensors: `output`
(last hidden state of the bare model, else the head's logits) and `grad.<name>` for every parameter.

`record` makes the golden cases of tests/data/lsg_golden once (tests/test_lsg_model.py reads them without this
environment): random-init LSG models built by lsg-converter's own classes (seeded), saved with their
`save_pretrained`, then `run` on each; with --minilm also all-MiniLM-L6-v2 converted by `LSGConverter`, of
which only hashes of the converted weights and a projection of the outputs are kept (small files).

`bench` times lsg-converter's LSGRobertaModel for one `etkd bench` row (same shapes and LSG settings as
etkd's model, inference or a training step) with etkd's own timer and peak-memory meter
(`etkd_kernels/timing.py`, loaded by file path: it needs only torch) and prints the row as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

AUTO = {
    "Model": "AutoModel",
    "ForMaskedLM": "AutoModelForMaskedLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForQuestionAnswering": "AutoModelForQuestionAnswering",
}


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import lsg_converter  # noqa: F401
    import tokenizers
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "lsg-converter": version("lsg-converter"),
        "python": sys.version.split()[0],
    }


def load(directory: str):
    import transformers

    with open(os.path.join(directory, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    suffix = next(s for s in AUTO if arch.endswith(s))
    cls = getattr(transformers, AUTO[suffix])
    return cls.from_pretrained(directory, trust_remote_code=True, attn_implementation="eager").eval()


def forward_backward(model, inputs: dict[str, torch.Tensor], project: torch.Tensor | None = None):
    """(output, {name: grad}) of sum(output [@ project] * cotangent) in fp32, eval mode."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    if getattr(out, "start_logits", None) is not None:
        y = torch.stack([out.start_logits, out.end_logits], dim=-1)
    else:
        y = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.logits
    if project is not None:
        y = y @ project
    (y * inputs["cotangent"]).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads


def run(directory: str) -> None:
    torch.manual_seed(0)
    model = load(directory)
    inputs = load_file(os.path.join(directory, "inputs.safetensors"))
    y, grads = forward_backward(model, inputs, inputs.get("project"))
    tensors = {"output": y.contiguous(), **{f"grad.{n}": g.contiguous() for n, g in grads.items()}}
    save_file(tensors, os.path.join(directory, "peer.safetensors"))


# --- bench ----------------------------------------------------------------------------------------------


def _timing(path: str | None = None):
    """etkd's timing module, loaded by file path (the side environment has no etkd installed): `path` as the
    caller gives it (the installed etkd_kernels/timing.py), else the source tree's."""
    import importlib.util

    path = path or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etkd_kernels", "timing.py"
    )
    spec = importlib.util.spec_from_file_location("_etkd_timing", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def bench(spec: dict) -> dict:
    """One `etkd bench` row for lsg-converter's LSGRobertaModel: spec["row"] (Row fields), spec["config"]
    (LSGRobertaConfig keyword arguments), repeats, warmup, threads."""
    from lsg_converter.roberta.modeling_lsg_roberta import LSGRobertaConfig, LSGRobertaModel

    timing = _timing(spec.get("timing_path"))
    row = dict(spec["row"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    config = LSGRobertaConfig(**spec["config"])
    model = LSGRobertaModel(config, add_pooling_layer=False)
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (row["batch"], row["seq"]), generator=g)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    call = timing.model_step(model, kwargs, row["mode"])
    call()
    with timing.PeakMemory(torch.device("cpu")) as peak:
        t = timing.time_call(call, spec["repeats"], warmup=spec["warmup"] - 1)
    row.update(peak_mib=peak.peak_mib, time_s=t.median, time_p20=t.p20, time_p80=t.p80,
               status="ok", versions=versions())  # fmt: skip
    return row


# --- record ------------------------------------------------------------------------------------------------

# Every case: (name, family, class suffix, LSG settings, lengths of the batch rows, seq).
BASE = dict(block_size=16, sparse_block_size=16, sparsity_factor=2, num_global_tokens=1)
CASES = [
    # lengths not a multiple of the block (adaptive pads to it), padding in the second row
    ("norm", "roberta", "Model", dict(BASE, sparsity_type="norm"), (100, 61)),
    ("pooling", "roberta", "Model", dict(BASE, sparsity_type="pooling"), (100, 61)),
    ("stride", "roberta", "Model", dict(BASE, sparsity_type="stride"), (100, 61)),
    ("block_stride", "roberta", "Model", dict(BASE, sparsity_type="block_stride"), (100, 61)),
    # no padding and a length one short of the block (the padded cases are at the end)
    ("bos_pooling", "roberta", "Model", dict(BASE, sparsity_type="bos_pooling"), (95, 95)),
    ("none", "roberta", "Model", dict(BASE, sparsity_type="none"), (100, 61)),
    # 3 globals, factor 4, sparse windows narrower than the block, no pool_with_global
    (
        "pooling_g3_f4",
        "roberta",
        "Model",
        dict(
            block_size=16,
            sparse_block_size=8,
            sparsity_factor=4,
            num_global_tokens=3,
            sparsity_type="pooling",
            pool_with_global=False,
        ),
        (100, 45),
    ),  # fmt: skip
    # odd step (block == factor, step 1; lsg-converter's model fails on any other odd step): its
    # unfold windows shift by one
    (
        "stride_odd_step",
        "roberta",
        "Model",
        dict(
            block_size=8, sparse_block_size=8, sparsity_factor=8, num_global_tokens=2, sparsity_type="stride"
        ),
        (100, 57),
    ),  # fmt: skip
    (
        "mask_first_token",
        "roberta",
        "Model",
        dict(BASE, sparsity_type="norm", mask_first_token=True),
        (100, 61),
    ),
    # up to two blocks: lsg-converter runs full attention
    ("short", "roberta", "Model", dict(BASE, sparsity_type="pooling"), (30, 19)),
    ("not_adaptive", "roberta", "Model", dict(BASE, sparsity_type="pooling", adaptive=False), (96, 70)),
    ("mlm", "roberta", "ForMaskedLM", dict(BASE, sparsity_type="pooling"), (100, 61)),
    ("seq_cls", "roberta", "ForSequenceClassification", dict(BASE, sparsity_type="norm"), (100, 61)),
    ("tok_cls", "roberta", "ForTokenClassification", dict(BASE, sparsity_type="stride"), (100, 61)),
    ("qa", "roberta", "ForQuestionAnswering", dict(BASE, sparsity_type="block_stride"), (100, 61)),
    ("bert", "bert", "Model", dict(BASE, sparsity_type="pooling"), (100, 61)),
    # (added later, after the cases above: each case's inputs are seeded by its index)
    # norm with sparse windows narrower than the block: key norms ranked in chunks of sparse_block_size
    (
        "norm_narrow_sparse",
        "roberta",
        "Model",
        dict(BASE, sparse_block_size=8, sparsity_type="norm"),
        (100, 61),
    ),
    (
        "norm_narrow_f4_g2",
        "roberta",
        "Model",
        dict(
            block_size=16, sparse_block_size=8, sparsity_factor=4, num_global_tokens=2, sparsity_type="norm"
        ),
        (100, 45),
    ),
    # bos_pooling attends the plain mean of a group of padding (its mask mean overflows), made of the padded
    # rows' hidden states (user padding and the adaptive padding to a multiple of the block), which every
    # layer computes
    ("bos_pooling_padded", "roberta", "Model", dict(BASE, sparsity_type="bos_pooling"), (100, 61)),
    (
        "bos_pooling_f4_g2_mlm",
        "roberta",
        "ForMaskedLM",
        dict(
            block_size=16,
            sparse_block_size=16,
            sparsity_factor=4,
            num_global_tokens=2,
            sparsity_type="bos_pooling",
            mask_first_token=True,
        ),
        (100, 45),
    ),  # fmt: skip
]
TINY = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=170, type_vocab_size=1, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2)  # fmt: skip


def lsg_classes(family: str):
    if family == "roberta":
        from lsg_converter.roberta import modeling_lsg_roberta as m

        return m, "Roberta"
    from lsg_converter.bert import modeling_lsg_bert as m

    return m, "Bert"


def make_inputs(lengths, seq, vocab, pad, out_shape_fn, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0] = 0  # <s>
        ids[i, n:] = pad
        mask[i, :n] = 1
    cot = torch.randn(*out_shape_fn(len(lengths), seq), generator=gen)
    if cot.dim() == 3:  # padded rows' outputs are arbitrary (etkd gives zeros there): no gradient from them
        cot = cot * mask[..., None]
    return {"input_ids": ids, "attention_mask": mask, "cotangent": cot}


def record(out: str, minilm: str | None) -> None:
    """Each case folder: config.json (lsg-converter's, with the case's LSG settings), inputs.safetensors and
    peer.safetensors; the weights, which do not depend on the LSG settings, once per class in
    weights/<class>.safetensors (random init of lsg-converter's class, seeded by class)."""
    os.makedirs(os.path.join(out, "weights"), exist_ok=True)
    manifest = {"versions": versions(), "cases": {}}
    classes = sorted({(family, suffix) for _, family, suffix, _, _ in CASES})
    for i, (name, family, suffix, lsg, lengths) in enumerate(CASES):
        m, stem = lsg_classes(family)
        kw = dict(TINY, num_labels=2 if suffix == "ForQuestionAnswering" else 3)
        if family == "bert":
            kw.update(type_vocab_size=2, pad_token_id=0)
        config = getattr(m, f"LSG{stem}Config")(**kw, **lsg)
        torch.manual_seed(100 + classes.index((family, suffix)))
        model = getattr(m, f"LSG{stem}{suffix}")(config)
        with torch.no_grad():  # make every weight matter (post_init leaves LayerNorms at 1/0, biases at 0)
            for n, p in model.named_parameters():
                if "LayerNorm" in n or n.endswith(".bias"):
                    p.add_(0.1 * torch.randn_like(p))
        d = os.path.join(out, name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        model.save_pretrained(d, safe_serialization=True)
        seq = max(lengths)
        hidden, vocab = TINY["hidden_size"], TINY["vocab_size"]
        width = {
            "Model": hidden,
            "ForMaskedLM": vocab,
            "ForTokenClassification": 3,
            "ForQuestionAnswering": 2,
        }
        if suffix == "ForSequenceClassification":
            shape = lambda b, s: (b, 3)
        else:
            shape = lambda b, s, w=width[suffix]: (b, s, w)
        inputs = make_inputs(lengths, seq, vocab, config.pad_token_id, shape, seed=i)
        save_file(inputs, os.path.join(d, "inputs.safetensors"))
        run(d)
        peer = load_file(os.path.join(d, "peer.safetensors"))
        g = config.num_global_tokens
        for n in [n for n in peer if n.endswith("global_embeddings.weight")]:
            assert peer[n][g:].abs().max() == 0  # rows past the globals in use get no gradient: keep g rows
            peer[n] = peer[n][:g].contiguous()
        save_file(peer, os.path.join(d, "peer.safetensors"))
        weights = os.path.join(out, "weights", f"{family}_{suffix}.safetensors")
        if os.path.isfile(weights):
            same = load_file(weights)
            mine = load_file(os.path.join(d, "model.safetensors"))
            assert same.keys() == mine.keys() and all(torch.equal(same[k], mine[k]) for k in same)
        else:
            shutil.copy(os.path.join(d, "model.safetensors"), weights)
        for f in os.listdir(d):  # the weights are shared, the model file is lsg-converter's own
            if f.endswith(".py") or f == "model.safetensors":
                os.remove(os.path.join(d, f))
        manifest["cases"][name] = {"family": family, "class": f"LSG{stem}{suffix}", "lsg": lsg,
                                   "lengths": list(lengths), "weights": f"weights/{family}_{suffix}.safetensors"}  # fmt: skip
        print(f"recorded {name}", flush=True)
    if minilm:
        manifest["minilm"] = record_minilm(os.path.join(out, "minilm"), minilm)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)


MINILM_LSG = dict(block_size=32, sparse_block_size=32, sparsity_factor=4, num_global_tokens=4,
                  sparsity_type="pooling")  # fmt: skip
MINILM_RANDOM_SEED = 5
MINILM_TEXTS = [
    "Long documents need attention patterns that grow linearly with their length. " * 9,
    "The quick brown fox jumps over the lazy dog, again and again, until the story is long enough. " * 4,
]


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().to(torch.float32).numpy().tobytes()).hexdigest()


def record_minilm(out: str, minilm: str) -> dict:
    """all-MiniLM-L6-v2 converted to LSG by LSGConverter (max 1024 tokens, its defaults otherwise): hashes of
    the converted global and position tables, and the converted model's output projected to 8 columns with
    the gradients of a few small tensors."""
    from lsg_converter import LSGConverter
    from transformers import AutoTokenizer

    os.makedirs(out, exist_ok=True)
    model, _ = LSGConverter(max_sequence_length=1024).convert_from_pretrained(minilm, **MINILM_LSG)
    model.eval()
    sd = model.state_dict()
    tok = AutoTokenizer.from_pretrained(minilm)
    enc = tok(MINILM_TEXTS, padding=True, return_tensors="pt")
    gen = torch.Generator().manual_seed(7)
    project = torch.randn(model.config.hidden_size, 8, generator=gen)
    b, s = enc["input_ids"].shape
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
              "cotangent": torch.randn(b, s, 8, generator=gen) * enc["attention_mask"][..., None],
              "project": project}  # fmt: skip
    keep = ("embeddings.LayerNorm.weight", "attention.self.query.bias", "output.LayerNorm.bias")
    g = model.config.num_global_tokens
    tensors = dict(inputs)
    # fp32 as users run it ("output", "grad.*"), and the same model and inputs in float64 ("truth64.*"): the
    # truth both fp32 implementations are measured against (lsg-converter's own fp32 error is of the size of
    # the 1e-5 tolerance on these sums over hundreds of tokens).
    for prefix, dtype in (("", torch.float32), ("truth64.", torch.float64)):
        m = model.to(dtype)
        x = {k: t.to(dtype) if t.is_floating_point() else t for k, t in inputs.items()}
        y, grads = forward_backward(m, x, x["project"])
        tensors[f"{prefix}output"] = y.contiguous()
        tensors[f"{prefix}grad.embeddings.global_embeddings.weight"] = grads[
            "embeddings.global_embeddings.weight"
        ][:g].contiguous()
        tensors.update({f"{prefix}grad.{n}": t.contiguous() for n, t in grads.items() if n.endswith(keep)})
    hashed = ("embeddings.global_embeddings.weight", "embeddings.position_embeddings.weight")
    # random_global_init: LSGConverter ignores its `seed` argument and draws from torch's global generator,
    # so torch.manual_seed before the conversion reproduces it -- up to the last bits: the draw goes through
    # the word embeddings' covariance and its Cholesky factor (BLAS), whose rounding depends on the thread
    # count and the CPU, so the table is recorded as a projection to 8 columns (compared with a tolerance),
    # besides the hash of this run's bits
    torch.manual_seed(MINILM_RANDOM_SEED)
    rnd, _ = LSGConverter(max_sequence_length=1024, random_global_init=True).convert_from_pretrained(
        minilm, **MINILM_LSG
    )
    table = rnd.state_dict()[hashed[0]]
    tensors["random_global_init.project"] = (table.double() @ project.double()).float().contiguous()
    save_file(tensors, os.path.join(out, "golden.safetensors"))
    return {"lsg": MINILM_LSG, "max_sequence_length": 1024, "architecture": type(model).__name__,
            "sha256": {n: sha(sd[n]) for n in hashed},
            "sum": {n: float(sd[n].double().sum()) for n in hashed},
            "random_global_init": {"torch_manual_seed": MINILM_RANDOM_SEED,
                                   "sha256": sha(rnd.state_dict()[hashed[0]])}}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("directory")
    c = sub.add_parser("record")
    c.add_argument("out")
    c.add_argument("--minilm", default=None)
    b = sub.add_parser("bench")
    b.add_argument("spec", help="JSON: row, config, repeats, warmup, threads")
    a = p.parse_args(argv)
    if a.cmd == "bench":
        print(json.dumps(bench(json.loads(a.spec))), flush=True)
        return 0
    torch.set_num_threads(1)
    if a.cmd == "run":
        run(a.directory)
    else:
        record(a.out, a.minilm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
