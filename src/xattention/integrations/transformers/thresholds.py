"""From what a user passes to ``enable`` to one threshold entry per layer.

Accepted: one number for every layer and head (``threshold=``); and as ``thresholds=``, a
:class:`xattention.profile.ThresholdProfile` or the path of its JSON file (its stride and block
size win), a nested list / tensor ``[num_layers][num_q_heads]``, a list / tensor ``[num_layers]``
or a dict ``{layer: number or [num_q_heads] numbers}``. Every single value goes through the core's
one threshold check (:func:`xattention._validation.check_threshold_value`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..._backend import warn_once
from ..._validation import check_threshold_value
from ...profile import ThresholdProfile

__all__ = ["LayerThreshold", "resolve_thresholds", "split_threshold_arguments", "threshold_table"]

LayerThreshold = float | torch.Tensor  # one number for all heads, or float32 [num_q_heads]

_DEFAULT_THRESHOLD = 0.9
_DEFAULT_STRIDE, _DEFAULT_BLOCK_SIZE = 8, 128


def split_threshold_arguments(threshold: Any, thresholds: Any) -> tuple[Any, Any]:
    """``(threshold, thresholds)`` with a table or profile given in the first slot moved to the
    second (``enable(model, profile)``); a string there is a mistake, not a path."""
    if isinstance(threshold, (str, os.PathLike)):
        raise TypeError(f"threshold must be a number in (0, inf), got {type(threshold).__name__} "
                        f"{os.fspath(threshold)!r}; a profile file goes to thresholds=PATH")
    if thresholds is None and not isinstance(threshold, (int, float)):
        return _DEFAULT_THRESHOLD, threshold
    return threshold, thresholds


def _row(row: Any, num_heads: int, layer: int) -> LayerThreshold:
    """One layer's entry: a number (all heads) or ``num_heads`` numbers."""
    if isinstance(row, torch.Tensor):
        row = row.detach().cpu().tolist()
    if isinstance(row, (int, float)) and not isinstance(row, bool):
        return check_threshold_value(f"thresholds[{layer}]", row)
    if not isinstance(row, Sequence) or isinstance(row, str):
        raise TypeError(f"thresholds[{layer}] must be a number or a list of {num_heads} numbers, "
                        f"got {type(row).__name__}")
    if len(row) != num_heads:
        raise ValueError(f"thresholds[{layer}] must have {num_heads} entries (one per query "
                         f"head), got {len(row)}")
    values = [check_threshold_value(f"thresholds[{layer}][{h}]", x) for h, x in enumerate(row)]
    return torch.tensor(values, dtype=torch.float32)


def _from_profile(model: torch.nn.Module, profile: ThresholdProfile, stride: int,
                  block_size: int) -> tuple[list[list[float]], int, int]:
    profile.check_model(model)  # ValueError on a model it was not calibrated for
    # The defaults mean "not chosen": only an explicit different choice is worth a warning.
    if (stride, block_size) != (_DEFAULT_STRIDE, _DEFAULT_BLOCK_SIZE) and \
            (profile.stride, profile.block_size) != (stride, block_size):
        warn_once(f"xattention: using the profile's stride={profile.stride}, "
                  f"block_size={profile.block_size} (calibrated with them) instead of "
                  f"stride={stride}, block_size={block_size}")
    return profile.thresholds, int(profile.stride), int(profile.block_size)


def resolve_thresholds(model: torch.nn.Module, threshold: Any, thresholds: Any, stride: int,
                       block_size: int, num_layers: int, num_heads: int
                       ) -> tuple[dict[int, LayerThreshold], int, int]:
    """``({layer: threshold}, stride, block_size)``; a profile may change stride and block size."""
    default = check_threshold_value("threshold", threshold)
    if isinstance(thresholds, (str, os.PathLike)):
        thresholds = ThresholdProfile.load(thresholds)  # clear errors for a missing or bad file
    if isinstance(thresholds, ThresholdProfile):
        thresholds, stride, block_size = _from_profile(model, thresholds, stride, block_size)
    return threshold_table(default, thresholds, num_layers, num_heads), stride, block_size


def threshold_table(threshold: Any, thresholds: Any, num_layers: int, num_heads: int
                    ) -> dict[int, LayerThreshold]:
    """``{layer: number or float32 [num_heads]}`` from a default and an optional table.

    ``thresholds``: None, a list / tensor ``[num_layers]``, a nested list / tensor
    ``[num_layers][num_heads]``, or a dict ``{layer: number or [num_heads]}`` for some layers
    (negative keys count from the end; the others keep ``threshold``). Shared by every
    integration, so each accepts the same tables with the same errors.
    """
    default = check_threshold_value("threshold", threshold)
    table: dict[int, LayerThreshold] = dict.fromkeys(range(num_layers), default)
    if thresholds is None:
        return table
    if isinstance(thresholds, Mapping):
        for key, row in thresholds.items():
            if isinstance(key, bool) or not isinstance(key, int) or \
                    not -num_layers <= key < num_layers:
                raise ValueError(f"thresholds has layer {key!r}, the model has {num_layers} "
                                 "layers")
            table[key % num_layers] = _row(row, num_heads, key)
        return table
    if isinstance(thresholds, torch.Tensor):
        if thresholds.dim() not in (1, 2):
            raise ValueError("thresholds tensor must be [num_layers] or [num_layers, num_heads], "
                             f"got shape {tuple(thresholds.shape)}")
        thresholds = thresholds.detach().cpu().tolist()
    if not isinstance(thresholds, Sequence) or isinstance(thresholds, str):
        raise TypeError("thresholds must be a ThresholdProfile or the path of its file, a nested "
                        "list/tensor [num_layers][num_heads], a list [num_layers] or a dict "
                        f"{{layer: value}}, got {type(thresholds).__name__}")
    if len(thresholds) != num_layers:
        raise ValueError(f"thresholds must have {num_layers} rows (one per layer), "
                         f"got {len(thresholds)}")
    for layer, row in enumerate(thresholds):
        table[layer] = _row(row, num_heads, layer)
    return table
