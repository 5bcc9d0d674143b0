"""Constants and small helpers every kernel shares (one copy each).

The ``@triton.jit`` layout predicates restate :class:`xattention.block_layout.BlockLayout` in device
code: candidate, forced and fully visible key blocks of query block ``i``. They are the only device
copies; ``tests/test_plan.py`` checks them against the layout through the selection kernel.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


def len_bucket(length: int) -> int:
    """Autotune key for a length: its log2, with everything up to 1k in one bucket."""
    return int(math.log2(max(length, 1024)))


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (plain Python: ``triton.next_power_of_2`` is a
    constexpr function on newer Triton, several microseconds per host call)."""
    return 1 << max(n - 1, 0).bit_length()


def padded_head_dim(head_dim: int, elem: int = 2) -> int:
    """The head_dim tiles cover (``D_PAD``): a power of two, at least 16, or 32 for 1-byte (FP8)
    operands, whose matrix products reduce over at least 32 elements."""
    return max(16 if elem > 1 else 32, next_power_of_2(head_dim))


def row_pad(num_k_blocks: int) -> int:
    """Power-of-two width of a program that holds a whole row of key blocks (selection)."""
    return max(16, next_power_of_2(num_k_blocks))


def row_warps(width: int) -> int:
    """Warps for a one-row-per-program kernel: 8 once a row no longer fits 4 warps' registers."""
    return 4 if width <= 1024 else 8


@triton.jit
def query_block_span(i, q_len, k_len, BLOCK_SIZE: tl.constexpr):
    """Absolute positions of the first and last row of query block ``i``."""
    offset = k_len - q_len
    p_first = offset + i * BLOCK_SIZE
    p_last = offset + tl.minimum((i + 1) * BLOCK_SIZE, q_len) - 1
    return p_first, p_last


@triton.jit
def block_is_candidate(j, i, q_len, k_len, BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr):
    """Key block ``j`` holds a key some row of query block ``i`` sees."""
    _, p_last = query_block_span(i, q_len, k_len, BLOCK_SIZE)
    if CAUSAL:
        return j * BLOCK_SIZE <= p_last
    return j >= 0


@triton.jit
def block_is_forced(j, i, q_len, k_len, BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr):
    """Causal: the sink block or a block of the diagonal band of query block ``i``."""
    p_first, p_last = query_block_span(i, q_len, k_len, BLOCK_SIZE)
    if CAUSAL:
        return (j == 0) | ((j >= p_first // BLOCK_SIZE) & (j <= p_last // BLOCK_SIZE))
    return j < 0


@triton.jit
def block_is_fully_visible(j, i, q_len, k_len, BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr):
    """Every row of query block ``i`` sees every key of block ``j`` (no element mask needed)."""
    p_first, _ = query_block_span(i, q_len, k_len, BLOCK_SIZE)
    inside = (j + 1) * BLOCK_SIZE <= k_len
    if CAUSAL:
        return inside & ((j + 1) * BLOCK_SIZE - 1 <= p_first)
    return inside


@triton.jit
def kv_row_offsets(rows, k_len, table_row, stride_page, stride_row, PAGE: tl.constexpr):
    """Element offsets of key/value rows ``rows`` from their head's base pointer.

    ``PAGE == 0``: contiguous rows, ``rows * stride_row``. Otherwise a paged cache
    (:class:`xattention.paged.PagedKV`): row ``t`` lies in page ``table_row[t // PAGE]`` (pages
    ``stride_page`` apart, in int64: a cache spans more than 2^31 elements), slot ``t % PAGE``.
    Rows past ``k_len`` read page 0; their loads are masked by the caller.
    """
    if PAGE == 0:
        off = rows * stride_row
    else:
        page = tl.load(table_row + rows // PAGE, mask=rows < k_len, other=0)
        off = page.to(tl.int64) * stride_page + (rows % PAGE) * stride_row
    return off

