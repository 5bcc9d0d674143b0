"""XAttention: block-sparse attention chosen by antidiagonal scoring.

>>> from xattention import xattention
>>> # out = xattention(q, k, v, threshold=0.9, stride=8, block_size=128, causal=True)
"""

from .api import xattention
from .estimate import estimate_block_scores
from .selection import select_blocks
from .sparse_attention import block_sparse_attention
from .stats import block_density

__all__ = [
    "xattention",
    "estimate_block_scores",
    "select_blocks",
    "block_sparse_attention",
    "block_density",
]
__version__ = "0.1.0"
