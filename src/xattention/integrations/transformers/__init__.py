"""Hugging Face ``transformers`` switch: prefill with XAttention, decode densely.

>>> import xattention.integrations.transformers as xt
>>> xt.enable(model, threshold=0.9, stride=8, block_size=128)   # doctest: +SKIP
>>> out = model.generate(**inputs, max_new_tokens=32)            # doctest: +SKIP
>>> xt.last_stats(model).per_layer()                             # doctest: +SKIP
{0: 0.41, 1: 0.22, ...}
>>> xt.disable(model)                                            # doctest: +SKIP

How it plugs in: ``enable`` registers one attention function, ``"xattention"``, in
``transformers.AttentionInterface`` (and its mask function in ``AttentionMaskInterface``) and
switches the model's language layers to it. Every prefill call of a layer XAttention serves is
counted in the model's :class:`AttentionStats` (``last_stats(model)``): blocks kept over candidate
blocks, per layer and per query head (dense = 1.0). See docs/design.md for the contract.

Modules, one concern each:

* :mod:`.switch`: ``enable`` / ``disable`` / ``is_enabled`` / ``last_stats`` / ``reset_stats``.
* :mod:`.attention`: the attention function (what runs dense, what runs sparse).
* :mod:`.padding`: exact XAttention under a padding mask.
* :mod:`.thresholds`: number, per-layer, per-head tables and profiles to one entry per layer.
* :mod:`.registration`: the two transformers tables, switching the language layers.
* :mod:`.capture`: recording q/k/v for calibration and evaluation (a context manager).
* :mod:`.model_info`: text config, attention layers, sliding-window layers.
* :mod:`.stats`, :mod:`.state`: statistics; what ``enable`` attaches to a model.
"""

from __future__ import annotations

from . import model_info
from .attention import xattention_attention_forward
from .capture import Capture, capture, capture_attention_inputs
from .model_info import attention_layers, layer_windows, sliding_layers, sparse_layers, text_config
from .registration import ATTENTION_NAME
from .stats import AttentionStats, LayerStats
from .switch import disable, enable, is_enabled, last_stats, reset_stats

__all__ = [
    "ATTENTION_NAME",
    "AttentionStats",
    "Capture",
    "LayerStats",
    "attention_layers",
    "capture",
    "capture_attention_inputs",
    "disable",
    "enable",
    "is_enabled",
    "last_stats",
    "layer_windows",
    "model_info",
    "reset_stats",
    "sliding_layers",
    "sparse_layers",
    "text_config",
    "xattention_attention_forward",
]
