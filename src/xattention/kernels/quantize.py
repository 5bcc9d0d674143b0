"""Rounding q and k to FP8 e4m3 for the estimate (``estimate_dtype=torch.float8_e4m3fn``).

One pass: each program scales a tile of rows by its (batch, head)'s power-of-two scale and stores
e4m3, reading the input once and writing a byte per element. The same in PyTorch (a divide, then
a cast) takes two passes and a full-size temporary: 2.7 ms for q and k at 128k tokens, 32/8 heads
on the H200, a fifth of the FP8 estimate itself (benchmarks/NOTES.md, run 10). The scales come
from ``xattention.fp8.head_scales``, so both backends round the same operands.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreter_enabled
from ..block_layout import num_blocks
from ..fp8 import FP8_DTYPE, head_scales, quantize_per_head, token_mean
from ._common import next_power_of_2


@triton.jit
def _quantize_e4m3_kernel(
    X, Scale, Mean, Out,
    stride_b, stride_h, stride_l, num_heads, length,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr, CENTER: tl.constexpr,
):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, D_PAD)
    ok = (rows < length)[:, None] & (d < HEAD_DIM)[None, :]
    x = tl.load(X + (bh // num_heads) * stride_b + (bh % num_heads) * stride_h
                + rows[:, None] * stride_l + d[None, :], mask=ok, other=0.0)
    x = x.to(tl.float32)
    if CENTER:
        x = x - tl.load(Mean + bh * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0)[None, :]
    # Dividing by a power of two is exact, so the cast is the only rounding (to nearest even).
    y = (x / tl.load(Scale + bh)).to(tl.float8e4nv)
    tl.store(Out + bh * length * HEAD_DIM + rows[:, None] * HEAD_DIM + d[None, :], y, mask=ok)


def quantize_per_head_triton(x: torch.Tensor, center: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``xattention.fp8.quantize_per_head`` in one Triton pass: (contiguous e4m3 copy, scales)."""
    if interpreter_enabled():
        # Triton's CPU interpreter rounds float -> e4m3 wrongly near exponent boundaries (125.2
        # becomes 64, not 128: 74 of 4096 values in [-300, 300] differ from torch), so interpreted
        # runs round with PyTorch; the kernel's rounding is tested on the GPU, bit for bit.
        return quantize_per_head(x, center)
    b, h, length, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    mean = token_mean(x) if center else None
    scale = head_scales(x, mean)
    out = torch.empty((b, h, length, d), dtype=FP8_DTYPE, device=x.device)
    d_pad = next_power_of_2(d)
    rows = max(1, min(128, 8192 // d_pad))
    _quantize_e4m3_kernel[(num_blocks(length, rows), b * h)](
        x, scale, scale if mean is None else mean.contiguous(), out,
        x.stride(0), x.stride(1), x.stride(2), h, length,
        HEAD_DIM=d, D_PAD=d_pad, ROWS=rows, CENTER=center,
    )
    return out, scale
