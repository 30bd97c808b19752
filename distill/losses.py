"""Distillation losses.

Task-agnostic (Brown et al. 2023, Appendix B; DistilBERT): `distillation_loss` =
alpha * MLM + beta * T^2 * KL(teacher_T || student_T) + gamma * (1 - cos(h_s, h_t)), optionally
+ delta * the per-layer hidden-state MSE (TinyBERT; `layer_map` pairs the layers) and + relation * MiniLMv2's
self-attention relation KL (`relation_kl`: Q-Q, K-K, V-V scaled dot-product relations of one teacher layer and the
student's last layer, split into relation heads).

Task-specific (Dasgupta et al. 2023, eq. 8-9): `task_kd_loss` = lam * CE(y, f) + (1 - lam) * L_KD with
L_KD one of
- "taylor": eq. 8 as printed, KL(p_hat || f) + <y - p_hat, -log f>. Algebraically this is
  CE(y, f) - H(p_hat): the teacher only adds a constant, so it drops out of the gradient.
- "taylor-mse": the authors' first released loss, mean over classes of p_hat * (z_s - z_t - (y/p_hat - 1))^2
  on student/teacher logits; this one does carry the teacher.
- "kd": Hinton KD, T^2 * KL(p_hat_T || f_T).
- "ce": no teacher; L = CE(y, f).
Shapes: b = batch, s = seq, v = vocab, c = classes, d = hidden.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TASK_LOSSES = ("taylor", "taylor-mse", "kd", "ce")
IGNORE_INDEX = -100


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are reduced in fp32 (softmax over a vocab loses too much in bf16)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def platt_scale(t: torch.Tensor, center: float = 2.5) -> torch.Tensor:
    """STS-B-style real targets -> probabilities, p = 1 / (1 + exp(-(t - center))) (paper 2, Section 4)."""
    return torch.sigmoid(t - center)


def inverse_platt(p: torch.Tensor, center: float = 2.5) -> torch.Tensor:
    """Probability of the positive class back to the regression scale (for Pearson/Spearman)."""
    return torch.logit(p, eps=1e-6) + center


def soft_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(b,) class ids -> (b, c) one-hot; (b,) floats in [0, 1] -> (b, 2) [1 - p, p]; (b, c) -> itself."""
    if labels.dim() == 2:
        return labels if labels.is_floating_point() else labels.float()
    if labels.dtype.is_floating_point:
        if num_classes != 2:
            raise ValueError(f"labels: probability targets need num_classes == 2, got {num_classes}")
        p = labels
        return torch.stack([1 - p, p], dim=-1)
    return F.one_hot(labels.long(), num_classes).float()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -<y, log softmax(logits)>; logits (b, c), target (b, c) probabilities."""
    return -(target * F.log_softmax(_upcast(logits), dim=-1)).sum(-1).mean()


def kd_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), summed over classes, mean over rows. (n, c) inputs."""
    t = temperature
    log_f = F.log_softmax(_upcast(student_logits) / t, dim=-1)
    log_p = F.log_softmax(_upcast(teacher_logits) / t, dim=-1)
    return (log_p.exp() * (log_p - log_f)).sum(-1).mean() * t * t


def taylor_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Eq. 8 as printed: KL(p_hat || f) + <y - p_hat, -log f>, mean over the batch (x T^2 when T != 1).

    Equals CE(y, f) - H(p_hat) exactly, so its gradient w.r.t. the student is that of CE(y, f).
    """
    t = temperature
    log_f = F.log_softmax(_upcast(student_logits) / t, dim=-1)
    log_p = F.log_softmax(_upcast(teacher_logits) / t, dim=-1)
    p = log_p.exp()
    kl = (p * (log_p - log_f)).sum(-1)
    taylor = ((target - p) * -log_f).sum(-1)
    return (kl + taylor).mean() * t * t


def taylor_mse(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The authors' first released loss: mean over classes and batch of p_hat (z_s - z_t - (y / p_hat - 1))^2.

    p_hat = softmax(z_t) is clamped at `eps` so y / p_hat stays finite for a confident, wrong teacher.
    """
    zs, zt = _upcast(student_logits), _upcast(teacher_logits)
    p = F.softmax(zt, dim=-1).clamp_min(eps)
    return (p * (zs - zt - (target / p - 1)) ** 2).mean()


