"""LSG: the keys every query block sees besides its local ones, the global and compressed (sparse) keys and
each block's sparse windows, shared by the reference and the fused backends (`etkd_kernels/reference/lsg.py`
defines the pattern)."""

from __future__ import annotations

import torch

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
