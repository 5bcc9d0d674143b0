"""Exact merge of attention over disjoint key sets from their log-sum-exps.

Attention of the same query rows over key sets ``K1, K2, ...`` that do not overlap, each given as
``(out_i, lse_i)`` (``lse`` the natural-log normaliser of the row's softmax over ``K_i``), equals
attention over their union::

    lse = logaddexp(lse_1, lse_2, ...)      out = sum_i exp(lse_i - lse) * out_i

This is how the diffusers joint text/video path puts XAttention over the video keys together with
dense attention over the text keys, and how chunked or split attention is recombined.

Non-finite rows (docs/design.md §4) keep what dense attention over the union would give: a part
whose row is NaN (a NaN it could see) makes the merged row NaN; a part without mass (``lse =
-inf``: it saw no key, zero output, or only ``-inf`` logits, NaN output) contributes nothing; a
row no part gave mass stays zero with ``-inf`` where no part saw a key, NaN where one saw only
``-inf`` logits.
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
    # A row no part gave mass (every lse -inf) would give exp(-inf - -inf) = NaN: weigh it 0.
    unseen = total == float("-inf")
    safe_total = torch.where(unseen, torch.zeros_like(total), total)
    zero = torch.zeros((), dtype=work, device=parts[0][0].device)
    out, massless_nan = None, torch.zeros_like(unseen)
    for (o, _), lse in zip(parts, lses, strict=True):
        weight = torch.exp(lse - safe_total).unsqueeze(-1)
        no_mass = lse == float("-inf")
        # A part without mass (it saw no key, or only -inf logits) adds nothing, whatever its
        # output holds. Keyed on the lse, not on the weight: a weight that merely underflows
        # to 0 still carries a NaN of v, as dense attention's 0 * NaN does.
        term = torch.where(no_mass.unsqueeze(-1), zero, o.to(work) * weight)
        # A NaN row of a part stays NaN (weight NaN, or NaN output), as dense attention would.
        term = torch.where(torch.isnan(weight), float("nan"), term)
        out = term if out is None else out + term
        massless_nan = massless_nan | (no_mass & torch.isnan(o).any(-1))
    # A row no part gave mass stays 0 where no part saw a key, and is NaN where a part saw only
    # -inf logits (its output NaN): dense attention over the union gives NaN there.
    out = torch.where((unseen & massless_nan).unsqueeze(-1), float("nan"), out).to(dtype)
    return (out, total) if return_lse else out
