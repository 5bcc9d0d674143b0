"""Which layers of a model are calibrated, and their softmax scales.

The model's layers are read through the transformers integration
(:func:`~xattention.integrations.transformers.model_info.sparse_layers`), so calibration covers
exactly the layers that ``enable()`` runs with XAttention at the calibration length: every
attention layer except ``dense_layers`` and windowed layers whose window is shorter than that
context (a window that covers the context is plain causal attention, which ``enable()``
sparsifies).
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


def calibrated_layers(model: Any, dense_layers: Sequence[int] = (),
                      seq_len: int | None = None) -> list[int]:
    """Layers ``enable(model, dense_layers=...)`` runs with XAttention at a context of
    ``seq_len`` tokens (ascending); ``None``: at any length (windowed layers left out)."""
    return integration().sparse_layers(model, seq_len, dense_layers)


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
