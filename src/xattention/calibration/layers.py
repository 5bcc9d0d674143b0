"""Which layers of a model are calibrated, and their softmax scales.

The model's layers are read through the transformers integration (its ``attention_layers`` and
sliding-layer detection), so calibration covers exactly the layers that ``enable()`` runs with
XAttention: every attention layer except sliding-window ones (left to their own local attention)
and ``dense_layers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["calibrated_layers", "device_of", "integration", "layer_scales"]

INSTALL_HINT = 'from a clone of the repository: pip install -e ".[transformers]"'


def integration() -> Any:
    """``xattention.integrations.transformers``, or a ModuleNotFoundError saying what to install."""
    try:
        import xattention.integrations.transformers as xt
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("xattention"):
            raise
        raise ModuleNotFoundError(f"calibration needs the transformers integration, which needs "
                                  f"{exc.name!r} ({INSTALL_HINT})", name=exc.name) from exc
    return xt


def calibrated_layers(model: Any, dense_layers: Sequence[int] = ()) -> list[int]:
    """Layers the integration runs with XAttention (ascending): attention layers that are not
    sliding-window layers, less ``dense_layers`` (negative indices count from the end)."""
    xt = integration()
    found = xt.attention_layers(model)
    sliding = xt.sliding_layers(model)
    n_layers = max(found, default=-1) + 1
    dense = {int(i) % n_layers for i in dense_layers} if n_layers else set()
    return [i for i in sorted(found) if i not in sliding and i not in dense]


def layer_scales(model: Any) -> dict[int, float]:
    """Softmax scale of every attention layer (the modules' ``scaling``), where it is stated."""
    out: dict[int, float] = {}
    for idx, modules in integration().attention_layers(model).items():
        scale = getattr(modules[0], "scaling", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            out[idx] = float(scale)
    return out


def device_of(model: Any) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
