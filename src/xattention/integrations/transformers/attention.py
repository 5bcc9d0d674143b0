"""The attention function registered as ``attn_implementation="xattention"``.

What runs where, per call of a layer's attention:

* decode (``Lq == 1``), short queries (``Lq < min_prefill_len``), layers in ``dense_layers``,
  dropout in training, soft-capping / attention sinks / position biases, non-causal attention
  with more queries than keys (cross-attention), and windowed layers whose window is shorter than
  the context: the dense SDPA path, exactly what ``attn_implementation="sdpa"`` computes. A
  window at least as long as the context is plain causal attention and is sparsified.
* everything else: ``xattention()`` with the layer's threshold(s), causal or not as the module
  says. A padding mask is handled exactly (:mod:`.padding`); a mask of any other shape falls back
  to dense attention with a warning (once).
* a vision encoder's attention (only after ``enable(..., vision=True)``): non-causal XAttention
  per image with the one ``threshold``, counted apart (``last_stats(model, vision=True)``).

``attention_mask=None`` means causal attention with the queries at the *end* of the keys
(docs/design.md), which is what the mask function of :mod:`.registration` hands over for plain
causal attention, chunked prefill included.
"""

from __future__ import annotations

from typing import Any

import torch

from ..._backend import warn_once
from ...api import xattention
from ...graphs import XAttentionGraph
from ...kernels.dense import lower_right_mask, lower_right_row_chunks
from .._common.stats import AttentionStats
from .model_info import window_restricts
from .padding import sparse_with_padding
from .state import VISION_INDEX_ATTR, XAttentionState, get_state

__all__ = ["dense_attention", "xattention_attention_forward"]

# Keyword arguments of attention variants that plain softmax attention does not compute.
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux")


def dense_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float,
                    scaling: float | None, causal: bool, **kwargs: Any
                    ) -> tuple[torch.Tensor, None]:
    """transformers' SDPA path, with ``mask=None`` read as lower-right causal (our convention)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None and causal and 1 < q_len < k_len:
        # sdpa's is_causal is upper-left aligned (and transformers would crop the keys):
        # chunked prefill needs the explicit lower-right pattern, in chunks of query rows so
        # that the mask never holds Lq x Lk at once (the core's dense path does the same).
        parts = []
        for r0, r1 in lower_right_row_chunks(q_len, k_len):
            seen = k_len - q_len + r1
            mask = lower_right_mask(r0, r1, q_len, k_len, query.device)[None, None]
            part, _ = sdpa_attention_forward(
                module, query[:, :, r0:r1], key[:, :, :seen], value[:, :, :seen], mask,
                dropout=dropout, scaling=scaling, is_causal=causal, **kwargs)
            parts.append(part)  # [B, rows, H, D]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=causal, **kwargs)


def _record(state: XAttentionState, stats: AttentionStats, layer: int,
            mask: torch.Tensor | None, q_len: int, k_len: int, heads: int, causal: bool,
            batch: int) -> None:
    if state.record_stats:
        stats.record(layer, mask, q_len=q_len, k_len=k_len, block_size=state.block_size,
                     causal=causal, heads=heads, batch=batch)


def _sparse(state: XAttentionState, stats: AttentionStats, layer: int,
            threshold: float | torch.Tensor, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, scaling: float | None, causal: bool) -> torch.Tensor:
    """``xattention`` on ``[B, H, L, D]`` tensors, recording the mask; ``[B, Hq, Lq, D]`` out."""
    if state.cuda_graphs and query.is_cuda:
        # The graph's output buffer is overwritten by the layer's next call: hand out a copy.
        return _graph_for(state, layer, threshold, scaling, causal)(query, key, value).clone()
    if state.cuda_graphs:
        warn_once(f"xattention: cuda_graphs=True captures CUDA tensors only; this model runs "
                  f"on {query.device.type}, eagerly (statistics stay off as enable() set them)")
    out, mask = xattention(query, key, value, threshold=threshold, stride=state.stride,
                           block_size=state.block_size, causal=causal, scale=scaling,
                           backend=state.backend, return_mask=True,
                           estimate_dtype=state.estimate_dtype)
    _record(state, stats, layer, mask, query.shape[2], key.shape[2], query.shape[1], causal,
            query.shape[0])
    return out


def _graph_for(state: XAttentionState, layer: int, threshold: float | torch.Tensor,
               scaling: float | None, causal: bool) -> XAttentionGraph:
    """The layer's graph cache: one per layer (its threshold, a number or the table's device
    tensor, is fixed in it), holding a captured call per input shape it has seen."""
    key = (layer, causal, scaling)
    graph = state.graphs.get(key)
    if graph is None:
        graph = state.graphs[key] = XAttentionGraph(
            threshold=threshold, stride=state.stride, block_size=state.block_size,
            causal=causal, scale=scaling, backend=state.backend,
            estimate_dtype=state.estimate_dtype, max_graphs=4)
    return graph


def _window_skips(state: XAttentionState, layer: int, sliding_window: int | None,
                  k_len: int) -> bool:
    """Whether the layer's window hides keys at this context length (then it stays dense)."""
    window = sliding_window if sliding_window is not None else state.windows.get(layer)
    if not window_restricts(window, k_len):
        return False
    if state.all_windowed:
        warn_once(f"xattention: every attention layer of this model uses a sliding window "
                  f"({window} tokens) shorter than this context ({k_len} tokens); XAttention "
                  "sparsifies a windowed layer only while the context fits in its window, so "
                  "nothing is sparsified at this length (dense attention runs)")
    return True


