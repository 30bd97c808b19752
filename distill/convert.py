"""`etkd convert`: a pretrained full-attention checkpoint -> an efficient long-sequence one (paper §3.1).

    etkd convert --from roberta-dir --to longformer --max-positions 4096 --window 512 --out long-dir

--from takes an etkd checkpoint dir, an HF checkpoint dir or an HF hub name. The result is written in the
etkd format (config.json + model.safetensors), or with --format hf as the matching transformers class, or with
--format hf-attention as the BERT/RoBERTa class whose config selects an `etkd_*` attn_implementation, or with
the pattern's own checkpoint format where it has one (`--format` lists them). The flags of each pattern's
settings are its registry entry's `options` (models/patterns/<name>.py, where each conversion is described).
The source's tokenizer is saved next to it (its model_max_length raised to the new length), so the next
command (`pretrain`, `distill`, `finetune`) finds it.
"""

from __future__ import annotations

import argparse
import inspect
import os

from etkd.models import patterns

from .core import load_tokenizer, log, special_token_ids
from .errors import UserError
from .hub import TOKENIZER_FILES, resolve_pretrained


def pattern_options() -> dict[str, tuple]:
    """`convert` keyword -> (its default, the patterns that take it, its `Option`): every registered pattern's
    `options`, in registry order (a keyword several patterns share is one flag)."""
    from etkd.models import convert

    params = inspect.signature(convert).parameters
    out: dict[str, tuple] = {}
    for p in patterns.PATTERNS.values():
        for name, option in p.options.items():
            if name not in params:
                raise ValueError(
                    f"pattern {p.name!r}: option {name!r} is not a keyword of etkd.models.convert"
                )
            default, users, first = out.get(name, (params[name].default, [], option))
            out[name] = (default, [*users, p.name], first)
    return out


def own_formats() -> dict[str, tuple[str, str]]:
    """`--format` name -> (the pattern it writes, what it is): the patterns' own checkpoint formats."""
    return {p.save_format: (p.name, p.save_format_help) for p in patterns.PATTERNS.values() if p.save_format}


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a full-attention encoder to an efficient-attention one")
    p.add_argument("--from", dest="source", required=True, help="etkd dir, HF checkpoint dir or HF hub name")
    p.add_argument("--to", required=True, choices=patterns.names())
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-positions", type=int, default=4096, help="longest input after conversion (tokens)")
    for name, (default, users, option) in pattern_options().items():
        kind = (
            {"action": argparse.BooleanOptionalAction}
            if isinstance(default, bool)
            else {"type": option.type or type(default)}
        )
        p.add_argument("--" + name.replace("_", "-"), default=default, choices=option.choices,
                       help=f"{' / '.join(users)}: {option.help}", **kind)  # fmt: skip
    p.add_argument(
        "--format",
        default="etkd",
        choices=("etkd", "hf", "hf-attention", *own_formats()),
        help="output format: etkd, hf (the matching transformers class), hf-attention (the BERT/RoBERTa class with "
        "attn_implementation='etkd_...' in its config; load after `import etkd.hf`)"
        + "".join(f", {fmt} ({what})" for fmt, (_, what) in own_formats().items()),
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer to save with the result (default: the source's)"
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bars"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from etkd.models import convert, load, to_hf

    source = resolve_pretrained(args.source, "--from")
    tokenizer = None
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    elif not os.path.isdir(source) or any(os.path.isfile(os.path.join(source, f)) for f in TOKENIZER_FILES):
        tokenizer = load_tokenizer(source, "--from")
    formats = own_formats()
    if args.format in formats and args.to != formats[args.format][0]:
        raise UserError(
            f"--format {args.format}: writes {formats[args.format][0]} models; --to is {args.to!r}"
        )
    try:
        model = load(source)
    except ValueError as exc:  # a checkpoint of a model etkd does not reproduce
        raise UserError(f"--from: {exc}") from None
    pattern = patterns.get(args.to)
    settings = {name: getattr(args, name) for name in pattern.options}  # the flags of this pattern
    if pattern.convert_tokens:
        if tokenizer is None:
            raise UserError(f"--to {args.to}: needs the tokenizer ({pattern.convert_tokens})")
        settings.update(special_token_ids(tokenizer))
    try:
        new = convert(model, args.to, args.max_positions, **settings)
    except ValueError as exc:  # the model library names the argument (window, block size, ...)
        raise UserError(f"convert: {exc}") from None
    if args.format in formats:
        new.save_pretrained(args.out, format=args.format)
    elif args.format == "hf":
        from etkd.models.encoder import apply_umask

        try:
            hf_model = to_hf(new)
        except ValueError as exc:  # no transformers class holds this model (pattern, positions, norm)
            raise UserError(
                f"--format hf: {exc}; --format etkd writes any model (hf-attention: a BERT/RoBERTa class on etkd.hf)"
            ) from None
        hf_model.save_pretrained(args.out)
        apply_umask(args.out)
    elif args.format == "hf-attention":
        from etkd.hf import save_hf_attention, to_hf_attention

        try:
            hf_model = to_hf_attention(new)
        except ValueError as exc:
            raise UserError(f"--format hf-attention: {exc}") from None
        save_hf_attention(hf_model, args.out)
    else:
        new.save_pretrained(args.out)
    cfg = new.config
    if tokenizer is not None:
        tokenizer.model_max_length = cfg.max_tokens
        tokenizer.save_pretrained(args.out)
    else:
        log.warning(
            "--from %s has no tokenizer: give --tokenizer to the commands that use %s", source, args.out
        )
    print(
        f"converted {args.source} -> {args.out}: attention={cfg.attention}, {cfg.num_layers} layers, "
        f"up to {cfg.max_tokens} tokens ({args.format} format)"
    )
    return 0
