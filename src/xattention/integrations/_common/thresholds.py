"""From what a user passes as thresholds to one threshold entry per layer, for every integration.

Accepted: one number for every layer and head (``threshold=``, any real number type: a numpy
scalar from a config is fine, a bool is not); and as ``thresholds=``, a
:class:`xattention.profile.ThresholdProfile` or the path of its JSON file, a nested list / tensor
``[num_layers][num_q_heads]``, a list / tensor ``[num_layers]`` or a dict
``{layer: number or [num_q_heads] numbers}``. Every single value goes through the core's one
threshold check (:func:`xattention._validation.check_threshold_value`).

The one policy for a profile: it was calibrated with a stride and a block size, and it runs with
them. ``stride`` / ``block_size`` left at None take the profile's; an explicit value that
contradicts the profile is a ValueError (a warning would run thresholds tuned for other blocks).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..._validation import check_block_params, check_threshold_value
from ...profile import ThresholdProfile

__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_STRIDE", "LayerThreshold", "ThresholdTable",
           "ProfileNotFoundError", "check_number", "load_profile", "resolve_thresholds",
           "threshold_table"]

LayerThreshold = float | torch.Tensor  # one number for all heads, or float32 [num_q_heads]

DEFAULT_STRIDE, DEFAULT_BLOCK_SIZE = 8, 128


def check_number(name: str, value: object) -> float:
    """One threshold value of any real number type (numpy scalars included, bools not)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and \
            not isinstance(value, (int, float)):
        value = float(value)
    return check_threshold_value(name, value)


class ProfileNotFoundError(FileNotFoundError, ValueError):
    """A profile path that names no file: a FileNotFoundError, and a ValueError of the argument
    (what every other bad ``thresholds=`` raises)."""


def load_profile(path: str | os.PathLike[str], what: str = "thresholds") -> ThresholdProfile:
    """The profile at ``path``; a missing file is a :class:`ProfileNotFoundError` naming
    ``what``."""
    if not os.path.isfile(path):
        raise ProfileNotFoundError(f"{what}={os.fspath(path)!r}: no such file (expected a "
                                   "threshold profile written by `xattention calibrate`)")
    try:
        return ThresholdProfile.load(path)
    except ValueError as exc:
        raise ValueError(f"{what}={os.fspath(path)!r}: {exc}") from None


def _row(row: Any, num_heads: int, layer: Any) -> LayerThreshold:
    """One layer's entry: a number (all heads) or ``num_heads`` numbers."""
    if isinstance(row, torch.Tensor):
        row = row.detach().cpu().tolist()
    if isinstance(row, numbers.Real) and not isinstance(row, bool):
        return check_number(f"thresholds[{layer}]", row)
    if not isinstance(row, Sequence) or isinstance(row, str):
        if hasattr(row, "tolist"):  # a numpy array
            return _row(row.tolist(), num_heads, layer)
        raise TypeError(f"thresholds[{layer}] must be a number or a list of {num_heads} numbers, "
                        f"got {type(row).__name__}")
    if len(row) != num_heads:
        raise ValueError(f"thresholds[{layer}] must have {num_heads} entries (one per query "
                         f"head), got {len(row)}")
    values = [check_number(f"thresholds[{layer}][{h}]", x) for h, x in enumerate(row)]
    return torch.tensor(values, dtype=torch.float32)


def threshold_table(threshold: Any, thresholds: Any, num_layers: int, num_heads: int
                    ) -> dict[int, LayerThreshold]:
    """``{layer: number or float32 [num_heads]}`` from a default and an optional table.

    ``thresholds``: None, a list / tensor ``[num_layers]``, a nested list / tensor
    ``[num_layers][num_heads]``, or a dict ``{layer: number or [num_heads]}`` for some layers
    (negative keys count from the end; the others keep ``threshold``).
    """
    default = check_number("threshold", threshold)
    table: dict[int, LayerThreshold] = dict.fromkeys(range(num_layers), default)
    if thresholds is None:
        return table
    if isinstance(thresholds, Mapping):
        for key, row in thresholds.items():
            if isinstance(key, bool) or not isinstance(key, numbers.Integral) or \
                    not -num_layers <= key < num_layers:
                raise ValueError(f"thresholds has layer {key!r}, the model has {num_layers} "
                                 "layers")
            table[int(key) % num_layers] = _row(row, num_heads, key)
        return table
    if isinstance(thresholds, torch.Tensor):
        if thresholds.dim() not in (1, 2):
            raise ValueError("thresholds tensor must be [num_layers] or [num_layers, num_heads], "
                             f"got shape {tuple(thresholds.shape)}")
        thresholds = thresholds.detach().cpu().tolist()
    elif hasattr(thresholds, "tolist") and not isinstance(thresholds, (str, Sequence)):
        thresholds = thresholds.tolist()  # a numpy array
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


def resolve_thresholds(threshold: Any, thresholds: Any, *, stride: int | None,
                       block_size: int | None, num_layers: int, num_heads: int,
                       model: Any = None) -> tuple[dict[int, LayerThreshold], int, int]:
    """``({layer: threshold}, stride, block_size)`` under the profile policy of this module.

    ``model`` (a model or its config), when given, is checked against a profile
    (:meth:`ThresholdProfile.check_model`: layer and head counts).
    """
    if isinstance(threshold, (str, os.PathLike)):
        raise TypeError(f"threshold must be a number in (0, inf), got {type(threshold).__name__} "
                        f"{os.fspath(threshold)!r}; a profile file goes to thresholds=PATH")
    default = check_number("threshold", threshold)
    if isinstance(thresholds, (str, os.PathLike)):
        thresholds = load_profile(thresholds)
    if isinstance(thresholds, ThresholdProfile):
        profile = thresholds
        if model is not None:
            profile.check_model(model)  # ValueError on a model it was not calibrated for
        for name, mine, theirs in (("stride", stride, profile.stride),
                                   ("block_size", block_size, profile.block_size)):
            if mine is not None and mine != theirs:
                raise ValueError(f"{name}={mine} contradicts the threshold profile, which was "
                                 f"calibrated with {name}={theirs}; leave {name} unset")
        stride, block_size = int(profile.stride), int(profile.block_size)
        thresholds = profile.thresholds
    stride = DEFAULT_STRIDE if stride is None else stride
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    # The pair, once the defaults are in: enable(stride=3) meets block_size's default here,
    # not in the first forward pass.
    stride, block_size = check_block_params(stride, block_size)
    return threshold_table(default, thresholds, num_layers, num_heads), stride, block_size


class ThresholdTable:
    """``{layer: threshold}`` whose per-head tensors are moved once to each device they run on
    (not once per call: a host-to-device copy per layer per step adds up).

    Example:
        >>> t = ThresholdTable({0: 0.9, 1: torch.tensor([0.8, 0.95])})
        >>> t.for_layer(0, torch.device("cpu"))
        0.9
    """

    def __init__(self, table: Mapping[int, LayerThreshold]) -> None:
        self.table: dict[int, LayerThreshold] = dict(table)
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __getitem__(self, layer: int) -> LayerThreshold:
        return self.table[layer]

    def __len__(self) -> int:
        return len(self.table)

    def for_layer(self, layer: int, device: torch.device) -> LayerThreshold:
        t = self.table[layer]
        if not isinstance(t, torch.Tensor) or t.device == device:
            return t
        key = (layer, device)
        cached = self._on_device.get(key)
        if cached is None:
            cached = self._on_device[key] = t.to(device)
        return cached
