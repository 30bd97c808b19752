"""`etkd convert`: a pretrained full-attention checkpoint -> an efficient long-sequence one (paper §3.1).

    etkd convert --from roberta-dir --to longformer --max-positions 4096 --window 512 --out long-dir

--from takes an etkd checkpoint dir, an HF checkpoint dir or an HF hub name. The result is written in the
etkd format (config.json + model.safetensors), or with --format hf as the matching transformers class, or with
--format hf-attention as the BERT/RoBERTa class whose config selects an `etkd_*` attn_implementation, or (--to lsg)
with --format lsg as lsg-converter's LSG checkpoint. --to lsg is lsg-converter's LSGConverter, weight for weight.
The source's tokenizer is saved next to it (its model_max_length raised to the new length), so the next
command (`pretrain`, `distill`, `finetune`) finds it.
"""

from __future__ import annotations

import argparse
import os

from etkd.models import patterns

from .core import load_tokenizer, log, lsg_token_ids
from .errors import UserError
from .hub import TOKENIZER_FILES, resolve_pretrained


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a full-attention encoder to an efficient-attention one")
    p.add_argument("--from", dest="source", required=True, help="etkd dir, HF checkpoint dir or HF hub name")
    p.add_argument("--to", required=True, choices=patterns.names())
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-positions", type=int, default=4096, help="longest input after conversion (tokens)")
    p.add_argument("--window", type=int, default=512, help="longformer: attention_window (even)")
    p.add_argument("--block-size", type=int, default=64, help="bigbird / lsg block size")
    p.add_argument("--num-random-blocks", type=int, default=3, help="bigbird random blocks per row")
    p.add_argument("--num-landmarks", type=int, default=64, help="nystrom landmarks")
    p.add_argument("--sparse-block-size", type=int, default=None, help="lsg (default: --block-size)")
    p.add_argument("--sparsity-factor", type=int, default=2, help="lsg")
    p.add_argument(
        "--sparsity-type",
        default="pooling",
        choices=("none", "norm", "pooling", "stride", "block_stride", "bos_pooling"),
        help="lsg",
    )
    p.add_argument("--num-global-tokens", type=int, default=1, help="lsg: learned global embeddings (1..512)")
    p.add_argument("--pool-with-global", action=argparse.BooleanOptionalAction, default=True,
                   help="lsg: the first token's output is the first global's (LSGRobertaConfig)")  # fmt: skip
    p.add_argument("--mask-first-token", action=argparse.BooleanOptionalAction, default=False,
                   help="lsg: hide the first token as a key")  # fmt: skip
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="lsg: pad lengths that are not a multiple of --block-size")  # fmt: skip
    p.add_argument("--global-positional-stride", type=int, default=64,
                   help="lsg: positions between consecutive global embeddings at init (LSGConverter)")  # fmt: skip
    p.add_argument("--random-global-init", action="store_true",
                   help="lsg: draw the global embeddings from the word embeddings' normal (LSGConverter)")  # fmt: skip
    p.add_argument(
        "--seed",
        type=int,
        default=123,
        help="lsg: the torch.manual_seed whose draws LSGConverter would make (--random-global-init)",
    )
    p.add_argument(
        "--format",
        default="etkd",
        choices=("etkd", "hf", "hf-attention", "lsg"),
        help="output format: etkd, hf (the matching transformers class), hf-attention (the BERT/RoBERTa class with "
        "attn_implementation='etkd_...' in its config; load after `import etkd.hf`), lsg (an LSG model as "
        "lsg-converter's checkpoint: config.json with auto_map, loads with trust_remote_code=True)",
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer to save with the result (default: the source's)"
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
    if args.format == "lsg" and args.to != "lsg":
        raise UserError(f"--format lsg: writes LSG models; --to is {args.to!r}")
    try:
        model = load(source)
    except ValueError as exc:  # a checkpoint of a model etkd does not reproduce
        raise UserError(f"--from: {exc}") from None
    lsg = {}
    if args.to == "lsg":
        if tokenizer is None:
            raise UserError(
                "--to lsg: needs the tokenizer (its bos/cls and mask tokens seed the global embeddings)"
            )
        lsg = dict(
            lsg_token_ids(tokenizer), pool_with_global=args.pool_with_global, mask_first_token=args.mask_first_token,
            adaptive=args.adaptive, global_positional_stride=args.global_positional_stride,
            random_global_init=args.random_global_init, seed=args.seed,
        )  # fmt: skip
    try:
        new = convert(
            model, args.to, args.max_positions, window=args.window, block_size=args.block_size,
            num_random_blocks=args.num_random_blocks, num_landmarks=args.num_landmarks,
            sparse_block_size=args.sparse_block_size, sparsity_factor=args.sparsity_factor,
            sparsity_type=args.sparsity_type, num_global_tokens=args.num_global_tokens, **lsg,
        )  # fmt: skip
    except ValueError as exc:  # the model library names the argument (window, block size, ...)
        raise UserError(f"convert: {exc}") from None
    if args.format == "lsg":
        new.save_pretrained(args.out, format="lsg")
    elif args.format == "hf":
        from etkd.models.encoder import apply_umask

        to_hf(new).save_pretrained(args.out)
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
