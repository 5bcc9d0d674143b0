"""The block layout of one attention call: which key blocks each query block may use (candidates),
must keep (forced) and sees without any element mask (fully visible). See docs/design.md §2.2.

This module holds the one definition of each of these predicates. The Triton kernels restate them
in device code (``kernels/_common.py``: ``block_is_candidate`` etc.); tests check the two agree.

Queries are the last ``q_len`` positions of a ``k_len`` context, so query row ``r`` sits at absolute
position ``k_len - q_len + r``. The layout depends only on lengths, not on batch or head, so its
masks are ``[nQB, nKB]`` and broadcast over the rest.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


def num_blocks(length: int, block_size: int) -> int:
    """``ceil(length / block_size)``: the one ceil-div of the package."""
    return -(-length // block_size)


@dataclass(frozen=True)
class BlockLayout:
    """Lengths, block size and causality of a call, and the block facts that follow from them.

    Example:
        >>> layout = BlockLayout(q_len=300, k_len=300, block_size=128, causal=True)
        >>> layout.num_q_blocks, layout.num_k_blocks, layout.max_partial_blocks
        (3, 3, 2)
        >>> layout.candidate().int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """

    q_len: int
    k_len: int
    block_size: int
    causal: bool

    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.q_len, self.block_size)

    @property
    def num_k_blocks(self) -> int:
        return num_blocks(self.k_len, self.block_size)

    @property
    def offset(self) -> int:
        """Absolute position of query row 0."""
        return self.k_len - self.q_len

    @property
    def max_partial_blocks(self) -> int:
        """Most key blocks one query block can keep that need an element mask.

        Causal: a partial block ends after the block's first row and starts at or before its last
        row; the rows span less than one block, so at most two blocks qualify (the ragged last key
        block is one of them, since it holds position ``k_len - 1 >= p_last``). Non-causal: only
        the ragged last key block.
        """
        return min(self.num_k_blocks, 2 if self.causal else 1)

    def query_block_positions(self, device: torch.device | str | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions of the first and last row of every query block."""
        first_row = torch.arange(0, self.q_len, self.block_size, device=device)
        last_row = torch.clamp(first_row + self.block_size, max=self.q_len) - 1
        return first_row + self.offset, last_row + self.offset

    def _key_blocks(self, device) -> torch.Tensor:
        return torch.arange(self.num_k_blocks, device=device)[None, :]

    def candidate(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``[nQB, nKB]``: key blocks holding at least one key visible to the query block."""
        nqb, nkb = self.num_q_blocks, self.num_k_blocks
        if not self.causal:
            return torch.ones(nqb, nkb, dtype=torch.bool, device=device)
        _, p_last = self.query_block_positions(device)
        return self._key_blocks(device) * self.block_size <= p_last[:, None]

    def forced(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``[nQB, nKB]``: the sink block and the diagonal band, always kept when causal."""
        if not self.causal:
            return torch.zeros(self.num_q_blocks, self.num_k_blocks, dtype=torch.bool,
                               device=device)
        p_first, p_last = self.query_block_positions(device)
        j = self._key_blocks(device)
        bs = self.block_size
        band = (j >= (p_first // bs)[:, None]) & (j <= (p_last // bs)[:, None])
        return band | (j == 0)

    def fully_visible(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``[nQB, nKB]``: key blocks every row of the query block sees whole (no element
        mask): inside the keys (not the ragged last block) and, causal, ending at or before the
        block's first row."""
        j_end = (self._key_blocks(device) + 1) * self.block_size  # one past the block's last key
        inside = (j_end <= self.k_len).expand(self.num_q_blocks, self.num_k_blocks)
        if not self.causal:
            return inside
        p_first, _ = self.query_block_positions(device)
        return inside & (j_end - 1 <= p_first[:, None])

    def grid_shape(self, batch: int, heads: int) -> tuple[int, int, int, int]:
        """Shape of a block mask (or score matrix) for this layout."""
        return (batch, heads, self.num_q_blocks, self.num_k_blocks)


def query_block_positions(
    q_len: int, k_len: int, block_size: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions of the first and last row of every query block."""
    return BlockLayout(q_len, k_len, block_size, True).query_block_positions(device)


def candidate_blocks(
    q_len: int, k_len: int, block_size: int, causal: bool, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool ``[nQB, nKB]``: :meth:`BlockLayout.candidate`."""
    return BlockLayout(q_len, k_len, block_size, causal).candidate(device)


@functools.lru_cache(maxsize=64)
def cached_candidate_blocks(q_len: int, k_len: int, block_size: int, causal: bool,
                            device: torch.device) -> tuple[torch.Tensor, int]:
    """``(candidate_blocks on device, their count)``, built once per shape: the same few shapes
    recur every call (one prompt length, many layers), and the count is known without reading
    the device. Shared and cached: read it, never write into it."""
    cand = candidate_blocks(q_len, k_len, block_size, causal)
    return cand.to(device), int(cand.sum())


def forced_blocks(
    q_len: int, k_len: int, block_size: int, causal: bool, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool ``[nQB, nKB]``: :meth:`BlockLayout.forced`."""
    return BlockLayout(q_len, k_len, block_size, causal).forced(device)


def fully_visible_blocks(
    q_len: int, k_len: int, block_size: int, causal: bool, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool ``[nQB, nKB]``: :meth:`BlockLayout.fully_visible`."""
    return BlockLayout(q_len, k_len, block_size, causal).fully_visible(device)
