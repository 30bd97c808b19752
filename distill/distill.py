"""`etkd distill`: task-agnostic DistilBERT-style KD (paper 1, Appendix B).

The teacher is frozen (eval, no grad); the student is `make_student(teacher)` (every other layer) or a
given checkpoint, optionally converted to another attention pattern / length. Loss:
alpha * MLM + beta * T^2 * KL(soft targets) + gamma * cosine(last hidden states), defaults 2, 5, 1, T = 2;
--delta adds TinyBERT's per-layer hidden-state MSE (student layer j vs teacher layer j * n / k; default 0);
--relation adds MiniLMv2's self-attention relation KL (Q-Q, K-K, V-V relations of teacher layer --relation-layer,
default the last, and of the student's last layer, in --relation-heads heads; default 0).
The cosine-only variant (--alpha 0 --beta 0) needs no MLM head and sees the text unmasked.

    etkd distill --teacher roberta-long/ --data oscar/ bookcorpus/ --long-fraction 0.3 \
        --output-dir runs/kd --max-steps 100000 --batch-size 8 --grad-accum-steps 4 --mixed-precision bf16
    etkd distill --teacher bert/ --student-attention longformer --student-max-positions 4096 ...

A teacher with fewer positions than the student sees long blocks in consecutive chunks of its own length.
The student is saved to OUTPUT_DIR/student (our format) and OUTPUT_DIR/student-hf where HF has a class.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from etkd.models import patterns
from etkd.models.encoder import TOKEN_HEADS

from .config import add_config_arg, finish, resolve
from .core import (
    MLM_DEFAULTS,
    add_mlm_run_args,
    check_vocab,
    load_model,
    log,
    prepare_model,
    require_mlm_head,
    special_token_ids,
    tokenizer_for,
    train_mlm,
)
from .errors import UserError
from .losses import distillation_loss, layer_map, logit_positions

STUDENT_DEFAULTS = {
    "teacher": None,
    "student": None,
    "student_layers": "every_other",
    "student_attention": None,
    "student_max_positions": None,
    "student_window": 512,
    "student_block_size": 64,
    "student_num_landmarks": 64,
}
DEFAULTS = {**MLM_DEFAULTS, **STUDENT_DEFAULTS, "alpha": 2.0, "beta": 5.0, "gamma": 1.0, "delta": 0.0,
            "relation": 0.0, "relation_heads": None, "relation_layer": None, "temperature": 2.0,
            "kd_masked_only": False, "teacher_precision": None}  # fmt: skip
# mlm_probability None: 0.15 when a term reads masked tokens (alpha or beta > 0), else 0 (see `run`).
DEFAULTS.update(output_dir="runs/distill", learning_rate=5e-4, warmup_ratio=0.05, mlm_probability=None)


def add_student_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher", default=None, help="teacher checkpoint dir (ours or HF)")
    g.add_argument("--student", default=None, help="student checkpoint dir (default: make_student(teacher))")
    g.add_argument("--student-layers", dest="student_layers", default=None,
                   help="'every_other' (0,2,4,...), 'spread' (half the layers from the first to the last, as "
                   "DistilBERT: 0,2,4,7,9,11 of 12) or comma-separated teacher layer indices, e.g. 0,2,4")  # fmt: skip
    g.add_argument("--student-attention", dest="student_attention", default=None,
                   choices=patterns.names(),
                   help="convert the student to this attention pattern")  # fmt: skip
    g.add_argument("--student-max-positions", dest="student_max_positions", type=int, default=None)
    g.add_argument("--student-window", dest="student_window", type=int, default=None)
    g.add_argument("--student-block-size", dest="student_block_size", type=int, default=None)
    g.add_argument("--student-num-landmarks", dest="student_num_landmarks", type=int, default=None)


def parse_layers(value) -> str | list[int]:
    if isinstance(value, list):
        return [int(i) for i in value]
    if value in ("every_other", "spread"):
        return value
    try:
        return [int(i) for i in str(value).split(",") if i.strip()]
    except ValueError:
        raise UserError(
            f"--student-layers: expected 'every_other', 'spread' or indices like 0,2,4, got {value!r}"
        ) from None


def spread_layers(num_layers: int) -> list[int]:
    """Half the teacher's layers (as many as 'every_other'), evenly spread from the first to the LAST:
    round(i (n - 1) / (k - 1)). For 12 layers this is DistilBERT's own choice, 0, 2, 4, 7, 9, 11 (its
    extraction script keeps the top layer, whose output the cosine term aligns to); 6 -> 0, 2, 5; 4 -> 0, 3."""
    k = (num_layers + 1) // 2
    return [0] if k == 1 else [round(i * (num_layers - 1) / (k - 1)) for i in range(k)]


def student_layers(value, num_layers: int) -> str | list[int]:
    """--student-layers for make_student: 'spread' resolved for this teacher depth."""
    value = parse_layers(value)
    return spread_layers(num_layers) if value == "spread" else value


def build_student(teacher, ns: argparse.Namespace, tokenizer=None):
    """--student, else make_student(teacher, layers); then convert if an attention/length is asked for
    (with the tokenizer's special-token ids, for a pattern whose conversion needs them: `convert_tokens`)."""
    from etkd.models import convert, make_student

    student = (
        load_model(ns.student, "--student")
        if ns.student
        else make_student(teacher, student_layers(ns.student_layers, teacher.config.num_layers))
    )
    if ns.student_attention or ns.student_max_positions:
        student = convert(
            student,
            to=ns.student_attention or student.config.attention,
            max_positions=ns.student_max_positions or student.config.max_tokens,
            window=ns.student_window,
            block_size=ns.student_block_size,
            num_landmarks=ns.student_num_landmarks,
            **(special_token_ids(tokenizer) if tokenizer is not None else {}),
        )
    return student


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="task-agnostic DistilBERT-style KD into a half-depth student",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_config_arg(p)
    add_student_args(p)
    g = p.add_argument_group("loss")
    g.add_argument("--alpha", type=float, default=None, help="MLM weight (2.0)")
    g.add_argument("--beta", type=float, default=None, help="soft-target KL weight (5.0)")
    g.add_argument("--gamma", type=float, default=None, help="hidden-state cosine weight (1.0)")
    g.add_argument("--delta", type=float, default=None,
                   help="per-layer hidden-state MSE weight (0: off): student layer j learns teacher layer "
                   "round(j n / k) of n, as TinyBERT (needs equal hidden sizes)")  # fmt: skip
    g.add_argument("--relation", type=float, default=None,
                   help="self-attention relation KL weight (0: off): MiniLMv2's Q-Q, K-K and V-V scaled dot-product "
                   "relations of the student's last layer learn those of teacher layer --relation-layer")  # fmt: skip
    g.add_argument("--relation-heads", dest="relation_heads", type=int, default=None,
                   help="relation heads (default: the teacher's attention heads); must divide both hidden sizes")  # fmt: skip
    g.add_argument("--relation-layer", dest="relation_layer", type=int, default=None,
                   help="the teacher layer (1-based) whose relations the student's last layer learns (default: "
                   "the last; MiniLMv2 takes an upper-middle layer of large teachers)")  # fmt: skip
    g.add_argument("--temperature", type=float, default=None, help="softmax temperature (2.0)")
    g.add_argument("--kd-masked-only", dest="kd_masked_only", action="store_true", default=None,
                   help="soft-target loss on masked tokens only (default: every real token)")  # fmt: skip
    g.add_argument("--teacher-precision", dest="teacher_precision", choices=("fp32", "bf16"), default=None,
                   help="the frozen teacher's precision: bf16 autocast, or fp32 (default: the run's, "
                   "--mixed-precision)")  # fmt: skip
    add_mlm_run_args(p, "--teacher")
    finish(p, DEFAULTS, func=run)


def teacher_forward(teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    positions: torch.Tensor | None = None, precision: str | None = None,
                    layers: list[int] | None = None):  # fmt: skip
    """The frozen teacher: (vocabulary logits at `positions` (b, s) bool as (n, v) rows, or None when
    `positions` is None; last hidden states (b, s, d); the hidden states after each layer of `layers` (indices
    of its hidden_states: 0 = embeddings, i = layer i's output), a tuple of (b, s, d), empty without). Runs under `torch.inference_mode` (no autograd
    bookkeeping); `precision` "bf16" runs it in bf16 autocast, "fp32" without autocast, None as the surrounding
    code runs (the training's --mixed-precision). Sequences longer than the teacher's position table
    are run in consecutive chunks of its length (each chunk sees only itself)."""
    limit = teacher.config.max_tokens
    autocast = (
        contextlib.nullcontext()  # the run's own precision (--mixed-precision's autocast, if any)
        if precision is None
        else torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    )
    with torch.inference_mode(), autocast:
        chunks = [teacher.encoder(input_ids=input_ids[:, start : start + limit],
                                  attention_mask=attention_mask[:, start : start + limit],
                                  output_hidden_states=bool(layers))
                  for start in range(0, input_ids.shape[1], limit)]  # fmt: skip
        hidden = torch.cat([c.last_hidden_state for c in chunks], 1)
        states = tuple(torch.cat([c.hidden_states[i] for c in chunks], 1) for i in layers or ())
        logits = None if positions is None else teacher.logits_at(hidden, positions)
    # Outside inference mode the loss may save what it computes from these for its backward: plain tensors.
    return (None if logits is None else logits.clone()), hidden.clone(), tuple(t.clone() for t in states)


def layer_qkv(model, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value projections (each (b, s, d)) that layer `index` (0-based) of `model` computes
    from its input x (b, s, d) (hidden_states[index]; LayerNorm'd first in a pre-norm model, as the layer does)."""
    layer = getattr(model, "module", model).encoder.layers[index]
    if layer.pre_norm:
        x = layer.norm1(x)
    b, s, d = x.shape
    return tuple(t.transpose(1, 2).reshape(b, s, d) for t in layer.attn.projections(x))  # heads back together


def make_loss(teacher, ns: argparse.Namespace, layers: list[int] | None = None):
    """The step `train` calls: vocabulary logits only where a loss term reads them (`logit_positions`): the
    student's at the masked tokens (and where the KL reads them), the teacher's only when beta > 0. With
    ns.delta, `layers` are the teacher hidden states student layers 1..k learn (`layer_map`). With ns.relation,
    the student's last layer's Q/K/V relations learn those of teacher layer ns.relation_layer (1-based, set)."""
    weights = dict(alpha=ns.alpha, beta=ns.beta, gamma=ns.gamma, temperature=ns.temperature)
    delta = getattr(ns, "delta", 0.0)
    if delta and not layers:
        raise ValueError("layers: required when delta is not 0 (layer_map(teacher layers, student layers))")
    relation = getattr(ns, "relation", 0.0)
    at_layer, heads = getattr(ns, "relation_layer", None), getattr(ns, "relation_heads", None)
    if relation and not (at_layer and heads):
        raise ValueError(
            "ns.relation_layer, ns.relation_heads: required when relation is not 0 (check_relation)"
        )
    # The teacher's hidden states to return: delta's, then the input of the relation layer.
    wanted = (list(layers) if delta else []) + ([at_layer - 1] if relation else [])
    precision = getattr(ns, "teacher_precision", None)

    def step(student, batch):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        at = logit_positions(labels, mask, alpha=ns.alpha, beta=ns.beta, masked_only=ns.kd_masked_only)
        # A student without a token-level head (the cosine-only variant of a bare encoder) computes no logits.
        token_head = getattr(student, "module", student).config.head in TOKEN_HEADS
        out = student(input_ids=ids, attention_mask=mask, head_positions=at[0] if token_head else None,
                      output_hidden_states=bool(delta or relation))  # fmt: skip
        t_logits, t_hidden, t_states = teacher_forward(teacher, ids, mask, at[1] if ns.beta else None, precision,
                                                       wanted)  # fmt: skip
        s_qkv = t_qkv = None
        if relation:  # the student's last layer, from its input; the teacher's relation layer, frozen
            s_qkv = layer_qkv(student, len(out.hidden_states) - 2, out.hidden_states[-2])
            with torch.no_grad():
                t_qkv = layer_qkv(teacher, at_layer - 1, t_states[-1])
        return distillation_loss(out.logits, t_logits, out.last_hidden_state, t_hidden, labels, mask,
                                 masked_only=ns.kd_masked_only, positions=at, delta=delta,
                                 student_states=out.hidden_states[1:] if delta else None,
                                 teacher_states=t_states[: len(layers)] if delta else None, relation=relation,
                                 student_qkv=s_qkv, teacher_qkv=t_qkv, relation_heads=heads,
                                 **weights)  # fmt: skip

    return step


def hidden_layer_map(teacher, student) -> list[int]:
    """`layer_map` for --delta, or a UserError naming what does not fit."""
    t, s = teacher.config, student.config
    if s.hidden_size != t.hidden_size:
        raise UserError(f"--delta: the per-layer loss needs equal hidden sizes, student {s.hidden_size} vs "
                        f"teacher {t.hidden_size}; set --delta 0")  # fmt: skip
    if s.num_layers > t.num_layers:
        raise UserError(f"--delta: the student has more layers ({s.num_layers}) than the teacher "
                        f"({t.num_layers}); set --delta 0")  # fmt: skip
    return layer_map(t.num_layers, s.num_layers)


def check_relation(teacher, student, ns: argparse.Namespace) -> None:
    """--relation's layer and heads resolved for this teacher (defaults: its last layer, its attention heads),
    or a UserError naming the flag that does not fit."""
    t, s = teacher.config, student.config
    ns.relation_layer = ns.relation_layer or t.num_layers
    ns.relation_heads = ns.relation_heads or t.num_heads
    if not 1 <= ns.relation_layer <= t.num_layers:
        raise UserError(
            f"--relation-layer: expected a teacher layer 1 to {t.num_layers}, got {ns.relation_layer}"
        )
    for who, d in (("teacher", t.hidden_size), ("student", s.hidden_size)):
        if d % ns.relation_heads:
            raise UserError(f"--relation-heads: expected a divisor of the {who}'s hidden size {d}, got "
                            f"{ns.relation_heads}")  # fmt: skip
    if "lsg" in (s.attention, t.attention):
        raise UserError("--relation: an LSG model's layers also attend to its global tokens, which the relations "
                        "would leave out; set --relation 0")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    ns = resolve(args, DEFAULTS)
    if not ns.teacher:
        raise UserError("--teacher: required")
    teacher = load_model(ns.teacher, "--teacher")
    if teacher.config.head != "mlm" and ns.add_mlm_head and ns.beta > 0:
        log.warning("--teacher: its new MLM head is untrained, so the soft-target term (--beta) distils "
                    "noise; MLM-train the teacher first (`etkd pretrain --add-mlm-head`) or set --beta 0")  # fmt: skip
    if ns.mlm_probability is None:
        # The cosine-only variant reads no masked token: its input is the clean text. Masking it (15%, as the
        # MLM terms need) distils the teacher on corrupted text, and that does not carry over: MiniLM-L6's
        # 3-layer student after 100 such steps matched the teacher at cosine 0.90 on masked blocks but 0.68
        # on the same blocks unmasked (0.54 before distillation).
        ns.mlm_probability = MLM_DEFAULTS["mlm_probability"] if ns.alpha or ns.beta else 0.0
    elif ns.mlm_probability == 0 and (ns.alpha or (ns.beta and ns.kd_masked_only)):
        # 0 is meaningful for the cosine term and for a KL over every token (clean text); a term that reads
        # only masked tokens would read nothing.
        term = f"the MLM term (--alpha {ns.alpha:g})" if ns.alpha else "--kd-masked-only's soft-target term"
        raise UserError(f"--mlm-probability 0: {term} reads only masked tokens, and nothing would be masked; "
                        "give a value in (0, 1) (0.15 as BERT) or drop that term")  # fmt: skip
    if ns.alpha or ns.beta or ns.add_mlm_head:
        teacher = require_mlm_head(teacher, ns, "--teacher")
    # else the cosine-only variant (alpha = beta = 0): no vocabulary logits anywhere, so no MLM head needed;
    # the student keeps the teacher's head (or none) untouched.
    torch.manual_seed(ns.seed)
    tokenizer = tokenizer_for(ns, ns.teacher, ns.student)
    student = prepare_model(build_student(teacher, ns, tokenizer), ns)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise UserError(
            f"student vocab_size {student.config.vocab_size} != teacher vocab_size {teacher.config.vocab_size}"
        )
    if ns.backend:
        teacher.set_attention_backend(ns.backend)
    check_vocab(tokenizer, student)
    layers = None
    if ns.delta:
        layers = hidden_layer_map(teacher, student)
        log.info("--delta %g: student layers 1..%d learn teacher layers %s", ns.delta, len(layers), layers)
    if ns.relation:
        check_relation(teacher, student, ns)
        log.info("--relation %g: the student's last layer learns teacher layer %d's Q/K/V relations in %d heads",
                 ns.relation, ns.relation_layer, ns.relation_heads)  # fmt: skip
        longest = max(ns.short_length, ns.long_length if ns.long_fraction else 0)
        if longest > 1024:
            log.warning("--relation: the relations are (seq x seq) per relation head, whatever the attention "
                        "pattern, so %d-token blocks cost %.1f GB a batch for this term alone", longest,
                        3 * 2 * 4 * ns.per_device_batch_size * ns.relation_heads * longest**2 / 1e9)  # fmt: skip
    return train_mlm(ns, student, tokenizer, make_loss(teacher, ns, layers), "distill", "student",
                     ("step", "loss", "history"), extra_modules=(teacher,))  # fmt: skip
