"""Cumulative-threshold block selection (docs/design.md §2.4).

Per (batch, query head, query block) row: forced blocks (causal: the sink and the diagonal band)
are kept and their scores count first; the other candidates follow in descending score order (ties
to the lower key block) and are kept while the mass accumulated *before* them is still below
``threshold * row total``. So the kept set is the smallest prefix that reaches the threshold.

Around either backend, the dispatch applies the rules for scores that are not plain finite
masses (docs/design.md, "Selection on user scores" and "Non-finite inputs"): only candidates
count, ``-inf`` is zero mass, ``+inf`` candidates are all kept, a row with a NaN keeps every
candidate, and no row is left empty. The backends see candidate-only rows without infinities;
what they decide for a row holding a NaN is overwritten.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import resolve_backend
from ._validation import (
    check_backend,
    check_block_grid,
    check_block_size,
    check_bool,
    check_lengths,
    check_scores,
    check_threshold,
)
from .block_layout import BlockLayout, num_blocks
from .plan import SparsePlan

# The default cumulative-score threshold. 0.95, not the paper's 0.9: on the three real models
# measured here (SmolLM2-135M, Gemma3-270M, Qwen2.5-Coder-1.5B; README "Accuracy") 0.9 lost
# 0.8-11 RULER points against full attention, 0.95 stayed closest (Qwen2.5-1.5B at 16k-32k:
# within one standard error); it keeps ~10 points more density.
DEFAULT_THRESHOLD = 0.95

# Rows of the score matrix sorted at once; bounds the float64 working copy.
_CHUNK_ELEMENTS = 1 << 24


def select_blocks(
    scores: torch.Tensor,
    threshold: float | torch.Tensor = DEFAULT_THRESHOLD,
    q_len: int | None = None,
    k_len: int | None = None,
    block_size: int = 128,
    causal: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Choose the key blocks each query block attends to.

    Args:
        scores: ``[B, Hq, nQB, nKB]`` block scores (e.g. from ``estimate_block_scores``). Only
            candidate blocks count; NaN, ``+-inf`` and rows without positive mass follow
            docs/design.md §3.
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
    threshold = check_threshold(threshold, scores.shape[1], scores.device)
    causal = check_bool("causal", causal)
    backend = check_backend(backend)
    return _select_user_scores(scores, threshold, BlockLayout(q_len, k_len, block_size, causal),
                               backend)


def select_plan(
    scores: torch.Tensor,
    threshold: float | torch.Tensor = DEFAULT_THRESHOLD,
    q_len: int | None = None,
    k_len: int | None = None,
    block_size: int = 128,
    causal: bool = True,
    backend: str = "auto",
) -> SparsePlan:
    """``select_blocks`` returning a :class:`~xattention.plan.SparsePlan` (what
    ``block_sparse_attention`` reads directly) instead of a bool mask. Same arguments and rules.

    Example:
        >>> import torch
        >>> from xattention import select_plan
        >>> scores = torch.tensor([[[[1.0, 0.0], [0.1, 0.9]]]])
        >>> plan = select_plan(scores, 0.5, q_len=256, k_len=256, block_size=128)
        >>> plan.to_dense().int().tolist(), plan.density()
        ([[[[1, 0], [1, 1]]]], 1.0)
    """
    mask = select_blocks(scores, threshold, q_len, k_len, block_size, causal, backend)
    return SparsePlan.from_mask(mask, BlockLayout(q_len, k_len, block_size, causal))


def _select_user_scores(scores, threshold, layout: BlockLayout, backend) -> torch.Tensor:
    """The rules for scores that are not plain finite masses, around ``_select_plan``."""
    scores, infinite = _canonical_scores(scores, layout.candidate(scores.device))
    mask = _select_plan(scores, threshold, layout, backend).to_dense()
    mask |= infinite
    if not layout.causal:  # causal rows always hold their forced blocks
        _keep_top_of_empty_rows(mask, scores)
    return mask


def _select(
    scores, threshold, q_len, k_len, block_size, causal, backend, inputs=None
) -> torch.Tensor:
    """The bool mask of :func:`_select_plan` (tests and ``select_blocks``)."""
    layout = BlockLayout(q_len, k_len, block_size, causal)
    return _select_plan(scores, threshold, layout, backend, inputs=inputs).to_dense()


def _select_plan(
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    layout: BlockLayout,
    backend: str,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    flags: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SparsePlan:
    """Selection on validated input (shared with ``xattention``), as a plan.

    ``inputs``: the ``(q, k, v)`` the scores were estimated from, when known. Query blocks holding
    a non-finite q, and key blocks holding a non-finite k or v, are then kept wherever they are
    candidates, so the sparse stage sees every non-finite value dense attention would see.
    ``flags``: those blocks as the estimate kernel found them (int8 ``[B, Hq, nQB]`` and
    ``[B, Hkv, nKB]``); computed here from ``inputs`` when missing.
    """
    from .kernels import selection_unsupported_reason

    chosen = resolve_backend(
        backend, scores.device, selection_unsupported_reason(scores), "block selection"
    )
    bs = layout.block_size
    if chosen == "triton":  # the kernel applies the rules below itself
        from .kernels.selection import select_plan_triton

        if flags is None and inputs is not None:
            q, k, v = inputs
            flags = (_nonfinite_blocks(q, bs).to(torch.int8),
                     (_nonfinite_blocks(k, bs) | _nonfinite_blocks(v, bs)).to(torch.int8))
        return select_plan_triton(scores, threshold, layout, flags)
    mask = select_blocks_torch(scores, threshold, layout.q_len, layout.k_len, bs, layout.causal)

    candidate = layout.candidate(scores.device)
    # A row whose mass is unknown (a NaN or inf score: from non-finite q or k, or a NaN user
    # score) cannot be ranked; keeping all its candidates makes it dense, so it comes out NaN
    # exactly where dense attention would, instead of plausible numbers from the forced blocks.
    unknown = ~torch.isfinite(scores).all(-1)
    if flags is None and inputs is not None:
        q, k, v = inputs
        flags = (_nonfinite_blocks(q, bs), _nonfinite_blocks(k, bs) | _nonfinite_blocks(v, bs))
    if flags is not None:
        row_bad, key_bad = (f.bool() for f in flags)
        unknown |= row_bad
        key_bad = key_bad.repeat_interleave(scores.shape[1] // key_bad.shape[1], dim=1)
        mask |= key_bad.unsqueeze(-2) & candidate
    mask |= unknown.unsqueeze(-1) & candidate
    return SparsePlan.from_mask(mask, layout)


def _nonfinite_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Bool ``[B, H, ceil(L/Bs)]``: blocks of ``x [B, H, L, D]`` holding a NaN or an inf.

    Tested through the row sums over ``D``: a NaN or inf always makes the sum non-finite, and a
    finite sum that overflows only keeps a block more, never one less.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    bad = ~torch.isfinite(x.sum(-1, dtype=work))
    n = num_blocks(x.shape[-2], block_size)
    bad = F.pad(bad, (0, n * block_size - x.shape[-2]))
    return bad.unflatten(-1, (n, block_size)).any(-1)


def _canonical_scores(
    scores: torch.Tensor, candidate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """User scores as the backends expect them, and the ``+inf`` candidates to keep besides.

    A copy where non-candidates and ``-inf`` are 0 (no mass), and rows holding a ``+inf``
    candidate are reduced to 1 on those candidates and 0 elsewhere: the infinite blocks hold all
    the mass. NaN candidates stay NaN, so ``_select`` keeps their whole row.
    """
    s = scores.masked_fill(~candidate, 0.0)
    s.masked_fill_(s == float("-inf"), 0.0)
    infinite = s == float("inf")
    finite_in_inf_row = infinite.any(-1, keepdim=True) & ~infinite & ~s.isnan()
    s.masked_fill_(finite_in_inf_row, 0.0)
    s.masked_fill_(infinite, 1.0)
    return s, infinite


def _keep_top_of_empty_rows(mask: torch.Tensor, scores: torch.Tensor) -> None:
    """In place: a row the rule left empty (no forced blocks and a candidate total <= 0) keeps
    its top-scoring block (the lowest index among ties), so every query row sees some key."""
    empty = ~mask.any(-1, keepdim=True)
    top = scores.argmax(-1, keepdim=True)
    mask.scatter_(-1, top, mask.gather(-1, top) | empty)


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
    layout = BlockLayout(q_len, k_len, block_size, causal)
    candidate, forced = layout.candidate(device), layout.forced(device)
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
