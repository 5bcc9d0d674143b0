"""``xattention()``: estimate, select, then block-sparse attention, in one call."""

from __future__ import annotations

import torch

from ._validation import (
    check_backend,
    check_block_params,
    check_bool,
    check_estimate_dtype,
    check_qkv,
    check_scale,
    check_threshold,
)
from .estimate import _estimate
from .kernels.dense import dense_attention, dense_block_mask, runs_dense
from .selection import _select
from .sparse_attention import _sparse_attention


def xattention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    threshold: float | torch.Tensor = 0.9,
    stride: int = 8,
    block_size: int = 128,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    return_mask: bool = False,
    min_sparse_len: int | None = None,
    estimate_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """XAttention: attention over the blocks that antidiagonal scoring says matter.

    Args:
        q: ``[B, Hq, Lq, D]`` queries, the last ``Lq`` positions of the context (``Lq < Lk`` is
            chunked prefill against a KV cache).
        k, v: ``[B, Hkv, Lk, D]``; ``Hq % Hkv == 0`` (GQA: pass K/V unrepeated).
        threshold: fraction of estimated attention mass each query block keeps; a float in
            ``(0, inf)`` or a tensor ``[Hq]``. ``>= 1`` keeps every block (dense attention).
        stride: antidiagonal stride ``S`` of the estimate; divides ``block_size``.
        block_size: block edge of the sparsity pattern.
        causal: causal attention, queries aligned to the end of the keys.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.
        return_mask: also return the bool block mask ``[B, Hq, ceil(Lq/Bs), ceil(Lk/Bs)]``.
        min_sparse_len: short inputs run exact dense attention instead, since the estimate and
            launches cost more than sparsity saves there. None (default): automatic, with
            ``backend="auto"`` on CUDA only, below a dense-FLOP crossover measured on the H200
            (docs/design.md); an int: dense when ``Lk < min_sparse_len`` (0: always sparse).
            A dense call's mask keeps every candidate block.
        estimate_dtype: None (the estimate multiplies in the input dtype) or
            ``torch.float8_e4m3fn``: the estimate's operands rounded to FP8, about 1.5x faster on
            Hopper at long lengths, at the cost of a different kept set on some rows
            (``estimate_block_scores`` has the details). Attention itself stays exact.

    Returns:
        the attention output ``[B, Hq, Lq, D]`` in the dtype of ``q`` (and the mask if asked).

    Example:
        >>> import torch
        >>> from xattention import xattention, block_density
        >>> q, k, v = (torch.randn(1, 4, 1024, 64) for _ in range(3))
        >>> out, mask = xattention(q, k, v, threshold=0.9, block_size=128, return_mask=True)
        >>> out.shape
        torch.Size([1, 4, 1024, 64])
        >>> 0 < block_density(mask, 1024, 1024, block_size=128)["overall"] <= 1
        True
    """
    shape = check_qkv(q, k, v)
    stride, block_size = check_block_params(stride, block_size)
    threshold = check_threshold(threshold, shape.q_heads, shape.device)
    scale = check_scale(scale, shape.head_dim)
    backend = check_backend(backend)
    causal = check_bool("causal", causal)
    return_mask = check_bool("return_mask", return_mask)
    min_sparse_len = _check_min_sparse_len(min_sparse_len)
    estimate_dtype = check_estimate_dtype(estimate_dtype)

    if runs_dense(q, k, causal, backend, min_sparse_len):
        out = dense_attention(q, k, v, causal, scale)
        if not return_mask:
            return out
        return out, dense_block_mask(shape.batch, shape.q_heads, shape.q_len, shape.k_len,
                                     block_size, causal, q.device)
    scores = _estimate(q, k, stride, block_size, causal, scale, backend, estimate_dtype)
    mask = _select(scores, threshold, shape.q_len, shape.k_len, block_size, causal, backend,
                   inputs=(q, k, v))
    out = _sparse_attention(q, k, v, mask, block_size, causal, scale, backend, False)
    return (out, mask) if return_mask else out


def _check_min_sparse_len(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"min_sparse_len must be None or an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"min_sparse_len must be >= 0, got {value}")
    return value
