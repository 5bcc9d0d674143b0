"""Threshold block selection in Triton: one program per (batch, head, query block) row.

Each program loads its row of scores, sorts the optional candidates once (descending score, ties to
the lower key block), takes the exclusive prefix sum in float64 and finds how many of them the rule
keeps. Instead of scattering the decision back through the sort permutation, it keeps the row's
blocks whose sort key is at least the last kept key: sort keys embed the block index, so they are
unique and the comparison is exact.

The kernel writes the :class:`~xattention.plan.SparsePlan` directly (counts and ascending indices,
split into fully visible and partial blocks), so no bool mask is stored and read back to compact.

Inside ``xattention()`` the kernel also applies the non-finite rules (docs/design.md §4) itself: a
row whose scores hold a NaN or inf, or whose query block holds a non-finite q, keeps every
candidate, and key blocks holding a non-finite k or v are kept wherever they are candidates. The
flags come from the estimate kernel, which reads q, k (and v, for the flags) anyway, so a sparse
call is three launches (estimate, selection, attention) and no host sync.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..block_layout import BlockLayout
from ..plan import SparsePlan
from ._common import (
    block_is_candidate,
    block_is_forced,
    block_is_fully_visible,
    row_pad,
    row_warps,
)
from ._launch import CachedLauncher


@triton.jit
def _select_plan_kernel(
    Scores, Threshold, FullCount, FullIndex, PartialCount, PartialIndex, RowBad, KeyBad,
    stride_sb, stride_sh, stride_si,
    num_heads, group, num_q_blocks, num_k_blocks, q_len, k_len,
    BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr, NKB_PAD: tl.constexpr,
    MAX_PARTIAL: tl.constexpr, HAS_FLAGS: tl.constexpr,
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

    candidate = in_row & block_is_candidate(j, i, q_len, k_len, BLOCK_SIZE, CAUSAL)
    forced = in_row & block_is_forced(j, i, q_len, k_len, BLOCK_SIZE, CAUSAL)
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

    # The plan, written straight from the decision: kept blocks split into fully visible ones
    # (no element mask in the attention kernels) and the rest, each list ascending. pid is the
    # row's index in the contiguous [B, H, nQB] counts. Unused slots get block 0 (FA4 loads
    # them); their addresses differ from the kept slots', so the two stores never race.
    visible = block_is_fully_visible(j, i, q_len, k_len, BLOCK_SIZE, CAUSAL)
    full = (keep & visible).to(tl.int32)
    part = (keep & ~visible).to(tl.int32)
    n_full = tl.sum(full, 0)
    n_part = tl.sum(part, 0)
    full_row = FullIndex + pid.to(tl.int64) * num_k_blocks
    tl.store(full_row + tl.cumsum(full, 0) - full, j, mask=full != 0)
    tl.store(full_row + j, tl.zeros_like(j), mask=in_row & (j >= n_full))
    part_row = PartialIndex + pid.to(tl.int64) * MAX_PARTIAL
    tl.store(part_row + tl.cumsum(part, 0) - part, j, mask=part != 0)
    slot = tl.arange(0, 2)
    tl.store(part_row + slot, tl.zeros_like(slot), mask=(slot < MAX_PARTIAL) & (slot >= n_part))
    tl.store(FullCount + pid, n_full)
    tl.store(PartialCount + pid, n_part)


_select_launcher = CachedLauncher(_select_plan_kernel)


@functools.lru_cache(maxsize=64)
def _threshold_vector(value: float, heads: int, device: torch.device) -> torch.Tensor:
    """One float64 threshold per head, cached: read-only, and a fill per call is one launch more."""
    return torch.full((heads,), value, dtype=torch.float64, device=device)


def select_plan_triton(
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    layout: BlockLayout,
    flags: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SparsePlan:
    """The plan, with the non-finite rules applied (from the scores, and from ``flags``: the
    int8 ``(query blocks [B, Hq, nQB], key blocks [B, Hkv, nKB])`` holding a non-finite q, or k or
    v, that the estimate kernel writes, when given)."""
    b, h, nqb, nkb = scores.shape
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if isinstance(threshold, torch.Tensor):
        thr = threshold.to(device=scores.device, dtype=torch.float64).contiguous()
    else:
        thr = _threshold_vector(float(threshold), h, scores.device)
    plan = SparsePlan.empty(layout, b, h, scores.device)
    row_bad = key_bad = plan.full_count  # placeholders, unread without flags
    group = 1
    if flags is not None:
        row_bad, key_bad = flags
        group = h // key_bad.shape[1]
    width = row_pad(nkb)
    _select_launcher[(b * h * nqb,)](
        scores, thr, plan.full_count, plan.full_index, plan.partial_count, plan.partial_index,
        row_bad, key_bad,
        scores.stride(0), scores.stride(1), scores.stride(2),
        h, group, nqb, nkb, layout.q_len, layout.k_len,
        BLOCK_SIZE=layout.block_size, CAUSAL=bool(layout.causal), NKB_PAD=width,
        MAX_PARTIAL=layout.max_partial_blocks, HAS_FLAGS=flags is not None,
        num_warps=row_warps(width),
    )
    return plan
