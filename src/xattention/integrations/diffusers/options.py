"""Checks of ``enable``'s arguments, each raising ValueError / TypeError that names the argument."""

from __future__ import annotations

from collections.abc import Iterable


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
