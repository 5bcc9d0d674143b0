"""Hugging Face ``transformers`` switch: prefill with XAttention, decode densely.

>>> import xattention.integrations.transformers as xt
>>> xt.enable(model, threshold=0.9, stride=8, block_size=128)   # doctest: +SKIP
>>> out = model.generate(**inputs, max_new_tokens=32)            # doctest: +SKIP
>>> xt.last_stats(model).per_layer()                             # doctest: +SKIP
{0: 0.41, 1: 0.22, ...}
>>> xt.disable(model)                                            # doctest: +SKIP

How it plugs in. ``enable`` registers one attention function, ``"xattention"``, in
``transformers.AttentionInterface`` and switches the model to it. A custom attention name must
also be registered in ``AttentionMaskInterface``: the model builds its masks through that table and
hands a name it does not know *no mask at all* (DESIGN.md §6). The mask function registered here is
``sdpa_mask`` except in one case: plain causal attention without padding, where it returns None even
for chunked prefill (``Lq < Lk``), so that a 32k x 32k bool mask is never built just to be compared
with the causal pattern. The attention function therefore reads ``attention_mask=None`` as causal
attention with the queries at the *end* of the keys (DESIGN.md §2), which is what ``xattention``
computes.

What runs where, per call of a layer's attention:

* sliding-window layers (Gemma 3's local layers), layers listed in ``dense_layers``, decode
  (``Lq == 1``), short queries (``Lq < min_query_len``), dropout in training, capture passes: the
  dense SDPA path, exactly what ``attn_implementation="sdpa"`` would compute.
* everything else: ``xattention()`` with the layer's threshold(s). A padding mask (batch of
  prompts of different lengths) is handled exactly: each sequence's valid span of keys and queries
  is cut out and run on its own; rows that are pure padding go through dense SDPA with the mask,
  as they would without XAttention. A mask of any other shape (packed sequences, custom 4D masks)
  falls back to dense attention with a warning (once).

Every prefill call of a full-attention layer is counted in the model's :class:`AttentionStats`
(``last_stats(model)``): blocks kept over causal candidate blocks, per layer and per query head,
the same definition as :func:`xattention.block_density` (dense causal = 1.0).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .._backend import warn_once
from ..api import xattention

__all__ = [
    "ATTENTION_NAME",
    "AttentionStats",
    "LayerStats",
    "enable",
    "disable",
    "is_enabled",
    "last_stats",
    "reset_stats",
    "capture_attention_inputs",
    "attention_layers",
    "xattention_attention_forward",
]

ATTENTION_NAME = "xattention"

# Above this many bool elements the mask comparison goes in row chunks (bounded extra memory).
_MASK_CHUNK_ELEMS = 1 << 26

_registered = False
_register_lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass
class LayerStats:
    """Accumulated block counts of one layer's prefill calls.

    ``kept[h]`` and ``total`` are counts of (batch, query block, key block) triples: kept blocks
    of query head ``h`` and causal candidate blocks (the same for every head). Dense calls count
    every candidate as kept.
    """

    kept: torch.Tensor
    total: float = 0.0
    sparse_calls: int = 0
    dense_calls: int = 0
    last_q_len: int = 0
    last_k_len: int = 0

    @property
    def density(self) -> float:
        """Kept over candidate blocks, averaged over heads (1.0 = dense)."""
        if self.total == 0:
            return float("nan")
        return float(self.kept.sum() / (self.total * self.kept.numel()))

    @property
    def per_head(self) -> torch.Tensor:
        """Density per query head, float32 ``[Hq]``."""
        if self.total == 0:
            return torch.full_like(self.kept, float("nan"), dtype=torch.float32)
        return (self.kept / self.total).to(torch.float32)


@dataclass
class AttentionStats:
    """Block densities of the prefill calls since the last :meth:`reset`.

    Example:
        >>> stats = AttentionStats()
        >>> stats.add(0, torch.tensor([3.0, 1.0]), total=4.0, sparse=True, q_len=256, k_len=256)
        >>> stats.per_layer()
        {0: 0.5}
        >>> round(stats.overall(), 3)
        0.5
    """

    layers: dict[int, LayerStats] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.layers.clear()

    def add(self, layer: int, kept: torch.Tensor, total: float, *, sparse: bool, q_len: int,
            k_len: int) -> None:
        """Accumulate one call: ``kept`` is per query head, ``total`` the candidate count."""
        kept = kept.detach().to("cpu", torch.float64)
        entry = self.layers.get(layer)
        if entry is None or entry.kept.shape != kept.shape:
            entry = self.layers[layer] = LayerStats(kept=torch.zeros_like(kept))
        entry.kept += kept
        entry.total += float(total)
        if sparse:
            entry.sparse_calls += 1
        else:
            entry.dense_calls += 1
        entry.last_q_len, entry.last_k_len = q_len, k_len

    def per_layer(self) -> dict[int, float]:
        """``{layer: density}`` for every full-attention layer that ran a prefill call."""
        return {i: self.layers[i].density for i in sorted(self.layers)}

    def per_head(self) -> dict[int, torch.Tensor]:
        """``{layer: float32 [Hq] density}``."""
        return {i: self.layers[i].per_head for i in sorted(self.layers)}

    def overall(self, layers: Iterable[int] | None = None) -> float:
        """Density over the given layers (default: all recorded), weighted by candidate blocks."""
        chosen = self.layers if layers is None else {i: self.layers[i] for i in layers
                                                     if i in self.layers}
        kept = sum(float(s.kept.sum()) for s in chosen.values())
        total = sum(s.total * s.kept.numel() for s in chosen.values())
        return kept / total if total else float("nan")

    def sparse_layers(self) -> list[int]:
        """Layers with at least one call that ran XAttention (not the dense path)."""
        return [i for i in sorted(self.layers) if self.layers[i].sparse_calls > 0]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {
            "overall": self.overall(),
            "per_layer": {str(i): s.density for i, s in sorted(self.layers.items())},
            "per_head": {str(i): [round(float(x), 6) for x in s.per_head]
                         for i, s in sorted(self.layers.items())},
            "sparse_calls": {str(i): s.sparse_calls for i, s in sorted(self.layers.items())},
            "dense_calls": {str(i): s.dense_calls for i, s in sorted(self.layers.items())},
        }


def _candidate_blocks(q_len: int, k_len: int, block_size: int, causal: bool) -> torch.Tensor:
    """Bool ``[nQB, nKB]``: blocks holding a key visible to the query block (DESIGN.md §2)."""
    nqb, nkb = -(-q_len // block_size), -(-k_len // block_size)
    if not causal:
        return torch.ones(nqb, nkb, dtype=torch.bool)
    last_row = torch.clamp(torch.arange(nqb) * block_size + block_size, max=q_len) - 1
    last_pos = last_row + (k_len - q_len)
    return (torch.arange(nkb) * block_size)[None, :] <= last_pos[:, None]


def _candidate_count(q_len: int, k_len: int, block_size: int, causal: bool) -> int:
    return int(_candidate_blocks(q_len, k_len, block_size, causal).sum())


# --------------------------------------------------------------------------------------------
# Per-model state
# --------------------------------------------------------------------------------------------


@dataclass
class _State:
    """What ``enable`` attached to a model (one object, shared by its attention modules)."""

    original: Any
    stride: int
    block_size: int
    backend: str
    min_query_len: int
    thresholds: dict[int, float | torch.Tensor]
    dense_layers: frozenset[int]
    sliding_layers: frozenset[int]
    num_layers: int
    num_q_heads: int
    record_stats: bool = True
    enabled: bool = True
    stats: AttentionStats = field(default_factory=AttentionStats)
    # Capture pass: forced dense, q/k/v of these layers stored, forward stopped after the last.
    force_dense: bool = False
    capture_layers: frozenset[int] | None = None
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)
    modules: list[torch.nn.Module] = field(default_factory=list)

    def threshold_for(self, layer: int, device: torch.device) -> float | torch.Tensor:
        t = self.thresholds[layer]
        if isinstance(t, torch.Tensor) and t.device != device:
            t = t.to(device)
            self.thresholds[layer] = t  # cache on the device the layer runs on
        return t


class _StopForward(Exception):
    """Raised inside a capture pass once the last requested layer has been captured."""


def _text_config(model: Any) -> Any:
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def attention_layers(model: torch.nn.Module) -> dict[int, list[torch.nn.Module]]:
    """``{layer_idx: [attention modules]}`` of a transformers model.

    Attention modules are those whose class name ends in ``Attention`` and that carry an integer
    ``layer_idx`` (every model written against ``AttentionInterface`` does).

    Example:
        >>> sorted(attention_layers(model))[:3]   # doctest: +SKIP
        [0, 1, 2]
    """
    found: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and type(module).__name__.endswith("Attention"):
            found.setdefault(idx, []).append(module)
    return found


def _sliding_layers(model: torch.nn.Module, layers: Mapping[int, list[torch.nn.Module]]
                    ) -> frozenset[int]:
    config = _text_config(model)
    layer_types = getattr(config, "layer_types", None)
    sliding = set()
    for idx, modules in layers.items():
        if any(getattr(m, "sliding_window", None) for m in modules):
            sliding.add(idx)
        elif layer_types is not None and idx < len(layer_types) and \
                layer_types[idx] in ("sliding_attention", "chunked_attention"):
            sliding.add(idx)
    return frozenset(sliding)


def _check_positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must lie in (0, inf), got {value}")
    return value


def _row_thresholds(row: Any, num_heads: int, layer: int) -> float | torch.Tensor:
    """One layer's entry: a float (all heads) or ``num_heads`` floats."""
    if isinstance(row, torch.Tensor):
        row = row.detach().cpu().tolist()
    if isinstance(row, (int, float)) and not isinstance(row, bool):
        return _check_positive(row, f"thresholds[{layer}]")
    if not isinstance(row, Sequence) or isinstance(row, str):
        raise TypeError(f"thresholds[{layer}] must be a float or a list of {num_heads} floats, "
                        f"got {type(row).__name__}")
    if len(row) != num_heads:
        raise ValueError(f"thresholds[{layer}] must have {num_heads} entries (one per query "
                         f"head), got {len(row)}")
    values = [_check_positive(x, f"thresholds[{layer}][{h}]") for h, x in enumerate(row)]
    return torch.tensor(values, dtype=torch.float32)


