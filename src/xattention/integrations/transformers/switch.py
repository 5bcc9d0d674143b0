"""The public switch: ``enable`` / ``disable`` a model, read its statistics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..._backend import warn_once
from ..._validation import check_backend, check_block_params, check_estimate_dtype
from .attention import xattention_attention_forward
from .model_info import (
    attention_layers,
    layer_count,
    layer_windows,
    text_config,
    vision_attention_modules,
)
from .registration import (
    ATTENTION_NAME,
    implementation,
    register,
    set_implementation,
    xattention_mask,
)
from .state import STATE_ATTR, VISION_INDEX_ATTR, XAttentionState, get_state
from .stats import AttentionStats
from .thresholds import resolve_thresholds, split_threshold_arguments

__all__ = ["disable", "enable", "is_enabled", "last_stats", "reset_stats"]


def _check_model(model: Any) -> Any:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    config = text_config(model)
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError("models with attention logit soft-capping (Gemma 2) are not supported: "
                         "XAttention computes plain softmax attention")
    return config


def _dense_layer_set(dense_layers: Iterable[int], num_layers: int) -> frozenset[int]:
    dense = set()
    for idx in dense_layers:
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise TypeError(f"dense_layers must hold ints, got {idx!r}")
        if not -num_layers <= idx < num_layers:
            raise ValueError(f"dense_layers has {idx}, the model has {num_layers} layers")
        dense.add(idx % num_layers)
    return frozenset(dense)


def enable(
    model: torch.nn.Module,
    threshold: float = 0.9,
    stride: int = 8,
    block_size: int = 128,
    *,
    thresholds: Any = None,
    dense_layers: Iterable[int] = (),
    min_query_len: int | None = None,
    backend: str = "auto",
    record_stats: bool = True,
    vision: bool = False,
    estimate_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Make ``model`` prefill with XAttention; decode stays dense.

    Args:
        model: a ``transformers`` model whose attention goes through ``AttentionInterface``
            (Llama, Qwen, Mistral, Gemma 3, BERT-like encoders, Qwen2-VL / Qwen2.5-VL, ...).
            On a multimodal model only the language model is switched: the vision encoder's
            attention and the multimodal rope run as before.
        threshold: cumulative-score threshold (a number) of every layer and head without an
            entry in ``thresholds``; ``>= 1`` keeps every block (dense result, sparse code path).
            A table or profile object passed here is taken as ``thresholds``; a string is a
            ``TypeError`` (a profile file goes to ``thresholds=``).
        stride: antidiagonal stride of the estimate (divides ``block_size``).
        block_size: block edge of the sparsity pattern.
        thresholds: per-layer or per-(layer, head) table: a
            :class:`xattention.profile.ThresholdProfile` or the path of its JSON file (its
            stride and block size win), a nested list / tensor ``[num_layers][num_q_heads]``,
            a list / tensor ``[num_layers]`` or a dict ``{layer: number or [num_q_heads]}``.
        dense_layers: layer indices kept dense (negative indices count from the end).
        min_query_len: queries shorter than this stay dense (``None``: ``block_size``); decode
            (one query) is always dense.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`xattention.xattention`).
        record_stats: count kept blocks of every prefill call (see :func:`last_stats`).
        vision: also run the vision encoder's attention (Qwen2-VL's ``VisionAttention``)
            through XAttention, non-causal, with ``threshold``; off by default, which leaves the
            encoder exactly as it was.
        estimate_dtype: ``torch.float8_e4m3fn`` runs the estimate on FP8 operands (see
            :func:`xattention.xattention`): faster at long prompts on Hopper, a slightly
            different kept set on some rows (benchmarks/results/fp8_fidelity.md). None: exact.

    Returns:
        ``model`` (switched in place). Calling ``enable`` again replaces the settings;
        :func:`disable` restores the attention the model had before the first call.

    Layers with a sliding window (Gemma 3's local layers, Mistral's window) are sparsified only
    while the context fits in the window (then they are plain causal attention); longer
    contexts leave them to their own local attention.

    Example:
        >>> import xattention.integrations.transformers as xt
        >>> xt.enable(model, threshold=0.9, dense_layers=[0, 1])   # doctest: +SKIP
        >>> ids = tok(prompt, return_tensors="pt")                   # doctest: +SKIP
        >>> out = model.generate(**ids, max_new_tokens=20)           # doctest: +SKIP
        >>> xt.last_stats(model).overall()                           # doctest: +SKIP
        0.31
    """
    config = _check_model(model)
    stride, block_size = check_block_params(stride, block_size)
    backend = check_backend(backend)
    estimate_dtype = check_estimate_dtype(estimate_dtype)
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx; "
                         "only models built on transformers' AttentionInterface are supported")
    num_layers = layer_count(model, layers)
    num_heads = int(config.num_attention_heads)

    threshold, thresholds = split_threshold_arguments(threshold, thresholds)
    table, stride, block_size = resolve_thresholds(model, threshold, thresholds, stride,
                                                   block_size, num_layers, num_heads)
    dense = _dense_layer_set(dense_layers, num_layers)
    if min_query_len is None:
        min_query_len = block_size
    if isinstance(min_query_len, bool) or not isinstance(min_query_len, int) or min_query_len < 0:
        raise ValueError(f"min_query_len must be a non-negative int, got {min_query_len!r}")
    if not isinstance(vision, bool):
        raise TypeError(f"vision must be a bool, got {type(vision).__name__}")
    vision_modules = vision_attention_modules(model) if vision else []
    if vision and not vision_modules:
        raise ValueError(f"vision=True, but {type(model).__name__} has no vision encoder with "
                         "attention modules (a vision_config sub-model)")
    if set(layers) <= dense:
        warn_once("xattention: dense_layers lists every attention layer of this model; nothing "
                  "will be sparsified")

    register(ATTENTION_NAME, xattention_attention_forward, xattention_mask)
    previous = get_state(model)
    if previous is not None and previous.enabled:
        original, original_vision = previous.original, previous.original_vision
        disable(model)  # back to the stock state, then switch with the new settings
    else:
        original, original_vision = implementation(model), implementation(model, vision=True)
    state = XAttentionState(original=original, stride=stride, block_size=block_size,
                            backend=backend, min_query_len=min_query_len, thresholds=table,
                            dense_layers=dense, windows=layer_windows(model),
                            num_layers=num_layers, num_q_heads=num_heads,
                            record_stats=record_stats, original_vision=original_vision,
                            estimate_dtype=estimate_dtype,
                            vision_threshold=float(threshold) if vision else None)
    for module in [m for modules in layers.values() for m in modules] + vision_modules:
        setattr(module, STATE_ATTR, state)
        state.modules.append(module)
    for index, module in enumerate(vision_modules):
        setattr(module, VISION_INDEX_ATTR, index)
    setattr(model, STATE_ATTR, state)
    set_implementation(model, ATTENTION_NAME, vision=ATTENTION_NAME if vision else None)
    return model


