"""The public switch: ``enable`` / ``disable`` a model, read its statistics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..._backend import warn_once
from ..._validation import check_backend, check_bool, check_estimate_dtype
from ...selection import DEFAULT_THRESHOLD
from .._common.layers import layer_set
from .._common.options import (
    UNSET,
    check_min_prefill_len,
    check_optional_block_params,
    renamed_option,
)
from .._common.thresholds import ThresholdTable, resolve_thresholds
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

__all__ = ["disable", "enable", "is_enabled", "last_stats", "reset_stats"]


def _check_model(model: Any) -> Any:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    config = text_config(model)
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError("models with attention logit soft-capping (Gemma 2) are not supported: "
                         "XAttention computes plain softmax attention")
    return config


def enable(
    model: torch.nn.Module,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    thresholds: Any = None,
    stride: int | None = None,
    block_size: int | None = None,
    dense_layers: Iterable[int] = (),
    min_prefill_len: int | None = None,
    backend: str = "auto",
    estimate_dtype: torch.dtype | None = None,
    record_stats: bool = True,
    vision: bool = False,
    cuda_graphs: bool = False,
    min_query_len: Any = UNSET,
) -> torch.nn.Module:
    """Make ``model`` prefill with XAttention; decode stays dense.

    Args:
        model: a ``transformers`` model whose attention goes through ``AttentionInterface``
            (Llama, Qwen, Mistral, Gemma 3, BERT-like encoders, Qwen2-VL / Qwen2.5-VL, ...).
            On a multimodal model only the language model is switched: the vision encoder's
            attention and the multimodal rope run as before.
        threshold: cumulative-score threshold in (0, inf) (any real type) of every layer and head
            without an entry in ``thresholds``; ``>= 1`` keeps every block (dense result, sparse
            code path).
        thresholds: per-layer or per-(layer, head) table: a
            :class:`xattention.profile.ThresholdProfile` or the path of its JSON file, a nested
            list / tensor ``[num_layers][num_q_heads]``, a list / tensor ``[num_layers]`` or a
            dict ``{layer: number or [num_q_heads]}``.
        stride: antidiagonal stride of the estimate (divides ``block_size``); None: the
            profile's, else 8. An explicit value that contradicts a profile is a ValueError.
        block_size: block edge of the sparsity pattern; None: the profile's, else 128.
        dense_layers: layer indices kept dense (negative indices count from the end).
        min_prefill_len: queries shorter than this stay dense (``None``: ``block_size``); decode
            (one query) is always dense. ``min_query_len=`` is its old name (deprecated).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`xattention.xattention`).
        record_stats: count kept blocks of every prefill call (see :func:`last_stats`).
        vision: also run the vision encoder's attention (Qwen2-VL's ``VisionAttention``)
            through XAttention, non-causal, with ``threshold``; off by default, which leaves the
            encoder exactly as it was.
        estimate_dtype: ``torch.float8_e4m3fn`` runs the estimate on FP8 operands (see
            :func:`xattention.xattention`): faster at long prompts on Hopper, a slightly
            different kept set on some rows (benchmarks/results/fp8_fidelity.md). None: exact.
        cuda_graphs: on a GPU, replay each layer's sparse calls from CUDA graphs
            (:class:`xattention.XAttentionGraph`, one per layer, a capture per input shape, at
            most 4 kept per layer): the first call at a shape captures (and tunes), later ones
            skip the host work of a call (~0.35 ms of a call's launches on an H100). Pays where
            prompt lengths repeat (fixed-length batches, benchmarks, serving at bucketed
            lengths); each captured shape holds a copy of its Q/K/V and output per layer. Needs
            ``record_stats=False``: a replay returns no block mask to count.

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
    stride, block_size = check_optional_block_params(stride, block_size)
    backend = check_backend(backend)
    estimate_dtype = check_estimate_dtype(estimate_dtype)
    check_bool("record_stats", record_stats)
    check_bool("vision", vision)
    check_bool("cuda_graphs", cuda_graphs)
    if cuda_graphs and record_stats:
        raise ValueError("cuda_graphs=True replays captured calls, which return no block mask "
                         "to count: pass record_stats=False with it")
    min_prefill_len = renamed_option("min_prefill_len", min_prefill_len, "min_query_len",
                                     min_query_len)
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx; "
                         "only models built on transformers' AttentionInterface are supported")
    num_layers = layer_count(model, layers)
    num_heads = int(config.num_attention_heads)

    table, stride, block_size = resolve_thresholds(
        threshold, thresholds, stride=stride, block_size=block_size, num_layers=num_layers,
        num_heads=num_heads, model=model)
    dense = layer_set(dense_layers, num_layers, "dense_layers")
    min_prefill_len = check_min_prefill_len(min_prefill_len, block_size)
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
                            backend=backend, min_prefill_len=min_prefill_len,
                            thresholds=ThresholdTable(table),
                            dense_layers=dense, windows=layer_windows(model),
                            num_layers=num_layers, num_q_heads=num_heads,
                            record_stats=record_stats, original_vision=original_vision,
                            estimate_dtype=estimate_dtype, cuda_graphs=cuda_graphs,
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
    state.graphs.clear()  # their buffers and memory pools go with them


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
