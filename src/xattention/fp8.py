"""FP8 (e4m3) operands for the estimate: the opt-in ``estimate_dtype=torch.float8_e4m3fn``.

The estimate only ranks blocks, so its products can run at FP8's doubled matrix rate on Hopper (and
half the bytes re-read from L2). Each (batch, head) slice of q and of k gets one scale, a power of
two chosen so that the slice's largest magnitude fits under e4m3's maximum (448): dividing by a
power of two is exact, so the only rounding is to e4m3's 3 mantissa bits (relative error <= 2^-4
per element). Both backends compute on exactly these rounded operands; the Triton kernel
multiplies the products by the two scales, the PyTorch path multiplies the operands back first.

A NaN or inf anywhere in a slice makes its scale non-finite, so every score of that head comes out
NaN and selection keeps all of the head's candidate blocks: more than the exact estimate keeps,
never fewer (docs/design.md §4).
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
_E4M3_MAX = 448.0


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, H, L, D]`` -> (e4m3 copy, float32 scales ``[B, H]``) with ``x ~= copy * scale``.

    Example:
        >>> import torch
        >>> x = torch.randn(1, 2, 16, 8)
        >>> x8, scale = quantize_per_head(x)
        >>> x8.dtype, scale.shape
        (torch.float8_e4m3fn, torch.Size([1, 2]))
        >>> bool(((x8.float() * scale[..., None, None] - x).abs() <= x.abs() / 16 + 1e-6).all())
        True
    """
    scale = head_scales(x)
    x8 = (x / scale[..., None, None].to(x.dtype)).to(FP8_DTYPE)
    return x8, scale


def head_scales(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, H]``: per (batch, head) of ``x [B, H, L, D]``, the smallest power of two
    ``s`` with ``max|x| / s <= 448`` (1 for an all-zero slice; non-finite where ``x`` is)."""
    # The max is exact in any dtype; the power of two is found in float64, so that a max just
    # above a power of two can never round to a scale one step too small (e4m3 would overflow).
    amax = torch.linalg.vector_norm(x, ord=math.inf, dim=(-2, -1)).double()
    scale = torch.exp2(torch.ceil(torch.log2(amax / _E4M3_MAX)))
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    # Not below the smallest normal of the input dtype (float16: 2^-14) or of float32, so the
    # scale is exact in both; a head that small rounds into e4m3's subnormals, its scores ~0.
    tiny = max(torch.finfo(x.dtype).tiny, torch.finfo(torch.float32).tiny)
    return scale.clamp(min=tiny).float()


def dequantize(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values the FP8 estimate computes with, in ``dtype`` (exact: a power-of-two scale)."""
    return x8.to(dtype) * scale[..., None, None].to(dtype)
