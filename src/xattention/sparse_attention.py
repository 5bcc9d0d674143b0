"""Block-sparse attention: dense softmax attention restricted to the kept blocks (docs/design.md).

Token pair ``(r, c)`` is visible iff its (query block, key block) pair is kept and, when causal,
``c <= k_len - q_len + r``. Rows that see no key at all (possible only with a user-made mask) get a
zero output and a log-sum-exp of ``-inf``, the FlashAttention convention.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._backend import new_output, resolve_backend, uses_fa4, warn_once
from ._validation import (
    as_bhsd,
    check_backend,
    check_block_mask,
    check_block_size,
    check_bool,
    check_plan,
    check_qkv,
    check_scale,
    from_bhsd,
)
from .block_layout import BlockLayout, num_blocks
from .plan import SparsePlan

# Elements held at once by one chunk of the PyTorch path: gathered K/V plus logits (64 MiB fp32).
_CHUNK_ELEMENTS = 1 << 24


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | SparsePlan,
    block_size: int | None = None,
    causal: bool | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    layout: str = "bhsd",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention that computes only the (query block, key block) pairs ``mask`` keeps.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` and ``Lq <= Lk``
            (``[B, L, H, D]`` with ``layout="bshd"``).
        mask: a bool block mask ``[B, Hq, ceil(Lq/Bs), ceil(Lk/Bs)]`` (batch and head dims may be
            1 to broadcast; any mask works, not only one from ``select_blocks``), or a
            :class:`~xattention.plan.SparsePlan` (from ``select_plan``, ``SparsePlan.from_mask``
            or ``xattention(..., return_plan=True)``), which the kernels read as it is.
        block_size: block edge ``Bs`` the mask is expressed in (default 128); a plan carries its
            own, which this must match when given.
        causal: additionally hide keys after each query's absolute position (default True); a
            plan carries its own, which this must match when given.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]`` (natural log; in the
            layout's order, ``[B, Lq, Hq]`` for ``"bshd"``).
        layout: ``"bhsd"`` (default) or ``"bshd"`` (FlashAttention's ``[B, L, H, D]``, read in
            place through strides).

    Returns:
        the output in q's layout and dtype (and the log-sum-exp when asked).

    The PyTorch path does work proportional to the kept blocks: per query block it gathers the
    kept key blocks and attends to them only. Its extra memory is float32 padded copies of q, k,
    v, the output (twice, briefly) and one chunk of ``2^24`` elements (~64 MiB: gathered K/V and
    logits) whatever the length; measured peak ~70 / 140 / 240-250 MiB at 16k / 32k / 64k
    tokens (B=1, 2 heads, D=64, 10% density; two runs of benchmarks/bench_cpu.py --memory).

    Example:
        >>> import torch
        >>> from xattention import block_sparse_attention
        >>> q = k = v = torch.randn(1, 2, 256, 64)
        >>> mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)  # every block: dense causal attention
        >>> out = block_sparse_attention(q, k, v, mask, block_size=128)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> bool(torch.allclose(out, ref, atol=1e-5))
        True
    """
    q, k, v, bshd = as_bhsd(layout, q, k, v)
    shape = check_qkv(q, k, v, layout="bshd" if bshd else "bhsd")
    if isinstance(mask, SparsePlan):
        plan = check_plan(mask, shape, block_size, causal)
        block_size, causal = plan.layout.block_size, plan.layout.causal
    else:
        block_size = 128 if block_size is None else check_block_size(block_size)
        causal = True if causal is None else check_bool("causal", causal)
        plan = check_block_mask(mask, shape, block_size)
    scale = check_scale(scale, shape.head_dim)
    return_lse = check_bool("return_lse", return_lse)
    backend = check_backend(backend)
    if shape.batch == 0:
        out = q.new_empty(q.shape[:3] + v.shape[3:])
        res = (out, q.new_empty(q.shape[:3], dtype=torch.float32)) if return_lse else out
    else:
        res = _sparse_attention(q, k, v, plan, block_size, causal, scale, backend, return_lse)
    return from_bhsd(res, bshd)


def _sparse_attention(q, k, v, mask, block_size, causal, scale, backend, return_lse,
                      out=None):
    """Dispatch on validated input (shared with ``xattention``).

    ``mask``: a bool ``[B, Hq, nQB, nKB]`` mask or a plan already ``[B, Hq, ...]``. ``out``: a
    buffer the Triton kernel writes into (graph capture); other paths copy into it.
    """
    from .kernels import sparse_attention_unsupported_reason

    chosen = resolve_backend(
        backend, q.device, sparse_attention_unsupported_reason(q, block_size), "sparse attention"
    )
    layout = BlockLayout(q.shape[2], k.shape[2], block_size, causal)
    if chosen == "triton":
        plan = mask if isinstance(mask, SparsePlan) else SparsePlan.from_mask(mask, layout)
        if uses_fa4(q, k, block_size, backend):
            from .kernels.fa4 import block_sparse_attention_fa4

            res, lse = block_sparse_attention_fa4(q, k, v, plan, scale)
            if out is not None:
                res = out.copy_(res)
        else:
            from .kernels.sparse_attention import block_sparse_attention_triton

            res, lse = block_sparse_attention_triton(q, k, v, plan, scale, out=out)
    else:
        dense = mask.to_dense() if isinstance(mask, SparsePlan) else mask
        res, lse = block_sparse_attention_torch(q, k, v, dense, block_size, causal, scale,
                                                need_lse=return_lse)
        if out is not None:
            res = out.copy_(res)
    return (res, lse) if return_lse else res


