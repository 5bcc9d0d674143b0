"""Antidiagonal block-score estimate (docs/design.md), the first stage of XAttention.

For query group ``a`` (``S`` consecutive query rows) and key group ``b`` (``S`` consecutive keys),
``A(a, b)`` is the mean of the antidiagonal of their ``S x S`` tile of ``q k^T`` times ``scale``.
Reversing the rows of each query group turns that antidiagonal into a plain dot product of two
``S*D``-wide vectors, so one matrix product over the strided reshape computes all of ``A`` at
``1/(2S)`` of the dense attention FLOPs. Each row of ``A`` goes through a softmax over its allowed
key groups, the probabilities are summed per (query block, key block), and every block row is
normalised to sum to 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import resolve_backend
from ._validation import (
    as_bhsd,
    check_backend,
    check_block_params,
    check_bool,
    check_estimate_dtype,
    check_qkv,
    check_scale,
)
from .block_layout import BlockLayout, num_blocks
from .fp8 import dequantize, quantize_per_head

# Elements of the per-chunk logits in the PyTorch path (float32: 4 bytes each, 64 MiB).
_CHUNK_ELEMENTS = 1 << 24


def estimate_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    stride: int = 8,
    block_size: int = 128,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    estimate_dtype: torch.dtype | None = None,
    layout: str = "bhsd",
) -> torch.Tensor:
    """Estimate how much attention mass each (query block, key block) pair holds.

    Args:
        q: ``[B, Hq, Lq, D]`` queries, the last ``Lq`` positions of the context.
        k: ``[B, Hkv, Lk, D]`` keys, ``Hq % Hkv == 0`` (GQA), ``Lq <= Lk``.
        stride: antidiagonal stride ``S``; must divide ``block_size``.
        block_size: block edge ``Bs`` for queries and keys.
        causal: only key groups at or before a query group's last position count.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        estimate_dtype: None (products in the input dtype, the exact reference), or
            ``torch.float8_e4m3fn``: q and k rounded to FP8 e4m3 with one power-of-two scale per
            (batch, head) (``xattention.fp8``), which runs the Triton kernel at FP8's matrix rate
            on sm89+ GPUs. Opt-in: it changes which blocks are kept on some rows
            (benchmarks/results/fp8_fidelity.md measures how many, on real models).
        layout: ``"bhsd"`` (default) or ``"bshd"`` (FlashAttention's ``[B, L, H, D]``, read in
            place through strides). The scores are ``[B, Hq, nQB, nKB]`` either way.

    Returns:
        float32 ``[B, Hq, ceil(Lq/Bs), ceil(Lk/Bs)]``; each row sums to 1.

    The PyTorch path works through runs of query groups, one chunk of at most ``2^24`` float32
    logits (64 MiB) at a time, never the full ``(L/S)^2`` matrix; with the strided copies of k
    its measured peak is ~65 / 130 / 230-330 MiB at 16k / 32k / 64k tokens (B=1, 2 heads,
    D=64, two runs of benchmarks/bench_cpu.py --memory): the 64 MiB chunk plus a few float32
    copies of k.

    Example:
        >>> import torch
        >>> from xattention import estimate_block_scores
        >>> q, k = torch.randn(1, 4, 300, 64), torch.randn(1, 2, 300, 64)
        >>> scores = estimate_block_scores(q, k, stride=8, block_size=64)
        >>> scores.shape, bool(torch.allclose(scores.sum(-1), torch.ones(1, 4, 5)))
        (torch.Size([1, 4, 5, 5]), True)
    """
    q, k, bshd = as_bhsd(layout, q, k)
    shape = check_qkv(q, k, layout="bshd" if bshd else "bhsd")
    stride, block_size = check_block_params(stride, block_size)
    scale = check_scale(scale, shape.head_dim)
    causal = check_bool("causal", causal)
    backend = check_backend(backend)
    estimate_dtype = check_estimate_dtype(estimate_dtype)
    if shape.batch == 0:
        grid = BlockLayout(shape.q_len, shape.k_len, block_size, causal).grid_shape(
            0, shape.q_heads)
        return q.new_empty(grid, dtype=torch.float32)
    return _estimate(q, k, stride, block_size, causal, scale, backend, estimate_dtype)


def _estimate(q, k, stride, block_size, causal, scale, backend, estimate_dtype=None
              ) -> torch.Tensor:
    """Dispatch on validated input (shared with ``xattention``)."""
    return _estimate_with_flags(q, k, None, stride, block_size, causal, scale, backend,
                                estimate_dtype)[0]


def _estimate_with_flags(q, k, v, stride, block_size, causal, scale, backend,
                         estimate_dtype=None):
    """``(scores, flags)``: with ``v`` given and the Triton kernel serving, ``flags`` are the
    selection's non-finite block flags written by the same launch; None otherwise (selection
    then derives them from the inputs)."""
    from .kernels import estimate_unsupported_reason

    reason = estimate_unsupported_reason(q, k, stride, block_size, estimate_dtype)
    chosen = resolve_backend(backend, q.device, reason, "estimate")
    if chosen == "triton":
        from .kernels.estimate import estimate_block_scores_triton

        res = estimate_block_scores_triton(q, k, stride, block_size, causal, scale,
                                           estimate_dtype, v=v)
        return res if v is not None else (res, None)
    if estimate_dtype is not None:  # the reference of the FP8 mode: the same rounded operands
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        q = dequantize(*quantize_per_head(q), work)
        k = dequantize(*quantize_per_head(k, center=True), work)  # xattention.fp8: why centred
    return estimate_block_scores_torch(q, k, stride, block_size, causal, scale), None


def strided_queries(q: torch.Tensor, stride: int, dtype: torch.dtype) -> torch.Tensor:
    """``[..., L, D] -> [..., ceil(L/S), S*D]`` with each group's rows reversed (zero padded)."""
    length = q.shape[-2]
    groups = num_blocks(length, stride)
    q = F.pad(q.to(dtype), (0, 0, 0, groups * stride - length))
    return q.unflatten(-2, (groups, stride)).flip(-2).flatten(-2)