def task_kd_loss(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    lam: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = lam * CE(y, f) + (1 - lam) * L_KD (eq. 9). student/teacher logits (b, c); labels (b,) ids,
    (b,) probabilities (Platt-scaled, 2 classes) or (b, c) distributions. Returns (loss, logs)."""
    if name not in TASK_LOSSES:
        raise ValueError(f"loss: expected one of {TASK_LOSSES}, got {name!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda: expected a value in [0, 1], got {lam}")
    y = soft_targets(labels, student_logits.shape[-1]).to(student_logits.device)
    ce = soft_cross_entropy(student_logits, y)
    if name == "ce":
        return ce, {"ce": ce.detach()}
    if teacher_logits is None:
        raise ValueError(f"loss {name!r} needs teacher logits")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits: expected the student's shape {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    teacher_logits = teacher_logits.detach()
    if name == "taylor":
        kd = taylor_kd(student_logits, teacher_logits, y, temperature)
    elif name == "taylor-mse":
        kd = taylor_mse(student_logits, teacher_logits, y)
    else:
        kd = kd_kl(student_logits, teacher_logits, temperature)
    loss = lam * ce + (1 - lam) * kd
    return loss, {"ce": ce.detach(), "kd": kd.detach()}


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy over positions whose label is not -100. logits (b, s, v) and labels (b, s), or rows:
    logits (n, v) and labels (n,)."""
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # keeps the graph (and DDP) happy on a batch with nothing masked
    return F.cross_entropy(_upcast(logits.flatten(0, -2)), labels.flatten(), ignore_index=IGNORE_INDEX)


def logit_positions(
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    alpha: float = 2.0,
    beta: float = 5.0,
    masked_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where `distillation_loss` reads vocabulary logits: (student, teacher), each (b, s) bool.

    The MLM term reads the student at the masked tokens; the KL term reads student and teacher at every real
    token (the masked ones only with `masked_only`). A term whose weight is 0 reads nothing, so with
    alpha = beta = 0 neither model needs its vocabulary head at all.
    """
    real = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    masked = (labels != IGNORE_INDEX) & real
    kd = masked if masked_only else real
    none = torch.zeros_like(real)
    teacher = kd if beta else none
    return (masked if alpha else none) | teacher, teacher


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """TinyBERT's uniform layer mapping: student layer j (1-based) learns the output of teacher layer
    round(j * n / k), for n teacher and k student layers; 6 -> 3 gives [2, 4, 6], 12 -> 6 [2, 4, ..., 12]. The
    last student layer always maps to the last teacher layer (the one the cosine term reads)."""
    n, k = teacher_layers, student_layers
    if not 1 <= k <= n:
        raise ValueError(f"student_layers: expected 1 to {n} (the teacher's layers), got {k}")
    return [round(j * n / k) for j in range(1, k + 1)]


def _paired_real_rows(
    student, teacher, arg: str, each: str, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The (b, s) bool mask of real tokens for a per-pair loss over `student` and `teacher` (lists of (b, s, ...)
    tensors, one teacher tensor per student one, at least one; `arg` and `each` name them in the error)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"{arg}: expected one per {each} ({len(student)}), got {len(teacher)}")
    first = student[0]
    if attention_mask is None:
        return torch.ones(first.shape[:2], dtype=torch.bool, device=first.device)
    return attention_mask.bool()


def hidden_state_mse(
    student_states: list[torch.Tensor] | tuple[torch.Tensor, ...],
    teacher_states: list[torch.Tensor] | tuple[torch.Tensor, ...],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-layer hidden-state loss (TinyBERT, eq. 8 without the projection: equal hidden sizes): the mean
    over the layer pairs of the squared error averaged over the real tokens and the hidden size. States are
    the already mapped pairs, each (b, s, d); attention_mask (b, s), True/1 = real token."""
    real = _paired_real_rows(
        student_states, teacher_states, "teacher_states", "student state", attention_mask
    )
    terms = []
    for hs, ht in zip(student_states, teacher_states):
        if hs.shape != ht.shape:
            raise ValueError(f"teacher_states: the per-layer loss needs equal shapes, student {tuple(hs.shape)} "
                             f"vs teacher {tuple(ht.shape)}")  # fmt: skip
        a, b = _upcast(hs[real]), _upcast(ht.detach()[real])
        terms.append(F.mse_loss(a, b) if a.numel() else hs.sum() * 0.0)
    return torch.stack(terms).mean()


def attention_relations(
    x: torch.Tensor, heads: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MiniLMv2's self-attention relations of one projection (queries, keys or values) x (b, s, d): split into
    `heads` relation heads of d / heads, log softmax(x_h x_h^T / sqrt(d / heads)) over the keys, (b, heads, s, s)
    log-probabilities; padded keys (attention_mask (b, s) False) get probability 0."""
    b, s, d = x.shape
    if heads < 1 or d % heads:
        raise ValueError(f"heads: expected a divisor of the hidden size {d}, got {heads}")
    xh = _upcast(x).view(b, s, heads, d // heads).transpose(1, 2)  # (b, r, s, d_r)
    scores = xh @ xh.transpose(-1, -2) / math.sqrt(d // heads)
    if attention_mask is not None:  # the most negative float, not -inf: a masked key's 0 * log 0 stays 0
        scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_kl(
    student_qkv: list[torch.Tensor] | tuple[torch.Tensor, ...],
    teacher_qkv: list[torch.Tensor] | tuple[torch.Tensor, ...],
    heads: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLMv2 (Wang et al. 2021, eq. 4-5): for each pair of projections (the student's and the teacher's
    queries, keys, values: (b, s, d_s) and (b, s, d_t), hidden sizes may differ), KL(R_t || R_s) between their
    `attention_relations` with the same number of relation heads, summed over the keys and averaged over the
    relation heads and the real query tokens; the mean over the pairs. attention_mask (b, s), True/1 = real."""
    real = _paired_real_rows(student_qkv, teacher_qkv, "teacher_qkv", "student projection", attention_mask)
    terms = []
    for xs, xt in zip(student_qkv, teacher_qkv):
        if xs.shape[:2] != xt.shape[:2]:
            raise ValueError(f"teacher_qkv: expected the student's (batch, seq) {tuple(xs.shape[:2])}, got "
                             f"{tuple(xt.shape[:2])}")  # fmt: skip
        log_s = attention_relations(xs, heads, real)
        log_t = attention_relations(xt.detach(), heads, real)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (b, r, s): one value per head and query
        rows = kl.transpose(1, 2)[real]  # (n real queries, r)
        terms.append(rows.mean() if rows.numel() else xs.sum() * 0.0)
    return torch.stack(terms).mean()


def distillation_loss(
    student_logits: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    alpha: float = 2.0,
    beta: float = 5.0,
    gamma: float = 1.0,
    temperature: float = 2.0,
    masked_only: bool = False,
    positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    delta: float = 0.0,
    student_states: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
    teacher_states: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
    relation: float = 0.0,
    student_qkv: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
    teacher_qkv: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
    relation_heads: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DistilBERT objective (paper 1, Appendix B): alpha * MLM + beta * KD + gamma * cosine, plus (delta > 0)
    TinyBERT's per-layer hidden-state MSE `hidden_state_mse(student_states, teacher_states)` (the states
    paired by `layer_map`), plus (relation > 0) MiniLMv2's `relation_kl(student_qkv, teacher_qkv,
    relation_heads)` (the Q, K, V projections of the student's last layer and of one teacher layer).

    logits (b, s, v) (None when alpha = beta = 0), hidden (b, s, d), labels (b, s) with -100 on unmasked
    tokens, attention_mask (b, s)
    (True/1 = real token). KD is T^2 * KL(softmax(t/T) || softmax(s/T)) summed over the vocab and averaged
    over real tokens (masked ones only with `masked_only`); cosine is mean(1 - cos(h_s, h_t)) over real
    tokens. Returns (loss, logs with each term).

    positions: `logit_positions(...)`'s (student, teacher) masks when the logits were computed only there:
    student_logits is then (n, v) = full_student_logits[student], teacher_logits (m, v) =
    full_teacher_logits[teacher] (None when beta = 0). The loss is the same as from the full logits, up to
    float summation order.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"teacher_hidden: the cosine loss needs equal hidden sizes, student {tuple(student_hidden.shape)} "
            f"vs teacher {tuple(teacher_hidden.shape)} (set gamma=0 to drop it)"
        )
    real = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    kd_sel = (labels != IGNORE_INDEX) & real if masked_only else real
    if not (alpha or beta):  # the cosine-only variant: no logits read (student_logits may be None)
        row_labels = s_kd = t_kd = None
    elif student_logits is None:
        raise ValueError(f"student_logits: required when alpha ({alpha}) or beta ({beta}) is not 0")
    elif positions is None:
        if beta and (teacher_logits is None or student_logits.shape != teacher_logits.shape):
            raise ValueError(
                f"teacher_logits: expected the student's shape {tuple(student_logits.shape)} (same vocab and "
                f"sequence), got {None if teacher_logits is None else tuple(teacher_logits.shape)}"
            )
        row_labels, s_kd = labels, student_logits[kd_sel]
        t_kd = teacher_logits[kd_sel] if beta else None
    else:
        s_pos, t_pos = positions
        want_s, want_t = logit_positions(labels, real, alpha=alpha, beta=beta, masked_only=masked_only)
        if (want_s & ~s_pos).any() or (want_t & ~t_pos).any():
            raise ValueError(
                "positions: must cover logit_positions(labels, attention_mask, ...) of these weights"
            )
        if student_logits.shape[0] != int(s_pos.sum()):
            raise ValueError(f"student_logits: expected {int(s_pos.sum())} rows (one per True in positions[0]), "
                             f"got {tuple(student_logits.shape)}")  # fmt: skip
        if beta and (
            teacher_logits is None or teacher_logits.shape != (int(t_pos.sum()), student_logits.shape[-1])
        ):
            raise ValueError(f"teacher_logits: expected ({int(t_pos.sum())}, {student_logits.shape[-1]}) rows at "
                             f"positions[1], got {None if teacher_logits is None else tuple(teacher_logits.shape)}")  # fmt: skip
        row_labels, s_kd = labels[s_pos], student_logits[kd_sel[s_pos]]
        t_kd = teacher_logits[kd_sel[t_pos]] if beta else None
    logs: dict[str, torch.Tensor] = {}
    loss = student_hidden.new_zeros((), dtype=torch.float32)
    if alpha:
        mlm = mlm_loss(student_logits, row_labels)
        loss = loss + alpha * mlm
        logs["mlm"] = mlm.detach()
    if beta:
        kd = kd_kl(s_kd, t_kd.detach(), temperature) if s_kd.shape[0] else student_logits.sum() * 0.0
        loss = loss + beta * kd
        logs["kd"] = kd.detach()
    if gamma:
        hs, ht = _upcast(student_hidden[real]), _upcast(teacher_hidden.detach()[real])
        cos = (1 - F.cosine_similarity(hs, ht, dim=-1)).mean() if hs.numel() else student_hidden.sum() * 0.0
        loss = loss + gamma * cos
        logs["cos"] = cos.detach()
    if delta:
        if student_states is None or teacher_states is None:
            raise ValueError(f"student_states, teacher_states: required when delta ({delta}) is not 0")
        hid = hidden_state_mse(student_states, teacher_states, real)
        loss = loss + delta * hid
        logs["hid"] = hid.detach()
    if relation:
        if student_qkv is None or teacher_qkv is None or relation_heads is None:
            raise ValueError(
                f"student_qkv, teacher_qkv, relation_heads: required when relation ({relation}) is not 0"
            )
        rel = relation_kl(student_qkv, teacher_qkv, relation_heads, real)
        loss = loss + relation * rel
        logs["rel"] = rel.detach()
    return loss, logs