def _detach(state: XAttentionState) -> None:
    for module in state.modules:
        if get_state(module) is state:
            delattr(module, STATE_ATTR)
            if hasattr(module, VISION_INDEX_ATTR):
                delattr(module, VISION_INDEX_ATTR)
    state.enabled = False
    state.modules = []


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation ``model`` had before :func:`enable`.

    A model that is not enabled is returned unchanged. The last statistics stay readable
    through :func:`last_stats`.

    Example:
        >>> xt.disable(model)                         # doctest: +SKIP
        >>> model.config._attn_implementation         # doctest: +SKIP
        'sdpa'
    """
    state = get_state(model)
    if state is None or not state.enabled:
        return model
    vision_changed = state.vision_threshold is not None
    set_implementation(model, state.original,
                       vision=state.original_vision if vision_changed else None)
    _detach(state)
    return model


def is_enabled(model: torch.nn.Module) -> bool:
    """Whether :func:`enable` is in effect on ``model``."""
    state = get_state(model)
    return bool(state is not None and state.enabled)


def last_stats(model: torch.nn.Module, *, vision: bool = False) -> AttentionStats:
    """Block densities of the prefill calls since :func:`enable` or :func:`reset_stats`
    (``vision=True``: of the vision encoder's calls, keyed by its attention module's position).

    Example:
        >>> xt.reset_stats(model); _ = model(**ids)   # doctest: +SKIP
        >>> xt.last_stats(model).per_layer()          # doctest: +SKIP
        {0: 0.52, 1: 0.31, ...}
    """
    state = get_state(model)
    if state is None:
        raise ValueError("xattention is not enabled on this model: call enable(model) first")
    return state.vision_stats if vision else state.stats


def reset_stats(model: torch.nn.Module) -> None:
    """Clear the statistics returned by :func:`last_stats` (language and vision)."""
    last_stats(model).reset()
    last_stats(model, vision=True).reset()