def strided_keys(k: torch.Tensor, stride: int, dtype: torch.dtype) -> torch.Tensor:
    """``[..., L, D] -> [..., ceil(L/S), S*D]`` keeping each group's order (zero padded)."""
    length = k.shape[-2]
    groups = num_blocks(length, stride)
    k = F.pad(k.to(dtype), (0, 0, 0, groups * stride - length))
    return k.unflatten(-2, (groups, stride)).flatten(-2)


def estimate_block_scores_torch(
    q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int, causal: bool, scale: float
) -> torch.Tensor:
    """Chunked PyTorch implementation (the reference path; runs on any device).

    Chunks are runs of query *groups* (not blocks), sized from the actual lengths, so a block
    size far beyond the input costs nothing extra; a block's partial sums accumulate over chunks
    and every block row is normalised at the end.
    """
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    if stride >= lk:
        return _single_group_scores(q, k, stride, block_size, scale, work)
    groups_per_block = block_size // stride
    nqb, nkb = num_blocks(lq, block_size), num_blocks(lk, block_size)
    nqg, nkg = num_blocks(lq, stride), num_blocks(lk, stride)

    k_str = strided_keys(k, stride, work).unsqueeze(2)  # [B, Hkv, 1, nKG, S*D]
    key_group_start = torch.arange(nkg, device=q.device) * stride
    offset = lk - lq
    acc = torch.zeros(b, hkv, group, nqb, nkb, dtype=work, device=q.device)

    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(b * hq * nkg, 1))
    for a0 in range(0, nqg, rows_per_chunk):
        a1 = min(nqg, a0 + rows_per_chunk)
        rows = q[:, :, a0 * stride : min(lq, a1 * stride)]
        q_str = strided_queries(rows, stride, work).unflatten(1, (hkv, group))
        logits = torch.matmul(q_str, k_str.transpose(-1, -2))  # [B, Hkv, G, na, nKG]
        logits.mul_(scale / stride)
        if causal:
            group_last_row = torch.clamp((torch.arange(a0, a1, device=q.device) + 1) * stride,
                                         max=lq) - 1
            allowed = key_group_start[None, :] <= (group_last_row + offset)[:, None]
            logits.masked_fill_(~allowed, float("-inf"))
        probs = _softmax_(logits)
        # Key groups summed into key blocks, then query groups added to their query block.
        per_key_block = _sum_runs(probs, groups_per_block)  # [B, Hkv, G, na, nKB]
        query_block = torch.arange(a0, a1, device=q.device) // groups_per_block
        acc.index_add_(3, query_block, per_key_block)
        del logits, probs, per_key_block  # before the next chunk is allocated: one at a time
    acc /= acc.sum(-1, keepdim=True)
    return acc.flatten(1, 2).to(torch.float32)


def _single_group_scores(q, k, stride, block_size, scale, work) -> torch.Tensor:
    """``stride >= Lk``: one key group (and one query group), so every softmax row is ``[1]`` and
    the only key block holds all the mass. Padding to a whole group would cost ``stride * D``
    memory for nothing; only the finiteness of the single logit ``A(0, 0)`` is computed, so that a
    NaN or inf input still gives NaN scores, as the full computation would."""
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    rows = torch.arange(min(lq, max(0, stride - lk)), lq, device=q.device)  # rows with a partner
    qr = q[:, :, rows].to(work).unflatten(1, (hkv, hq // hkv))
    kr = k[:, :, stride - 1 - rows].to(work).unsqueeze(2)
    logit = (qr * kr).sum(dim=(-1, -2)).flatten(1, 2) * (scale / stride)  # A(0, 0), [B, Hq]
    # The padded product also multiplies every other entry by zero: a NaN or inf anywhere in the
    # group makes A(0, 0) NaN there.
    everything = q.to(work).sum(dim=(-1, -2)) + k.to(work).sum(dim=(-1, -2)).repeat_interleave(
        hq // hkv, dim=1)
    logit = logit + 0.0 * everything
    ones = torch.ones(b, hq, num_blocks(lq, block_size), 1, dtype=work, device=q.device)
    return (ones + 0.0 * logit[:, :, None, None]).to(torch.float32)  # softmax of one logit


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in place: the chunk's logits are the only chunk-sized buffer."""
    x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.div_(x.sum(-1, keepdim=True))


def _sum_runs(x: torch.Tensor, run: int) -> torch.Tensor:
    """Sums of consecutive runs of ``run`` entries along the last dim (the last run may be short),
    without padding to whole runs: ``run`` may exceed the length by any amount."""
    n = x.shape[-1]
    full = n // run * run
    parts = []
    if full:
        parts.append(x[..., :full].unflatten(-1, (n // run, run)).sum(-1))
    if full < n:
        parts.append(x[..., full:].sum(-1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)
