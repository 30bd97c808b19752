"""Math that the reference (the oracle) and the fused backends share, so no backend imports another's
internals: the compute dtype, backward by recomputation, Nystromformer's landmarks and pseudo-inverse
(whose semantics `etkd_kernels/reference/nystrom.py` documents), LSG's extra keys: the global and
compressed (sparse) keys and each block's sparse windows (semantics in `etkd_kernels/reference/lsg.py`), and the
attention-dropout RNG (Philox4x32-10 and the keep-mask every backend reproduces bit for bit)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The oracle computes in fp32 (fp64 for fp64 inputs) whatever the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def recompute_backward(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    grad_out: torch.Tensor,
    inputs: Sequence[torch.Tensor | None],
    *args,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of `fn(*inputs, *args)[0]` (or of its only output) w.r.t. each non-None input.

    Runs with grad mode on and inference mode off: compiled graphs may call the backward op inside either.
    """
    with torch.inference_mode(False), torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
        out = fn(*leaves, *args)
        if isinstance(out, tuple):
            out = out[0]
        wrt = [t for t in leaves if t is not None]
        if out.requires_grad:
            grads = torch.autograd.grad(out, wrt, grad_out, allow_unused=True)
        else:  # the output does not depend on the inputs (e.g. a layout with no allowed block)
            grads = [None] * len(wrt)
    it = iter(grads)
    res = []
    for t in leaves:
        if t is None:
            res.append(None)
        else:
            g = next(it)
            res.append(torch.zeros_like(t) if g is None else g)
    return tuple(res)


