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
from .merge import merge_attention
from .paged import PagedKV
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
    v (none where they already are whole float32 blocks), the output (twice, briefly) and one
    chunk of ``2^24`` elements (~64 MiB: gathered Q/K/V, outputs and logits) whatever the
    length; measured peak 86 / 111 / 134 MiB at 16k / 32k / 64k tokens (B=1, 2 heads, D=64, 10%
    density, float32, the measurement of benchmarks/bench_cpu.py --memory).

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
    shape = check_qkv(q, k, v, layout="bshd" if bshd else "bhsd", need_v=True)
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
        # FlashAttention-4 takes contiguous K/V: a PagedKV stays with the kernel that reads pages.
        if not isinstance(k, PagedKV) and uses_fa4(q, k, block_size, backend):
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
    that keep the same number of blocks form a group, attended in one batched call. Items are
    sorted by group and taken in chunks of at most ``_CHUNK_ELEMENTS`` elements, each chunk with
    one gather of Q, K and V and one scatter of the output whatever its groups, so the work is
    proportional to the kept blocks, the extra memory is bounded whatever the length, and the
    number of large ops stays small: on a loaded machine every parallel op waits for its slowest
    thread (benchmarks/NOTES.md, "CPU path under load"). Blocks wholly visible to every row of
    the item go through torch's fused flash-attention CPU kernel where there is one; the causal
    diagonal too, with one broadcast mask, when query and key blocks align; otherwise the at most
    two blocks some row may not fully see are masked explicitly and the two parts are merged by
    their log-sum-exp.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    bs = block_size
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    nqb, nkb = num_blocks(lq, bs), num_blocks(lk, bs)
    dev = q.device

    # Blocks with no visible key (causal: wholly in the future) contribute nothing: never compute.
    keep = (mask.to(dev) & BlockLayout(lq, lk, bs, causal).candidate(dev)).reshape(-1, nkb)
    counts = keep.sum(-1)
    # Flat block lists: index_select on one dim is much faster than advanced indexing.
    q_blocks = _as_blocks(q, bs, work)  # [B*Hq*nQB, Bs, D]
    k_blocks = _as_blocks(k, bs, work)  # [B*Hkv*nKB, Bs, D]
    v_blocks = _as_blocks(v, bs, work)
    fused = dev.type == "cpu" and _fused_cpu_kernel() is not None
    # Non-finite q or k take the explicit softmax: torch's fused kernel gives a row whose every
    # logit is -inf output 0 and log-sum-exp 0 (mass 1, where dense attention gives NaN), and
    # the diagonal's additive mask would turn a hidden non-finite key into NaN logits for rows
    # that cannot see it (§4 keeps those finite). One check per call (a host sync); a sum is
    # one reduction where isfinite().all() is four, and its overflow only costs speed.
    if fused:
        fused = bool(torch.isfinite(q_blocks.sum() + k_blocks.sum()))
    diagonal = None
    if fused and causal and (lk - lq) % bs == 0:
        diagonal = _diagonal_first_mask(bs, max(int(counts.max()), 1), work)  # 0: all dropped
    geo = _Geometry(lq, lk, bs, nqb, nkb, hq, hkv, causal, diagonal, scale)
    out = new_output((b * hq * nqb, bs, v.shape[-1]), q.dtype, dev)
    lse = new_output((b * hq * nqb, bs if need_lse else 0), torch.float32, dev)

    # A group is (kept-block count, whether the last kept block needs a token mask).
    group = counts * 2
    if fused:
        group = group + _last_block_partial(keep, counts, geo)
    order = torch.argsort(group, stable=True)
    runs, sizes = torch.unique_consecutive(group[order], return_counts=True)

    def per_item(g: int) -> int:
        """Gathered K and V, Q and the output (twice) per item, plus the logits of the blocks
        whose softmax is materialised (the fused kernel keeps its own in per-thread tiles)."""
        n = g // 2
        if not fused:
            explicit = n
        elif causal and diagonal is None:
            explicit = 2  # the diagonal band, masked explicitly
        else:
            explicit = 0
        return 2 * n * bs * d + 3 * bs * d + 4 * bs * bs * explicit

    for start, pieces in _chunks(runs.tolist(), sizes.tolist(), per_item, _CHUNK_ELEMENTS):
        items = order[start : start + sum(c for _, c in pieces)]
        o, item_lse = _attend_chunk(items, pieces, keep, q_blocks, k_blocks, v_blocks, geo, fused)
        out.index_copy_(0, items, o.to(q.dtype))
        if need_lse:
            lse.index_copy_(0, items, item_lse.to(torch.float32))

    out = out.view(b, hq, nqb * bs, -1)[:, :, :lq].contiguous()
    if not need_lse:
        return out, None
    return out, lse.view(b, hq, nqb * bs)[:, :, :lq].contiguous()


