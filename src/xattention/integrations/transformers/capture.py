"""Capturing the post-RoPE q/k/v that attention layers receive, for calibration and evaluation.

A capture switches the model's language layers, for its duration, to a second registered
attention function (``"xattention_capture"``: store the inputs, then transformers' own SDPA), so
the XAttention function never looks at capture flags. On exit the model gets back the
implementation it had, enabled or not, with its statistics untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .._common.layers import layer_set
from .model_info import attention_layers
from .registration import CAPTURE_NAME, implementation, register, set_implementation

__all__ = ["Capture", "capture", "capture_attention_inputs"]

_CAPTURE_ATTR = "_xattention_capture"

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _StopForward(Exception):
    """Raised inside a capture once the last requested layer has been captured."""


@dataclass
class Capture:
    """What a :func:`capture` block recorded: ``qkv[layer] = (q, k, v)``, ``q [B, Hq, L, D]``,
    ``k, v [B, Hkv, L, D]`` (the last call of that layer inside the block)."""

    layers: frozenset[int]
    stop_early: bool = True
    qkv: dict[int, QKV] = field(default_factory=dict)


def _capture_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     **kwargs: Any) -> tuple[torch.Tensor, Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cap: Capture | None = getattr(module, _CAPTURE_ATTR, None)
    layer = getattr(module, "layer_idx", None)
    if cap is not None and layer in cap.layers:
        cap.qkv[layer] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
        if cap.stop_early and len(cap.qkv) == len(cap.layers):
            raise _StopForward
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _wanted_layers(model: torch.nn.Module, layers: Iterable[int] | None
                   ) -> tuple[dict[int, list[torch.nn.Module]], list[int]]:
    all_layers = attention_layers(model)
    # Indices as everywhere else (ints, negative from the end; a bool or 1.7 is no layer index).
    count = max(all_layers, default=-1) + 1
    wanted = sorted(all_layers) if layers is None else sorted(layer_set(layers, count, "layers"))
    missing = [i for i in wanted if i not in all_layers]
    if missing:
        raise ValueError(f"layers {missing} are not attention layers of this model "
                         f"(it has {len(all_layers)})")
    return all_layers, wanted


@contextmanager
def capture(model: torch.nn.Module, layers: Iterable[int] | None = None, *,
            stop_early: bool = True) -> Iterator[Capture]:
    """Record the q/k/v of ``layers`` (default: all) during the forward passes inside the block.

    The passes inside run dense SDPA. With ``stop_early`` the forward pass is stopped right after
    the last requested layer (the block exits there, so put nothing after the model call): early
    layers are cheap to capture and the LM head never runs.

    Example:
        >>> with xt.capture(model, layers=[0, 5]) as cap:         # doctest: +SKIP
        ...     model(input_ids=ids, use_cache=False)
        >>> q, k, v = cap.qkv[5]                                   # doctest: +SKIP
    """
    all_layers, wanted = _wanted_layers(model, layers)
    cap = Capture(layers=frozenset(wanted), stop_early=stop_early)
    register(CAPTURE_NAME, _capture_forward)
    before = implementation(model)
    modules = [m for i in wanted for m in all_layers[i]]
    for m in modules:
        setattr(m, _CAPTURE_ATTR, cap)
    set_implementation(model, CAPTURE_NAME)
    try:
        yield cap
    except _StopForward:
        pass
    finally:
        set_implementation(model, before)
        for m in modules:
            if getattr(m, _CAPTURE_ATTR, None) is cap:
                delattr(m, _CAPTURE_ATTR)


@torch.no_grad()
def capture_attention_inputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    layers: Iterable[int] | None = None,
    **forward_kwargs: Any,
) -> dict[int, QKV]:
    """Post-RoPE ``q [B, Hq, L, D]`` and ``k, v [B, Hkv, L, D]`` that the chosen layers' attention
    receives during one dense forward pass of ``input_ids`` (no KV cache); see :func:`capture`.

    Example:
        >>> caps = capture_attention_inputs(model, ids, layers=[0, 5])   # doctest: +SKIP
        >>> q, k, v = caps[5]                                            # doctest: +SKIP
        >>> q.shape, k.shape                                             # doctest: +SKIP
        (torch.Size([1, 9, 512, 64]), torch.Size([1, 3, 512, 64]))
    """
    _, wanted = _wanted_layers(model, layers)
    if not wanted:
        return {}
    with capture(model, wanted) as cap:
        model(input_ids=input_ids, use_cache=False, **forward_kwargs)
    return {i: cap.qkv[i] for i in wanted}
