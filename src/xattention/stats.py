"""Statistics of a sparsity pattern: the density of a block mask, the way sparse-attention results
are reported, and the exact attention mass per block that a mask is judged against."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._validation import (
    check_block_grid,
    check_block_size,
    check_bool,
    check_lengths,
    check_mask_tensor,
    check_qkv,
    check_scale,
)
from .block_layout import BlockLayout, num_blocks
from .plan import SparsePlan

# Elements of float32 logits held at once by block_attention_mass (~64 MiB).
_MASS_CHUNK_ELEMENTS = 1 << 24


def block_density(
    mask: torch.Tensor | SparsePlan, q_len: int | None = None, k_len: int | None = None,
    block_size: int = 128, causal: bool = True
) -> dict[str, float | torch.Tensor]:
    """Kept blocks over candidate blocks (causal: blocks with at least one visible key).

    ``mask``: a bool block mask ``[B, Hq, nQB, nKB]`` (with ``q_len``, ``k_len``, ``block_size``,
    ``causal`` saying what it was made for), or a :class:`~xattention.plan.SparsePlan`, which
    carries them (the other arguments are then ignored).

    Returns ``{"overall": float, "per_head": float32 tensor [Hq]}``; both average over batch and
    query blocks. Dense causal attention has density 1.0, not ~0.5.

    Example:
        >>> import torch
        >>> from xattention import block_density
        >>> mask = torch.tensor([[[[True, False], [True, True]]]])
        >>> block_density(mask, 256, 256, block_size=128)["overall"]
        1.0
    """
    if isinstance(mask, SparsePlan):
        return {"overall": mask.density(), "per_head": mask.density_per_head()}
    mask = check_mask_tensor("mask", mask)
    if q_len is None or k_len is None:
        raise TypeError("block_density needs q_len and k_len with a bool mask")
    q_len, k_len = check_lengths(q_len, k_len)
    block_size = check_block_size(block_size)
    causal = check_bool("causal", causal)
    check_block_grid("mask", mask, q_len, k_len, block_size)
    cand = BlockLayout(q_len, k_len, block_size, causal).candidate(mask.device)
    kept = (mask & cand).sum(dim=(0, 2, 3)).to(torch.float64)
    per_head_total = cand.sum().item() * mask.shape[0]
    per_head = (kept / per_head_total).to(torch.float32)
    overall = kept.sum().item() / (per_head_total * mask.shape[1])
    return {"overall": float(overall), "per_head": per_head}


@torch.no_grad()
def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int = 128,
    causal: bool = True,
    scale: float | None = None,
    per_row: bool = False,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Exact softmax attention mass that query rows put on every key block.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]`` (GQA, queries the last ``Lq`` positions).
        block_size: key (and, unless ``per_row``, query) block edge.
        causal: hide keys after each query's absolute position.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        per_row: return the mass of every query row, ``[B, Hq, Lq, nKB]``, instead of its mean
            over each query block's rows, ``[B, Hq, nQB, nKB]``.
        progress: called with the number of query rows done after each chunk.

    Returns:
        float32; every row sums to 1. Computed in float32 for chunks of query rows (at most
        ``2^24`` logits, ~64 MiB, or one row against all keys), never ``Lq x Lk`` at once.

    Example:
        >>> import torch
        >>> from xattention.stats import block_attention_mass
        >>> q, k = torch.randn(1, 2, 300, 16), torch.randn(1, 1, 300, 16)
        >>> mass = block_attention_mass(q, k, block_size=128)
        >>> mass.shape, bool(torch.allclose(mass.sum(-1), torch.ones(1, 2, 3)))
        (torch.Size([1, 2, 3, 3]), True)
    """
    shape = check_qkv(q, k)
    block_size = check_block_size(block_size)
    scale = check_scale(scale, shape.head_dim)
    causal, per_row = check_bool("causal", causal), check_bool("per_row", per_row)
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    nqb, nkb = num_blocks(lq, block_size), num_blocks(lk, block_size)
    key_block = torch.arange(lk, device=q.device) // block_size
    kf = k.float().unsqueeze(2)  # [B, Hkv, 1, Lk, D]: GQA without repeating K
    out = torch.zeros(b, hq, lq if per_row else nqb, nkb, dtype=torch.float32, device=q.device)
    step = max(1, _MASS_CHUNK_ELEMENTS // max(b * hq * lk, 1))
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        qc = q[:, :, r0:r1].float().unflatten(1, (hkv, hq // hkv))
        logits = torch.matmul(qc, kf.transpose(-1, -2)).mul_(scale)  # [B, Hkv, G, rows, Lk]
        if causal:
            pos = torch.arange(r0, r1, device=q.device) + (lk - lq)
            logits.masked_fill_(torch.arange(lk, device=q.device) > pos[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).flatten(1, 2)
        del logits
        mass = torch.zeros(*probs.shape[:-1], nkb, dtype=torch.float32, device=q.device)
        mass.index_add_(-1, key_block, probs)  # [B, Hq, rows, nKB]
        if per_row:
            out[:, :, r0:r1] = mass
        else:
            out.index_add_(2, torch.arange(r0, r1, device=q.device) // block_size, mass)
        if progress is not None:
            progress(r1 - r0)
    if not per_row:
        rows = torch.clamp(lq - torch.arange(nqb, device=q.device) * block_size, max=block_size)
        out /= rows[:, None].to(out.dtype)
    return out