def _chunks(groups: list[int], sizes: list[int], per_item, budget: int):
    """``(first item, [(group, item count), ...])`` per chunk of the group-sorted items, each chunk
    within ``budget`` elements (or one item) and cutting a group only where it must."""
    start, pieces, used = 0, [], 0
    for g, size in zip(groups, sizes, strict=True):
        cost = per_item(g)
        while size:
            take = min(size, max(0, (budget - used) // cost))
            if take == 0 and pieces:
                yield start, pieces
                start += sum(c for _, c in pieces)
                pieces, used = [], 0
                continue
            take = max(take, 1)
            pieces.append((g, take))
            used += take * cost
            size -= take
    if pieces:
        yield start, pieces


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
    diagonal: torch.Tensor | None  # _diagonal_first_mask where the diagonal may use it
    scale: float


def _last_block_partial(keep: torch.Tensor, counts: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """Per item (row of ``keep``): 1 where its last kept key block needs a token mask (the
    causal diagonal, or a short last key block), else 0."""
    idx = torch.arange(geo.nkb, device=keep.device)
    last = torch.where(keep, idx, -1).amax(-1)
    block = torch.arange(keep.shape[0], device=keep.device) % geo.nqb
    return (_needs_token_mask(last, block, geo) & (counts > 0)).long()


def _needs_token_mask(key_block: torch.Tensor, query_block: torch.Tensor,
                      geo: _Geometry) -> torch.Tensor:
    """Whether key block ``key_block`` needs a token mask for query block ``query_block``
    (broadcast): it ends past the last key, or (causal) after the query block's first row."""
    key_end = (key_block + 1) * geo.bs
    partial = key_end > geo.lk
    if geo.causal:
        partial = partial | (key_end - 1 > query_block * geo.bs + (geo.lk - geo.lq))
    return partial


def _attend_chunk(items, pieces, keep, q_blocks, k_blocks, v_blocks, geo: _Geometry, fused: bool):
    """Output ``[N, Bs, Dv]`` and log-sum-exp ``[N, Bs]`` of ``items`` (flat (batch, head, query
    block) indices, sorted by group; ``pieces`` lists each group's item count), with one gather
    of Q, K and V for the whole chunk."""
    layouts, flat, off = [], [], 0
    for g, count in pieces:
        it = items[off : off + count]
        off += count
        layout = _piece_layout(it, keep[it], g // 2, geo, fused)
        layouts.append(layout)
        flat.append(layout.blocks.flatten())
    flat = torch.cat(flat)
    ks_all = k_blocks.index_select(0, flat)  # [kept blocks, Bs, D]
    vs_all = v_blocks.index_select(0, flat)
    qs_all = q_blocks.index_select(0, items)
    outs, lses, item0, block0 = [], [], 0, 0
    for layout in layouts:
        num, n = layout.blocks.shape
        qs = qs_all[item0 : item0 + num]
        if n == 0:  # possible only with a user mask: the FlashAttention convention
            outs.append(qs.new_zeros(num, geo.bs, vs_all.shape[-1]))
            lses.append(qs.new_full((num, geo.bs), float("-inf")))
        else:
            ks = ks_all[block0 : block0 + num * n].view(num, n, geo.bs, -1)
            vs = vs_all[block0 : block0 + num * n].view(num, n, geo.bs, -1)
            o, lse = _attend(qs, ks, vs, layout, geo, fused)
            outs.append(o)
            lses.append(lse)
        item0, block0 = item0 + num, block0 + num * n
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs), torch.cat(lses)


@dataclass(frozen=True)
class _PieceLayout:
    """Where one group's items read: ``blocks [N, n]`` flat K/V block indices in the order they are
    attended, ``cols [N, n]`` their key block numbers, and how many trailing blocks need a mask."""

    blocks: torch.Tensor
    cols: torch.Tensor
    query_block: torch.Tensor  # [N]
    tail: int  # trailing blocks some row does not fully see (at most two)
    every: bool  # every item's last block is such a block
    diagonal_first: bool  # the one partial block was moved to the front (see _attend)


def _piece_layout(items, keep, n: int, geo: _Geometry, fused: bool) -> _PieceLayout:
    num = items.numel()
    cols = torch.nonzero(keep)[:, 1].view(num, n)  # ascending kept key blocks
    head, block = items // geo.nqb, items % geo.nqb  # head = batch * Hq + query head
    kv = (head // geo.hq) * geo.hkv + (head % geo.hq) // (geo.hq // geo.hkv)
    tail, every, diagonal_first = 0, False, False
    if n:
        # Blocks that need a token mask have the highest indices among the kept ones (at most
        # two: the diagonal band, the short last key block).
        partial = _needs_token_mask(cols[:, -min(n, 2):], block[:, None], geo)
        tail = int(partial.sum(-1).max())
        every = bool(partial[:, -1].all())
        # Causal with query blocks aligned to key blocks: the one partial block is the diagonal,
        # with the same triangle in every item. Softmax does not care about key order, so moving
        # it to the front lets one broadcast mask serve the whole group in one fused call.
        diagonal_first = geo.diagonal is not None and tail == 1 and every
        if diagonal_first:
            cols = torch.roll(cols, 1, dims=1)
    return _PieceLayout(kv[:, None] * geo.nkb + cols, cols, block, tail, every, diagonal_first)


def _attend(qs, ks, vs, layout: _PieceLayout, geo: _Geometry, fused: bool):
    """Attention of one group: ``qs [N, Bs, D]`` to the gathered ``ks, vs [N, n, Bs, D]``."""
    bs, n, tail, cols = geo.bs, ks.shape[1], layout.tail, layout.cols

    def span(x, j0, j1, trim=0):  # kept blocks j0..j1-1 of every item as one key sequence
        return x[:, j0:j1].flatten(1, 2)[:, : (j1 - j0) * bs - trim]

    if layout.diagonal_first:
        mask = geo.diagonal[:, : n * bs]
        return _fused_part(qs, span(ks, 0, n), span(vs, 0, n), geo.scale, mask=mask)
    if fused and (tail == 0 or (not geo.causal and layout.every)):
        # Only the padding of a short last key block to hide: trim it.
        trim = geo.nkb * bs - geo.lk if tail else 0
        return _fused_part(qs, span(ks, 0, n, trim), span(vs, 0, n, trim), geo.scale)
    parts = []
    if tail < n:
        body = (span(ks, 0, n - tail), span(vs, 0, n - tail))
        parts.append(_fused_part(qs, *body, geo.scale) if fused
                     else _masked_part(qs, *body, geo.scale))
    if tail:
        offsets = torch.arange(bs, device=qs.device)
        key_pos = (cols[:, n - tail :, None] * bs + offsets).flatten(1)  # [N, tail*Bs]
        if geo.causal:  # real rows sit before lk, so this hides the padding keys too
            row_pos = layout.query_block[:, None] * bs + offsets + (geo.lk - geo.lq)  # [N, Bs]
            hidden = key_pos[:, None, :] > row_pos[:, :, None]
        else:
            hidden = (key_pos >= geo.lk)[:, None, :]
        parts.append(_masked_part(qs, span(ks, n - tail, n), span(vs, n - tail, n), geo.scale,
                                  hidden))
    if len(parts) == 1:
        return parts[0]
    # The two parts by their log-sum-exps (the core's merge keeps the non-finite rules: a part
    # without mass adds nothing, a NaN behind an underflowing weight stays NaN).
    return merge_attention(parts, dtype=parts[0][0].dtype, return_lse=True)


def _diagonal_first_mask(bs: int, blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[Bs, blocks * Bs]`` hiding the future keys of the first block: the causal
    diagonal moved to the front. Built once per call and sliced per group (on a loaded machine
    every op costs a scheduling round); never larger than one group's gathered K/V."""
    mask = torch.zeros(bs, blocks * bs, dtype=dtype)
    mask[:, :bs] = torch.full((bs, bs), float("-inf"), dtype=dtype).triu(1)
    return mask


def _masked_part(qs, ks, vs, scale, hidden=None):
    """Attention of ``qs [N, Bs, D]`` (times ``scale``) to ``ks, vs [N, M, D]`` minus the
    ``hidden`` pairs, with one materialised softmax. Rows that see no key give 0 and a
    log-sum-exp of ``-inf``; whether a row sees a key comes from ``hidden``, never from the
    logits, so a NaN input stays NaN, and a row that sees only ``-inf`` logits gives NaN with
    a log-sum-exp of ``-inf``."""
    logits = torch.bmm(qs, ks.transpose(1, 2)).mul_(scale)
    seen = None
    if hidden is not None:
        logits.masked_fill_(hidden, float("-inf"))
        seen = ~hidden.all(-1, keepdim=True)
    row_max = logits.amax(-1, keepdim=True)
    # A row whose every logit is -inf (hidden, or an inf input) subtracts 0, not -inf: its
    # probabilities are 0 and its lse -inf (no mass; the merge weighs it 0), and a row that saw
    # keys then divides 0 by 0: NaN, as dense attention gives it.
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    probs = logits.sub_(row_max).exp_()
    denom = probs.sum(-1, keepdim=True)
    out = torch.bmm(probs, vs) / denom
    if seen is not None:
        out = torch.where(seen, out, torch.zeros_like(out))
    return out, (row_max + torch.log(denom)).squeeze(-1)


def _fused_part(qs, ks, vs, scale, mask=None):
    """``_masked_part`` through torch's fused CPU flash-attention kernel, with an additive
    ``mask [Bs, M]`` shared by every item (broadcast, never copied) where given; every row must
    see a key (the kernel gives such a row a log-sum-exp of 0, not ``-inf``)."""
    extra = {} if mask is None else {"attn_mask": mask[None, None]}
    out, lse = _fused_cpu_kernel()(qs[:, None], ks[:, None], vs[:, None], 0.0, False,
                                   scale=scale, **extra)
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


def _as_blocks(x: torch.Tensor, bs: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, L, D] -> [B*H*ceil(L/Bs), Bs, D]`` in ``dtype``, zero padded: a view where ``x``
    already is that (contiguous, whole blocks), else one copy."""
    bsz, h, length, d = x.shape
    if length % bs == 0 and x.dtype == dtype and x.is_contiguous():
        return x.view(-1, bs, d)
    padded = x.new_empty(bsz, h, num_blocks(length, bs) * bs, d, dtype=dtype)
    padded[:, :, :length] = x
    padded[:, :, length:] = 0  # padding keys are masked, but a hidden weight times NaN is NaN
    return padded.view(-1, bs, d)
