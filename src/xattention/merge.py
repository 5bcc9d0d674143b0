"""Exact merge of attention over disjoint key sets from their log-sum-exps.

Attention of the same query rows over key sets ``K1, K2, ...`` that do not overlap, each given as
``(out_i, lse_i)`` (``lse`` the natural-log normaliser of the row's softmax over ``K_i``), equals
attention over their union::

    lse = logaddexp(lse_1, lse_2, ...)      out = sum_i exp(lse_i - lse) * out_i

This is how the diffusers joint text/video path puts XAttention over the video keys together with
dense attention over the text keys, and how chunked or split attention is recombined.

Non-finite rows (docs/design.md §4) keep what dense attention over the union would give: a part
whose row is NaN (a NaN it could see) makes the merged row NaN; a part that saw no key at all
(``lse = -inf``, zero output) contributes nothing; a row no part saw stays zero with ``-inf``.
"""

from __future__ import annotations

import torch

from ._validation import check_bool


def merge_attention(
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Combine ``[(out [..., L, D], lse [..., L]), ...]`` over disjoint key sets.

    Args:
        parts: at least one ``(out, lse)`` pair, every ``out`` of one shape and on one device.
        dtype: output dtype (default: the first part's ``out`` dtype). Work is in float32
            (float64 when any part is float64).
        return_lse: also return the merged log-sum-exp (float32, or float64 as above).

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
        >>> def part(ks, vs):
        ...     logits = q @ ks.transpose(-1, -2) / 8 ** 0.5
        ...     return torch.softmax(logits, -1) @ vs, torch.logsumexp(logits, -1)
        >>> out = merge_attention([part(k[..., :2, :], v[..., :2, :]),
        ...                        part(k[..., 2:, :], v[..., 2:, :])])
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        >>> bool(torch.allclose(out, ref, atol=1e-6))
        True
    """
    if not isinstance(parts, (list, tuple)) or not parts:
        raise TypeError("parts must be a non-empty list of (out, lse) pairs")
    for i, part in enumerate(parts):
        if not (isinstance(part, (list, tuple)) and len(part) == 2
                and all(isinstance(t, torch.Tensor) for t in part)):
            raise TypeError(f"parts[{i}] must be an (out, lse) pair of tensors")
        if part[0].shape[:-1] != part[1].shape or part[0].shape != parts[0][0].shape:
            raise ValueError(f"parts[{i}] has out {list(part[0].shape)} and lse "
                             f"{list(part[1].shape)}; every out must have the first part's "
                             f"shape {list(parts[0][0].shape)} and its lse that shape minus "
                             f"the last dim")
        if part[0].device != parts[0][0].device or part[1].device != parts[0][0].device:
            raise ValueError(f"parts[{i}] is on {part[0].device} / {part[1].device}; every "
                             f"part must be on {parts[0][0].device}, as the first")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__} "
                        f"{dtype!r}")
    return_lse = check_bool("return_lse", return_lse)
    dtype = parts[0][0].dtype if dtype is None else dtype
    wide = any(o.dtype == torch.float64 or lse.dtype == torch.float64 for o, lse in parts)
    work = torch.float64 if wide else torch.float32
    lses = [lse.to(work) for _, lse in parts]
    total = lses[0]
    for lse in lses[1:]:
        total = torch.logaddexp(total, lse)
    # A row no part saw (every lse -inf) would give exp(-inf - -inf) = NaN: weigh it 0 instead.
    unseen = total == float("-inf")
    safe_total = torch.where(unseen, torch.zeros_like(total), total)
    out = None
    for (o, _), lse in zip(parts, lses, strict=True):
        weight = torch.exp(lse - safe_total).unsqueeze(-1)
        # A part that saw nothing has weight 0 and a zero output: 0, even if out holds garbage.
        term = torch.where(weight > 0, o.to(work) * weight, torch.zeros((), dtype=work,
                                                                         device=o.device))
        # A NaN row of a part stays NaN (weight NaN, or NaN output), as dense attention would.
        term = torch.where(torch.isnan(weight), float("nan"), term)
        out = term if out is None else out + term
    out = out.to(dtype)
    return (out, total) if return_lse else out
