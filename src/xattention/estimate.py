"""Antidiagonal block-score estimate (DESIGN.md §2), the first stage of XAttention.

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
from ._validation import check_backend, check_block_params, check_bool, check_qkv, check_scale
from .block_layout import num_blocks

# Elements of the per-chunk score matrix in the PyTorch path (fp32: 4 bytes each). Bounds the peak
# extra memory at ~256 MiB whatever the length.
_CHUNK_ELEMENTS = 1 << 26


def estimate_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    stride: int = 8,
    block_size: int = 128,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
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

    Returns:
        float32 ``[B, Hq, ceil(Lq/Bs), ceil(Lk/Bs)]``; each row sums to 1.

    The PyTorch path works through query blocks in chunks: its peak extra memory is
    ``min(all, ~2^26)`` float32 scores of one chunk (``B*Hq*rows/S*Lk/S``), never the full
    ``(L/S)^2`` matrix.

    Example:
        >>> import torch
        >>> from xattention import estimate_block_scores
        >>> q, k = torch.randn(1, 4, 300, 64), torch.randn(1, 2, 300, 64)
        >>> scores = estimate_block_scores(q, k, stride=8, block_size=64)
        >>> scores.shape, bool(torch.allclose(scores.sum(-1), torch.ones(1, 4, 5)))
        (torch.Size([1, 4, 5, 5]), True)
    """
    shape = check_qkv(q, k)
    stride, block_size = check_block_params(stride, block_size)
    scale = check_scale(scale, shape.head_dim)
    causal = check_bool("causal", causal)
    backend = check_backend(backend)
    return _estimate(q, k, stride, block_size, causal, scale, backend)


def _estimate(q, k, stride, block_size, causal, scale, backend) -> torch.Tensor:
    """Dispatch on validated input (shared with ``xattention``)."""
    from .kernels import estimate_unsupported_reason

    chosen = resolve_backend(
        backend, q.device, estimate_unsupported_reason(q, k, stride, block_size), "estimate"
    )
    if chosen == "triton":
        from .kernels.estimate import estimate_block_scores_triton

        return estimate_block_scores_triton(q, k, stride, block_size, causal, scale)
    return estimate_block_scores_torch(q, k, stride, block_size, causal, scale)


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
    """Chunked PyTorch implementation (the reference path; runs on any device)."""
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups_per_block = block_size // stride
    nqb, nkb = num_blocks(lq, block_size), num_blocks(lk, block_size)
    nqg, nkg = num_blocks(lq, stride), num_blocks(lk, stride)

    k_str = strided_keys(k, stride, work).unsqueeze(2)  # [B, Hkv, 1, nKG, S*D]
    key_group_start = torch.arange(nkg, device=q.device) * stride
    offset = lk - lq
    out = torch.empty(b, hq, nqb, nkb, dtype=torch.float32, device=q.device)

    per_block = b * hq * groups_per_block * nkg
    blocks_per_chunk = max(1, _CHUNK_ELEMENTS // max(per_block, 1))
    for i0 in range(0, nqb, blocks_per_chunk):
        i1 = min(nqb, i0 + blocks_per_chunk)
        a0, a1 = i0 * groups_per_block, min(nqg, i1 * groups_per_block)
        rows = q[:, :, a0 * stride : min(lq, a1 * stride)]
        q_str = strided_queries(rows, stride, work).unflatten(1, (hkv, group))
        logits = torch.matmul(q_str, k_str.transpose(-1, -2)) * (scale / stride)
        if causal:
            group_last_row = torch.clamp((torch.arange(a0, a1, device=q.device) + 1) * stride,
                                         max=lq) - 1
            allowed = key_group_start[None, :] <= (group_last_row + offset)[:, None]
            logits.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # [B, Hkv, G, na, nKG]
        # Sum key groups into key blocks, then query groups into query blocks.
        probs = F.pad(probs, (0, nkb * groups_per_block - nkg))
        probs = probs.unflatten(-1, (nkb, groups_per_block)).sum(-1)
        na = a1 - a0
        probs = F.pad(probs, (0, 0, 0, (i1 - i0) * groups_per_block - na))
        block = probs.unflatten(-2, (i1 - i0, groups_per_block)).sum(-2)
        block = block / block.sum(-1, keepdim=True)
        out[:, :, i0:i1] = block.flatten(1, 2).to(torch.float32)
    return out
