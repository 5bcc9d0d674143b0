"""What the integration reads from a ``transformers`` model: its language config, its attention
layers and which of them use a sliding window.

Calibration and evaluation import these helpers from here, so that every part of the package
agrees on which layers XAttention runs on.

Example:
    >>> from xattention.integrations.transformers import model_info
    >>> sorted(model_info.attention_layers(model))[:3]        # doctest: +SKIP
    [0, 1, 2]
    >>> model_info.sliding_layers(model)                      # doctest: +SKIP
    frozenset({0, 1, 2, 3, 4, 6, 7, ...})
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ...profile import text_config
from .._common.layers import layer_set

__all__ = [
    "attention_layers",
    "layer_count",
    "layer_windows",
    "sliding_layers",
    "sparse_layers",
    "text_config",
    "vision_attention_modules",
    "vision_config_key",
    "window_restricts",
]

_WINDOW_LAYER_TYPES = {"sliding_attention": "sliding_window",
                       "chunked_attention": "attention_chunk_size"}


def attention_layers(model: torch.nn.Module) -> dict[int, list[torch.nn.Module]]:
    """``{layer_idx: [attention modules]}`` of the language model of a transformers model.

    Attention modules are those whose class name ends in ``Attention`` and that carry an integer
    ``layer_idx`` (every decoder written against ``AttentionInterface`` does). Vision towers'
    attention (Qwen2-VL's ``VisionAttention``) has no ``layer_idx`` and is not listed.
    """
    found: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and not isinstance(idx, bool) and \
                type(module).__name__.endswith("Attention"):
            found.setdefault(idx, []).append(module)
    return found


def vision_config_key(model: torch.nn.Module) -> str | None:
    """Key of the vision encoder's sub-config in ``model.config`` (``"vision_config"`` on
    Qwen2-VL / Qwen2.5-VL), None for a model without one."""
    config = model.config
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and getattr(sub, "base_config_key", key) == "vision_config":
            return key
    return None


def vision_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of the vision encoder, in order (empty without one).

    The encoder is the sub-model built from the vision sub-config; its attention modules are
    those whose class name ends in ``Attention`` (Qwen2-VL's ``VisionAttention``).
    """
    key = vision_config_key(model)
    if key is None:
        return []
    vision = getattr(model.config, key)
    towers = [m for m in model.modules() if m is not model and getattr(m, "config", None) is vision]
    return [m for tower in towers[:1] for m in tower.modules()
            if type(m).__name__.endswith("Attention")]


def layer_count(model: torch.nn.Module,
                layers: dict[int, list[torch.nn.Module]] | None = None) -> int:
    """Number of decoder layers (the config's ``num_hidden_layers``, else the highest index)."""
    n = getattr(text_config(model), "num_hidden_layers", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    layers = attention_layers(model) if layers is None else layers
    return max(layers) + 1 if layers else 0


def _config_window(config: Any, layer: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if layer < len(layer_types) and layer_types[layer] in _WINDOW_LAYER_TYPES:
            window = getattr(config, _WINDOW_LAYER_TYPES[layer_types[layer]], None)
            return window if isinstance(window, int) and window > 0 else None
        return None
    # No per-layer types (Mistral): one window for every layer, if the config turns it on.
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


def layer_windows(model: torch.nn.Module) -> dict[int, int | None]:
    """``{layer_idx: window}``: the sliding-window (or attention-chunk) length of every attention
    layer in tokens, ``None`` for global attention.

    A module's own ``sliding_window`` attribute wins (Gemma 3, Qwen 2 set it per layer); without
    one, the config's ``layer_types`` or its model-wide ``sliding_window`` decides (Mistral).
    """
    config = text_config(model)
    windows: dict[int, int | None] = {}
    for idx, modules in attention_layers(model).items():
        own = [m.sliding_window for m in modules if hasattr(m, "sliding_window")]
        if own:
            sizes = [w for w in own if isinstance(w, int) and w > 0]
            windows[idx] = min(sizes) if sizes else None
        else:
            windows[idx] = _config_window(config, idx)
    return windows


def window_restricts(window: int | None, k_len: int) -> bool:
    """Whether a window of ``window`` tokens hides any key of a ``k_len``-token context.

    Query position ``p`` sees keys ``(p - window, p]`` (transformers' sliding mask), so a window
    at least as long as the context is plain causal attention, which XAttention sparsifies.
    """
    return window is not None and k_len > window


def sliding_layers(model: torch.nn.Module, seq_len: int | None = None) -> frozenset[int]:
    """Layers whose sliding window restricts attention, and that XAttention therefore leaves to
    their own (dense, local) attention.

    Args:
        model: a transformers model.
        seq_len: context length (keys, cache included) to judge at; ``None`` lists every layer
            that has a window, whatever the length.
    """
    return frozenset(i for i, w in layer_windows(model).items()
                     if w is not None and (seq_len is None or window_restricts(w, seq_len)))


def sparse_layers(model: torch.nn.Module, seq_len: int | None = None,
                  dense_layers: Iterable[int] = ()) -> list[int]:
    """Layers :func:`~xattention.integrations.transformers.enable` runs with XAttention at a
    context of ``seq_len`` tokens: every attention layer except windowed ones
    (:func:`sliding_layers`) and ``dense_layers`` (negative indices count from the end)."""
    layers = attention_layers(model)
    dense = layer_set(dense_layers, layer_count(model, layers), "dense_layers")
    skip = sliding_layers(model, seq_len) | dense
    return [i for i in sorted(layers) if i not in skip]
