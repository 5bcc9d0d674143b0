"""Block densities of the prefill calls XAttention served: the shared
:class:`~xattention.integrations._common.stats.AttentionStats` (one definition for every
integration), re-exported where transformers users have always found it."""

from .._common.stats import AttentionStats, LayerStats, count_blocks

__all__ = ["AttentionStats", "LayerStats", "count_blocks"]
