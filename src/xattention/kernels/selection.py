"""Threshold block selection in Triton: one program per (batch, head, query block) row.

Each program loads its row of scores, sorts the optional candidates once (descending score, ties to
the lower key block), takes the exclusive prefix sum in float64 and finds how many of them the rule
keeps. Instead of scattering the decision back through the sort permutation, it keeps the row's
blocks whose sort key is at least the last kept key: sort keys embed the block index, so they are
unique and the comparison is exact.

Inside ``xattention()`` the kernel also applies the non-finite rules (docs/design.md §4) itself: a
row whose scores hold a NaN or inf, or whose query block holds a non-finite q, keeps every
candidate, and key blocks holding a non-finite k or v are kept wherever they are candidates. The
flags come from one pass over q and one over k and v (``_nonfinite_blocks_kernel``), so a call
costs three launches and no host sync, where the same rules in PyTorch took two dozen small ones.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._backend import new_output


@triton.jit
def _nonfinite_blocks_kernel(
    X, Y, Out,
    stride_b, stride_h, stride_l, num_heads, length, num_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, D_PAD: tl.constexpr,
    HAS_Y: tl.constexpr,
):
    """``Out[b, h, blk]`` = 1 where rows ``blk*Bs ...`` of ``X`` (or of ``Y``, same layout) hold a
    NaN or an inf, else 0; one program per (block, batch x head)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    base = (bh // num_heads) * stride_b + (bh % num_heads) * stride_h
    d = tl.arange(0, D_PAD)
    bad = tl.zeros([ROWS, D_PAD], dtype=tl.int8)
    for r0 in range(0, BLOCK_SIZE, ROWS):
        rows = blk * BLOCK_SIZE + r0 + tl.arange(0, ROWS)
        ok = (rows < length)[:, None] & (d < HEAD_DIM)[None, :]
        offs = base + rows[:, None] * stride_l + d[None, :]
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        bad = tl.maximum(bad, ((x - x) != 0).to(tl.int8))  # x - x: NaN for NaN and +-inf
        if HAS_Y:
            y = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32)
            bad = tl.maximum(bad, ((y - y) != 0).to(tl.int8))
    tl.store(Out + bh * num_blocks + blk, tl.max(tl.max(bad, 1), 0))