def _resolve_thresholds(model: torch.nn.Module, threshold: float, thresholds: Any,
                        stride: int, block_size: int, num_layers: int, num_heads: int
                        ) -> tuple[dict[int, float | torch.Tensor], int, int]:
    default = _check_positive(threshold, "threshold")
    table: dict[int, float | torch.Tensor] = {i: default for i in range(num_layers)}
    if thresholds is None:
        return table, stride, block_size
    profile_cls = _threshold_profile_class()
    if isinstance(thresholds, (str, os.PathLike)):
        if profile_cls is None:  # pragma: no cover - the calibration package ships with the core
            raise ModuleNotFoundError("reading a threshold profile needs xattention.calibration")
        thresholds = profile_cls.load(thresholds)  # clear errors for a missing or bad file
    if profile_cls is not None and isinstance(thresholds, profile_cls):
        thresholds.check_model(model)  # raises ValueError on a model it was not calibrated for
        # The defaults (8, 128) mean "not chosen": only an explicit different choice is worth
        # a warning.
        if (stride, block_size) != (8, 128) and \
                (thresholds.stride, thresholds.block_size) != (stride, block_size):
            warn_once(f"xattention: using the profile's stride={thresholds.stride}, "
                       f"block_size={thresholds.block_size} (calibrated with them) instead of "
                       f"stride={stride}, block_size={block_size}")
        stride, block_size = int(thresholds.stride), int(thresholds.block_size)
        thresholds = thresholds.thresholds
    if isinstance(thresholds, Mapping):
        for key, row in thresholds.items():
            layer = int(key)
            if not 0 <= layer < num_layers:
                raise ValueError(f"thresholds has layer {key}, the model has {num_layers} layers")
            table[layer] = _row_thresholds(row, num_heads, layer)
        return table, stride, block_size
    if isinstance(thresholds, torch.Tensor):
        if thresholds.dim() not in (1, 2):
            raise ValueError("thresholds tensor must be [num_layers] or [num_layers, num_heads], "
                             f"got shape {tuple(thresholds.shape)}")
        thresholds = thresholds.detach().cpu().tolist()
    if not isinstance(thresholds, Sequence) or isinstance(thresholds, str):
        raise TypeError("thresholds must be a ThresholdProfile, a nested list/tensor "
                        "[num_layers][num_heads], a list [num_layers] or a dict {layer: value}, "
                        f"got {type(thresholds).__name__}")
    if len(thresholds) != num_layers:
        raise ValueError(f"thresholds must have {num_layers} rows (one per layer), "
                         f"got {len(thresholds)}")
    for layer, row in enumerate(thresholds):
        table[layer] = _row_thresholds(row, num_heads, layer)
    return table, stride, block_size


