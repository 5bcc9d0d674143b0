"""Which key blocks each query block may use (candidates) and must keep (forced).

See docs/design.md §2.2.

Queries are the last ``q_len`` positions of a ``k_len`` context, so query row ``r`` sits at absolute
position ``k_len - q_len + r``. These masks depend only on lengths, not on batch or head, so they
are ``[nQB, nKB]`` and broadcast over the rest.
"""

from __future__ import annotations

import torch


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def query_block_positions(
    q_len: int, k_len: int, block_size: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions of the first and last row of every query block."""
    first_row = torch.arange(0, q_len, block_size, device=device)
    last_row = torch.clamp(first_row + block_size, max=q_len) - 1
    offset = k_len - q_len
    return first_row + offset, last_row + offset


def candidate_blocks(
    q_len: int, k_len: int, block_size: int, causal: bool, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool ``[nQB, nKB]``: key blocks holding at least one key visible to the query block."""
    nqb, nkb = num_blocks(q_len, block_size), num_blocks(k_len, block_size)
    if not causal:
        return torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    _, p_last = query_block_positions(q_len, k_len, block_size, device)
    key_start = torch.arange(nkb, device=device) * block_size
    return key_start[None, :] <= p_last[:, None]


def forced_blocks(
    q_len: int, k_len: int, block_size: int, causal: bool, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool ``[nQB, nKB]``: the sink block and the diagonal band, always kept when causal."""
    nqb, nkb = num_blocks(q_len, block_size), num_blocks(k_len, block_size)
    if not causal:
        return torch.zeros(nqb, nkb, dtype=torch.bool, device=device)
    p_first, p_last = query_block_positions(q_len, k_len, block_size, device)
    j = torch.arange(nkb, device=device)[None, :]
    band = (j >= (p_first // block_size)[:, None]) & (j <= (p_last // block_size)[:, None])
    return band | (j == 0)
