"""Block densities of the prefill calls XAttention served: per layer, per query head.

Density is kept blocks over candidate blocks (:func:`xattention.block_layout.candidate_blocks`:
every block for non-causal attention, the blocks holding a visible key for causal attention), the
same definition as :func:`xattention.block_density`; a dense call keeps every candidate (1.0).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...block_layout import candidate_blocks

__all__ = ["AttentionStats", "LayerStats", "count_blocks"]


@dataclass
class LayerStats:
    """Accumulated block counts of one layer's prefill calls.

    ``kept[h]`` and ``total`` are counts of (batch, query block, key block) triples: kept blocks
    of query head ``h`` and causal candidate blocks (the same for every head). Dense calls count
    every candidate as kept.
    """

    kept: torch.Tensor
    total: float = 0.0
    sparse_calls: int = 0
    dense_calls: int = 0
    last_q_len: int = 0
    last_k_len: int = 0

    @property
    def density(self) -> float:
        """Kept over candidate blocks, averaged over heads (1.0 = dense)."""
        if self.total == 0:
            return float("nan")
        return float(self.kept.sum() / (self.total * self.kept.numel()))

    @property
    def per_head(self) -> torch.Tensor:
        """Density per query head, float32 ``[Hq]``."""
        if self.total == 0:
            return torch.full_like(self.kept, float("nan"), dtype=torch.float32)
        return (self.kept / self.total).to(torch.float32)


@dataclass
class AttentionStats:
    """Block densities of the prefill calls since the last :meth:`reset`.

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
        """Accumulate one call: ``kept`` is per query head, ``total`` the candidate count."""
        kept = kept.detach().to("cpu", torch.float64)
        entry = self.layers.get(layer)
        if entry is None or entry.kept.shape != kept.shape:
            entry = self.layers[layer] = LayerStats(kept=torch.zeros_like(kept))
        entry.kept += kept
        entry.total += float(total)
        if sparse:
            entry.sparse_calls += 1
        else:
            entry.dense_calls += 1
        entry.last_q_len, entry.last_k_len = q_len, k_len

    def per_layer(self) -> dict[int, float]:
        """``{layer: density}`` for every full-attention layer that ran a prefill call."""
        return {i: self.layers[i].density for i in sorted(self.layers)}

    def per_head(self) -> dict[int, torch.Tensor]:
        """``{layer: float32 [Hq] density}``."""
        return {i: self.layers[i].per_head for i in sorted(self.layers)}

    def overall(self, layers: Iterable[int] | None = None) -> float:
        """Density over the given layers (default: all recorded), weighted by candidate blocks."""
        chosen = self.layers if layers is None else {i: self.layers[i] for i in layers
                                                     if i in self.layers}
        kept = sum(float(s.kept.sum()) for s in chosen.values())
        total = sum(s.total * s.kept.numel() for s in chosen.values())
        return kept / total if total else float("nan")

    def sparse_layers(self) -> list[int]:
        """Layers with at least one call that ran XAttention (not the dense path)."""
        return [i for i in sorted(self.layers) if self.layers[i].sparse_calls > 0]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {
            "overall": self.overall(),
            "per_layer": {str(i): s.density for i, s in sorted(self.layers.items())},
            "per_head": {str(i): [round(float(x), 6) for x in s.per_head]
                         for i, s in sorted(self.layers.items())},
            "sparse_calls": {str(i): s.sparse_calls for i, s in sorted(self.layers.items())},
            "dense_calls": {str(i): s.dense_calls for i, s in sorted(self.layers.items())},
        }


def count_blocks(mask: torch.Tensor | None, q_len: int, k_len: int, block_size: int,
                 causal: bool, heads: int, batch: int = 1) -> tuple[torch.Tensor, float]:
    """``(kept per query head, candidates)`` of one call, summed over the batch.

    ``mask`` is the call's block mask ``[B, Hq, nQB, nKB]``; ``None`` stands for a dense call
    (every candidate kept).
    """
    cand = candidate_blocks(q_len, k_len, block_size, causal)
    total = float(cand.sum()) * batch
    if mask is None:
        return torch.full((heads,), total, dtype=torch.float64), total
    kept = (mask & cand.to(mask.device)).sum(dim=(0, 2, 3)).to(torch.float64)
    return kept, total
