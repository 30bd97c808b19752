"""BigBird's block layout (window, global and random blocks), and HF's exact random plans."""

from __future__ import annotations

import torch

from .._checks import check_positive_int
from ..masks import BlockLayout
from . import empty_layout, num_blocks

__all__ = ["bigbird_block_counts", "bigbird_layout", "fold_block_counts"]


def _bigbird_globals(num_global_blocks: int) -> tuple[int, int]:
    """(top, bottom) global blocks: HF's 2 means the first and the last block."""
    return (num_global_blocks + 1) // 2, num_global_blocks // 2


def _rand_plan(nb: int, r: int, base: int) -> tuple[list[int], list[int]]:
    """HF `_get_rand_attn_plan` in blocks: where random blocks are drawn from, and how many per segment."""
    if 2 * r + base < nb:
        return [2 * r + base, nb], [r, 0]
    if r + base < nb:
        return [r + base, nb], [r // 2, r - r // 2]
    return [nb], [r]


def _row_random(block_id, start, end, n, wl, wr, gl, gr, gen) -> list[int]:
    """HF `_get_single_block_row_attention` with torch's generator: n blocks of [start, end) outside the row's
    window and the segment's global blocks (fewer when too few are legal)."""
    perm = (torch.randperm(end - start, generator=gen) + start).tolist()
    illegal = set(range(block_id - wl, block_id + wr + 1)) | set(range(gl)) | set(range(end - gr, end))
    if block_id == 1:
        illegal.add(end - 2)
    if block_id == end - 2:
        illegal.add(1)
    return [p for p in perm if p not in illegal][:n]


def _generate_rand(nb, r, heads, wl, wr, gt, gb, seed) -> list[list[list[int]]]:
    """HF `_bigbird_block_rand_mask_with_head` (training mode), same plan and loop order, torch RNG.

    Returns rand[h][row - gt] = the random key blocks of query block `row`, for rows gt .. nb - gb - 1."""
    gen = torch.Generator().manual_seed(seed)
    plan, counts = _rand_plan(nb, r, wl + wr + 1 + gt + gb)
    rand = [[[] for _ in range(nb)] for _ in range(heads)]

    def fill(rows, start, end, n):
        for row in rows:
            for h in range(heads):
                rand[h][row] += _row_random(row, start, end, n, wl, wr, gt, gb, gen)

    for p in range(len(plan)):
        if p > 0:
            if counts[p] > 0:
                fill(range(gt, plan[p - 1]), plan[p - 1], plan[p], counts[p])
            for q in range(p):
                if counts[q] > 0:
                    fill(range(plan[p - 1], plan[p]), plan[q - 1] if q > 0 else 0, plan[q], counts[q])
        if counts[p] > 0:
            fill(
                range(plan[p - 1] if p > 0 else gt, plan[p]), plan[p - 1] if p > 0 else 0, plan[p], counts[p]
            )
    return [rows[gt : nb - gb] for rows in rand]


def _as_rand_attn(rand_attn, nb: int, rows: int) -> torch.Tensor:
    """HF's random indices (list of per-head (rows, r) arrays, an array or a tensor) as long (H, rows, r)."""
    if isinstance(rand_attn, (list, tuple)):
        rand_attn = torch.stack([torch.as_tensor(a) for a in rand_attn])
    t = torch.as_tensor(rand_attn)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"rand_attn: expected integer block indices, got dtype {t.dtype}")
    if t.dim() != 3 or t.shape[1] != rows:
        raise ValueError(
            f"rand_attn: expected shape (heads, {rows}, num_random_blocks) for {nb} blocks (one row per "
            f"non-global query block, as HF's BigBirdBlockSparseAttention generates), got {tuple(t.shape)}"
        )
    t = t.long().cpu()
    if t.numel() and (t.min() < 0 or t.max() >= nb):
        raise ValueError(
            f"rand_attn: block indices must lie in [0, {nb}), got [{int(t.min())}, {int(t.max())}]"
        )
    return t


def _bigbird_base(nb: int, num_window_blocks: int, gt: int, gb: int) -> torch.Tensor:
    idx = torch.arange(nb)
    base = (idx[:, None] - idx[None, :]).abs() <= num_window_blocks // 2
    glob = (idx < gt) | (idx >= nb - gb)
    return base | glob[:, None] | glob[None, :]


