"""Fast paths: Triton kernels (CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``), the
optional FlashAttention-4 sparse stage (``fa4``) and dense attention for short inputs (``dense``).

Each kernel sits in one module with its launcher. The ``*_unsupported_reason`` functions say why a
kernel cannot serve given inputs (None when it can), so ``backend="auto"`` can warn and fall back.
They import nothing from Triton, so asking is cheap when Triton is absent.
"""

from __future__ import annotations

import torch

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def estimate_unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int,
    estimate_dtype: torch.dtype | None = None,
) -> str | None:
    fp8 = estimate_dtype is not None
    if fp8 and q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        return "estimate_dtype float8_e4m3fn (FP8 matrix products need an sm89+ GPU)"
    if q.dtype not in _KERNEL_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16, float32)"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} (the kernel takes up to 256)"
    per_block = block_size // stride
    if per_block & (per_block - 1) or per_block > 128:
        return (f"block_size/stride = {per_block} (the kernel needs a power of two up to 128 key "
                "groups per block)")
    return None


def sparse_attention_unsupported_reason(q: torch.Tensor, block_size: int) -> str | None:
    if q.dtype not in _KERNEL_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16, float32)"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} (the kernel takes up to 256)"
    if block_size % 16:
        return f"block_size {block_size} (the kernel needs a multiple of 16)"
    return None


def selection_unsupported_reason(scores: torch.Tensor) -> str | None:
    if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"scores dtype {scores.dtype} (the kernel takes float32, float16, bfloat16)"
    if scores.shape[-1] > 8192:
        return f"{scores.shape[-1]} key blocks (the kernel sorts up to 8192 per row)"
    return None