def block_sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    block_size: int,
    causal: bool,
    scale: float,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch implementation that skips dropped blocks; ``mask`` already ``[B, Hq, nQB, nKB]``.

    A work item is one (batch, query head, query block). Its kept key blocks are gathered from the
    unrepeated K/V of its KV head (GQA shares them, nothing is repeated) and attended to; items
    that keep the same number of blocks are batched together, in chunks of at most
    ``_CHUNK_ELEMENTS`` elements, so the work is proportional to the kept blocks and the extra
    memory is bounded whatever the length. Blocks wholly visible to every row of the item go
    through one fused attention call (torch's flash-attention CPU kernel on CPU); the at most two
    blocks some row may not fully see (the diagonal band, the short last key block) are masked
    explicitly, and the two parts are merged by their log-sum-exp.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    bs = block_size
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    nqb, nkb = num_blocks(lq, bs), num_blocks(lk, bs)
    dev = q.device
    geo = _Geometry(lq, lk, bs, nqb, nkb, hq, hkv, causal)

    # Blocks with no visible key (causal: wholly in the future) contribute nothing: never compute.
    keep = (mask.to(dev) & BlockLayout(lq, lk, bs, causal).candidate(dev)).reshape(-1, nkb)
    counts = keep.sum(-1)
    # Flat block lists: index_select on one dim is much faster than advanced indexing.
    q_blocks = _as_blocks(q, bs, work, scale)  # [B*Hq*nQB, Bs, D], pre-scaled
    k_blocks = _as_blocks(k, bs, work)  # [B*Hkv*nKB, Bs, D]
    v_blocks = _as_blocks(v, bs, work)
    fused = dev.type == "cpu" and _fused_cpu_kernel() is not None
    out = new_output((b * hq * nqb, bs, v.shape[-1]), q.dtype, dev)
    lse = new_output((b * hq * nqb, bs if need_lse else 0), torch.float32, dev)

    for n in counts.unique().tolist():
        items = torch.nonzero(counts == n).squeeze(1)
        if n == 0:  # possible only with a user mask: the FlashAttention convention
            out[items] = 0
            lse[items] = float("-inf")
            continue
        # Gathered K and V per item, plus logits where they are materialised.
        per_item = 2 * n * bs * d + 4 * bs * (2 * bs if fused else n * bs)
        step = max(1, _CHUNK_ELEMENTS // per_item)
        for s in range(0, items.numel(), step):
            it = items[s : s + step]
            o, item_lse = _attend(it, keep[it], q_blocks, k_blocks, v_blocks, geo, fused)
            out.index_copy_(0, it, o.to(q.dtype))
            if need_lse:
                lse.index_copy_(0, it, item_lse.to(torch.float32))

    out = out.view(b, hq, nqb * bs, -1)[:, :, :lq].contiguous()
    if not need_lse:
        return out, None
    return out, lse.view(b, hq, nqb * bs)[:, :, :lq].contiguous()


@dataclass(frozen=True)
class _Geometry:
    lq: int
    lk: int
    bs: int
    nqb: int
    nkb: int
    hq: int
    hkv: int
    causal: bool


def _attend(items, keep, q_blocks, k_blocks, v_blocks, geo: _Geometry, fused: bool):
    """Output ``[N, Bs, Dv]`` and log-sum-exp ``[N, Bs]`` of ``items`` (flat (batch, head, query
    block) indices) whose ``keep`` rows all hold the same number ``n`` of kept key blocks."""
    num, bs = items.numel(), geo.bs
    cols = torch.nonzero(keep)[:, 1].view(num, -1)  # ascending kept key blocks
    n = cols.shape[1]
    head, block = items // geo.nqb, items % geo.nqb  # head = batch * Hq + query head
    kv = (head // geo.hq) * geo.hkv + (head % geo.hq) // (geo.hq // geo.hkv)
    flat = (kv[:, None] * geo.nkb + cols).flatten()
    ks = k_blocks.index_select(0, flat).view(num, n, bs, -1)
    vs = v_blocks.index_select(0, flat).view(num, n, bs, -1)
    qs = q_blocks.index_select(0, items)  # [N, Bs, D]

    # A kept block needs a token mask when it ends after the item's first row (causal) or past
    # the last key. Those blocks have the highest indices among the kept ones (at most two).
    last = cols[:, -min(n, 2):]
    key_end = (last + 1) * bs
    partial = key_end > geo.lk
    if geo.causal:
        first_row_pos = block * bs + (geo.lk - geo.lq)
        partial = partial | (key_end - 1 > first_row_pos[:, None])
    tail = int(partial.sum(-1).max())
    every = bool(partial[:, -1].all())  # every item has a partial last block

    def span(x, j0, j1, trim=0):  # kept blocks j0..j1-1 of every item as one key sequence
        return x[:, j0:j1].flatten(1, 2)[:, : (j1 - j0) * bs - trim]

    if fused and (tail == 0 or (not geo.causal and every)):
        # Only the padding of a short last key block to hide: trim it.
        trim = geo.nkb * bs - geo.lk if tail else 0
        return _fused_part(qs, span(ks, 0, n, trim), span(vs, 0, n, trim))
    parts = []
    if tail < n:
        body = (span(ks, 0, n - tail), span(vs, 0, n - tail))
        parts.append(_fused_part(qs, *body) if fused else _masked_part(qs, *body))
    tail_kv = (span(ks, n - tail, n), span(vs, n - tail, n))
    if not tail:
        pass
    elif fused and geo.causal and tail == 1 and every and (geo.lk - geo.lq) % bs == 0:
        # The diagonal block, aligned with the query block: plain causal attention within it.
        parts.append(_fused_part(qs, *tail_kv, causal=True))
    else:
        offsets = torch.arange(bs, device=items.device)
        key_pos = (cols[:, n - tail :, None] * bs + offsets).flatten(1)  # [N, tail*Bs]
        if geo.causal:  # real rows sit before lk, so this hides the padding keys too
            row_pos = block[:, None] * bs + offsets + (geo.lk - geo.lq)  # [N, Bs]
            hidden = key_pos[:, None, :] > row_pos[:, :, None]
        else:
            hidden = (key_pos >= geo.lk)[:, None, :]
        parts.append(_masked_part(qs, *tail_kv, hidden))
    if len(parts) == 1:
        return parts[0]
    (o1, l1), (o2, l2) = parts
    total = torch.logaddexp(l1, l2)
    w1, w2 = torch.exp(l1 - total).unsqueeze(-1), torch.exp(l2 - total).unsqueeze(-1)
    return o1 * w1 + o2 * w2, total


def _masked_part(qs, ks, vs, hidden=None):
    """Attention of ``qs [N, Bs, D]`` to ``ks, vs [N, M, D]`` minus the ``hidden`` pairs, with one
    materialised softmax. Rows that see no key give 0 and a log-sum-exp of ``-inf``; whether a row
    sees a key comes from ``hidden``, never from the logits, so a NaN input stays NaN."""
    logits = torch.bmm(qs, ks.transpose(1, 2))
    seen = None
    if hidden is not None:
        logits.masked_fill_(hidden, float("-inf"))
        seen = ~hidden.all(-1, keepdim=True)
    row_max = logits.amax(-1, keepdim=True)
    if seen is not None:
        row_max = torch.where(seen, row_max, torch.zeros_like(row_max))
    probs = logits.sub_(row_max).exp_()
    denom = probs.sum(-1, keepdim=True)
    out = torch.bmm(probs, vs) / denom
    if seen is not None:
        out = torch.where(seen, out, torch.zeros_like(out))
    return out, (row_max + torch.log(denom)).squeeze(-1)


def _fused_part(qs, ks, vs, causal=False):
    """``_masked_part`` without a mask (or top-left causal), through torch's fused CPU
    flash-attention kernel."""
    out, lse = _fused_cpu_kernel()(qs[:, None], ks[:, None], vs[:, None], 0.0, causal, scale=1.0)
    return out[:, 0], lse[:, 0]


@functools.cache
def _fused_cpu_kernel():
    """torch's CPU flash-attention kernel, which returns the log-sum-exp that merging needs; the
    public ``scaled_dot_product_attention`` does not. None (with a warning) where this torch
    build lacks it: the explicit softmax then serves, same numbers, slower."""
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if kernel is None:
        warn_once("xattention: this torch has no aten._scaled_dot_product_flash_attention_for_cpu;"
                  " the PyTorch sparse attention uses an explicit softmax (same result, slower)")
    return kernel


def _as_blocks(x: torch.Tensor, bs: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``[B, H, L, D] -> [B*H*ceil(L/Bs), Bs, D]`` in ``dtype``, zero padded, times ``scale``."""
    bsz, h, length, d = x.shape
    padded = x.new_zeros(bsz, h, num_blocks(length, bs) * bs, d, dtype=dtype)
    padded[:, :, :length] = x if scale == 1.0 else x.to(dtype) * scale
    return padded.view(-1, bs, d)