def _check_bigbird_args(seq_len, block_size, num_window_blocks, num_global_blocks, num_random_blocks) -> int:
    nb = num_blocks(seq_len, block_size)
    check_positive_int(num_window_blocks, "num_window_blocks")
    if num_window_blocks % 2 == 0:
        raise ValueError(
            f"num_window_blocks: expected an odd int (the band is symmetric), got {num_window_blocks}"
        )
    check_positive_int(num_global_blocks, "num_global_blocks", minimum=0)
    check_positive_int(num_random_blocks, "num_random_blocks", minimum=0)
    return nb


def bigbird_block_counts(
    seq_len: int,
    block_size: int,
    rand_attn,
    num_window_blocks: int = 3,
    num_global_blocks: int = 2,
) -> torch.Tensor:
    """How many times HF BigBird's softmax counts each key block: int64 (heads, q_blocks, k_blocks).

    1 for the window and global blocks, plus one per occurrence in `rand_attn` (heads, q_blocks - 2, r).
    HF concatenates random blocks after the window and global ones without removing repeats, so an entry
    > 1 means that key block enters the softmax that many times (HF eval mode: `rand_attn` is all zeros,
    so every non-global query block counts key block 0 `1 + r` times). See `fold_block_counts`.
    """
    nb = _check_bigbird_args(seq_len, block_size, num_window_blocks, num_global_blocks, 0)
    gt, gb = _bigbird_globals(num_global_blocks)
    ra = _as_rand_attn(rand_attn, nb, nb - gt - gb)
    heads = ra.shape[0]
    counts = _bigbird_base(nb, num_window_blocks, gt, gb).long().repeat(heads, 1, 1)
    rows = torch.arange(gt, nb - gb)[None, :, None].expand_as(ra)
    hidx = torch.arange(heads)[:, None, None].expand_as(ra)
    counts.index_put_((hidx, rows, ra), torch.ones_like(ra), accumulate=True)
    return counts


def bigbird_layout(
    seq_len: int,
    block_size: int = 64,
    num_window_blocks: int = 3,
    num_global_blocks: int = 2,
    num_random_blocks: int = 3,
    seed: int = 0,
    rand_attn=None,
    *,
    num_heads: int = 1,
    allow_duplicates: bool = False,
) -> BlockLayout:
    """BigBird (ITC) as blocks, exactly the key blocks HF's `BigBirdBlockSparseAttention` attends to.

    With nb = ceil(seq_len / block_size) blocks, global blocks = the first ceil(g/2) and last floor(g/2)
    blocks (HF's g = 2: the first and the last block):
      * global query blocks attend to every key block; every query block attends to the global key blocks;
      * query block i attends to the band |i - j| <= num_window_blocks // 2;
      * each non-global query block also attends to `num_random_blocks` random key blocks.
    HF computes the first/last and second/second-to-last query blocks separately, but the key blocks they
    see are exactly the ones above (q[1]: k[0..2] + k[-1] + random; q[-2]: k[0] + k[-3..-1] + random).

    Random blocks:
      * `rand_attn` given: HF's indices, (heads, nb - 2, r) (the per-head list HF's
        `_bigbird_block_rand_mask_with_head` / `_bigbird_block_rand_mask` returns, or its stacked array);
        the layout then has one head per row of `rand_attn` and gives HF's output exactly. If an index
        repeats a block the row already sees (HF eval mode returns all zeros; the legacy plan HF uses for
        seq 1024 with max_position_embeddings 1024 can pick window blocks), HF counts that block twice in
        its softmax, which a bool layout cannot say: this raises ValueError unless `allow_duplicates=True`
        (then each block counts once). To reproduce HF's duplicated softmax exactly, use
        `bigbird_block_counts` + `fold_block_counts`.
      * `rand_attn=None`: drawn with a `torch.Generator` seeded by `seed`, following HF's training-mode
        generator (`_get_rand_attn_plan` + `_bigbird_block_rand_mask_with_head`: same plan, same legal
        blocks, never a window or global block, distinct per row), independently for each of `num_heads`
        heads. The indices differ from HF's (numpy RNG), and HF's legacy generator for seq 1024/3072/4096
        is not emulated: pass HF's `rand_attn` when outputs must match HF.

    Short sequences: `BigBirdModel` switches to full attention when seq_len <= (5 + 2r) * block_size
    (generalised here to (num_window_blocks + num_global_blocks + 2r) * block_size); for such seq_len and
    `rand_attn=None` this returns a full layout (name "bigbird_full"), matching HF's model output.
    """
    nb = _check_bigbird_args(seq_len, block_size, num_window_blocks, num_global_blocks, num_random_blocks)
    check_positive_int(num_heads, "num_heads")
    if nb == 0:
        return empty_layout(block_size, "bigbird")
    gt, gb = _bigbird_globals(num_global_blocks)
    wl = wr = num_window_blocks // 2
    if rand_attn is None:
        if seq_len <= (num_window_blocks + num_global_blocks + 2 * num_random_blocks) * block_size:
            return BlockLayout(torch.ones(1, nb, nb, dtype=torch.bool), block_size, "bigbird_full")
        rand = _generate_rand(nb, num_random_blocks, num_heads, wl, wr, gt, gb, seed)
        mask = _bigbird_base(nb, num_window_blocks, gt, gb).repeat(num_heads, 1, 1)
        for h, rows in enumerate(rand):
            for i, cols in enumerate(rows):
                mask[h, gt + i, cols] = True
        return BlockLayout(mask, block_size, "bigbird")

    if nb - gt - gb < 1:
        raise ValueError(
            f"seq_len: {seq_len} gives {nb} blocks, too few for {num_global_blocks} global blocks"
        )
    counts = bigbird_block_counts(seq_len, block_size, rand_attn, num_window_blocks, num_global_blocks)
    if not allow_duplicates and bool((counts > 1).any()):
        h, i, j = (int(x) for x in (counts > 1).nonzero()[0])
        raise ValueError(
            f"rand_attn: head {h}, query block {i} lists key block {j} {int(counts[h, i, j])} times (with its "
            f"window/global blocks); HF's softmax counts it that many times, a bool layout once. HF eval mode "
            f"gives all-zero rand_attn. Pass allow_duplicates=True to count each block once, or use "
            f"bigbird_block_counts + fold_block_counts to reproduce HF exactly"
        )
    return BlockLayout(counts > 0, block_size, "bigbird")


