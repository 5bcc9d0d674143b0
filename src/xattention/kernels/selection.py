"""Threshold block selection in Triton: one program per (batch, head, query block) row.

Each program loads its row of scores, sorts the optional candidates once (descending score, ties to
the lower key block), takes the exclusive prefix sum in float64 and finds how many of them the rule
keeps. Instead of scattering the decision back through the sort permutation, it keeps the row's
blocks whose sort key is at least the last kept key: sort keys embed the block index, so they are
unique and the comparison is exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import new_output


@triton.jit
def _select_blocks_kernel(
    Scores, Threshold, Mask,
    stride_sb, stride_sh, stride_si,
    stride_mb, stride_mh, stride_mi,
    num_heads, num_q_blocks, num_k_blocks, q_len, k_len,
    BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr, NKB_PAD: tl.constexpr,
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
    tl.store(Mask + b * stride_mb + h * stride_mh + i * stride_mi + j, keep.to(tl.int8),
             mask=in_row)


def select_blocks_triton(
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    q_len: int,
    k_len: int,
    block_size: int,
    causal: bool,
) -> torch.Tensor:
    b, h, nqb, nkb = scores.shape
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if isinstance(threshold, torch.Tensor):
        thr = threshold.to(device=scores.device, dtype=torch.float64).contiguous()
    else:
        thr = torch.full((h,), float(threshold), dtype=torch.float64, device=scores.device)
    mask = new_output((b, h, nqb, nkb), torch.int8, scores.device)
    nkb_pad = max(16, triton.next_power_of_2(nkb))
    warps = 4 if nkb_pad <= 1024 else 8
    _select_blocks_kernel[(b * h * nqb,)](
        scores, thr, mask,
        scores.stride(0), scores.stride(1), scores.stride(2),
        mask.stride(0), mask.stride(1), mask.stride(2),
        h, nqb, nkb, q_len, k_len,
        BLOCK_SIZE=block_size, CAUSAL=bool(causal), NKB_PAD=nkb_pad, num_warps=warps,
    )
    return mask.view(torch.bool)
