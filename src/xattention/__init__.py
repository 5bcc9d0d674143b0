"""XAttention: block-sparse attention chosen by antidiagonal scoring.

>>> from xattention import xattention
>>> # out = xattention(q, k, v, threshold=0.9, stride=8, block_size=128, causal=True)

The public functions are imported on first use, so that ``xattention --help`` (and any tool that
only needs a submodule) starts without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:
    from .api import xattention
    from .estimate import estimate_block_scores
    from .graphs import XAttentionGraph
    from .merge import merge_attention
    from .paged import PagedKV
    from .plan import SparsePlan
    from .selection import select_blocks, select_plan
    from .sparse_attention import block_sparse_attention
    from .stats import block_density

# public name -> submodule that defines it
_EXPORTS = {
    "xattention": "api",
    "estimate_block_scores": "estimate",
    "select_blocks": "selection",
    "select_plan": "selection",
    "SparsePlan": "plan",
    "merge_attention": "merge",
    "PagedKV": "paged",
    "XAttentionGraph": "graphs",
    "block_sparse_attention": "sparse_attention",
    "block_density": "stats",
}

__all__ = [
    "xattention",
    "estimate_block_scores",
    "select_blocks",
    "select_plan",
    "block_sparse_attention",
    "SparsePlan",
    "merge_attention",
    "PagedKV",
    "XAttentionGraph",
    "block_density",
]
__version__ = "0.1.0"


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
