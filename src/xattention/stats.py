"""Density of a block mask, the way sparse-attention results are reported."""

from __future__ import annotations

import torch

from ._validation import check_block_grid, check_block_size, check_lengths
from .block_layout import candidate_blocks


def block_density(
    mask: torch.Tensor, q_len: int, k_len: int, block_size: int = 128, causal: bool = True
) -> dict[str, float | torch.Tensor]:
    """Kept blocks over candidate blocks (causal: blocks with at least one visible key).

    Returns ``{"overall": float, "per_head": float32 tensor [Hq]}``; both average over batch and
    query blocks. Dense causal attention has density 1.0, not ~0.5.

    Example:
        >>> import torch
        >>> from xattention import block_density
        >>> mask = torch.tensor([[[[True, False], [True, True]]]])
        >>> block_density(mask, 256, 256, block_size=128)["overall"]
        1.0
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        raise TypeError("mask must be a bool tensor [B, Hq, nQB, nKB]")
    q_len, k_len = check_lengths(q_len, k_len)
    block_size = check_block_size(block_size)
    check_block_grid("mask", mask, q_len, k_len, block_size)
    cand = candidate_blocks(q_len, k_len, block_size, bool(causal), mask.device)
    kept = (mask & cand).sum(dim=(0, 2, 3)).to(torch.float64)
    per_head_total = cand.sum().item() * mask.shape[0]
    per_head = (kept / per_head_total).to(torch.float32)
    overall = kept.sum().item() / (per_head_total * mask.shape[1])
    return {"overall": float(overall), "per_head": per_head}
