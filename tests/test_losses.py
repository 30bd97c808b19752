"""Each distillation loss against hand-computed values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from etkd.distill.losses import (
    distillation_loss,
    hidden_state_mse,
    inverse_platt,
    kd_kl,
    layer_map,
    logit_positions,
    mlm_loss,
    platt_scale,
    relation_kl,
    soft_targets,
    task_kd_loss,
    taylor_kd,
    taylor_mse,
)


def test_kd_kl_by_hand():
    zs, zt = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # T = 2: p = softmax([0, .5]), f = softmax([.5, 0]); KL(p||f) = sum p (log p - log f), times T^2 = 4.
    p1 = 1 / (1 + math.exp(-0.5))  # teacher prob of class 1
    f1 = 1 / (1 + math.exp(0.5))
    kl = p1 * math.log(p1 / f1) + (1 - p1) * math.log((1 - p1) / (1 - f1))
    assert kd_kl(zs, zt, 2.0).item() == pytest.approx(4 * kl, rel=1e-6)
    assert kd_kl(zt, zt, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_taylor_equals_ce_minus_teacher_entropy_and_teacher_drops_out_of_gradient():
    torch.manual_seed(0)
    zs = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = F.one_hot(torch.tensor([0, 1, 2, 3, 1, 0]), 4).double()
    grads = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        zt = torch.randn(6, 4, dtype=torch.float64)
        p = zt.softmax(-1)
        loss = taylor_kd(zs, zt, y)
        ce = -(y * zs.log_softmax(-1)).sum(-1).mean()
        entropy = -(p * p.log()).sum(-1).mean()
        torch.testing.assert_close(loss, ce - entropy, rtol=1e-12, atol=1e-12)
        (g,) = torch.autograd.grad(loss, zs)
        grads.append(g)
    # Two different teachers, identical gradient: d/dz_s = (softmax(z_s) - y) / b, CE's gradient.
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-14)
    torch.testing.assert_close(grads[0], (zs.detach().softmax(-1) - y) / 6, rtol=1e-12, atol=1e-12)


def test_taylor_mse_by_hand_and_gradient():
    zs = torch.tensor([[0.5, -0.5, 1.0]], dtype=torch.float64, requires_grad=True)
    zt = torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    p = [math.exp(v) for v in (0.0, 1.0, -1.0)]
    p = [v / sum(p) for v in p]
    terms = [p[c] * (zs[0, c].item() - zt[0, c].item() - (y[0, c].item() / p[c] - 1)) ** 2 for c in range(3)]
    loss = taylor_mse(zs, zt, y)
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-12)
    (g,) = torch.autograd.grad(loss, zs)
    expect = [
        2 * p[c] * (zs[0, c].item() - zt[0, c].item() - (y[0, c].item() / p[c] - 1)) / 3 for c in range(3)
    ]
    torch.testing.assert_close(g[0], torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # It carries the teacher: another teacher, another gradient. Its minimum: z_s = z_t + y/p - 1.
    (g2,) = torch.autograd.grad(taylor_mse(zs, zt + torch.tensor([[1.0, 0, 0]]), y), zs)
    assert not torch.allclose(g, g2)
    best = (zt + y / zt.softmax(-1) - 1).requires_grad_()
    assert taylor_mse(best, zt, y).item() == pytest.approx(0.0, abs=1e-20)


def test_task_kd_loss_mixes_with_lambda():
    torch.manual_seed(0)
    zs, zt = torch.randn(5, 3), torch.randn(5, 3)
    labels = torch.tensor([0, 2, 1, 1, 0])
    y = F.one_hot(labels, 3).float()
    ce = F.cross_entropy(zs, labels)
    for name, kd in (("taylor", taylor_kd(zs, zt, y)), ("taylor-mse", taylor_mse(zs, zt, y)),
                     ("kd", kd_kl(zs, zt, 2.0))):  # fmt: skip
        t = 2.0 if name == "kd" else 1.0
        loss, logs = task_kd_loss(name, zs, zt, labels, lam=0.3, temperature=t)
        torch.testing.assert_close(loss, 0.3 * ce + 0.7 * kd, rtol=1e-6, atol=1e-6)
        assert set(logs) == {"ce", "kd"}
    loss, _ = task_kd_loss("ce", zs, None, labels, lam=0.3)
    torch.testing.assert_close(loss, ce)
    with pytest.raises(ValueError, match="loss: expected one of"):
        task_kd_loss("mse", zs, zt, labels)
    with pytest.raises(ValueError, match="lambda"):
        task_kd_loss("kd", zs, zt, labels, lam=1.5)
    with pytest.raises(ValueError, match="teacher_logits"):
        task_kd_loss("kd", zs, zt[:, :2], labels)


def test_platt_scaling():
    t = torch.tensor([0.0, 2.5, 5.0])
    p = platt_scale(t)
    torch.testing.assert_close(p, torch.tensor([1 / (1 + math.exp(2.5)), 0.5, 1 / (1 + math.exp(-2.5))]))
    torch.testing.assert_close(inverse_platt(p), t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(soft_targets(p, 2), torch.stack([1 - p, p], -1))
    loss, _ = task_kd_loss("taylor-mse", torch.zeros(3, 2), torch.zeros(3, 2), p, lam=0.5)
    assert torch.isfinite(loss)


def _student_teacher(b: int, s: int, v: int, d: int):
    """Seeded float64 (student logits, teacher logits, student hidden, teacher hidden); the student's take
    gradients."""
    torch.manual_seed(0)
    zs = torch.randn(b, s, v, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(b, s, v, dtype=torch.float64)
    hs = torch.randn(b, s, d, dtype=torch.float64, requires_grad=True)
    return zs, zt, hs, torch.randn(b, s, d, dtype=torch.float64)


def test_distillation_loss_by_hand():
    b, s, v, d = 2, 5, 7, 4
    zs, zt, hs, ht = _student_teacher(b, s, v, d)
    labels = torch.full((b, s), -100)
    labels[0, 1], labels[1, 3] = 3, 6
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 4] = False  # a padding token: in no term
    loss, logs = distillation_loss(zs, zt, hs, ht, labels, mask)

    mlm, kd, cos, n = 0.0, 0.0, 0.0, 0
    for i in range(b):
        for j in range(s):
            if labels[i, j] != -100:
                mlm += -zs[i, j].log_softmax(-1)[labels[i, j]].item() / 2
            if mask[i, j]:
                p, lf = (zt[i, j] / 2).softmax(-1), (zs[i, j] / 2).log_softmax(-1)
                kd += (p * (p.log() - lf)).sum().item() * 4
                cos += 1 - (hs[i, j] @ ht[i, j] / (hs[i, j].norm() * ht[i, j].norm())).item()
                n += 1
    assert logs["mlm"].item() == pytest.approx(mlm, rel=1e-9)
    assert logs["kd"].item() == pytest.approx(kd / n, rel=1e-6)
    assert logs["cos"].item() == pytest.approx(cos / n, rel=1e-6)
    assert loss.item() == pytest.approx(2 * mlm + 5 * kd / n + cos / n, rel=1e-6)
    # Padding gets no gradient; the teacher none at all.
    gz, gh = torch.autograd.grad(loss, (zs, hs))
    assert gz[1, 4].abs().max() == 0 and gh[1, 4].abs().max() == 0 and gz[0, 0].abs().max() > 0

    # masked_only: KD over the two masked tokens only.
    _, logs_m = distillation_loss(zs, zt, hs, ht, labels, mask, masked_only=True)
    sel = labels != -100
    assert logs_m["kd"].item() == pytest.approx(kd_kl(zs[sel], zt[sel], 2.0).item(), rel=1e-9)


def test_layer_map_is_tinybert_uniform():
    assert layer_map(6, 3) == [2, 4, 6] and layer_map(12, 6) == [2, 4, 6, 8, 10, 12]
    assert layer_map(4, 4) == [1, 2, 3, 4] and layer_map(6, 1) == [6] and layer_map(5, 2) == [2, 5]
    for n, k in ((0, 1), (3, 0), (3, 4)):
        with pytest.raises(ValueError, match="student_layers: expected 1 to"):
            layer_map(n, k)


def test_hidden_state_mse_by_hand_and_in_the_objective():
    """delta * the mean over layer pairs of the squared error over real tokens and hidden units; padding gets
    no gradient; an all-padding batch is 0 (not NaN); with delta = 0 the objective is unchanged."""
    b, s, v, d = 2, 5, 7, 4
    zs, zt, hs, ht = _student_teacher(b, s, v, d)
    torch.manual_seed(1)
    ss = [torch.randn(b, s, d, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    ts = [torch.randn(b, s, d, dtype=torch.float64) for _ in range(3)]
    labels = torch.full((b, s), -100)
    labels[0, 1] = 3
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 3:] = False
    by_hand = 0.0
    for a, t in zip(ss, ts):
        rows = [((a[i, j] - t[i, j]) ** 2).mean().item() for i in range(b) for j in range(s) if mask[i, j]]
        by_hand += sum(rows) / len(rows) / 3
    assert hidden_state_mse(ss, ts, mask).item() == pytest.approx(by_hand, rel=1e-12)
    base, base_logs = distillation_loss(zs, zt, hs, ht, labels, mask)
    loss, logs = distillation_loss(
        zs, zt, hs, ht, labels, mask, delta=0.5, student_states=ss, teacher_states=ts
    )
    assert logs["hid"].item() == pytest.approx(by_hand, rel=1e-12) and "hid" not in base_logs
    assert loss.item() == pytest.approx(base.item() + 0.5 * by_hand, rel=1e-12)
    grads = torch.autograd.grad(loss, ss)
    assert all(g[1, 3:].abs().max() == 0 and g[0].abs().max() > 0 for g in grads)
    none = torch.zeros(b, s, dtype=torch.bool)
    assert hidden_state_mse(ss, ts, none).item() == 0.0
    with pytest.raises(ValueError, match="student_states, teacher_states: required when delta"):
        distillation_loss(zs, zt, hs, ht, labels, mask, delta=1.0)
    with pytest.raises(ValueError, match="teacher_states: expected one per student state"):
        hidden_state_mse(ss, ts[:2], mask)
    with pytest.raises(ValueError, match="the per-layer loss needs equal shapes"):
        hidden_state_mse(ss[:1], [torch.randn(b, s, d + 1)], mask)


def test_relation_kl_by_hand():
    """One relation head, d = 1, two tokens: the student's x = (1, 0) gives relation rows softmax(1, 0) and
    softmax(0, 0); the teacher's x = (0, 0) uniform rows. KL(uniform || softmax(1, 0)) = log((e + 1) / 2) - 1/2,
    the second row 0; the mean over the two query rows, and the same for Q, K and V."""
    xs = torch.tensor([[[1.0], [0.0]]], dtype=torch.float64)
    xt = torch.zeros(1, 2, 1, dtype=torch.float64)
    by_hand = (math.log((math.e + 1) / 2) - 0.5) / 2
    assert relation_kl([xs] * 3, [xt] * 3, heads=1).item() == pytest.approx(by_hand, rel=1e-12)
    assert relation_kl([xs], [xs], heads=1).item() == pytest.approx(0.0, abs=1e-15)


def test_relation_kl_heads_padding_and_sizes_by_loops():
    """MiniLMv2's relations with 2 heads, a padded row and different hidden sizes (student 4, teacher 6:
    relation heads of 2 and 3), against a loop over batch, head and query; padding gets no gradient; all
    padding is 0, not NaN; in the objective it adds relation * rel."""
    b, s, heads = 2, 4, 2
    torch.manual_seed(2)
    xs = [torch.randn(b, s, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    xt = [torch.randn(b, s, 6, dtype=torch.float64) for _ in range(3)]
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 2:] = False

    def rel(x, i, h, q):  # one query's relation row over the real keys of sequence i, head h
        dr = x.shape[-1] // heads
        keys = [j for j in range(s) if mask[i, j]]
        scores = [float(x[i, q, h * dr : (h + 1) * dr] @ x[i, j, h * dr : (h + 1) * dr]) / math.sqrt(dr)
                  for j in keys]  # fmt: skip
        z = sum(math.exp(c) for c in scores)
        return [math.exp(c) / z for c in scores]

    by_hand = 0.0
    for a, t in zip(xs, xt):
        rows = []
        for i in range(b):
            for q in (q for q in range(s) if mask[i, q]):
                for h in range(heads):
                    ps, pt = rel(a.detach(), i, h, q), rel(t, i, h, q)
                    rows.append(sum(p * (math.log(p) - math.log(r)) for p, r in zip(pt, ps)))
        by_hand += sum(rows) / len(rows) / 3
    got = relation_kl(xs, xt, heads, mask)
    assert got.item() == pytest.approx(by_hand, rel=1e-10)
    grads = torch.autograd.grad(got, xs)
    assert all(g[1, 2:].abs().max() == 0 and g[0].abs().max() > 0 for g in grads)
    assert relation_kl(xs, xt, heads, torch.zeros(b, s, dtype=torch.bool)).item() == 0.0
    zs, zt, hs, ht = _student_teacher(b, s, 7, 4)
    labels = torch.full((b, s), -100)
    base, _ = distillation_loss(zs, zt, hs, ht, labels, mask)
    loss, logs = distillation_loss(zs, zt, hs, ht, labels, mask, relation=2.0, student_qkv=xs, teacher_qkv=xt,
                                   relation_heads=heads)  # fmt: skip
    assert logs["rel"].item() == pytest.approx(by_hand, rel=1e-10)
    assert loss.item() == pytest.approx(base.item() + 2 * by_hand, rel=1e-10)
    with pytest.raises(ValueError, match="relation_heads: required when relation"):
        distillation_loss(zs, zt, hs, ht, labels, mask, relation=1.0)
    with pytest.raises(ValueError, match="heads: expected a divisor of the hidden size 4, got 3"):
        relation_kl(xs, xt, 3, mask)
    with pytest.raises(ValueError, match="teacher_qkv: expected one per student projection"):
        relation_kl(xs, xt[:1], heads, mask)
    with pytest.raises(ValueError, match=r"teacher_qkv: expected the student's \(batch, seq\)"):
        relation_kl(xs[:1], [torch.randn(b, s + 1, 6)], heads)


def test_distillation_loss_errors_and_edge_cases():
    z = torch.randn(1, 3, 5)
    h = torch.randn(1, 3, 4)
    labels = torch.full((1, 3), -100)
    loss, logs = distillation_loss(z, z, h, h, labels)  # nothing masked: MLM term is 0, not NaN
    assert torch.isfinite(loss) and logs["mlm"].item() == 0.0
    assert mlm_loss(z.requires_grad_(), labels).item() == 0.0
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(z, torch.randn(1, 3, 6), h, h, labels)
    with pytest.raises(ValueError, match="teacher_hidden: the cosine loss needs equal hidden sizes"):
        distillation_loss(z, z, h, torch.randn(1, 3, 8), labels)


@pytest.mark.parametrize("alpha, beta, masked_only", [(2.0, 5.0, False), (2.0, 5.0, True), (2.0, 0.0, False),
                                                      (0.0, 5.0, True), (0.0, 0.0, False)])  # fmt: skip
def test_distillation_loss_on_logit_rows_equals_full_logits(alpha, beta, masked_only):
    """Issue 29: logits computed only at `logit_positions` give the loss and gradients of the full logits."""
    b, s, v, d = 3, 6, 11, 4
    zs, zt, hs, ht = _student_teacher(b, s, v, d)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[2, 3:] = False
    labels = torch.where(
        (torch.rand(b, s) < 0.4) & mask, torch.randint(0, v, (b, s)), torch.full((b, s), -100)
    )
    kw = dict(alpha=alpha, beta=beta, masked_only=masked_only)
    ref, ref_logs = distillation_loss(zs, zt, hs, ht, labels, mask, **kw)
    at = logit_positions(labels, mask, **kw)
    real, masked = mask, labels != -100
    kd = masked if masked_only else real
    assert torch.equal(at[1], kd if beta else torch.zeros_like(mask))
    assert torch.equal(at[0], (masked if alpha else torch.zeros_like(mask)) | at[1])
    loss, logs = distillation_loss(
        zs[at[0]], zt[at[1]] if beta else None, hs, ht, labels, mask, positions=at, **kw
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert logs.keys() == ref_logs.keys() and all(
        logs[k].item() == pytest.approx(ref_logs[k].item()) for k in logs
    )
    g = torch.autograd.grad(loss, (zs, hs), allow_unused=True, materialize_grads=True)
    r = torch.autograd.grad(ref, (zs, hs), allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-15)
    # Rows that do not cover what the weights read are refused, naming the argument.
    if alpha or beta:
        with pytest.raises(ValueError, match="student_logits: expected"):
            distillation_loss(
                zs[at[0]][1:], zt[at[1]] if beta else None, hs, ht, labels, mask, positions=at, **kw
            )
        with pytest.raises(ValueError, match="positions: must cover"):
            none = torch.zeros_like(mask)
            distillation_loss(zs[none], None, hs, ht, labels, mask, positions=(none, none), **kw)
