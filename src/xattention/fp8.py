"""FP8 (e4m3) operands for the estimate: the opt-in ``estimate_dtype=torch.float8_e4m3fn``.

The estimate only ranks blocks, so its products can run at FP8's doubled matrix rate on Hopper (and
half the bytes re-read from L2). Each (batch, head) slice of q and of k gets one scale, a power of
two chosen so that the slice's largest magnitude fits under e4m3's maximum (448): dividing by a
power of two is exact, so the only rounding is to e4m3's 3 mantissa bits (relative error <= 2^-4
per element). Both backends compute on exactly these rounded operands; the Triton kernel
multiplies the products by the two scales, the PyTorch path multiplies the operands back first.

Keys are centred first: each (batch, head) slice of k loses its mean over tokens. That changes
every logit of a query row by the same amount (the row's product with the mean key), so the
softmax over key groups, and the estimate, are unchanged, except for the last key group when
``Lk`` is not a multiple of ``S`` (its zero padding is not centred). It matters for rounding:
real keys can carry a large per-head constant (Qwen2.5's first layer: ``|k|`` up to 362, under 10
once centred), and one scale per head sized for the constant leaves e4m3's 3 bits nothing for the
part that tells keys apart (benchmarks/results/fp8_fidelity.md).

A NaN or inf anywhere in a slice makes its scale non-finite, so every score of that head comes out
NaN and selection keeps all of the head's candidate blocks: more than the exact estimate keeps,
never fewer (docs/design.md §4).
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
_E4M3_MAX = 448.0


def quantize_per_head(x: torch.Tensor, center: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, H, L, D]`` -> (e4m3 copy, float32 scales ``[B, H]``) with ``x ~= copy * scale``
    (``x - mean`` when ``center``: the mean over tokens of each (batch, head) slice).

    Example:
        >>> import torch
        >>> x = torch.randn(1, 2, 16, 8)
        >>> x8, scale = quantize_per_head(x)
        >>> x8.dtype, scale.shape
        (torch.float8_e4m3fn, torch.Size([1, 2]))
        >>> bool(((x8.float() * scale[..., None, None] - x).abs() <= x.abs() / 16 + 1e-6).all())
        True
    """
    if center:
        mean = token_mean(x)
        scale = head_scales(x, mean)
        shifted = x.float() - mean[..., None, :]  # float32, as the Triton kernel subtracts
        return (shifted / scale[..., None, None]).to(FP8_DTYPE), scale
    scale = head_scales(x)
    x8 = (x / scale[..., None, None].to(x.dtype)).to(FP8_DTYPE)
    return x8, scale


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, H, D]``: the mean over tokens of each (batch, head) slice of ``x``."""
    return x.mean(dim=-2, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32
                  ).float()


def head_scales(x: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[B, H]``: per (batch, head) of ``x [B, H, L, D]`` (minus ``mean [B, H, D]``),
    the smallest power of two ``s`` with ``max|x| / s <= 448`` (1 for an all-zero slice;
    non-finite where ``x`` is)."""
    if mean is None:  # the max is exact in any dtype
        amax = torch.linalg.vector_norm(x, ord=math.inf, dim=(-2, -1)).double()
    else:
        # max |x - mean| per column is at the column's max or min: exact, and no centred copy.
        # float32 differences, as quantize_per_head and the Triton kernel compute them.
        hi = x.amax(dim=-2).float() - mean
        lo = mean - x.amin(dim=-2).float()
        amax = torch.maximum(hi, lo).amax(dim=-1).double()
    # The power of two is found in float64, so that a max just above a power of two can never
    # round to a scale one step too small (e4m3 would overflow).
    scale = torch.exp2(torch.ceil(torch.log2(amax / _E4M3_MAX)))
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    # Not below the smallest normal of the input dtype (float16: 2^-14) or of float32, so the
    # scale is exact in both; a head that small rounds into e4m3's subnormals, its scores ~0.
    tiny = max(torch.finfo(x.dtype).tiny, torch.finfo(torch.float32).tiny)
    return scale.clamp(min=tiny).float()


def dequantize(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values the FP8 estimate computes with, in ``dtype`` (exact: a power-of-two scale)."""
    return x8.to(dtype) * scale[..., None, None].to(dtype)
