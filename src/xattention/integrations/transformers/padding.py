"""Exact XAttention under a padding mask: split each sequence of the batch into its valid span.

A batch of prompts of different lengths reaches the attention function as a bool mask
``[B, 1, Lq, Lk]``. When, for every sequence, the mask is attention over one contiguous span of
valid keys ``[s, e)`` (left or right padding, or a static cache's unwritten tail), causal or not,
the valid query rows are run through XAttention against that span alone, and the rows that are
pure padding get what dense SDPA gives them. Any other mask (packed sequences, custom 4D masks)
is reported as not decomposable, and the caller runs it dense.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["decompose", "sparse_with_padding"]

# Above this many bool elements the mask comparison goes in row chunks (bounded extra memory).
_MASK_CHUNK_ELEMS = 1 << 26

SparseRun = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _mask_matches(mask: torch.Tensor, s: int, e: int, offset: int, causal: bool) -> bool:
    """Whether bool ``mask [Lq, Lk]`` is: key ``c`` visible to row ``r`` iff ``s <= c < e`` and
    (causal) ``c <= offset + r``. Compared in row chunks to bound memory."""
    q_len, k_len = mask.shape
    cols = torch.arange(k_len, device=mask.device)
    span = (cols >= s) & (cols < e)
    step = max(1, _MASK_CHUNK_ELEMS // max(k_len, 1))
    for r0 in range(0, q_len, step):
        r1 = min(q_len, r0 + step)
        if causal:
            rows = torch.arange(r0, r1, device=mask.device)[:, None] + offset
            expected = span[None, :] & (cols[None, :] <= rows)
        else:
            expected = span[None, :].expand(r1 - r0, k_len)
        if not torch.equal(mask[r0:r1], expected):
            return False
    return True


def decompose(mask: torch.Tensor, causal: bool) -> tuple[int, int, int] | None:
    """``(s, e, offset)`` when ``mask [Lq, Lk]`` is attention over the contiguous valid key span
    ``[s, e)`` (causal: query row ``r`` sitting at absolute position ``offset + r``); None for any
    other pattern."""
    q_len, k_len = mask.shape
    valid = mask.any(dim=0)
    nz = valid.nonzero()
    if nz.numel() == 0:
        return None
    s, e = int(nz[0]), int(nz[-1]) + 1
    if not bool(valid[s:e].all()):
        return None
    offsets = [k_len - q_len] if not causal else list(dict.fromkeys([k_len - q_len, e - q_len]))
    for offset in offsets:
        if _mask_matches(mask, s, e, offset, causal):
            return s, e, offset
    return None


def _sdpa_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Dense attention of some rows with an explicit bool mask; ``[1, Hq, rows, D]``."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask[None, None],
                                          scale=scaling)


def _is_padding_mask(mask: torch.Tensor, batch: int, q_len: int, k_len: int) -> bool:
    return (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
            and mask.shape[0] in (1, batch) and tuple(mask.shape[2:]) == (q_len, k_len))


def sparse_with_padding(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor, causal: bool, scaling: float | None,
                        run: SparseRun) -> torch.Tensor | None:
    """``[B, Hq, Lq, D]`` exact under a padding mask, or None when the mask has another shape.

    ``run(q, k, v)`` computes XAttention of one sequence's valid rows against its valid keys.
    """
    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    if not _is_padding_mask(attention_mask, batch, q_len, k_len):
        return None
    plans = []
    for b in range(batch):
        m = attention_mask[b if attention_mask.shape[0] > 1 else 0, 0]
        plan = decompose(m, causal)
        if plan is None:
            return None
        plans.append((m, plan))
    out = torch.empty_like(query)
    for b, (m, (s, e, offset)) in enumerate(plans):
        qb, kb, vb = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        # Valid query rows are those whose own position lies in the valid span: never more rows
        # than keys, causal or not (a padded encoder has Lq == Lk but only e - s valid keys).
        r0, r1 = max(0, s - offset), min(q_len, e - offset)
        if r1 > r0:
            k_end = offset + r1 if causal else e
            out[b:b + 1, :, r0:r1] = run(qb[:, :, r0:r1], kb[:, :, s:k_end], vb[:, :, s:k_end])
        # Rows outside the valid span are padding: give them what dense SDPA gives them.
        for lo, hi in ((0, min(r0, q_len)), (max(r1, 0), q_len)):
            if hi > lo:
                out[b:b + 1, :, lo:hi] = _sdpa_rows(qb[:, :, lo:hi], kb, vb, m[lo:hi], scaling)
    return out
