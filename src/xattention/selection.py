"""Cumulative-threshold block selection (DESIGN.md §2).

Per (batch, query head, query block) row: forced blocks (causal: the sink and the diagonal band)
are kept and their scores count first; the other candidates follow in descending score order (ties
to the lower key block) and are kept while the mass accumulated *before* them is still below
``threshold * row total``. So the kept set is the smallest prefix that reaches the threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import resolve_backend
from ._validation import (
    check_backend,
    check_block_grid,
    check_block_size,
    check_lengths,
    check_scores,
    check_threshold,
)
from .block_layout import candidate_blocks, forced_blocks

# Rows of the score matrix sorted at once; bounds the float64 working copy.
_CHUNK_ELEMENTS = 1 << 24


def select_blocks(
    scores: torch.Tensor,
    threshold: float | torch.Tensor = 0.9,
    q_len: int | None = None,
    k_len: int | None = None,
    block_size: int = 128,
    causal: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Choose the key blocks each query block attends to.

    Args:
        scores: ``[B, Hq, nQB, nKB]`` block scores (e.g. from ``estimate_block_scores``).
        threshold: fraction of each row's score mass to keep; a float or a tensor ``[Hq]`` (per
            query head). ``>= 1`` keeps every candidate block.
        q_len, k_len: the query and key lengths the scores were made for (``q_len <= k_len``).
        block_size: the block edge the scores were made with.
        causal: force the sink and diagonal blocks, drop blocks wholly in the future.
        backend: ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"torch"``.

    Returns:
        bool ``[B, Hq, nQB, nKB]``.

    Example:
        >>> import torch
        >>> from xattention import select_blocks
        >>> scores = torch.tensor([[[[1.0, 0.0], [0.1, 0.9]]]])
        >>> select_blocks(scores, 0.5, q_len=256, k_len=256, block_size=128)
        tensor([[[[ True, False],
                  [ True,  True]]]])
    """
    scores = check_scores(scores)
    if q_len is None or k_len is None:
        raise TypeError("select_blocks needs q_len and k_len (the lengths the scores came from)")
    q_len, k_len = check_lengths(q_len, k_len)
    block_size = check_block_size(block_size)
    check_block_grid("scores", scores, q_len, k_len, block_size)
    threshold = check_threshold(threshold, scores.shape[1])
    backend = check_backend(backend)
    return _select(scores, threshold, q_len, k_len, block_size, bool(causal), backend)


def _select(scores, threshold, q_len, k_len, block_size, causal, backend) -> torch.Tensor:
    """Selection on validated input (shared with ``xattention``)."""
    from .kernels import selection_unsupported_reason

    chosen = resolve_backend(
        backend, scores.device, selection_unsupported_reason(scores), "block selection"
    )
    if chosen == "triton":
        from .kernels.selection import select_blocks_triton

        return select_blocks_triton(scores, threshold, q_len, k_len, block_size, causal)
    return select_blocks_torch(scores, threshold, q_len, k_len, block_size, causal)


def select_blocks_torch(
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    q_len: int,
    k_len: int,
    block_size: int,
    causal: bool,
) -> torch.Tensor:
    """Vectorised selection: one stable sort and one cumulative sum per chunk of rows.

    Sums run in float64 so that the cut matches an exact sequential accumulation except for ties
    within ~1e-16 of the threshold.
    """
    b, h, nqb, nkb = scores.shape
    device = scores.device
    candidate = candidate_blocks(q_len, k_len, block_size, causal, device)
    forced = forced_blocks(q_len, k_len, block_size, causal, device)
    if isinstance(threshold, torch.Tensor):
        thr = threshold.to(device=device, dtype=torch.float64).view(1, h, 1)
        keep_all = (threshold >= 1).to(device).view(1, h, 1, 1)
    else:
        thr = torch.tensor(threshold, dtype=torch.float64, device=device)
        keep_all = torch.tensor(threshold >= 1, device=device)

    mask = torch.empty(b, h, nqb, nkb, dtype=torch.bool, device=device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(b * h * nkb, 1))
    for i0 in range(0, nqb, rows_per_chunk):
        i1 = min(nqb, i0 + rows_per_chunk)
        s = scores[:, :, i0:i1].to(torch.float64)
        cand, force = candidate[i0:i1], forced[i0:i1]
        total = s.sum(-1)
        forced_mass = (s * force).sum(-1)
        optional = cand & ~force
        key = torch.where(optional, s, torch.tensor(float("-inf"), dtype=s.dtype, device=device))
        ordered, order = torch.sort(key, dim=-1, descending=True, stable=True)
        is_optional = torch.isfinite(ordered)
        ordered = torch.where(is_optional, ordered, torch.zeros((), dtype=s.dtype, device=device))
        # Exclusive prefix sum: the mass accumulated before each block in sorted order.
        mass_before = F.pad(torch.cumsum(ordered, dim=-1)[..., :-1], (1, 0))
        mass_before = mass_before + forced_mass.unsqueeze(-1)
        below = mass_before < (thr * total).unsqueeze(-1)
        # "Kept while": the first block that fails ends the row (matters for negative scores).
        keep_sorted = is_optional & (below.to(torch.uint8).cummin(-1).values.bool())
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted) | force
        keep = torch.where(keep_all, cand, keep)
        mask[:, :, i0:i1] = keep
    return mask