def fold_block_counts(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Exact mapping of a softmax that counts key block j of query block i `counts[h, i, j]` times onto
    `block_sparse_attention` with the bool layout `counts > 0`.

    Counting a key m times in a softmax is adding log(m) to its score. With L = log(counts) (heads, nb, nb),
    write L[h] = onehot(row class) @ U[h] where U holds the distinct rows of L[h]; then extra head-dim
    columns q_x = onehot(class of the query's block) and k_x = U[:, key's block] / scale add exactly L to
    every score. Returns (q2, k2, v2, scale) with head_dim grown by the number of distinct rows (v padded
    with zeros): `block_sparse_attention(q2, k2, v2, counts > 0, scale=scale)[..., :head_dim]` is the
    duplicated softmax (HF BigBird in eval mode: 2 extra columns). q, k, v: (batch, heads, seq, head_dim).
    """
    b, h, s, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    counts = counts.to(q.device)
    hl, nb, _ = counts.shape
    if s > nb * block_size:
        raise ValueError(f"counts: {nb} blocks of {block_size} do not cover seq {s}")
    logc = torch.log(counts.clamp(min=1).double())
    classes, tables = [], []
    for i in range(hl):
        u, inv = torch.unique(logc[i], dim=0, return_inverse=True)
        classes.append(inv)
        tables.append(u)
    width = max(t.shape[0] for t in tables)
    tok_block = torch.arange(s, device=q.device) // block_size
    qx = torch.zeros(hl, s, width, dtype=q.dtype, device=q.device)
    kx = torch.zeros(hl, s, width, dtype=q.dtype, device=q.device)
    for i in range(hl):
        qx[i, torch.arange(s, device=q.device), classes[i][tok_block]] = 1
        kx[i, :, : tables[i].shape[0]] = (tables[i][:, tok_block].T / scale).to(q.dtype)
    qx, kx = qx[None].expand(b, h, s, width), kx[None].expand(b, h, s, width)
    q2 = torch.cat([q, qx], dim=-1)
    k2 = torch.cat([k, kx], dim=-1)
    v2 = torch.cat([v, v.new_zeros(b, h, s, width)], dim=-1)
    return q2, k2, v2, scale
