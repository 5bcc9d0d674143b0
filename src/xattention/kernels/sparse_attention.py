"""Block-sparse FlashAttention forward in Triton, and its launcher.

One program computes ``BLOCK_M`` query rows of one (batch, query head) and visits only the key
blocks its query block keeps, read from a :class:`~xattention.plan.SparsePlan`: first the *full*
list (blocks wholly visible to every row of the query block: no element masks at all), then the
*partial* list (diagonal band, ragged key tail) with element masks, so the hot loop carries no
masking arithmetic. Both phases run one inner-loop function, ``_attend_blocks``, specialised by
its ``STAGE`` argument (as the Triton fused-attention tutorial does). Online softmax runs in base
2 with the scale folded into one multiply.

Programs are launched heaviest-first (last query blocks hold the most keys under a causal mask)
so the tail of the grid is short work rather than one straggler.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .._backend import autotune_timer, interpreter_enabled, new_output, quick_tuning
from ..block_layout import num_blocks
from ..paged import PagedKV
from ..plan import SparsePlan
from ._common import LN2, LOG2E, kv_row_offsets, len_bucket, padded_head_dim
from ._launch import CachedLauncher
from ._tuning import HOPPER_SMEM_BYTES, forced_config, smem_limit


def _gpu_configs() -> list[triton.Config]:
    configs = []
    for bm in (64, 128):
        for bn in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    for tma in (False, True):
                        if stages == 4 and not tma:
                            continue
                        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn,
                                                      "USE_TMA": tma},
                                                     num_warps=warps, num_stages=stages))
    return configs


def _quick_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "USE_TMA": tma}, num_warps=4,
                          num_stages=2) for tma in (False, True)]


def _configs() -> list[triton.Config]:
    if interpreter_enabled():
        # One config per TMA setting; _prune keeps the one TMA_OK allows (the autotuner prunes
        # only when it holds more than one config).
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "USE_TMA": tma}, num_warps=4,
                              num_stages=1) for tma in (True, False)]
    return _quick_configs() if quick_tuning() else _gpu_configs()


def kept_configs(configs: list[triton.Config], block_size: int, head_dim: int, tma_ok: bool,
                 elem: int = 2, smem: int = HOPPER_SMEM_BYTES) -> list[triton.Config]:
    """The configs of ``configs`` tuning chooses among for this shape (tests walk all of them).

    ``elem``: operand bytes; ``smem``: the per-program shared memory limit.
    """
    d_pad = padded_head_dim(head_dim)
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if block_size % bm or block_size % bn:
            continue
        # Pipelined K and V tiles plus the resident Q tile (the compiler's figure on sm90).
        if (c.num_stages * 2 * bn + bm) * d_pad * elem > smem:
            continue
        # Where the copy engine can serve, it won every shape we timed: tune among TMA configs.
        if c.kwargs["USE_TMA"] != tma_ok:
            continue
        # Large head dims need the smaller tiles to stay in registers.
        if head_dim >= 256 and (bm > 64 or bn > 64):
            continue
        kept.append(c)
    if not kept:  # block_size below every tile: the smallest tile that divides it.
        tile = math.gcd(block_size, 64)
        kept = [triton.Config({"BLOCK_M": tile, "BLOCK_N": tile, "USE_TMA": False}, num_warps=4,
                              num_stages=2)]
    return kept


def _prune(configs, named_args, **kwargs):
    forced = forced_config("_block_sparse_attention_fwd")
    if forced is not None:
        return [forced]
    device = named_args["Q"].device if "Q" in named_args else None
    return kept_configs(configs, kwargs["BLOCK_SIZE"], kwargs["HEAD_DIM"], kwargs["TMA_OK"],
                        4 if kwargs["IS_FP32"] else 2, smem_limit(device))


@triton.autotune(
    configs=_configs(),
    key=["HEAD_DIM", "BLOCK_SIZE", "CAUSAL", "len_bucket", "IS_FP32", "TMA_OK", "PAGE"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=autotune_timer(),
)
@triton.jit
def _block_sparse_attention_fwd(
    Q, K, V, Out, Lse, FullCount, FullIndex, PartialCount, PartialIndex, Table,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_cb, stride_ch,
    stride_fb, stride_fh, stride_fm,
    stride_pb, stride_ph, stride_pm, stride_tb,
    len_bucket, batch, num_heads, group_size, q_len, k_len, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr, IS_FP32: tl.constexpr, TMA_OK: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    # Query tiles vary fastest so that the programs in flight share one head's K/V in L2; within
    # a head the heaviest (latest) rows go first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group_size
    m0 = pid_m * BLOCK_M
    q_block = m0 // BLOCK_SIZE

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < q_len) & d_ok[None, :], other=0.0)
    # Paged K/V (PAGE > 0): the batch strides are page strides, rows come through the table
    # (and TMA_OK is off: a tile's rows are not one box of memory).
    table_row = Table + b * stride_tb
    if PAGE == 0:
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
    else:
        k_base = K + hk * stride_kh
        v_base = V + hk * stride_vh
    if USE_TMA:  # Hopper's bulk copy engine; it also zero-fills rows past k_len and head_dim
        kv_heads = num_heads // group_size
        k_desc = tl.make_tensor_descriptor(K, shape=[batch, kv_heads, k_len, HEAD_DIM],
                                           strides=[stride_kb, stride_kh, stride_kn, 1],
                                           block_shape=[1, 1, BLOCK_N, D_PAD])
        v_desc = tl.make_tensor_descriptor(V, shape=[batch, kv_heads, k_len, HEAD_DIM],
                                           strides=[stride_vb, stride_vh, stride_vn, 1],
                                           block_shape=[1, 1, BLOCK_N, D_PAD])
    else:
        k_desc = K
        v_desc = V
    row_pos = offs_m + (k_len - q_len)  # absolute position of each query row

    count_off = b * stride_cb + h * stride_ch + q_block  # counts share strides, last one 1
    n_full = tl.load(FullCount + count_off)
    n_part = tl.load(PartialCount + count_off)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    # Phase 1: key blocks every row of this query block sees in full. Phase 2: diagonal band and
    # ragged tail, with element masks.
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, k_desc, v_desc, k_base, v_base,
        FullIndex + b * stride_fb + h * stride_fh + q_block * stride_fm, n_full,
        b, hk, row_pos, offs_n, offs_d, d_ok, k_len, stride_kn, stride_vn, qk_scale,
        table_row, stride_kb, stride_vb, PAGE, 1, CAUSAL, USE_TMA, IS_FP32, BLOCK_SIZE,
        BLOCK_N, D_PAD)
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, k_desc, v_desc, k_base, v_base,
        PartialIndex + b * stride_pb + h * stride_ph + q_block * stride_pm, n_part,
        b, hk, row_pos, offs_n, offs_d, d_ok, k_len, stride_kn, stride_vn, qk_scale,
        table_row, stride_kb, stride_vb, PAGE, 2, CAUSAL, USE_TMA, IS_FP32, BLOCK_SIZE,
        BLOCK_N, D_PAD)

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < q_len) & d_ok[None, :])
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(Lse + (b * num_heads + h) * q_len + offs_m, lse, mask=offs_m < q_len)


_sparse_launcher = CachedLauncher(_block_sparse_attention_fwd)


@triton.jit
def _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, k_base, v_base, idx_base, n_blocks,
                   b, hk, row_pos, offs_n, offs_d, d_ok, k_len, stride_kn, stride_vn, qk_scale,
                   table_row, stride_kp, stride_vp, PAGE: tl.constexpr, STAGE: tl.constexpr,
                   CAUSAL: tl.constexpr, USE_TMA: tl.constexpr,
                   IS_FP32: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   D_PAD: tl.constexpr):
    """Online softmax over the ``n_blocks`` key blocks listed at ``idx_base``.

    ``STAGE`` 1: blocks wholly visible (no element mask, no -inf guard). ``STAGE`` 2: blocks that
    need the key-length bound and, causal, the causal mask.
    """
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    MASKED: tl.constexpr = STAGE == 2
    for u in range(0, n_blocks * SUB):
        j = tl.load(idx_base + u // SUB)
        n0 = j * BLOCK_SIZE + (u % SUB) * BLOCK_N
        qk = _scores(q, k_desc, k_base, b, hk, n0, offs_n, offs_d, d_ok, k_len, stride_kn,
                     table_row, stride_kp, PAGE, MASKED, USE_TMA, IS_FP32, BLOCK_N, D_PAD)
        if MASKED:
            cols = n0 + offs_n
            visible = (cols < k_len)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= row_pos[:, None])
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen nothing yet keeps m = -inf; shift by 0 instead of inf - inf.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_shift[:, None])
            alpha = tl.math.exp2(m_i - m_shift)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # one FMA per element
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _weighted_values(
            p, v_desc, v_base, b, hk, n0, offs_n, offs_d, d_ok, k_len, stride_vn,
            table_row, stride_vp, PAGE, MASKED, USE_TMA, IS_FP32, BLOCK_N, D_PAD)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _scores(q, k_desc, k_base, b, hk, n0, offs_n, offs_d, d_ok, k_len, stride_kn,
            table_row, stride_kp, PAGE: tl.constexpr, MASK_COLS: tl.constexpr,
            USE_TMA: tl.constexpr, IS_FP32: tl.constexpr,
            BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """q @ k^T for the key tile starting at n0 (unscaled)."""
    if USE_TMA:
        k = tl.trans(tl.reshape(k_desc.load([b, hk, n0, 0]), (BLOCK_N, D_PAD)))
    else:
        cols = n0 + offs_n
        ok = d_ok[:, None]
        if MASK_COLS:
            ok = ok & (cols < k_len)[None, :]
        rows = kv_row_offsets(cols, k_len, table_row, stride_kp, stride_kn, PAGE)
        k = tl.load(k_base + rows[None, :] + offs_d[:, None], mask=ok, other=0.0)
    if IS_FP32:  # tf32 would cost ~1e-3 relative error
        return tl.dot(q, k, input_precision="ieee")
    return tl.dot(q, k)


@triton.jit
def _weighted_values(p, v_desc, v_base, b, hk, n0, offs_n, offs_d, d_ok, k_len, stride_vn,
                     table_row, stride_vp, PAGE: tl.constexpr, MASK_COLS: tl.constexpr,
                     USE_TMA: tl.constexpr, IS_FP32: tl.constexpr,
                     BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """p @ v for the key tile starting at n0."""
    if USE_TMA:
        v = tl.reshape(v_desc.load([b, hk, n0, 0]), (BLOCK_N, D_PAD))
    else:
        cols = n0 + offs_n
        ok = d_ok[None, :]
        if MASK_COLS:
            ok = ok & (cols < k_len)[:, None]
        rows = kv_row_offsets(cols, k_len, table_row, stride_vp, stride_vn, PAGE)
        v = tl.load(v_base + rows[:, None] + offs_d[None, :], mask=ok, other=0.0)
    if IS_FP32:
        return tl.dot(p, v, input_precision="ieee")
    return tl.dot(p.to(v.dtype), v)


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether the bulk tensor copy engine can read these: Hopper or newer (or the interpreter),
    16-byte aligned base and strides."""
    if os.environ.get("XATTENTION_DISABLE_TMA", "0") not in ("", "0"):
        return False
    if interpreter_enabled():
        ok = True
    else:
        ok = torch.cuda.get_device_capability(tensors[0].device)[0] >= 9
        ok = ok and hasattr(tl, "make_tensor_descriptor")
    for t in tensors:
        size = t.element_size()
        ok = ok and t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride()[:-1])
    if ok:
        _ensure_allocator()
    return ok


