"""Block densities of the calls an integration served: per layer, per query head.

Density is kept blocks over candidate blocks (:func:`xattention.block_layout.candidate_blocks`:
every block for non-causal attention, the blocks holding a visible key for causal attention), the
same definition as :func:`xattention.block_density`; a dense call keeps every candidate (1.0).

The counts stay on the device the attention runs on: recording a call is a few device ops and no
synchronisation (a ``.cpu()`` per layer per call would stall every prefill); they move to the
host when read (:attr:`LayerStats.kept`, :meth:`AttentionStats.per_layer`, ...). The
transformers, diffusers and vLLM integrations all record through :meth:`AttentionStats.record`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ...block_layout import cached_candidate_blocks

__all__ = ["AttentionStats", "LayerStats", "count_blocks"]


def _count_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def count_blocks(mask: torch.Tensor | None, q_len: int, k_len: int, block_size: int,
                 causal: bool, heads: int, batch: int = 1) -> tuple[torch.Tensor, float]:
    """``(kept per query head, candidates)`` of one call, summed over the batch; ``kept`` stays
    on the mask's device.

    ``mask`` is the call's block mask ``[B, Hq, nQB, nKB]``; ``None`` stands for a dense call
    (every candidate kept).
    """
    device = mask.device if mask is not None else torch.device("cpu")
    cand, per_batch = cached_candidate_blocks(q_len, k_len, block_size, causal, device)
    total = float(per_batch * batch)
    if mask is None:
        return torch.full((heads,), total, dtype=torch.float64), total
    kept = (mask & cand).sum(dim=(0, 2, 3)).to(_count_dtype(mask.device))
    return kept, total


@dataclass
class LayerStats:
    """Accumulated block counts of one layer's calls.

    ``kept[h]`` and ``total`` are counts of (batch, query block, key block) triples: kept blocks
    of query head ``h`` and candidate blocks (the same for every head). Dense calls count every
    candidate as kept.
    """

    counts: torch.Tensor  # kept per head, on the device the layer runs on
    total: float = 0.0
    sparse_calls: int = 0
    dense_calls: int = 0
    last_q_len: int = 0
    last_k_len: int = 0

    @property
    def kept(self) -> torch.Tensor:
        """Kept blocks per query head, float64 on the host (reading synchronises)."""
        return self.counts.detach().to("cpu", torch.float64)

    @property
    def density(self) -> float:
        """Kept over candidate blocks, averaged over heads (1.0 = dense)."""
        if self.total == 0:
            return float("nan")
        kept = self.kept
        return float(kept.sum() / (self.total * kept.numel()))

    @property
    def per_head(self) -> torch.Tensor:
        """Density per query head, float32 ``[Hq]``."""
        kept = self.kept
        if self.total == 0:
            return torch.full_like(kept, float("nan"), dtype=torch.float32)
        return (kept / self.total).to(torch.float32)


@dataclass
class AttentionStats:
    """Block densities of the calls since the last :meth:`reset`.

    Example:
        >>> stats = AttentionStats()
        >>> stats.add(0, torch.tensor([3.0, 1.0]), total=4.0, sparse=True, q_len=256, k_len=256)
        >>> stats.per_layer()
        {0: 0.5}
        >>> round(stats.overall(), 3)
        0.5
    """

    layers: dict[int, LayerStats] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.layers.clear()

    def add(self, layer: int, kept: torch.Tensor, total: float, *, sparse: bool, q_len: int,
            k_len: int) -> None:
        """Accumulate one call: ``kept`` is per query head (any device), ``total`` the candidate
        count. No host synchronisation."""
        kept = kept.detach()
        entry = self.layers.get(layer)
        if entry is None or entry.counts.shape != kept.shape:
            dtype = _count_dtype(kept.device)
            entry = self.layers[layer] = LayerStats(counts=torch.zeros(kept.shape, dtype=dtype,
                                                                       device=kept.device))
        if kept.device != entry.counts.device:
            kept = kept.to(entry.counts.device, non_blocking=True)
        entry.counts += kept.to(entry.counts.dtype)
        entry.total += float(total)
        if sparse:
            entry.sparse_calls += 1
        else:
            entry.dense_calls += 1
        entry.last_q_len, entry.last_k_len = q_len, k_len

    def record(self, layer: int, mask: torch.Tensor | None, *, q_len: int, k_len: int,
               block_size: int, causal: bool, heads: int, batch: int = 1) -> None:
        """Count one call's block mask ``[B, Hq, nQB, nKB]`` (None: a dense call)."""
        kept, total = count_blocks(mask, q_len, k_len, block_size, causal, heads, batch)
        self.add(layer, kept, total, sparse=mask is not None, q_len=q_len, k_len=k_len)

    def host_copy(self) -> AttentionStats:
        """A copy with the counts on the host, taken without waiting for the device: CUDA counts
        go to pinned memory by non-blocking copies, so the copy is readable once the work queued
        so far has finished (record an event after this call and wait on it before reading)."""
        out = AttentionStats()
        for i, s in self.layers.items():
            if s.counts.device.type == "cuda":
                host = torch.empty(s.counts.shape, dtype=s.counts.dtype, pin_memory=True)
                host.copy_(s.counts, non_blocking=True)
            else:
                host = s.counts.detach().clone()
            out.layers[i] = replace(s, counts=host)
        return out

    def per_layer(self) -> dict[int, float]:
        """``{layer: density}`` for every layer that recorded a call."""
        return {i: self.layers[i].density for i in sorted(self.layers)}

    def per_head(self) -> dict[int, torch.Tensor]:
        """``{layer: float32 [Hq] density}``."""
        return {i: self.layers[i].per_head for i in sorted(self.layers)}

    def kept_and_total(self, layers: Iterable[int] | None = None) -> tuple[float, float]:
        """``(kept, candidates)`` summed over the given layers (default: all) and heads."""
        chosen = self.layers.values() if layers is None else \
            [self.layers[i] for i in layers if i in self.layers]
        kept = total = 0.0
        for s in chosen:
            k = s.kept
            kept += float(k.sum())
            total += s.total * k.numel()
        return kept, total

    def overall(self, layers: Iterable[int] | None = None) -> float:
        """Density over the given layers (default: all recorded), weighted by candidate blocks."""
        kept, total = self.kept_and_total(layers)
        return kept / total if total else float("nan")

    def sparse_layers(self) -> list[int]:
        """Layers with at least one call that ran XAttention (not the dense path)."""
        return [i for i in sorted(self.layers) if self.layers[i].sparse_calls > 0]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        items = sorted(self.layers.items())
        return {
            "overall": self.overall(),
            "per_layer": {str(i): s.density for i, s in items},
            "per_head": {str(i): [round(float(x), 6) for x in s.per_head] for i, s in items},
            "candidates": {str(i): s.total for i, s in items},  # per head (merging needs it)
            "sparse_calls": {str(i): s.sparse_calls for i, s in items},
            "dense_calls": {str(i): s.dense_calls for i, s in items},
        }
