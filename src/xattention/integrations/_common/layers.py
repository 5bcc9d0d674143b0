"""One parser for sets of layer indices (``dense_layers`` and the like).

Every integration, calibration and ``model_info.sparse_layers`` read layer lists through
:func:`layer_set`, so ``-1`` means the last layer and a bad entry fails with the same words.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

__all__ = ["layer_set", "parse_layer_list"]


def layer_set(layers: Iterable[int] | None, num_layers: int, what: str = "dense_layers",
              *, unit: str = "model") -> frozenset[int]:
    """``layers`` as a set of indices in ``0 .. num_layers - 1`` (negative: from the end).

    Raises TypeError for a non-iterable or a non-integer entry and ValueError for an index out of
    range, naming ``what``. ``unit`` names the owner in that message ("model", "transformer").

    Example:
        >>> sorted(layer_set([0, -1], 4))
        [0, 3]
    """
    if layers is None:
        return frozenset()
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"{what} must be an iterable of ints, got {type(layers).__name__}")
    chosen = set()
    for idx in layers:
        # numpy integers are integers (a list read with numpy); bools are not layer indices
        if isinstance(idx, bool) or not isinstance(idx, numbers.Integral):
            raise TypeError(f"{what} must hold ints, got {idx!r}")
        idx = int(idx)
        if not -num_layers <= idx < num_layers:
            raise ValueError(f"{what} has {idx}, the {unit} has {num_layers} layers")
        chosen.add(idx % num_layers)
    return frozenset(chosen)


def parse_layer_list(raw: str, what: str) -> tuple[int, ...]:
    """Comma-separated layer indices (an environment variable, a CLI option) as ints.

    Example:
        >>> parse_layer_list("0, 1,-1", "XATTENTION_DENSE_LAYERS")
        (0, 1, -1)
    """
    try:
        return tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated layer indices such as '0,1,-1', "
                         f"got {raw!r}") from None
