"""Checks of ``enable``'s arguments, each raising ValueError / TypeError that names the argument."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch


def positive_float(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must lie in (0, inf), got {value}")
    return value


def non_negative_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


def block_params(stride: object, block_size: object) -> tuple[int, int]:
    for name, value in (("stride", stride), ("block_size", block_size)):
        if non_negative_int(value, name) == 0:
            raise ValueError(f"{name} must be positive, got 0")
    if block_size % stride:
        raise ValueError(f"stride ({stride}) must divide block_size ({block_size})")
    return stride, block_size


def layer_set(layers: Iterable[int], num_layers: int, what: str) -> frozenset[int]:
    """Layer indices (negative ones count from the end) as a set of ``0..num_layers-1``."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"{what} must be an iterable of ints, got {type(layers).__name__}")
    chosen = set()
    for idx in layers:
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise TypeError(f"{what} must hold ints, got {idx!r}")
        if not -num_layers <= idx < num_layers:
            raise ValueError(f"{what} has {idx}, the transformer has {num_layers} layers")
        chosen.add(idx % num_layers)
    return frozenset(chosen)


def _row(row: Any, heads: int, layer: int) -> float | torch.Tensor:
    """One layer's entry: a float (all heads) or ``heads`` floats."""
    if isinstance(row, torch.Tensor):
        row = row.detach().cpu().tolist()
    if isinstance(row, (int, float)) and not isinstance(row, bool):
        return positive_float(row, f"thresholds[{layer}]")
    if not isinstance(row, Sequence) or isinstance(row, str):
        raise TypeError(f"thresholds[{layer}] must be a float or a list of {heads} floats, "
                        f"got {type(row).__name__}")
    if len(row) != heads:
        raise ValueError(f"thresholds[{layer}] must have {heads} entries (one per head), "
                         f"got {len(row)}")
    return torch.tensor([positive_float(x, f"thresholds[{layer}][{h}]")
                         for h, x in enumerate(row)], dtype=torch.float32)


def threshold_table(threshold: object, thresholds: Any, num_layers: int, heads: int
                    ) -> dict[int, float | torch.Tensor]:
    """``{layer: float or float32 [heads]}`` from the default and the optional table.

    ``thresholds``: None, a list / tensor ``[num_layers]`` (per layer), a nested list / tensor
    ``[num_layers][heads]`` (per layer and head), or a dict ``{layer: float or [heads]}`` for
    some layers (the others use ``threshold``).
    """
    default = positive_float(threshold, "threshold")
    table: dict[int, float | torch.Tensor] = dict.fromkeys(range(num_layers), default)
    if thresholds is None:
        return table
    if isinstance(thresholds, Mapping):
        for key, row in thresholds.items():
            if isinstance(key, bool) or not isinstance(key, int) or \
                    not -num_layers <= key < num_layers:
                raise ValueError(f"thresholds has layer {key!r}, the transformer has "
                                 f"{num_layers} layers")
            table[key % num_layers] = _row(row, heads, key)
        return table
    if isinstance(thresholds, torch.Tensor):
        if thresholds.dim() not in (1, 2):
            raise ValueError("thresholds tensor must be [num_layers] or [num_layers, heads], got "
                             f"shape {tuple(thresholds.shape)}")
        thresholds = thresholds.detach().cpu().tolist()
    if not isinstance(thresholds, Sequence) or isinstance(thresholds, str):
        raise TypeError("thresholds must be a list [num_layers], a nested list "
                        "[num_layers][heads], a tensor of those shapes or a dict "
                        f"{{layer: value}}, got {type(thresholds).__name__}")
    if len(thresholds) != num_layers:
        raise ValueError(f"thresholds must have {num_layers} rows (one per layer), "
                         f"got {len(thresholds)}")
    for layer, row in enumerate(thresholds):
        table[layer] = _row(row, heads, layer)
    return table
