"""What :func:`~xattention.integrations.transformers.enable` attaches to a model: one state
object, shared by the model and its attention modules (``_xattention_state``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._common.stats import AttentionStats
from .._common.thresholds import LayerThreshold, ThresholdTable

__all__ = ["STATE_ATTR", "VISION_INDEX_ATTR", "XAttentionState", "get_state"]

STATE_ATTR = "_xattention_state"
VISION_INDEX_ATTR = "_xattention_vision_index"  # position of a vision attention module


@dataclass
class XAttentionState:
    """Settings of one enabled model, its statistics and the modules that carry it."""

    original: Any  # the language layers' attention implementation before enable
    stride: int
    block_size: int
    backend: str
    min_prefill_len: int
    thresholds: ThresholdTable
    dense_layers: frozenset[int]
    windows: dict[int, int | None]  # sliding window (tokens) per layer, None for global
    num_layers: int
    num_q_heads: int
    record_stats: bool = True
    estimate_dtype: torch.dtype | None = None  # None: exact estimate; float8_e4m3fn: FP8
    cuda_graphs: bool = False  # replay sparse calls from CUDA graphs (enable(cuda_graphs=True))
    # (layer, causal, scale) -> XAttentionGraph, made on a layer's first sparse call on a GPU
    graphs: dict[tuple, Any] = field(default_factory=dict)
    enabled: bool = True
    stats: AttentionStats = field(default_factory=AttentionStats)
    modules: list[torch.nn.Module] = field(default_factory=list)
    # Vision encoder (enable(..., vision=True)): one threshold, its own statistics.
    vision_threshold: float | None = None
    original_vision: Any = None
    vision_stats: AttentionStats = field(default_factory=AttentionStats)

    @property
    def sliding_layers(self) -> frozenset[int]:
        """Layers with a window; each is sparsified only while the context fits in it."""
        return frozenset(i for i, w in self.windows.items() if w is not None)

    @property
    def all_windowed(self) -> bool:
        """Whether every layer not in ``dense_layers`` has a window (Mistral's configs)."""
        return all(self.windows.get(i) is not None for i in self.windows
                   if i not in self.dense_layers)

    def threshold_for(self, layer: int, device: torch.device) -> LayerThreshold:
        return self.thresholds.for_layer(layer, device)


def get_state(obj: Any) -> XAttentionState | None:
    """The state attached to a model or one of its attention modules, if any."""
    return getattr(obj, STATE_ATTR, None)