def segment_means(x: torch.Tensor, num_landmarks: int) -> torch.Tensor:
    """x (b, h, s, d) -> (b, h, L', d): means over contiguous segments of ceil(s / L) tokens.

    L' = ceil(s / ceil(s / L)) (= L when L divides s); the last segment may be shorter.
    """
    b, h, s, d = x.shape
    c = -(-s // num_landmarks)
    n = -(-s // c)
    if n * c == s:
        # HF's exact expression (same rounding) when the segments tile the sequence.
        return x.reshape(b, h, n, c, d).mean(dim=-2)
    sums = F.pad(x, (0, 0, 0, n * c - s)).reshape(b, h, n, c, d).sum(dim=-2)
    counts = torch.full((n, 1), float(c), dtype=x.dtype, device=x.device)
    counts[-1] = s - (n - 1) * c
    return sums / counts


def iterative_pinv(m: torch.Tensor, iterations: int, pinv_init: str) -> torch.Tensor:
    """HF's Newton-Schulz pseudo-inverse of the row-stochastic (b, h, L, L) matrices `m`."""
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    col_sums = m.sum(dim=-2)  # (b, h, L); softmax rows make ||m||_inf = 1, so this is ||m||_1's column sums
    if pinv_init == "hf_global":
        coeff = 1 / col_sums.max()
    else:
        coeff = 1 / col_sums.amax(dim=-1)[..., None, None]
    z = coeff * m.transpose(-1, -2)
    for _ in range(iterations):
        mz = m @ z
        # Same association and constants as HF so fp32 rounding matches as closely as possible.
        z = (0.25 * z) @ (13 * eye - mz @ (15 * eye - mz @ (7 * eye - mz)))
    return z


# --- Attention dropout -------------------------------------------------------------------------------------
# The keep-mask of element (batch b, head h, query row i, key column j) is a pure function of (seed, offset, p,
# b * H + h, i, j), so a backward regenerates it, and no backend's tiling or thread count can change it:
#   key     = (seed & 0xFFFFFFFF, seed >> 32)                   seed in [0, 2^63)
#   counter = (j >> 3, i, b * H + h, offset & 0xFFFFFFFF)       H = heads of q
#   r       = Philox4x32-10(counter, key)                       one call covers 8 consecutive key columns
#   u16     = (r[(j & 7) >> 1] >> (16 * (j & 1))) & 0xFFFF
#   keep    = u16 >= min(65535, floor(p * 65536))
# p is thereby resolved to multiples of 1/65536 (FlashAttention resolves it to 1/256), and kept probabilities
# are multiplied by 1 / (1 - p) (computed in double, applied in float32), as torch.nn.functional.dropout does.
# i and j are positions in the op's own [0, seq) coordinates; keys that are not sequence positions (LSG's
# compressed keys, Nystrom's landmarks) get columns >= seq, defined in that pattern's reference module.

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Random123's Philox4x32 multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # and Weyl key bumps
_M32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for int64 tensors a in [0, 2^32) and a constant m < 2^32, without int64
    overflow: 16-bit halves, every partial product < 2^34."""
    ah, al = a >> 16, a & 0xFFFF
    mh, ml = m >> 16, m & 0xFFFF
    mid = ah * ml + al * mh
    t = al * ml + ((mid & 0xFFFF) << 16)
    return ah * mh + (mid >> 16) + (t >> 32), t & _M32


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 (Salmon et al., SC11; Random123's `philox4x32`) of the counter words c0..c3 (int64 tensors,
    broadcastable, taken mod 2^32) under the key (k0, k1): four int64 tensors of 32-bit words."""
    c0, c1, c2, c3 = (torch.as_tensor(c).long() & _M32 for c in (c0, c1, c2, c3))
    k0, k1 = k0 & _M32, k1 & _M32
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _M32, (k1 + PHILOX_W[1]) & _M32
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """The 16-bit threshold of the keep test (u16 >= threshold): floor(p * 65536), at most 65535."""
    return min(65535, int(p * 65536))


def dropout_scale(p: float) -> float:
    """What kept probabilities are multiplied by: 1 / (1 - p) in double (the kernels round it to float32)."""
    return 1.0 / (1.0 - p)


def dropout_keep(
    seed: int, offset: int, p: float, bh: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """Keep-mask (bool, the broadcast shape of bh, i, j) of the elements at batch-head index bh = b * H + h,
    query row i and key column j (int64 tensors; negative columns are never kept-tested meaningfully: callers
    only use entries that are real positions)."""
    r0, r1, r2, r3 = philox4x32_10(
        j >> 3, i, bh, torch.as_tensor(offset & _M32), seed & _M32, (seed >> 32) & _M32
    )
    sel = (j & 7) >> 1
    word = torch.where(sel < 2, torch.where(sel == 0, r0, r1), torch.where(sel == 2, r2, r3))
    u16 = (word >> ((j & 1) * 16)) & 0xFFFF
    return u16 >= dropout_threshold(p)


def batch_heads(b: int, h: int, device: torch.device) -> torch.Tensor:
    """(b, h, 1, 1) int64: the b * H + h index of the dropout counter."""
    return (torch.arange(b, device=device)[:, None] * h + torch.arange(h, device=device)[None, :])[
        ..., None, None
    ]


def apply_dropout(
    probs: torch.Tensor, p: float, seed: int, offset: int, bh: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """probs with the dropped entries zeroed and the kept ones scaled by 1 / (1 - p); probs itself when p == 0.
    bh, i, j (int64, broadcastable to probs) give each entry's counter (see `dropout_keep`)."""
    if p == 0:
        return probs
    keep = dropout_keep(seed, offset, p, bh, i, j)
    return torch.where(
        keep, probs * dropout_scale(p), torch.zeros((), dtype=probs.dtype, device=probs.device)
    )


# ----------------------------------------------------------------------------------------------------------
# LSG: the keys every query block sees besides its local ones (`reference/lsg.py` defines the pattern).


VARIANTS = ("layer", "model")


def lead_tokens(num_global_tokens: int, block_size: int, variant: str) -> int:
    """Where the first non-global token sits: 0 for "layer" (the globals are ordinary tokens of block 0), the
    globals rounded up to whole blocks for "model" (the op pads them so)."""
    return -(-num_global_tokens // block_size) * block_size if variant == "model" else 0


def all_query_rows(sparsity_type: str, variant: str) -> bool:
    """Whether padded non-global query rows get outputs like the real rows of their block instead of zeros: the
    model files' bos_pooling pools a group of padding tokens from those rows' hidden states (plain mean), which
    the next layer's keys are made of, so LSG RoBERTa needs them as lsg-converter computes them."""
    return variant == "model" and sparsity_type == "bos_pooling"


def uses_sparse(sparsity_type: str, sparse_block_size: int, num_blocks: int) -> bool:
    return sparsity_type != "none" and sparse_block_size > 0 and num_blocks > 2


def sparse_windows(n, step: int, sparse_block_size: int, variant: str = "layer"):
    """First compressed position of the left and right sparse windows of query block(s) n. For an odd step
    both windows shift in the "layer" variant; in the model files' unfold only the right one does."""
    o = step % 2
    left = o if variant == "layer" else 0
    return (n - 1) * step - sparse_block_size + left, (n + 2) * step - 2 * o


def lsg_key_columns(seq: int, num_global_tokens: int, num_extra: int, device=None) -> torch.Tensor:
    """The attention-dropout columns (`dropout_keep`'s j, int64 (num_extra,)) of LSG's extra keys [global keys,
    compressed keys] (`extra_keys`' order): global key x < G is position x, compressed position t is column
    seq + t (not a sequence position: it draws bits of its own). Every backend passes these to its kernel."""
    x = torch.arange(num_extra, device=device)
    return torch.where(x < num_global_tokens, x, seq + x - num_global_tokens)


def sparse_keys(
    q, k, v, real, num_global_tokens, block_size, sparsity_factor, sparsity_type, scale, variant="layer",
    sparse_block_size=None,
):  # fmt: skip
    """Compressed keys/values (b, h, T, d) and whether each is attended (b, h or 1, T)."""
    b, h, s, d = k.shape
    f, g = sparsity_factor, num_global_tokens
    t = s // f
    usable = real & (torch.arange(s, device=k.device) >= g)[None]
    if f == 1:
        return k, v, usable[:, None]
    if sparsity_type in ("pooling", "bos_pooling"):
        kg, vg = k.view(b, h, t, f, d), v.view(b, h, t, f, d)
        ok = torch.ones(b, 1, t, dtype=torch.bool, device=k.device)
        lead = lead_tokens(g, block_size, variant)
        if sparsity_type == "pooling":
            w = usable.view(b, 1, t, f, 1).to(k.dtype)
            if variant == "model":
                ok = w.view(b, 1, t, f).any(-1)
            w = w / (w.sum(-2, keepdim=True) + 1e-6)
        else:
            if variant == "model":
                ok = ok & (torch.arange(t, device=k.device) >= lead // f)
            s0 = torch.einsum("bhd,bhsd->bhs", q[:, :, lead], k).view(b, h, t, f) * scale
            rg = real.view(b, 1, t, f)
            # A group with no real token: LSG's scores there are all s + finfo.min, which rounds to finfo.min,
            # so its weights are uniform, yet autograd still differentiates the softmax of s: s - s.detach().
            s0 = torch.where(rg.any(-1, keepdim=True), s0.masked_fill(~rg, float("-inf")), s0 - s0.detach())
            w = torch.softmax(s0, dim=-1)[..., None]
        return (kg * w).sum(-2), (vg * w).sum(-2), ok
    p = torch.arange(t, device=k.device)
    hh = torch.arange(h, device=k.device)[:, None]
    step = block_size // f
    if sparsity_type == "stride":
        tok = (p[None, :] * f + hh % f)[None].expand(b, h, t)
    elif sparsity_type == "block_stride":
        tok = ((p[None, :] // step) * block_size + (hh * step + p[None, :] % step) % block_size)[None].expand(
            b, h, t
        )
    else:  # norm
        # The model files rank in chunks of min(block_size, sparse_block_size) tokens, largest norms kept in
        # ascending order (their argsort's tail); the layer ranks whole blocks, in descending order.
        chunk = block_size
        if variant == "model" and sparse_block_size:
            chunk = min(block_size, sparse_block_size)
        with torch.no_grad():
            nrm = k.detach().norm(dim=-1).masked_fill(~usable[:, None], -1.0)
            top = nrm.view(b, h, s // chunk, chunk).topk(chunk // f, dim=-1, sorted=True).indices
            if variant == "model":
                top = top.flip(-1)
            tok = (top + torch.arange(0, s, chunk, device=k.device)[:, None]).reshape(b, h, t)
    idx = tok[..., None].expand(b, h, t, d)
    return k.gather(2, idx), v.gather(2, idx), usable[:, None].expand(b, h, s).gather(2, tok)


def extra_keys(
    q, k, v, block_size, sparse_block_size, sparsity_factor, sparsity_type, num_global_tokens, real, scale,
    variant="layer",
):  # fmt: skip
    """[global keys, compressed keys] (b, h, G + T, d) for keys and values, which are attended (b, h, G + T),
    and each query block's sparse window starts (nb, 2) (empty when no sparse keys)."""
    b, h, s, d = k.shape
    g, nb = num_global_tokens, s // block_size
    if not uses_sparse(sparsity_type, sparse_block_size, nb):
        ok = real[:, None, :g].expand(b, h, g)
        return k[:, :, :g], v[:, :, :g], ok, torch.zeros(0, 2, dtype=torch.long, device=k.device)
    kc, vc, okc = sparse_keys(
        q, k, v, real, g, block_size, sparsity_factor, sparsity_type, scale, variant, sparse_block_size
    )
    n = torch.arange(nb, device=k.device)
    starts = torch.stack(sparse_windows(n, block_size // sparsity_factor, sparse_block_size, variant), dim=1)
    kx, vx = torch.cat([k[:, :, :g], kc], dim=2), torch.cat([v[:, :, :g], vc], dim=2)
    ok = torch.cat([real[:, None, :g].expand(b, h, g), okc.expand(b, h, okc.shape[-1])], dim=2)
    return kx, vx, ok, starts
