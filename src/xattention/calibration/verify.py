"""Held-out verification: a threshold table run through the model on windows it was not fitted on.

``HeldOut.prepare`` runs every held-out window densely once (its next-token log-probabilities on
the scored positions are the reference) and keeps each calibrated layer's block scores, so the
density of any threshold table is counted without another forward pass. ``HeldOut.evaluate`` runs
the model with ``integrations.transformers.enable(thresholds=...)`` and compares: mean
KL(dense || sparse) per scored token, the next-token loss and its increase, and the density.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..estimate import estimate_block_scores
from ._progress import each
from .data import CalibrationWindow
from .layers import device_of, integration, layer_scales
from .measure import density_counts

__all__ = ["HeldOut", "forward_logprobs", "mean_kl", "mean_loss"]


@torch.no_grad()
def forward_logprobs(model: Any, ids: torch.Tensor, last: int) -> torch.Tensor:
    """Log-probabilities (float32, on the CPU) of the positions predicting the last ``last``
    tokens of ``ids``."""
    ids = ids.to(device_of(model)).view(1, -1)
    try:
        out = model(input_ids=ids, logits_to_keep=last + 1, use_cache=False)
    except TypeError:  # models without logits_to_keep
        out = model(input_ids=ids, use_cache=False)
    logits = out.logits[0, -(last + 1):-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def mean_loss(logprobs: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token loss of the scored positions (the last ``len(logprobs)`` tokens)."""
    targets = ids.view(-1)[-logprobs.shape[0]:]
    return float(-logprobs.gather(1, targets.view(-1, 1)).mean())


def mean_kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(ref || other), both log-probabilities."""
    return float((ref.exp() * (ref - other)).sum(-1).mean())


@dataclass
class HeldOut:
    """Held-out windows with their dense reference and per-layer block scores."""

    model: Any
    windows: list[CalibrationWindow]
    layers: list[int]
    stride: int
    block_size: int
    backend: str
    dense_logprobs: list[torch.Tensor]
    scores: list[dict[int, torch.Tensor]]
    dense_loss: float

    @classmethod
    def prepare(cls, model: Any, windows: Sequence[CalibrationWindow], layers: Sequence[int],
                stride: int, block_size: int, backend: str, progress: bool = False) -> HeldOut:
        """One dense forward and one capture per window: the reference the runs compare with."""
        xt = integration()
        scales = layer_scales(model)
        windows, layers = list(windows), list(layers)
        logprobs: list[torch.Tensor] = []
        scores: list[dict[int, torch.Tensor]] = []
        for w in each(windows, "held-out dense", progress):
            logprobs.append(forward_logprobs(model, w.ids, w.scored))
            caps = xt.capture_attention_inputs(model, w.ids.view(1, -1).to(device_of(model)),
                                               layers=layers)
            scores.append({layer: estimate_block_scores(
                caps[layer][0], caps[layer][1], stride=stride, block_size=block_size,
                causal=True, scale=scales.get(layer), backend=backend).cpu()
                for layer in layers})
            del caps
        dense_loss = float(np.mean([mean_loss(lp, w.ids)
                                    for lp, w in zip(logprobs, windows, strict=True)]))
        return cls(model, windows, layers, stride, block_size, backend, logprobs, scores,
                   dense_loss)

    def density(self, thresholds: list[list[float]]) -> float:
        """Mean over (window, calibrated layer, head) of kept / candidate blocks."""
        per_head = []
        for sc, w in zip(self.scores, self.windows, strict=True):
            n = w.ids.numel()
            for li in self.layers:
                row = torch.tensor(thresholds[li], dtype=torch.float32)
                kept, total = density_counts(sc[li], row, n, n, self.block_size, True,
                                             self.backend)
                per_head.extend((kept / total).tolist())
        return float(np.mean(per_head))

    def evaluate(self, thresholds: list[list[float]], **enable_kwargs: Any) -> dict[str, float]:
        """Run the model with these thresholds on the held-out windows: KL, loss, density.

        KL and loss are averaged over each window's scored tokens, then over windows (a window
        counts once however long its answer is). ``runtime_density`` is what the integration
        recorded during the sparse run (its q/k follow the sparse layers before it).
        """
        xt = integration()
        kls, losses = [], []
        xt.enable(self.model, threshold=0.9, stride=self.stride, block_size=self.block_size,
                  thresholds=thresholds, backend=self.backend, **enable_kwargs)
        xt.reset_stats(self.model)
        try:
            for w, ref in zip(self.windows, self.dense_logprobs, strict=True):
                lp = forward_logprobs(self.model, w.ids, w.scored)
                kls.append(mean_kl(ref, lp))
                losses.append(mean_loss(lp, w.ids))
            runtime = xt.last_stats(self.model).overall(layers=self.layers)
        finally:
            xt.disable(self.model)
        loss = float(np.mean(losses))
        return {"kl": float(np.mean(kls)), "loss": loss,
                "loss_increase": loss - self.dense_loss, "density": self.density(thresholds),
                "runtime_density": float(runtime)}
