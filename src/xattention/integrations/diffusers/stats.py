"""Density statistics of a video transformer's self-attention, per denoising step and layer.

Density counts blocks of the video x video region only (non-causal: every block is a candidate):
kept blocks over all blocks, 1.0 for a dense call (warm-up steps, ``dense_layers``). Text rows and
columns are always computed and are not counted. Each step holds an
:class:`xattention.integrations._common.stats.AttentionStats` (the per-layer record every
integration keeps, counted on the device), so all integrations read the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._common.stats import AttentionStats


@dataclass
class VideoAttentionStats:
    """Block densities since :func:`enable`, :func:`reset_stats` or the start of a generation.

    Example:
        >>> s = VideoAttentionStats()
        >>> s.add(0, 3, torch.tensor([4.0, 4.0]), total=4.0, sparse=False, length=256)
        >>> s.add(5, 3, torch.tensor([1.0, 3.0]), total=4.0, sparse=True, length=256)
        >>> s.per_step(), s.dense_steps(), s.sparse_steps()
        ({0: 1.0, 5: 0.5}, [0], [5])
    """

    steps: dict[int, AttentionStats] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.steps.clear()

    def add(self, step: int, layer: int, kept: torch.Tensor, total: float, *, sparse: bool,
            length: int) -> None:
        """Record one call: ``kept`` blocks per head out of ``total`` video blocks."""
        self.steps.setdefault(step, AttentionStats()).add(layer, kept, total, sparse=sparse,
                                                          q_len=length, k_len=length)

    def record(self, step: int, layer: int, mask: torch.Tensor | None, *, batch: int,
               heads: int, length: int, block_size: int) -> None:
        """Count one call's video block mask ``[B, H, nB, nB]`` (None: dense, all kept)."""
        self.steps.setdefault(step, AttentionStats()).record(
            layer, mask, q_len=length, k_len=length, block_size=block_size, causal=False,
            heads=heads, batch=batch)

    def per_step(self) -> dict[int, float]:
        """``{step: density over all layers}``."""
        return {s: self.steps[s].overall() for s in sorted(self.steps)}

    def per_layer(self, steps: Iterable[int] | None = None) -> dict[int, float]:
        """``{layer: density}`` over the given steps (default: all recorded)."""
        kept: dict[int, float] = {}
        total: dict[int, float] = {}
        for s in self._chosen(steps):
            for layer in self.steps[s].layers:
                k, t = self.steps[s].kept_and_total([layer])
                kept[layer] = kept.get(layer, 0.0) + k
                total[layer] = total.get(layer, 0.0) + t
        return {i: kept[i] / total[i] for i in sorted(kept) if total[i]}

    def per_step_layer(self) -> dict[int, dict[int, float]]:
        """``{step: {layer: density}}``."""
        return {s: self.steps[s].per_layer() for s in sorted(self.steps)}

    def per_head(self, step: int) -> dict[int, torch.Tensor]:
        """``{layer: float32 [H] density}`` of one step."""
        return self.steps[step].per_head()

    def overall(self, steps: Iterable[int] | None = None) -> float:
        """Density over the given steps (default: all recorded) and all layers."""
        kept = total = 0.0
        for s in self._chosen(steps):
            k, t = self.steps[s].kept_and_total()
            kept += k
            total += t
        return kept / total if total else float("nan")

    def dense_steps(self) -> list[int]:
        """Steps in which no call ran XAttention (warm-up)."""
        return [s for s in sorted(self.steps) if not self.steps[s].sparse_layers()]

    def sparse_steps(self) -> list[int]:
        """Steps with at least one XAttention call."""
        return [s for s in sorted(self.steps) if self.steps[s].sparse_layers()]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {
            "overall": self.overall(),
            "overall_sparse_steps": self.overall(self.sparse_steps()),
            "per_step": {str(s): d for s, d in self.per_step().items()},
            "per_layer": {str(i): d for i, d in self.per_layer().items()},
            "dense_steps": self.dense_steps(),
            "sparse_steps": self.sparse_steps(),
        }

    def _chosen(self, steps: Iterable[int] | None) -> list[int]:
        return sorted(self.steps) if steps is None else [s for s in steps if s in self.steps]
