"""What the three integrations (transformers, diffusers, vLLM) decide the same way, decided once.

* :mod:`.thresholds`: a number, a per-layer / per-(layer, head) table, a
  :class:`~xattention.profile.ThresholdProfile` or its path to one entry per layer, and one
  policy for a profile next to an explicit stride / block size; :class:`ThresholdTable` caches
  each entry on the device its layer runs on.
* :mod:`.layers`: layer sets such as ``dense_layers`` (negative indices count from the end).
* :mod:`.options`: option checks (delegating to the core's ``_validation``) and the deprecated
  spellings of renamed options.
* :mod:`.stats`: :class:`AttentionStats`, kept-block counts accumulated on the device.

Imports run one way: the core <- ``integrations`` <- calibration / evaluation; nothing here
imports an integration's framework (transformers, diffusers, vLLM).
"""

from .layers import layer_set, parse_layer_list
from .options import (
    check_min_prefill_len,
    check_non_negative_int,
    check_optional_block_params,
    renamed_option,
)
from .stats import AttentionStats, LayerStats, count_blocks
from .thresholds import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_STRIDE,
    LayerThreshold,
    ThresholdTable,
    resolve_thresholds,
    threshold_table,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_STRIDE",
    "AttentionStats",
    "LayerStats",
    "LayerThreshold",
    "ThresholdTable",
    "check_min_prefill_len",
    "check_non_negative_int",
    "check_optional_block_params",
    "count_blocks",
    "layer_set",
    "parse_layer_list",
    "renamed_option",
    "resolve_thresholds",
    "threshold_table",
]
