"""The encoder itself: every attention pattern trains (forward + backward), padding isolation, gradient
checkpointing, pre-norm, inputs_embeds / token_type_ids, config JSON, backend selection, torch.compile."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import SameDropoutMasks, assert_close

from etkd.models import PATTERNS, EncoderConfig, EncoderModel

PATTERNS = sorted(PATTERNS)
# Settings small enough for a 40-token input to exercise each pattern's sparse path (bigbird: 10 blocks).
SETTINGS = dict(window=8, block_size=4, num_random_blocks=1, sparse_block_size=2, num_landmarks=8)


def tiny(attention: str = "full", **kw) -> EncoderModel:
    base = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=64,
                hidden_dropout=0.0, attention_dropout=0.0, attention=attention, **SETTINGS)  # fmt: skip
    return EncoderModel(EncoderConfig(**{**base, **kw})).set_attention_backend("reference")


def batch(seq: int = 40):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 50, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq - 9 :] = 0
    return ids, mask


HEAD_SHAPES = {"mlm": (2, 40, 50), "sequence_classification": (2, 3), "token_classification": (2, 40, 3),
               "question_answering": (2, 40, 2)}  # fmt: skip
CASES = [("full", head) for head in HEAD_SHAPES] + [(p, "mlm") for p in PATTERNS if p != "full"]


@pytest.mark.parametrize("attention,head", CASES)
def test_forward_backward(attention, head):
    ids, mask = batch()
    model = tiny(attention, head=head, num_labels=3, hidden_dropout=0.1, attention_dropout=0.1,
                 global_projections=True, head_style="roberta").train()  # fmt: skip
    gmask = torch.zeros_like(mask)
    gmask[:, 0] = 1
    out = model(ids, attention_mask=mask, global_attention_mask=gmask)
    assert out.logits.shape == HEAD_SHAPES[head]
    out.logits.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), attention


@pytest.mark.parametrize("attention", [p for p in PATTERNS if p != "nystrom"])
def test_real_positions_ignore_padded_tokens(attention):
    # Nystrom is left out on purpose: its landmarks average over padded positions too (as HF's do).
    model = tiny(attention).eval()
    ids, mask = batch()
    other = ids.clone()
    other[1, -9:] = 7
    with torch.no_grad():
        a = model(ids, attention_mask=mask).last_hidden_state
        b = model(other, attention_mask=mask).last_hidden_state
    assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, name=attention)


@pytest.mark.parametrize("attention", ["full", "longformer"])
@pytest.mark.parametrize("attention_dropout", [0.0, 0.2])  # 0.2: the recomputation regenerates the same masks
def test_gradient_checkpointing_gives_same_gradients(attention, attention_dropout):
    ids, mask = batch()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = tiny(attention, head="mlm", attention_dropout=attention_dropout).train()
        model.set_gradient_checkpointing(ckpt)
        model(ids, attention_mask=mask).logits.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        assert_close(g1, g0, atol=1e-5, name="checkpointed grad")


# The op each pattern hands attention dropout to, where its HF model applies it (models/patterns/<name>.py): bigbird's
# block-sparse path and nystrom apply none, as in HF; bigbird's full fallback (<= 28 tokens here) does; fixed
# (no HF model) drops probabilities like BERT.
DROPOUT_OP = {"full": "full_attention", "longformer": "sliding_window_attention", "lsg": "lsg_attention",
              "bigbird": None, "nystrom": None, "fixed": "block_sparse_attention"}  # fmt: skip
DROPOUT_CASES = [(p, 40, DROPOUT_OP[p]) for p in PATTERNS] + [("bigbird", 24, "full_attention")]


@pytest.mark.parametrize("attention,seq,op", DROPOUT_CASES)
def test_attention_dropout_goes_to_the_op_in_training_mode_only(monkeypatch, attention, seq, op):
    ids, mask = batch(seq)
    gmask = torch.zeros_like(mask)
    gmask[:, 0] = 1
    model = tiny(attention, attention_dropout=0.3, global_projections=True)  # hidden dropout 0
    masks = SameDropoutMasks(monkeypatch)
    with masks.ours(), torch.no_grad():
        ev = model.eval()(ids, attention_mask=mask, global_attention_mask=gmask).last_hidden_state
        assert masks.calls == []  # eval mode: the ops' p = 0 path
        tr = model.train()(ids, attention_mask=mask, global_attention_mask=gmask).last_hidden_state
    assert [c[:2] for c in masks.calls] == ([(op, 0.3)] * 2 if op else [])  # one call per layer
    real = mask.bool()
    if op is None:
        assert_close(tr[real], ev[real], atol=1e-6, name=f"{attention}: no attention dropout, as in HF")
        return
    assert not torch.allclose(tr[real], ev[real])
    with torch.no_grad():  # seeds drawn from torch's generator: manual_seed reproduces, the next call differs
        torch.manual_seed(5)
        a = model(ids, attention_mask=mask, global_attention_mask=gmask).last_hidden_state
        torch.manual_seed(5)
        b = model(ids, attention_mask=mask, global_attention_mask=gmask).last_hidden_state
        c = model(ids, attention_mask=mask, global_attention_mask=gmask).last_hidden_state
    assert torch.equal(a, b) and not torch.allclose(b[real], c[real])


def test_attention_dropout_drops_probabilities_not_the_output():
    # With every value vector equal to c, attention returns c whatever the probabilities; dropout on the
    # probabilities then scales all of a row's head_dim entries by one factor (sum of its kept probabilities
    # / (1 - p)), while dropout on the output (the pre-issue-27 behaviour) zeroed entries one by one.
    model = tiny("full", attention_dropout=0.5, num_layers=1).train()
    attn = model.encoder.layers[0].attn
    x = torch.randn(2, 40, 32)
    q, k = (p(x).view(2, 40, 2, 16).transpose(1, 2) for p in (attn.q, attn.k))
    v = torch.full_like(q, 0.25)
    y = attn.attend(attn, x, q, k, v, None, None, "reference")  # (b, h, s, hd)
    factor = y / 0.25
    assert_close(factor, factor[..., :1].expand_as(factor), atol=1e-6, name="one factor per row")
    assert (
        factor.std() > 0.1
    )  # rows differ (std ~0.16 for near-uniform rows of 40 keys): probabilities dropped


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_longformer_global_queries_projected_for_global_rows_only(monkeypatch, backend):
    """As HF's LongformerSelfAttention (`query_global` of the global rows only), the global query projection runs
    on the global rows alone, with the same outputs and gradients as projecting every row."""
    import etkd.models.patterns.longformer as lf

    ids, mask = batch()
    gmask = torch.zeros_like(mask)
    gmask[:, 0] = 1
    gmask[0, 7] = 1  # 3 global tokens in all
    torch.manual_seed(0)
    model = tiny("longformer", global_projections=True).set_attention_backend(backend)
    seen = []
    model.encoder.layers[0].attn.qg.register_forward_hook(
        lambda m, args, out: seen.append(tuple(args[0].shape))
    )

    def run():
        model.zero_grad()
        out = model(ids, attention_mask=mask, global_attention_mask=gmask).last_hidden_state
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    got, got_grads = run()
    assert seen == [(3, 32)]
    monkeypatch.setattr(lf, "_global_queries", lambda attn, x, global_mask: attn.qg(x))  # every row
    want, want_grads = run()
    assert seen[-1] == (2, 40, 32)
    assert_close(got, want, atol=1e-6, name="hidden states")
    for name, g in want_grads.items():
        assert_close(got_grads[name], g, atol=1e-6 * max(1.0, float(g.abs().max())), name=f"d {name}")


def test_pre_norm_has_final_norm_and_runs():
    model = tiny(pre_norm=True).eval()
    assert model.encoder.final_norm is not None
    ids, mask = batch()
    out = model(ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all()


def test_inputs_embeds_token_types_and_hidden_states():
    model = tiny().eval()
    ids, mask = batch()
    with torch.no_grad():
        a = model(ids, attention_mask=mask, output_hidden_states=True)
        b = model(inputs_embeds=model.encoder.embeddings.word(ids), attention_mask=mask)
        c = model(ids, attention_mask=mask, token_type_ids=torch.ones_like(ids))
    assert_close(b.last_hidden_state, a.last_hidden_state, atol=0, name="inputs_embeds")
    assert not torch.allclose(c.last_hidden_state, a.last_hidden_state)
    assert len(a.hidden_states) == 3 and a.hidden_states[-1] is a.last_hidden_state
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.encoder.embeddings.word(ids))


def test_config_json_round_trip_and_validation(tmp_path):
    cfg = EncoderConfig(hidden_size=64, num_heads=4, attention="longformer", window=[4, 8], num_layers=2)
    cfg.save(tmp_path)
    assert EncoderConfig.load(tmp_path) == cfg
    with pytest.raises(ValueError, match="attention"):
        EncoderConfig(attention="performer")
    with pytest.raises(ValueError, match="window"):
        EncoderConfig(window=5)
    with pytest.raises(ValueError, match="hidden_size"):
        EncoderConfig(hidden_size=30, num_heads=4)


def test_unavailable_backend_raises_with_reason(monkeypatch):
    model = tiny().eval()
    ids, mask = batch()
    model.set_attention_backend("cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        model(ids, attention_mask=mask)
    model.set_attention_backend("auto")
    monkeypatch.setenv("ETKD_BACKEND", "reference")
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=mask).last_hidden_state).all()


@pytest.mark.slow
@pytest.mark.parametrize("attention", PATTERNS)
def test_torch_compile_fullgraph_matches_eager(attention):
    model = tiny(attention, head="mlm", num_layers=1).eval()
    ids, mask = batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits  # also fills bigbird's per-length block-mask cache
        got = torch.compile(model, fullgraph=True)(ids, attention_mask=mask).logits
    assert_close(got, ref, atol=1e-4, name=f"compiled {attention}")


@pytest.mark.parametrize("used", [(True, True, True), (True, False, True)], ids=["qkv", "q_v"])
def test_fused_qkv_projection_equals_three_linears(used):
    """`SelfAttention.projections` (one GEMM, heads as views of its output, its own backward) gives the q, k, v of the
    three nn.Linear layers and the same gradients for x and every weight and bias, also when one of q/k/v gets no
    gradient; float64 gradcheck of its backward."""
    from etkd.models.encoder import _QKV

    cfg = EncoderConfig(hidden_size=32, num_heads=4, num_layers=1, intermediate_size=64, vocab_size=50)
    attn = EncoderModel(cfg).double().encoder.layers[0].attn
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    params = [p for lin in (attn.q, attn.k, attn.v) for p in (lin.weight, lin.bias)]
    want = [lin(x).view(2, 7, 4, 8).transpose(1, 2) for lin in (attn.q, attn.k, attn.v)]
    got = attn.projections(x)
    for g, w in zip(got, want):
        assert_close(g, w, 1e-12, name="q/k/v")
    grads = [torch.randn_like(w) for w in want]

    def loss(ts):
        return sum((t * g).sum() for t, g, u in zip(ts, grads, used) if u)

    want_grads = torch.autograd.grad(loss(want), [x, *params], allow_unused=True)
    got_grads = torch.autograd.grad(loss(got), [x, *params], allow_unused=True)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            assert_close(g, w, 1e-12, name="grad")
    ws = [attn.q.weight, attn.k.weight, attn.v.weight, attn.q.bias, attn.k.bias, attn.v.bias]
    assert torch.autograd.gradcheck(lambda x, *w: _QKV.apply(x, 4, *w), (x, *ws))


def test_projections_honour_wrapped_or_hooked_linears(monkeypatch):
    """The stacked q/k/v GEMM reads the weights directly: a projection wrapped (a LoRA-style nn.Linear subclass) or
    hooked must still give its own output — the encoder then calls each module, and says so once."""
    import etkd.models.encoder as enc

    monkeypatch.setattr(enc, "_told_unfused", False)
    cfg = EncoderConfig(hidden_size=32, num_heads=4, num_layers=1, intermediate_size=64, vocab_size=50)
    attn = EncoderModel(cfg).encoder.layers[0].attn
    x = torch.randn(2, 7, 32)
    assert type(attn.projections(x)[0].grad_fn).__name__ == "_QKVBackward"  # plain linears: the stacked GEMM

    class LoRA(torch.nn.Linear):
        def __init__(self, base):
            super().__init__(base.in_features, base.out_features)
            self.load_state_dict(base.state_dict())
            self.a, self.b = torch.nn.Parameter(torch.randn(2, 32)), torch.nn.Parameter(torch.randn(32, 2))

        def forward(self, t):
            return super().forward(t) + t @ self.a.t() @ self.b.t()

    attn.v = LoRA(attn.v)
    handle = attn.k.register_forward_hook(lambda m, i, o: 2 * o)
    with pytest.warns(UserWarning, match=r"not plain nn.Linear .*LoRA.*one by one"):
        q, k, v = attn.projections(x)
    heads = lambda t: t.view(2, 7, 4, 8).transpose(1, 2)  # noqa: E731
    assert_close(q, heads(attn.q(x)), 1e-6, name="q")
    assert_close(k, heads(attn.k(x)), 1e-6, name="k (hooked: doubled)")
    assert_close(v, heads(attn.v(x)), 1e-6, name="v (LoRA delta)")
    v.sum().backward()
    assert attn.v.a.grad is not None and attn.v.a.grad.abs().sum() > 0  # the adapter trains
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn.projections(x)  # said once
    handle.remove()


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("seq", [0, 1, 7])
def test_chunked_ffn_equals_the_modules(monkeypatch, act, seq):
    """`Layer.ffn` runs `_FFN` (row chunks, its own backward) for plain linears and a GELU: the same output and
    gradients for x and every weight and bias as ffn_out(act(ffn_in(x))), with chunks of 3 rows (a partial last one)
    and with none; float64 gradcheck of its backward; a gradient asked for x alone skips the weights' GEMMs."""
    import etkd.models.encoder as enc

    cfg = EncoderConfig(hidden_size=32, num_heads=4, num_layers=1, intermediate_size=64, vocab_size=50,
                        hidden_act=act, hidden_dropout=0.0)  # fmt: skip
    layer = EncoderModel(cfg).double().encoder.layers[0]
    params = [*layer.ffn_in.parameters(), *layer.ffn_out.parameters()]
    x = torch.randn(2, seq, 32, dtype=torch.float64, requires_grad=True)
    want = layer.ffn_out(layer.act(layer.ffn_in(x)))
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * g).sum(), [x, *params])
    for chunk_bytes in (3 * 64 * 8, 1 << 30):
        monkeypatch.setattr(enc, "FFN_CHUNK_BYTES", chunk_bytes)
        got = layer.ffn(x)
        assert type(got.grad_fn).__name__ == "_FFNBackward"
        assert_close(got, want, 1e-12, name="ffn")
        for a, b in zip(torch.autograd.grad((got * g).sum(), [x, *params]), want_grads):
            assert_close(a, b, 1e-12, name="grad")
    monkeypatch.setattr(enc, "FFN_CHUNK_BYTES", 3 * 64 * 8)
    if seq == 7:
        fn = lambda x, *w: enc._FFN.apply(x, *w, enc._FFN_GELU[act])  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, *params))
        for p in params:
            p.requires_grad_(False)
        (dx,) = torch.autograd.grad((layer.ffn(x) * g).sum(), [x])
        assert_close(dx, want_grads[0], 1e-12, name="grad x alone")


def test_ffn_without_gelu_runs_as_the_modules_and_says_so(monkeypatch):
    import etkd.models.encoder as enc

    monkeypatch.setattr(enc, "_told_unchunked", False)
    cfg = EncoderConfig(hidden_size=32, num_heads=4, num_layers=1, intermediate_size=64, vocab_size=50,
                        hidden_act="relu", hidden_dropout=0.0)  # fmt: skip
    layer = EncoderModel(cfg).encoder.layers[0]
    x = torch.randn(2, 5, 32, requires_grad=True)
    with pytest.warns(UserWarning, match=r"unchunked .*'relu' is not a GELU"):
        y = layer.ffn(x)
    assert_close(y, layer.ffn_out(torch.relu(layer.ffn_in(x))), 1e-6, name="relu ffn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.ffn(x)  # said once