def _runs_dense(state: XAttentionState, module: torch.nn.Module, layer: int, q_len: int,
                k_len: int, dropout: float, causal: bool, kwargs: dict[str, Any]) -> bool:
    return (q_len <= 1 or q_len < state.min_prefill_len or layer in state.dense_layers
            or (dropout > 0 and module.training) or (not causal and q_len > k_len)
            or any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS))


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
    """Receives ``query [B, Hq, Lq, D]`` and ``key, value [B, Hkv, Lk, D]`` (KV-head count, the
    cache already appended) and returns ``(out [B, Lq, Hq, D], None)`` like transformers' SDPA
    function."""
    state = get_state(module)
    layer = getattr(module, "layer_idx", None)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if state is not None and layer is None:
        return _vision_forward(state, module, query, key, value, attention_mask, dropout,
                               scaling, causal, **kwargs)
    if state is None or layer is None:
        return dense_attention(module, query, key, value, attention_mask, dropout, scaling,
                               causal, **kwargs)

    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    if _window_skips(state, layer, sliding_window, k_len):
        return dense_attention(module, query, key, value, attention_mask, dropout, scaling,
                               causal, **kwargs)
    if _runs_dense(state, module, layer, q_len, k_len, dropout, causal, kwargs):
        if q_len > 1:
            _record(state, state.stats, layer, None, q_len, k_len, heads, causal, batch)
        return dense_attention(module, query, key, value, attention_mask, dropout, scaling,
                               causal, **kwargs)

    threshold = state.threshold_for(layer, query.device)
    if attention_mask is None:
        out = _sparse(state, state.stats, layer, threshold, query, key, value, scaling, causal)
    else:
        out = sparse_with_padding(
            query, key, value, attention_mask, causal, scaling,
            lambda q, k, v: _sparse(state, state.stats, layer, threshold, q, k, v, scaling,
                                    causal))
        if out is None:
            warn_once("xattention: this attention mask is not attention over one contiguous "
                      "span of keys per sequence (packed sequences or a custom 4D mask?); those "
                      "calls run dense attention")
            _record(state, state.stats, layer, None, q_len, k_len, heads, causal, batch)
            return dense_attention(module, query, key, value, attention_mask, dropout, scaling,
                                   causal, **kwargs)
    return out.transpose(1, 2).contiguous(), None


def _vision_forward(state: XAttentionState, module: torch.nn.Module, query: torch.Tensor,
                    key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                    dropout: float, scaling: float | None, causal: bool, **kwargs: Any
                    ) -> tuple[torch.Tensor, None]:
    """A vision encoder's attention (``enable(..., vision=True)``): each call is one image's (or
    one window's) patches, without a mask; shorter than ``min_prefill_len`` it stays dense."""
    index = getattr(module, VISION_INDEX_ATTR, None)
    q_len, k_len = query.shape[2], key.shape[2]
    if (index is None or state.vision_threshold is None or attention_mask is not None
            or q_len < max(2, state.min_prefill_len) or q_len > k_len
            or (dropout > 0 and module.training)):
        return dense_attention(module, query, key, value, attention_mask, dropout, scaling,
                               causal, **kwargs)
    out = _sparse(state, state.vision_stats, index, state.vision_threshold, query, key, value,
                  scaling, causal)
    return out.transpose(1, 2).contiguous(), None
