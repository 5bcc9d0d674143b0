"""Triton kernels (CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``).

Each kernel sits in one module with its launcher. The ``*_unsupported_reason`` functions say why a
kernel cannot serve given inputs (None when it can), so ``backend="auto"`` can warn and fall back.
"""

from __future__ import annotations

import torch


def estimate_unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int
) -> str | None:
    return "the Triton estimate kernel is not built yet"


def sparse_attention_unsupported_reason(q: torch.Tensor, block_size: int) -> str | None:
    return "the Triton sparse-attention kernel is not built yet"
