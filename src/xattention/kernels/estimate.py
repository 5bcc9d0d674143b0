"""Fused antidiagonal estimate in Triton, and its launcher.

The reference computes ``A = Q_str K_str^T`` over the strided reshape, a softmax per row and block
sums. The original implementation writes ``A`` (``(L/S)^2`` per head) to memory and reads it twice.
Here one kernel does it all in a single pass over the keys:

1. For a tile of query groups (rows) and every head of its GQA group, stream the key groups in
   tiles. The antidiagonal dot products come straight from q and k in memory: for offset ``t`` the
   query rows ``a*S + S-1-t`` meet the key rows ``b*S + t``, so no strided copy is ever made, and
   one K tile serves all query heads that share it.
2. Keep an online softmax per row (running max ``m`` and sum ``l``). For each key tile, sum
   ``exp(A - m_now)`` over the key groups of each key block and store those per-row partial block
   sums plus ``m_now``: ``L/Bs`` numbers per row instead of ``L/S``.
3. After the last key tile, the program reads its own partials back, rescales each by
   ``exp(m_then - m_final) / l_final`` (now the exact softmax), sums the rows of each query block
   and writes the normalised block scores.

The partials live in a scratch buffer sized for one chunk of query groups at a time (the launcher
walks the query length in chunks), so memory stays bounded at any length.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._backend import autotune_timer, interpreter_enabled, new_output, quick_tuning
from ..block_layout import num_blocks
from ..paged import PagedKV
from ._common import LOG2E, kv_row_offsets, len_bucket, padded_head_dim
from ._launch import CachedLauncher
from ._tuning import HOPPER_SMEM_BYTES, forced_config, smem_limit
from .quantize import quantize_per_head_triton

# Scratch for partial block sums of one launch, in bytes.
_SCRATCH_BYTES = 512 << 20


def _gpu_configs() -> list[triton.Config]:
    configs = []
    for rows in (16, 32, 64, 128, 256):
        for bn in (64, 128, 256):
            for bd in (64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        configs.append(triton.Config({"ROWS": rows, "BLOCK_N": bn, "BLOCK_D": bd},
                                                     num_warps=warps, num_stages=stages))
    return configs


def _configs() -> list[triton.Config]:
    if interpreter_enabled():
        # Small tiles keep the interpreter fast; BLOCK_D 16 walks the head_dim in chunks as large
        # head dims do on the GPU. Two entries, because the autotuner prunes (and so adapts the
        # tile to the block shape) only when it has more than one config; _prune keeps one.
        return [triton.Config({"ROWS": r, "BLOCK_N": r, "BLOCK_D": 16}, num_warps=4,
                              num_stages=1) for r in (16, 32)]
    return _gpu_configs()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _few_programs(row_groups: int, device: torch.device) -> bool:
    """Whether 128-row tiles would leave part of the GPU idle (short inputs, few heads)."""
    if device.type != "cuda":
        return False
    return num_blocks(row_groups, 128) < _sm_count(device.index or 0)


def _smem_bytes(c: triton.Config, g_tile: int, elem: int) -> int:
    """Shared memory of the pipelined Q and K tiles (matches the compiler's figure on sm90)."""
    m, bd = c.kwargs["ROWS"] * g_tile, c.kwargs["BLOCK_D"]
    return c.num_stages * (m * bd + bd * c.kwargs["BLOCK_N"]) * elem


def kept_configs(gpb: int, g_tile: int, d_pad: int, few_programs: bool = False, elem: int = 2,
                 smem: int = HOPPER_SMEM_BYTES) -> list[triton.Config]:
    """The GPU configs full tuning chooses among for this block shape (tests walk all of them).

    ``few_programs``: the launch has fewer 128-row tiles than the GPU has SMs, so 64-row tiles,
    which double the programs, are kept too. ``elem``: operand bytes; ``smem``: the per-program
    shared memory limit.
    """
    kept = []
    for c in _gpu_configs():
        rows, bn = c.kwargs["ROWS"], c.kwargs["BLOCK_N"]
        if rows < gpb or bn < gpb or c.kwargs["BLOCK_D"] > d_pad:
            continue
        if _smem_bytes(c, g_tile, elem) > smem:
            continue
        m = rows * g_tile
        if few_programs and m == 64 and bn == 128 and c.num_warps == 4 and c.num_stages < 4:
            kept.append(c)
            continue
        if not 128 <= m <= 256:
            continue
        # Wide tiles (64 FLOP per byte of L2 traffic at 128x128, 85 at 128x256) pay only with 8
        # warps holding the accumulator; 4 stages only for them; smaller tiles stay at 2-3.
        big = m * bn >= 128 * 256
        if big and (c.num_warps != 8 or m * bn > 128 * 256):
            continue
        if not big and (c.num_stages == 4 or m != 128 or bn != 128):
            continue
        kept.append(c)
    return kept or [_fallback_config(gpb, g_tile, d_pad)]


def _min_tile(gpb: int) -> int:
    """The smallest row / key tile a block shape allows: whole key blocks, 16 for tl.dot."""
    return max(16, gpb)


def _fallback_config(gpb: int, g_tile: int, d_pad: int, interpreted: bool = False
                     ) -> triton.Config:
    """The config when no tuned one fits (large blocks per tile): the smallest legal tiles
    (small head-dim chunks under the interpreter, whose cost grows with tile size)."""
    size = _min_tile(gpb)
    if interpreted:
        return triton.Config({"ROWS": size, "BLOCK_N": size, "BLOCK_D": 16}, num_warps=4,
                             num_stages=1)
    return triton.Config({"ROWS": max(size, 128 // g_tile), "BLOCK_N": size,
                          "BLOCK_D": min(d_pad, 64)}, num_warps=4, num_stages=2)


def _quick_config(gpb: int, g_tile: int, d_pad: int, row_groups: int,
                  device: torch.device, elem: int = 2, len_bucket: int = 0) -> triton.Config:
    """The shape full tuning picked on the H200, with rows halved while the grid would leave SMs
    idle (at 4k, S=16 has half the query groups of S=8 and ran 2.6x slower at 128 rows), and
    256-wide key tiles from 32k keys on (the best of every kept config at 128k, run 10)."""
    floor = _min_tile(gpb)
    rows = max(floor, 128 // g_tile)
    if device.type == "cuda":
        while rows > floor and num_blocks(row_groups, rows) < _sm_count(device.index or 0):
            rows //= 2
    warps = 8 if rows * g_tile >= 128 else 4
    wide = warps == 8 and rows * g_tile <= 128 and len_bucket >= 15
    # FP8: 128 head_dim elements per tile row (128 bytes, as bf16's 64).
    return triton.Config({"ROWS": rows, "BLOCK_N": 256 if wide else max(128, gpb),
                          "BLOCK_D": min(d_pad, 128 if elem == 1 else 64)},
                         num_warps=warps, num_stages=3)


def _prune(configs, named_args, **kwargs):
    forced = forced_config("_antidiagonal_estimate_fwd")
    if forced is not None:
        return [forced]
    gpb, g_tile, d_pad = kwargs["GPB"], kwargs["G_TILE"], kwargs["D_PAD"]
    if interpreter_enabled():
        fits = [c for c in configs if c.kwargs["ROWS"] >= gpb and c.kwargs["BLOCK_N"] >= gpb]
        return fits[:1] or [_fallback_config(gpb, g_tile, d_pad, interpreted=True)]
    row_groups, device = named_args["row_groups"], named_args["Q"].device
    elem = named_args["Q"].element_size()
    if quick_tuning():
        return [_quick_config(gpb, g_tile, d_pad, row_groups, device, elem,
                              named_args["len_bucket"])]
    return kept_configs(gpb, g_tile, d_pad, _few_programs(row_groups, device), elem,
                        smem_limit(device))


@triton.autotune(
    configs=_configs(),
    # len_bucket (keys) and rows_bucket (query groups x head tiles, i.e. how full the grid is):
    # short inputs and chunked prefill (few query rows against many keys) tune apart.
    # Triton adds the tensors' dtypes to the key, so FP8 operands tune apart from bf16 ones.
    key=["HEAD_DIM", "STRIDE", "GPB", "G_TILE", "CAUSAL", "len_bucket", "rows_bucket",
         "IS_FP32", "SCALED", "PAGE"],
    prune_configs_by={"early_config_prune": _prune},
    # The scratch is rewritten whole by every run, so benchmarking configs is side-effect free.
    do_bench=autotune_timer(),
)
@triton.jit
def _antidiagonal_estimate_fwd(
    Q, K, V, Scores, Partial, TileMax, QScale, KScale, RowBad, KeyBad, Table,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_sb, stride_sh, stride_si,
    stride_vb, stride_vh, stride_vn, stride_tb,
    len_bucket, rows_bucket, row_groups, q_heads, kv_heads, q_len, k_len,
    num_q_groups, num_k_groups, num_q_blocks, num_k_blocks,
    chunk_a0, chunk_rows, partial_row_len, tile_max_row_len, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    STRIDE: tl.constexpr, GPB: tl.constexpr, G_TILE: tl.constexpr,
    CAUSAL: tl.constexpr, IS_FP32: tl.constexpr, SCALED: tl.constexpr, FLAGS: tl.constexpr,
    PAGE: tl.constexpr, KEY_ROWS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK_M: tl.constexpr = G_TILE * ROWS
    NB_T: tl.constexpr = BLOCK_N // GPB  # key blocks per key tile
    ND: tl.constexpr = D_PAD // BLOCK_D
    group = q_heads // kv_heads
    tiles_per_chunk = tl.num_programs(0)
    pid_r = tiles_per_chunk - 1 - tl.program_id(0)  # heaviest (latest) rows first
    pid_h = tl.program_id(1)  # (batch, kv head, head tile)
    head_tiles = group // G_TILE
    b = pid_h // (kv_heads * head_tiles)
    hk = (pid_h // head_tiles) % kv_heads
    h0 = hk * group + (pid_h % head_tiles) * G_TILE

    r = tl.arange(0, BLOCK_M)
    head = h0 + r // ROWS  # query head of each row
    local_a = pid_r * ROWS + r % ROWS  # row within this chunk
    a = chunk_a0 + local_a  # query group index
    row_ok = a < num_q_groups
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_row_base = Q + b * stride_qb + head * stride_qh
    # Paged K/V (PAGE > 0): the batch stride is the page stride, rows come through the table.
    table_row = Table + b * stride_tb
    if PAGE == 0:
        k_base = K + b * stride_kb + hk * stride_kh
    else:
        k_base = K + hk * stride_kh
    offset = k_len - q_len
    # Causal limit per row: key group b is allowed iff b*S <= position of the group's last row.
    last_pos = offset + tl.minimum(a * STRIDE + STRIDE - 1, q_len - 1)
    if CAUSAL:
        a_hi = tl.minimum(chunk_a0 + pid_r * ROWS + ROWS, num_q_groups) - 1
        hi_pos = offset + tl.minimum(a_hi * STRIDE + STRIDE - 1, q_len - 1)
        n_tiles = (hi_pos // STRIDE) // BLOCK_N + 1
    else:
        n_tiles = tl.cdiv(num_k_groups, BLOCK_N)

    scratch_row = (b * q_heads + head) * chunk_rows + local_a  # [BLOCK_M]
    p_ptrs = Partial + scratch_row[:, None] * partial_row_len
    t_ptrs = TileMax + scratch_row * tile_max_row_len
    # Quantized operands (FP8): one scale per (batch, head) of q and of k multiplies the products.
    if SCALED:
        row_scale = (tl.load(QScale + b * q_heads + head) * tl.load(KScale + b * kv_heads + hk)
                     * qk_scale)
    else:
        row_scale = tl.full([BLOCK_M], qk_scale, dtype=tl.float32)

    if FLAGS:
        # The selection's non-finite flags (docs/design.md §4), written here so that they cost no
        # launch of their own: this program's query blocks, from the q rows it reads anyway, and
        # a share of the key blocks of its KV head (K and V), spread over the first chunk's
        # programs of the head tile 0.
        q_bad = tl.zeros([BLOCK_M], dtype=tl.int32)
        for e in range(0, STRIDE * ND):
            t = e // ND
            d = (e % ND) * BLOCK_D + offs_d
            q_rows = a * STRIDE + (STRIDE - 1 - t)
            qv = tl.load(q_row_base[:, None] + q_rows[:, None] * stride_qm + d[None, :],
                         mask=(q_rows < q_len)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
            qv = qv.to(tl.float32)
            q_bad = tl.maximum(q_bad, tl.max(((qv - qv) != 0).to(tl.int32), 1))  # NaN, +-inf
        QB_F: tl.constexpr = BLOCK_M // GPB
        fb = tl.arange(0, QB_F)
        f_qb = (chunk_a0 + pid_r * ROWS + (fb * GPB) % ROWS) // GPB
        f_head = h0 + (fb * GPB) // ROWS
        f_bad = tl.max(tl.reshape(q_bad, (QB_F, GPB)), 1)
        tl.store(RowBad + (b * q_heads + f_head) * num_q_blocks + f_qb, f_bad.to(tl.int8),
                 mask=f_qb < num_q_blocks)
        if chunk_a0 == 0:
            scan_keys = pid_h % head_tiles == 0
        else:
            scan_keys = pid_h < 0
        if scan_keys:
            KB_ROWS: tl.constexpr = KEY_ROWS
            kr = tl.arange(0, KB_ROWS)
            if PAGE == 0:
                v_base = V + b * stride_vb + hk * stride_vh
            else:
                v_base = V + hk * stride_vh
            for kb in range(tl.program_id(0), num_k_blocks, tiles_per_chunk):
                kv_bad = tl.zeros([KB_ROWS], dtype=tl.int32)
                for e in range(0, (GPB * STRIDE // KB_ROWS) * ND):
                    rows_k = kb * (GPB * STRIDE) + (e // ND) * KB_ROWS + kr
                    d = (e % ND) * BLOCK_D + offs_d
                    ok = (rows_k < k_len)[:, None] & (d < HEAD_DIM)[None, :]
                    k_off = kv_row_offsets(rows_k, k_len, table_row, stride_kb, stride_kn, PAGE)
                    v_off = kv_row_offsets(rows_k, k_len, table_row, stride_vb, stride_vn, PAGE)
                    kx = tl.load(k_base + k_off[:, None] + d[None, :], mask=ok,
                                 other=0.0).to(tl.float32)
                    vx = tl.load(v_base + v_off[:, None] + d[None, :], mask=ok,
                                 other=0.0).to(tl.float32)
                    bad = ((kx - kx) != 0) | ((vx - vx) != 0)
                    kv_bad = tl.maximum(kv_bad, tl.max(bad.to(tl.int32), 1))
                tl.store(KeyBad + (b * kv_heads + hk) * num_k_blocks + kb,
                         tl.max(kv_bad, 0).to(tl.int8))

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for kt in range(0, n_tiles):
        kg = kt * BLOCK_N + offs_n  # key group index
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for e in range(0, STRIDE * ND):
            t = e // ND
            d = (e % ND) * BLOCK_D + offs_d
            q_rows = a * STRIDE + (STRIDE - 1 - t)
            qv = tl.load(q_row_base[:, None] + q_rows[:, None] * stride_qm + d[None, :],
                         mask=(q_rows < q_len)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
            k_rows = kg * STRIDE + t
            k_off = kv_row_offsets(k_rows, k_len, table_row, stride_kb, stride_kn, PAGE)
            kv = tl.load(k_base + k_off[None, :] + d[:, None],
                         mask=(k_rows < k_len)[None, :] & (d < HEAD_DIM)[:, None], other=0.0)
            if IS_FP32:  # tf32 would cost ~1e-3 relative error on the logits
                acc = tl.dot(qv, kv, acc, input_precision="ieee")
            else:
                # FP8 on sm90: Triton keeps the whole loop in the MMA's reduced-precision
                # accumulator. Promoting to float32 every 128 products cut the score error 14x
                # (2e-3 -> 1.4e-4) but cost 1.4x (12.4 -> 17.1 ms at 128k), and changed 0.02% of
                # the mask's blocks at 32k: not worth it (benchmarks/NOTES.md, run 10).
                acc = tl.dot(qv, kv, acc)
        allowed = (kg < num_k_groups)[None, :]
        if CAUSAL:
            allowed = allowed & ((kg * STRIDE)[None, :] <= last_pos[:, None])
        s = tl.where(allowed, acc * row_scale[:, None], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key group 0 is always allowed
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(p, 1)
        m_i = m_new
        block_sums = tl.sum(tl.reshape(p, (BLOCK_M, NB_T, GPB)), 2)
        # The last key tile may reach past the last key block (a 256-group tile covers 256 / GPB
        # blocks): those sums are all zero and would land in the next row's scratch.
        kb_w = kt * NB_T + tl.arange(0, NB_T)
        tl.store(p_ptrs + kb_w[None, :], block_sums, mask=(kb_w < num_k_blocks)[None, :])
        tl.store(t_ptrs + kt, m_new)

    # Read the partials back (written by other threads of this program: barrier first).
    tl.debug_barrier()
    inv_l = tl.where(row_ok, 1.0 / l_i, 0.0)
    QB_T: tl.constexpr = BLOCK_M // GPB
    qb_row = tl.arange(0, QB_T)
    qb = (chunk_a0 + pid_r * ROWS + (qb_row * GPB) % ROWS) // GPB  # query block of each output row
    qb_head = h0 + (qb_row * GPB) // ROWS
    # Clamped at 1: rows past the last query block are masked at the store, not divided by 0.
    groups_in_block = tl.maximum(tl.minimum(num_q_groups - qb * GPB, GPB), 1).to(tl.float32)
    out_ptrs = Scores + b * stride_sb + qb_head[:, None] * stride_sh + qb[:, None] * stride_si
    out_ok = (qb < num_q_blocks)[:, None]
    num_k_tiles = tl.cdiv(num_k_blocks, NB_T)
    for kt in range(0, num_k_tiles):
        kb = kt * NB_T + tl.arange(0, NB_T)
        if kt < n_tiles:
            part = tl.load(p_ptrs + kb[None, :], mask=(kb < num_k_blocks)[None, :], other=0.0)
            w = tl.math.exp2(tl.load(t_ptrs + kt) - m_i) * inv_l
            contrib = tl.reshape(part * w[:, None], (QB_T, GPB, NB_T))
            score = tl.sum(contrib, 1) / groups_in_block[:, None]
        else:
            score = tl.zeros([QB_T, NB_T], dtype=tl.float32)
        tl.store(out_ptrs + kb[None, :], score, mask=out_ok & (kb < num_k_blocks)[None, :])


_estimate_launcher = CachedLauncher(_antidiagonal_estimate_fwd)


def _head_tile(group: int) -> int:
    """Query heads per program: the largest power of two dividing the GQA group, at most 8."""
    tile = 1
    while tile < 8 and group % (tile * 2) == 0:
        tile *= 2
    return tile


def estimate_block_scores_triton(
    q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int, causal: bool, scale: float,
    estimate_dtype: torch.dtype | None = None, v: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The block scores; with ``v``, also the selection's non-finite flags: int8 ``[B, Hq, nQB]``
    (query blocks holding a NaN or inf q) and ``[B, Hkv, nKB]`` (key blocks holding one in k or
    v), written by the same launch.

    ``k`` may be a :class:`~xattention.paged.PagedKV` (then ``v`` is the same object or None):
    its rows are read in place through the block table (not with ``estimate_dtype``).
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    paged = k if isinstance(k, PagedKV) else None
    scores = new_output((b, hq, num_blocks(lq, block_size), num_blocks(lk, block_size)),
                        torch.float32, q.device)
    q_scale = k_scale = None
    if estimate_dtype is not None and paged is not None:
        raise ValueError("the FP8 estimate rounds a contiguous k: gather the PagedKV first")
    if estimate_dtype is not None:
        # Keys centred: the softmax over key groups ignores a per-row shift (xattention.fp8).
        q, q_scale = quantize_per_head_triton(q)
        k, k_scale = quantize_per_head_triton(k, center=True)
    q = q if q.stride(-1) == 1 else q.contiguous()
    if paged is None:
        k = k if k.stride(-1) == 1 else k.contiguous()
        k_strides = (k.stride(0), k.stride(1), k.stride(2))
        table, page = k, 0  # placeholder, unread
    else:
        k = paged.k_pages
        k_strides = paged.kernel_strides("k")
        table, page = paged.block_table, paged.page_size
    gpb = block_size // stride
    g_tile = _head_tile(hq // hkv)
    nqg, nkg = num_blocks(lq, stride), num_blocks(lk, stride)
    nqb, nkb = scores.shape[2], scores.shape[3]
    d_pad = padded_head_dim(d, q.element_size())

    # Scratch rows hold one partial sum per key block (stores past the last block are masked, so
    # no tile width can overflow a row) and one running max per key tile (tl.dot needs tiles of
    # at least 16 key groups).
    partial_row_len = nkb
    tile_max_row_len = num_blocks(nkg, 16)
    row_bytes = b * hq * (partial_row_len + tile_max_row_len) * 4
    # Chunks hold whole query blocks and whole row tiles of any config (up to 256 rows), so no
    # program's rows run past its chunk's scratch.
    unit = max(256, gpb)
    chunk_rows = max(unit, (_SCRATCH_BYTES // max(row_bytes, 1)) // unit * unit)
    chunk_rows = min(chunk_rows, num_blocks(nqg, unit) * unit)
    partial = torch.empty(b * hq * chunk_rows * partial_row_len, dtype=torch.float32,
                          device=q.device)
    tile_max = torch.empty(b * hq * chunk_rows * tile_max_row_len, dtype=torch.float32,
                           device=q.device)
    flags = v is not None
    if flags:
        if paged is not None:
            v, v_strides = paged.v_pages, paged.kernel_strides("v")
        else:
            v = v if v.stride(-1) == 1 else v.contiguous()
            v_strides = (v.stride(0), v.stride(1), v.stride(2))
        row_bad = new_output((b, hq, nqb), torch.int8, q.device)
        key_bad = new_output((b, hkv, nkb), torch.int8, q.device)
    else:
        v, row_bad, key_bad = k, scores, scores  # placeholders, unread
        v_strides = k_strides
    head_tiles = b * hkv * ((hq // hkv) // g_tile)

    for a0 in range(0, nqg, chunk_rows):
        rows_here = min(chunk_rows, nqg - a0)
        row_groups = rows_here * head_tiles

        def grid(meta, rows_here=rows_here):
            return (num_blocks(rows_here, meta["ROWS"]), b * hkv * ((hq // hkv) // g_tile))

        _estimate_launcher[grid](
            q, k, v, scores, partial, tile_max,
            scores if q_scale is None else q_scale, scores if k_scale is None else k_scale,
            row_bad, key_bad, table,
            q.stride(0), q.stride(1), q.stride(2),
            *k_strides,
            scores.stride(0), scores.stride(1), scores.stride(2),
            *v_strides, table.stride(0),
            len_bucket(lk), int(math.log2(row_groups)), row_groups, hq, hkv, lq, lk, nqg, nkg, nqb,
            nkb,
            a0, chunk_rows, partial_row_len, tile_max_row_len, scale * LOG2E / stride,
            HEAD_DIM=d, D_PAD=d_pad, STRIDE=stride, GPB=gpb, G_TILE=g_tile,
            CAUSAL=bool(causal), IS_FP32=q.dtype == torch.float32, SCALED=q_scale is not None,
            PAGE=page,
            FLAGS=flags, KEY_ROWS=min(16, block_size & -block_size),
        )
    return (scores, (row_bad, key_bad)) if flags else scores