_allocator_set = False


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need a little global scratch, which Triton asks for."""
    global _allocator_set
    if not _allocator_set:
        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device="cpu" if interpreter_enabled()
                               else "cuda")

        triton.set_allocator(alloc)
        _allocator_set = True


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SparsePlan,
    scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on ``plan`` (already ``[B, Hq, ...]``; expanded views are fine).

    ``out``/``lse``: buffers to write into (a captured graph's outputs), else new ones. ``k`` may
    be a :class:`~xattention.paged.PagedKV` (``v`` None): rows read through its block table.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    layout = plan.layout
    if isinstance(k, PagedKV):
        q = q if q.stride(-1) == 1 else q.contiguous()
        paged, k, v = k, k.k_pages, k.v_pages
        strides = (*paged.kernel_strides("k"), *paged.kernel_strides("v"))
        table, page, tma = paged.block_table, paged.page_size, False
    else:
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
        table, page, tma = k, 0, _tma_ok(k, v)  # table: a placeholder, unread
    if plan.full_count.stride() != plan.partial_count.stride() or any(
            t.stride(-1) != 1 for t in (plan.full_count, plan.full_index, plan.partial_index)):
        plan = plan.contiguous()
    if out is None:
        out = new_output(q.shape, q.dtype, q.device)
    if lse is None:
        lse = new_output((b, hq, lq), torch.float32, q.device)

    def grid(meta):
        return (num_blocks(lq, meta["BLOCK_M"]), b * hq)

    fc, fi, pi = plan.full_count, plan.full_index, plan.partial_index
    _sparse_launcher[grid](
        q, k, v, out, lse, fc, fi, plan.partial_count, pi, table,
        q.stride(0), q.stride(1), q.stride(2),
        *strides,
        out.stride(0), out.stride(1), out.stride(2),
        fc.stride(0), fc.stride(1),
        fi.stride(0), fi.stride(1), fi.stride(2),
        pi.stride(0), pi.stride(1), pi.stride(2), table.stride(0),
        len_bucket(lk), b, hq, hq // hkv, lq, lk, scale * LOG2E,
        HEAD_DIM=d, D_PAD=padded_head_dim(d), BLOCK_SIZE=layout.block_size,
        CAUSAL=bool(layout.causal), IS_FP32=q.dtype == torch.float32, TMA_OK=tma,
        PAGE=page,
    )
    return out, lse