@triton.jit
def _select_blocks_kernel(
    Scores, Threshold, Mask, RowBad, KeyBad,
    stride_sb, stride_sh, stride_si,
    stride_mb, stride_mh, stride_mi,
    num_heads, group, num_q_blocks, num_k_blocks, q_len, k_len,
    BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr, NKB_PAD: tl.constexpr,
    HAS_FLAGS: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid % num_q_blocks
    bh = pid // num_q_blocks
    h = bh % num_heads
    b = bh // num_heads
    j = tl.arange(0, NKB_PAD)
    in_row = j < num_k_blocks
    s = tl.load(Scores + b * stride_sb + h * stride_sh + i * stride_si + j, mask=in_row,
                other=0.0).to(tl.float64)
    threshold = tl.load(Threshold + h)

    if CAUSAL:
        offset = k_len - q_len
        p_first = offset + i * BLOCK_SIZE
        p_last = offset + tl.minimum((i + 1) * BLOCK_SIZE, q_len) - 1
        candidate = in_row & (j * BLOCK_SIZE <= p_last)
        forced = in_row & ((j == 0) | ((j >= p_first // BLOCK_SIZE) & (j <= p_last // BLOCK_SIZE)))
    else:
        candidate = in_row
        forced = j < 0
    optional = candidate & ~forced
    total = tl.sum(s, 0)
    forced_mass = tl.sum(tl.where(forced, s, 0.0), 0)

    # Sort key: score bits (order-preserving for non-negative floats) above the inverted index, so
    # a descending sort puts equal scores in ascending block order. Non-optional blocks sort last.
    bits = tl.maximum(s, 0.0).to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(optional, (bits << 32) | (NKB_PAD - j).to(tl.int64), -1)
    ordered = tl.sort(key, 0, descending=True)
    is_opt = ordered >= 0
    # Recover the exact float64 score of each sorted entry through its block index.
    jj = NKB_PAD - (ordered & 0xFFFFFFFF).to(tl.int32)
    sorted_s = tl.load(Scores + b * stride_sb + h * stride_sh + i * stride_si + jj,
                       mask=is_opt, other=0.0).to(tl.float64)
    before = tl.cumsum(sorted_s, 0) - sorted_s + forced_mass
    # "Kept while the mass before is below threshold * total": stop at the first failure.
    fail = is_opt & ~(before < threshold * total)
    pos = tl.arange(0, NKB_PAD)
    first_fail = tl.min(tl.where(fail, pos, NKB_PAD), 0)
    kept_sorted = is_opt & (pos < first_fail)
    cut = tl.min(tl.where(kept_sorted, ordered, 0x7FFFFFFFFFFFFFFF), 0)
    keep = forced | (optional & (key >= cut))
    keep = tl.where(threshold >= 1.0, candidate, keep)
    # A row whose mass is unknown (a NaN or inf score, or a non-finite q in its block) cannot be
    # ranked: it keeps every candidate, so it is NaN exactly where dense attention would be.
    unknown = tl.max(tl.where(in_row & ((s - s) != 0), 1, 0), 0) > 0
    if HAS_FLAGS:
        unknown = unknown | (tl.load(RowBad + (b * num_heads + h) * num_q_blocks + i) != 0)
        kv_head = b * (num_heads // group) + h // group
        bad_key = tl.load(KeyBad + kv_head * num_k_blocks + j, mask=in_row, other=0) != 0
        keep = keep | (candidate & bad_key)
    keep = tl.where(unknown, candidate, keep)
    tl.store(Mask + b * stride_mb + h * stride_mh + i * stride_mi + j, keep.to(tl.int8),
             mask=in_row)


def nonfinite_blocks_triton(x: torch.Tensor, block_size: int,
                            y: torch.Tensor | None = None) -> torch.Tensor:
    """int8 ``[B, H, ceil(L/Bs)]``: 1 where a block of ``x`` (or of ``y``, same shape) holds a
    NaN or an inf."""
    b, h, length, d = x.shape
    if x.stride(-1) != 1 or (y is not None and y.stride() != x.stride()):
        x = x.contiguous()
        y = None if y is None else y.contiguous()
    n = -(-length // block_size)
    out = new_output((b, h, n), torch.int8, x.device)
    d_pad = triton.next_power_of_2(d)
    # Row chunks: a power of two (a Triton tile) that divides the block, at most 8192 elements.
    rows = block_size & -block_size
    while rows * d_pad > 8192:
        rows //= 2
    _nonfinite_blocks_kernel[(n, b * h)](
        x, x if y is None else y, out, x.stride(0), x.stride(1), x.stride(2), h, length, n,
        HEAD_DIM=d, BLOCK_SIZE=block_size, ROWS=rows, D_PAD=d_pad, HAS_Y=y is not None,
    )
    return out


@functools.lru_cache(maxsize=64)
def _threshold_vector(value: float, heads: int, device: torch.device) -> torch.Tensor:
    """One float64 threshold per head, cached: read-only, and a fill per call is one launch more."""
    return torch.full((heads,), value, dtype=torch.float64, device=device)


def select_blocks_triton(
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    q_len: int,
    k_len: int,
    block_size: int,
    causal: bool,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The mask, with the non-finite rules applied (from the scores, and from ``inputs``, the
    ``(q, k, v)`` the scores came from, when given)."""
    b, h, nqb, nkb = scores.shape
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if isinstance(threshold, torch.Tensor):
        thr = threshold.to(device=scores.device, dtype=torch.float64).contiguous()
    else:
        thr = _threshold_vector(float(threshold), h, scores.device)
    mask = new_output((b, h, nqb, nkb), torch.int8, scores.device)
    row_bad = key_bad = mask  # placeholders, unread without inputs
    group = 1
    if inputs is not None:
        q, k, v = inputs
        group = q.shape[1] // k.shape[1]
        row_bad = nonfinite_blocks_triton(q, block_size)
        key_bad = nonfinite_blocks_triton(k, block_size, v)
    nkb_pad = max(16, triton.next_power_of_2(nkb))
    warps = 4 if nkb_pad <= 1024 else 8
    _select_blocks_kernel[(b * h * nqb,)](
        scores, thr, mask, row_bad, key_bad,
        scores.stride(0), scores.stride(1), scores.stride(2),
        mask.stride(0), mask.stride(1), mask.stride(2),
        h, group, nqb, nkb, q_len, k_len,
        BLOCK_SIZE=block_size, CAUSAL=bool(causal), NKB_PAD=nkb_pad,
        HAS_FLAGS=inputs is not None, num_warps=warps,
    )
    return mask.view(torch.bool)