def _threshold_profile_class() -> type | None:
    try:
        from ..calibration import ThresholdProfile
    except Exception:  # the calibration module is optional; nested lists still work
        return None
    return ThresholdProfile


# --------------------------------------------------------------------------------------------
# Registration with transformers
# --------------------------------------------------------------------------------------------


def _xattention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0,
                     kv_offset: int = 0, mask_function: Any = None,
                     attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                     allow_is_causal_skip: bool = True, **kwargs: Any) -> torch.Tensor | None:
    """``sdpa_mask``, except that plain causal attention without padding yields None.

    ``sdpa_mask`` itself only skips the mask when ``Lq == Lk`` (torch's ``is_causal`` is
    upper-left aligned); our attention function reads None as lower-right causal, so it can skip
    it for chunked prefill too and never materialise an ``Lq x Lk`` mask it does not need.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    if (allow_is_causal_skip and local_size is None and mask_function is causal_mask_function
            and kv_offset == 0 and not isinstance(q_offset, torch.Tensor)
            and int(q_offset) + q_length == kv_length):
        if attention_mask is None:
            return None
        padding = attention_mask
        if padding.dim() == 2 and padding.shape[-1] >= kv_length:
            padding = padding[:, padding.shape[-1] - kv_length:]
            if bool(padding.all()):
                return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def _register() -> None:
    global _registered
    with _register_lock:
        if _registered:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTENTION_NAME, xattention_attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, _xattention_mask)
        _registered = True


def _set_implementation(model: Any, name: Any) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(name)
    else:  # older transformers: the config attribute is what the layers read
        model.config._attn_implementation = name
    current = _text_config(model)._attn_implementation
    wanted = name if isinstance(name, str) else None
    if wanted is not None and current != wanted:
        raise RuntimeError(f"could not switch the model's attention to {wanted!r} "
                           f"(config still says {current!r})")


# --------------------------------------------------------------------------------------------
# Public switch
# --------------------------------------------------------------------------------------------


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
) -> torch.nn.Module:
    """Make ``model`` prefill with XAttention; decode stays dense.

    Args:
        model: a ``transformers`` model whose attention goes through ``AttentionInterface``
            (Llama, Qwen, Mistral, Gemma 3, ...).
        threshold: cumulative-score threshold of every layer and head without an entry in
            ``thresholds``; ``>= 1`` keeps every block (dense result, sparse code path). A
            table or profile passed here is taken as ``thresholds``.
        stride: antidiagonal stride of the estimate (divides ``block_size``).
        block_size: block edge of the sparsity pattern.
        thresholds: per-layer or per-(layer, head) table: a
            :class:`xattention.calibration.ThresholdProfile` or the path of its JSON file (its
            stride and block size win), a nested list / tensor ``[num_layers][num_q_heads]``,
            a list / tensor ``[num_layers]`` or a dict ``{layer: float or [num_q_heads]}``.
        dense_layers: layer indices kept dense (negative indices count from the end).
        min_query_len: queries shorter than this stay dense (``None``: ``block_size``); decode
            (one query) is always dense.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`xattention.xattention`).
        record_stats: count kept blocks of every prefill call (see :func:`last_stats`).

    Returns:
        ``model`` (switched in place). Calling ``enable`` again replaces the settings;
        :func:`disable` restores the attention the model had before the first call.

    Sliding-window layers (Gemma 3's local layers) are left alone: only global layers are
    sparsified.

    Example:
        >>> import xattention.integrations.transformers as xt
        >>> xt.enable(model, threshold=0.9, dense_layers=[0, 1])   # doctest: +SKIP
        >>> ids = tok(prompt, return_tensors="pt")                   # doctest: +SKIP
        >>> out = model.generate(**ids, max_new_tokens=20)           # doctest: +SKIP
        >>> xt.last_stats(model).overall()                           # doctest: +SKIP
        0.31
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride <= 0:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    config = _text_config(model)
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError("models with attention logit soft-capping (Gemma 2) are not supported: "
                         "XAttention computes plain softmax attention")
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx; "
                         "only models built on transformers' AttentionInterface are supported")
    num_layers = int(getattr(config, "num_hidden_layers", max(layers) + 1))
    num_heads = int(config.num_attention_heads)

    if thresholds is None and not isinstance(threshold, (int, float)):
        # enable(model, profile) / enable(model, table): a table given in the first slot.
        thresholds, threshold = threshold, 0.9
    table, stride, block_size = _resolve_thresholds(model, threshold, thresholds, stride,
                                                    block_size, num_layers, num_heads)
    if block_size % stride:
        raise ValueError(f"stride ({stride}) must divide block_size ({block_size})")
    dense = set()
    for idx in dense_layers:
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise TypeError(f"dense_layers must hold ints, got {idx!r}")
        if not -num_layers <= idx < num_layers:
            raise ValueError(f"dense_layers has {idx}, the model has {num_layers} layers")
        dense.add(idx % num_layers)
    if min_query_len is None:
        min_query_len = block_size
    if isinstance(min_query_len, bool) or not isinstance(min_query_len, int) or min_query_len < 0:
        raise ValueError(f"min_query_len must be a non-negative int, got {min_query_len!r}")

    _register()
    previous: _State | None = getattr(model, "_xattention_state", None)
    original = previous.original if previous is not None and previous.enabled \
        else config._attn_implementation
    state = _State(original=original, stride=stride, block_size=block_size, backend=backend,
                   min_query_len=min_query_len, thresholds=table, dense_layers=frozenset(dense),
                   sliding_layers=_sliding_layers(model, layers), num_layers=num_layers,
                   num_q_heads=num_heads, record_stats=record_stats)
    for modules in layers.values():
        for module in modules:
            module._xattention_state = state
            state.modules.append(module)
    model._xattention_state = state
    if config._attn_implementation != ATTENTION_NAME:
        _set_implementation(model, ATTENTION_NAME)
    return model


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation ``model`` had before :func:`enable`.

    A model that is not enabled is returned unchanged. The last statistics stay readable
    through :func:`last_stats`.

    Example:
        >>> xt.disable(model)                         # doctest: +SKIP
        >>> model.config._attn_implementation         # doctest: +SKIP
        'sdpa'
    """
    state: _State | None = getattr(model, "_xattention_state", None)
    if state is None or not state.enabled:
        return model
    _set_implementation(model, state.original)
    for module in state.modules:
        if getattr(module, "_xattention_state", None) is state:
            del module._xattention_state
    state.enabled = False
    state.modules = []
    return model


def is_enabled(model: torch.nn.Module) -> bool:
    """Whether :func:`enable` is in effect on ``model``."""
    state = getattr(model, "_xattention_state", None)
    return bool(state is not None and state.enabled)


def last_stats(model: torch.nn.Module) -> AttentionStats:
    """Block densities of the prefill calls since :func:`enable` or :func:`reset_stats`.

    Example:
        >>> xt.reset_stats(model); _ = model(**ids)   # doctest: +SKIP
        >>> xt.last_stats(model).per_layer()          # doctest: +SKIP
        {0: 0.52, 1: 0.31, ...}
    """
    state: _State | None = getattr(model, "_xattention_state", None)
    if state is None:
        raise ValueError("xattention is not enabled on this model: call enable(model) first")
    return state.stats


def reset_stats(model: torch.nn.Module) -> None:
    """Clear the statistics returned by :func:`last_stats`."""
    last_stats(model).reset()


# --------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------


def _dense(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, dropout: float, scaling: float | None,
           causal: bool, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA path, with ``mask=None`` read as lower-right causal (our convention)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None and causal and 1 < q_len < k_len:
        # sdpa's is_causal is upper-left aligned (and transformers would crop the keys):
        # chunked prefill needs the explicit lower-right pattern.
        rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        attention_mask = (torch.arange(k_len, device=query.device)[None, :] <= rows)[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=causal, **kwargs)


def _sdpa_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Dense attention of some rows with an explicit bool mask; ``[1, Hq, rows, D]``."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask[None, None],
                                          scale=scaling)


def _mask_matches(mask: torch.Tensor, s: int, e: int, offset: int, causal: bool) -> bool:
    """Whether bool ``mask [Lq, Lk]`` is: key ``c`` visible to row ``r`` iff ``s <= c < e`` and
    (causal) ``c <= offset + r``. Compared in row chunks to bound memory."""
    q_len, k_len = mask.shape
    cols = torch.arange(k_len, device=mask.device)
    span = (cols >= s) & (cols < e)
    step = max(1, _MASK_CHUNK_ELEMS // max(k_len, 1))
    for r0 in range(0, q_len, step):
        r1 = min(q_len, r0 + step)
        if causal:
            rows = torch.arange(r0, r1, device=mask.device)[:, None] + offset
            expected = span[None, :] & (cols[None, :] <= rows)
        else:
            expected = span[None, :].expand(r1 - r0, k_len)
        if not torch.equal(mask[r0:r1], expected):
            return False
    return True


def _decompose(mask: torch.Tensor, causal: bool) -> tuple[int, int, int] | None:
    """``(s, e, offset)`` when ``mask [Lq, Lk]`` is causal attention over the contiguous valid key
    span ``[s, e)`` (left or right padding, or a static cache's unwritten tail), query row ``r``
    sitting at absolute position ``offset + r``; None for any other pattern."""
    q_len, k_len = mask.shape
    valid = mask.any(dim=0)
    nz = valid.nonzero()
    if nz.numel() == 0:
        return None
    s, e = int(nz[0]), int(nz[-1]) + 1
    if not bool(valid[s:e].all()):
        return None
    offsets = [k_len - q_len] if not causal else list(dict.fromkeys([k_len - q_len, e - q_len]))
    for offset in offsets:
        if _mask_matches(mask, s, e, offset, causal):
            return s, e, offset
    return None


def _record(state: _State, layer: int, mask: torch.Tensor | None, q_len: int, k_len: int,
            heads: int, causal: bool, batch: int = 1) -> None:
    """Add one call's block counts (``mask`` None: dense, every candidate kept)."""
    if not state.record_stats:
        return
    cand = _candidate_blocks(q_len, k_len, state.block_size, causal)
    total = float(cand.sum()) * batch
    if mask is None:
        kept = torch.full((heads,), total, dtype=torch.float64)
        state.stats.add(layer, kept, total, sparse=False, q_len=q_len, k_len=k_len)
    else:
        kept = (mask & cand.to(mask.device)).sum(dim=(0, 2, 3)).to(torch.float64)
        state.stats.add(layer, kept, total, sparse=True, q_len=q_len, k_len=k_len)


def _sparse(state: _State, layer: int, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, scaling: float | None, causal: bool) -> torch.Tensor:
    """``xattention`` on ``[B, H, L, D]`` tensors, recording the mask; ``[B, Hq, Lq, D]`` out."""
    threshold = state.threshold_for(layer, query.device)
    out, mask = xattention(query, key, value, threshold=threshold, stride=state.stride,
                           block_size=state.block_size, causal=causal, scale=scaling,
                           backend=state.backend, return_mask=True)
    _record(state, layer, mask, query.shape[2], key.shape[2], query.shape[1], causal,
            batch=query.shape[0])
    return out


def _sparse_masked(state: _State, layer: int, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attention_mask: torch.Tensor, scaling: float | None,
                   causal: bool) -> torch.Tensor | None:
    """Exact XAttention under a padding mask, or None when the mask has another shape."""
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or \
            attention_mask.shape[1] != 1 or attention_mask.shape[0] not in (1, batch) or \
            tuple(attention_mask.shape[2:]) != (q_len, k_len):
        return None
    plans = []
    for b in range(batch):
        m = attention_mask[b if attention_mask.shape[0] > 1 else 0, 0]
        plan = _decompose(m, causal)
        if plan is None:
            return None
        plans.append((m, plan))
    out = torch.empty_like(query)
    for b, (m, (s, e, offset)) in enumerate(plans):
        qb, kb, vb = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        if causal:
            r0, r1 = max(0, s - offset), min(q_len, e - offset)
        else:
            r0, r1 = 0, q_len
        if r1 > r0:
            k_end = offset + r1 if causal else e
            out[b:b + 1, :, r0:r1] = _sparse(state, layer, qb[:, :, r0:r1], kb[:, :, s:k_end],
                                             vb[:, :, s:k_end], scaling, causal)
        # Rows outside the valid span are padding: give them what dense SDPA gives them.
        for lo, hi in ((0, min(r0, q_len)), (max(r1, 0), q_len)):
            if hi > lo:
                out[b:b + 1, :, lo:hi] = _sdpa_rows(qb[:, :, lo:hi], kb, vb, m[lo:hi], scaling)
    return out


def xattention_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered as ``attn_implementation="xattention"``.

    Receives ``query [B, Hq, Lq, D]`` and ``key, value [B, Hkv, Lk, D]`` (KV-head count, the
    cache already appended) and returns ``(out [B, Lq, Hq, D], None)`` like transformers' SDPA
    function. ``attention_mask=None`` means causal with the queries at the end of the keys.
    """
    state: _State | None = getattr(module, "_xattention_state", None)
    layer = getattr(module, "layer_idx", None)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal)
    if state is None or layer is None:
        return _dense(module, query, key, value, attention_mask, dropout, scaling, causal,
                      **kwargs)

    if state.capture_layers is not None and layer in state.capture_layers:
        state.captured[layer] = (query.detach().clone(), key.detach().clone(),
                                 value.detach().clone())
        if len(state.captured) == len(state.capture_layers):
            raise _StopForward

    q_len, k_len = query.shape[2], key.shape[2]
    sliding = sliding_window is not None or layer in state.sliding_layers
    use_dropout = dropout > 0 and module.training
    if (state.force_dense or sliding or use_dropout or q_len <= 1 or layer in state.dense_layers
            or q_len < state.min_query_len or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None):
        if q_len > 1 and not sliding and not state.force_dense:
            _record(state, layer, None, q_len, k_len, query.shape[1], causal, query.shape[0])
        return _dense(module, query, key, value, attention_mask, dropout, scaling, causal,
                      **kwargs)

    if attention_mask is None:
        out = _sparse(state, layer, query, key, value, scaling, causal)
    else:
        out = _sparse_masked(state, layer, query, key, value, attention_mask, scaling, causal)
        if out is None:
            warn_once("xattention: this attention mask is not causal attention over one "
                       "contiguous span of keys per sequence (packed sequences or a custom 4D "
                       "mask?); those calls run dense attention")
            _record(state, layer, None, q_len, k_len, query.shape[1], causal, query.shape[0])
            return _dense(module, query, key, value, attention_mask, dropout, scaling, causal,
                          **kwargs)
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------------
# Capturing q/k/v
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def capture_attention_inputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    layers: Iterable[int] | None = None,
    **forward_kwargs: Any,
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Post-RoPE ``q [B, Hq, L, D]`` and ``k, v [B, Hkv, L, D]`` that the chosen layers' attention
    receives during one dense forward pass (no KV cache).

    The pass stops right after the last requested layer, so capturing early layers is cheap and
    the LM head never runs. Works whether or not XAttention is enabled on ``model`` (the pass is
    dense either way, and the model is left as it was).

    Example:
        >>> caps = capture_attention_inputs(model, ids, layers=[0, 5])   # doctest: +SKIP
        >>> q, k, v = caps[5]                                            # doctest: +SKIP
        >>> q.shape, k.shape                                             # doctest: +SKIP
        (torch.Size([1, 9, 512, 64]), torch.Size([1, 3, 512, 64]))
    """
    all_layers = attention_layers(model)
    wanted = sorted(all_layers) if layers is None else sorted({int(i) for i in layers})
    missing = [i for i in wanted if i not in all_layers]
    if missing:
        raise ValueError(f"layers {missing} are not attention layers of this model "
                         f"(it has {len(all_layers)})")
    if not wanted:
        return {}
    was_enabled = is_enabled(model)
    if was_enabled:
        state: _State = model._xattention_state
        saved = (state.force_dense, state.record_stats)
    else:
        enable(model, record_stats=False)
        state = model._xattention_state
        saved = (False, False)
    state.force_dense, state.record_stats = True, False
    state.capture_layers, state.captured = frozenset(wanted), {}
    try:
        try:
            model(input_ids=input_ids, use_cache=False, **forward_kwargs)
        except _StopForward:
            pass
        captured = dict(state.captured)
    finally:
        state.capture_layers, state.captured = None, {}
        state.force_dense, state.record_stats = saved
        if not was_enabled:
            disable(model)
    return {i: captured[i] for i in wanted}
