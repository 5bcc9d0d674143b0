"""Per-head curves of a model: density, recall and cost of every grid threshold, per (layer, head).

``measure_curves`` runs the model densely once per calibration window, captures every calibrated
layer's post-RoPE q/k/v and accumulates ``measure.measure_layer`` sums; ``Curves.from_sums``
flattens them to ``[heads, thresholds]`` arrays over (layer, head), the form the knapsack solvers
take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._progress import bar
from .data import CalibrationWindow
from .layers import device_of, integration, layer_scales
from .measure import CurveSums, measure_layer

__all__ = ["Curves", "measure_curves", "stack_curves"]

# A measured output error below this is float rounding, not lost attention.
NOISE = 1e-9


def measure_curves(
    model: Any,
    windows: Sequence[torch.Tensor | CalibrationWindow],
    grid: Sequence[float],
    *,
    layers: Sequence[int] | None = None,
    stride: int = 8,
    block_size: int = 128,
    backend: str = "auto",
    progress: bool = True,
) -> dict[int, CurveSums]:
    """Per-layer ``CurveSums`` (density / recall / output error for every grid threshold),
    accumulated over ``windows`` (1-D token tensors: every row measured, or
    ``CalibrationWindow``: the rows it focuses on)."""
    xt = integration()
    layers = sorted(xt.attention_layers(model)) if layers is None else list(layers)
    scales = layer_scales(model)
    sums: dict[int, CurveSums] = {}
    device = device_of(model)
    with bar("calibration curves", progress, total=len(windows) * len(layers)) as tick:
        for w in windows:
            ids, rows = (w.ids, w.rows) if isinstance(w, CalibrationWindow) else (w, None)
            caps = xt.capture_attention_inputs(model, ids.view(1, -1).to(device), layers=layers)
            for layer in layers:
                q, k, v = caps[layer]
                s = measure_layer(q, k, v, grid, stride=stride, block_size=block_size,
                                  causal=True, scale=scales.get(layer), backend=backend,
                                  rows=rows)
                if layer in sums:
                    sums[layer].add(s)
                else:
                    sums[layer] = s
                tick()
            del caps
    return sums


def stack_curves(sums: dict[int, CurveSums], n_layers: int, proxy: str = "output_error"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Flatten per-layer sums to ``density, recall, cost`` arrays ``[N, T]`` over (layer, head).

    ``proxy`` is ``"output_error"`` (relative squared error of the head output) or
    ``"lost_mass"`` (``1 - recall``). Returns the head order as ``(layer, head)`` pairs.
    """
    if proxy not in ("output_error", "lost_mass"):
        raise ValueError(f"proxy must be 'output_error' or 'lost_mass', got {proxy!r}")
    d, r, c, keys = [], [], [], []
    for layer in range(n_layers):
        if layer not in sums:
            continue
        s = sums[layer]
        d.append(s.density)
        r.append(s.recall)
        c.append(s.rel_error if proxy == "output_error" else np.clip(1 - s.recall, 0, None))
        keys.extend((layer, h) for h in range(s.density.shape[0]))
    return np.concatenate(d), np.concatenate(r), np.concatenate(c), keys


@dataclass
class Curves:
    """Measured curves, flattened over (layer, head).

    Attributes:
        grid: the thresholds (columns), descending.
        sums: per-layer running sums (``measure.CurveSums``).
        density, recall, cost: ``[N, T]``; ``cost`` is the proxy, zero for dense options and
            for errors under float noise.
        keys: ``(layer, head)`` of each row.
        seconds: time the measurement took.
    """

    grid: list[float]
    sums: dict[int, CurveSums]
    density: np.ndarray
    recall: np.ndarray
    cost: np.ndarray
    keys: list[tuple[int, int]]
    seconds: float = 0.0

    @classmethod
    def from_sums(cls, sums: dict[int, CurveSums], grid: Sequence[float], n_layers: int,
                  proxy: str, seconds: float = 0.0) -> Curves:
        density, recall, cost, keys = stack_curves(sums, n_layers, proxy)
        dense = (np.asarray(grid) >= 1)[None, :]
        cost = np.where(dense | (cost < NOISE), 0.0, cost)
        return cls(list(grid), sums, density, recall, cost, keys, seconds)

    def feasible(self, min_recall: float) -> np.ndarray:
        """Options ``[N, T]`` meeting the recall floor (the dense option always does)."""
        if not (0 <= min_recall <= 1):
            raise ValueError(f"min_recall must be in [0, 1], got {min_recall}")
        f = self.recall >= min_recall
        f |= (np.asarray(self.grid) >= 1)[None, :]
        if not f.any(axis=1).all():
            bad = [self.keys[i] for i in np.flatnonzero(~f.any(axis=1))][:5]
            raise ValueError(f"no threshold in the grid reaches min_recall={min_recall} for "
                             f"heads {bad} (layer, head); add 1.0 to the grid")
        return f

    def sparse_share(self, min_recall: float) -> float:
        """Share of heads with at least one sparse (threshold < 1) option meeting the floor."""
        sparse = (np.asarray(self.grid) < 1)[None, :]
        return float((self.feasible(min_recall) & sparse).any(axis=1).mean())
