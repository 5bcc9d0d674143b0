"""Dense attention for inputs too short for the sparse pipeline to pay for itself.

``xattention()`` runs an estimate, a selection and the sparse kernel: three launches and some
Python whose fixed cost exceeds what sparsity saves on short inputs. Below a crossover measured
on the H200 (benchmarks/NOTES.md, "short inputs") it runs dense attention instead, which is
exact. The crossover is expressed in dense FLOPs (``4 * B * Hq * pairs * D``: two matrix
products, two FLOPs per multiply-add, over the visible (query, key) pairs, about half of
``Lq * Lk`` when causal), since the fixed cost is per call while the savings grow with heads,
batch and length alike.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# The dense-switch policy (runs_dense, dense_flops, the crossover) lives in the backend module,
# which owns every choice of implementation; re-exported here for existing imports.
from .._backend import DENSE_FLOP_CROSSOVER, dense_flops, runs_dense  # noqa: E402,F401
from ..block_layout import cached_candidate_blocks

# SDPA grew enable_gqa in torch 2.5.
_SDPA_TAKES_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

# Elements of the explicit causal mask one SDPA call takes when Lq < Lk (16 MiB of bool): query
# rows go in chunks, so the mask never holds Lq x Lk at once whatever the lengths.
MASK_ELEMENTS = 1 << 24


def lower_right_row_chunks(q_len: int, k_len: int) -> list[tuple[int, int]]:
    """``(r0, r1)`` chunks of query rows whose masks (:func:`lower_right_mask`) stay within
    ``MASK_ELEMENTS`` (one row at the least): one chunk wherever ``Lq * Lk`` fits."""
    rows = max(1, MASK_ELEMENTS // k_len)
    return [(r0, min(q_len, r0 + rows)) for r0 in range(0, q_len, rows)]


def lower_right_mask(r0: int, r1: int, q_len: int, k_len: int, device: torch.device
                     ) -> torch.Tensor:
    """Bool ``[r1 - r0, k_len - q_len + r1]``: query row ``r`` (the last ``q_len`` positions of
    the keys) sees keys ``0 .. k_len - q_len + r``; the keys after the chunk's last row's are
    cut off, not masked."""
    offset = k_len - q_len
    rows = torch.arange(r0, r1, device=device)[:, None] + offset
    return torch.arange(offset + r1, device=device)[None, :] <= rows


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    scale: float) -> torch.Tensor:
    """Exact attention through SDPA (cuDNN first on CUDA), queries aligned to the end of the keys.

    SDPA's ``is_causal`` aligns queries to the start of the keys, so ``Lq < Lk`` passes the
    bottom-right causal mask explicitly, in chunks of query rows (``lower_right_row_chunks``)
    so that it never holds ``Lq x Lk`` at once. GQA goes to SDPA's ``enable_gqa`` (torch >= 2.5;
    cuDNN took it on the H200 with torch 2.11 at the same device time, two copies fewer); older
    torch repeats K/V through expand + reshape, since ``repeat_interleave`` waits for the GPU to
    size its output.
    """
    b, hkv, lk_, d = k.shape
    group = q.shape[1] // hkv
    extra = {}
    if group > 1 and _SDPA_TAKES_GQA:
        extra["enable_gqa"] = True
    elif group > 1:
        k = k[:, :, None].expand(b, hkv, group, lk_, d).reshape(b, hkv * group, lk_, d)
        v = v[:, :, None].expand(b, hkv, group, lk_, d).reshape(b, hkv * group, lk_, d)
    lq, lk = q.shape[2], k.shape[2]
    previous = _prefer_cudnn()
    try:
        if not causal or lq == lk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **extra)
        chunks = lower_right_row_chunks(lq, lk)
        out = None if len(chunks) == 1 else q.new_empty(q.shape[:3] + v.shape[3:])
        for r0, r1 in chunks:
            seen = lk - lq + r1
            part = F.scaled_dot_product_attention(
                q[:, :, r0:r1], k[:, :, :seen], v[:, :, :seen],
                attn_mask=lower_right_mask(r0, r1, lq, lk, q.device), scale=scale, **extra)
            if out is None:
                return part
            out[:, :, r0:r1] = part
        return out
    finally:
        if previous is not None:
            torch._C._set_sdp_priority_order(previous)


def _prefer_cudnn() -> list[int] | None:
    """Put cuDNN first in SDPA's backend priority; returns the order to restore (None where this
    torch has no priority order). Only the order changes: backends the caller disabled stay off.
    ``torch.nn.attention.sdpa_kernel`` would do it too, at ~16 us of Python per call (measured on
    the CPU), which is as long as a whole 1k-token attention on the H200."""
    get = getattr(torch._C, "_get_sdp_priority_order", None)
    if get is None:
        return None
    previous = get()
    torch._C._set_sdp_priority_order(_cudnn_first(tuple(previous)))
    return previous


@functools.lru_cache(maxsize=8)
def _cudnn_first(previous: tuple[int, ...]) -> list[int]:
    from torch.nn.attention import SDPBackend

    first = [int(b) for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                              SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)]
    return first + [b for b in previous if b not in first]


def dense_block_mask(batch: int, heads: int, q_len: int, k_len: int, block_size: int,
                     causal: bool, device: torch.device) -> torch.Tensor:
    """The mask a dense call reports: every candidate block (one copy from a cached pattern)."""
    cand, _ = cached_candidate_blocks(q_len, k_len, block_size, causal, device)
    return cand.expand(batch, heads, *cand.shape).clone()
