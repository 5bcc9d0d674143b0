"""``SparsePlan``: the kept blocks of a block-sparse attention call, as the kernels read them.

Selection produces it and every sparse consumer reads it (the Triton kernel, the FA4 stage, the
PyTorch path, the statistics, the benchmarks); a bool block mask is one view of it
(:meth:`SparsePlan.to_dense`, :meth:`SparsePlan.from_mask`). Like FlexAttention's ``BlockMask``,
the kept key blocks of every (batch, head, query block) row are held as counts plus ascending
key-block indices, split in two lists:

* *full* blocks: every row of the query block sees every key of the block
  (:meth:`BlockLayout.fully_visible`), so the kernels run them without element masks;
* *partial* blocks: the diagonal band and the ragged last key block, which need the causal mask
  or the key-length bound. At most :attr:`BlockLayout.max_partial_blocks` (2) per row.

Entries past a row's count are 0, a valid block index, since FA4 loads them (never uses them).
Blocks that are not candidates (no visible key) are never in a plan. Everything here runs on the
tensors' device without host syncs, so a plan can be built and read inside a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .block_layout import BlockLayout

_INDEX_DTYPE = torch.int32


@dataclass(frozen=True)
class SparsePlan:
    """Kept blocks per (batch, head, query block) row: full and partial key-block lists.

    Attributes:
        layout: lengths, block size and causality the plan is for.
        full_count: int32 ``[B, H, nQB]``; full_index: int32 ``[B, H, nQB, nKB]``, the first
            ``full_count`` entries of each row ascending.
        partial_count: int32 ``[B, H, nQB]``; partial_index: int32 ``[B, H, nQB, P]`` with
            ``P = layout.max_partial_blocks``.

    ``B`` and ``H`` may be 1 (broadcast); see :meth:`expand`.

    Example:
        >>> import torch
        >>> from xattention.block_layout import BlockLayout
        >>> layout = BlockLayout(256, 256, 128, causal=True)
        >>> plan = SparsePlan.from_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), layout)
        >>> plan.full_count.tolist(), plan.partial_count.tolist()
        ([[[0, 1]]], [[[1, 1]]])
        >>> plan.to_dense().int().tolist()
        [[[[1, 0], [1, 1]]]]
    """

    layout: BlockLayout
    full_count: torch.Tensor
    full_index: torch.Tensor
    partial_count: torch.Tensor
    partial_index: torch.Tensor

    def __post_init__(self) -> None:
        lay = self.layout
        if not isinstance(lay, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(lay).__name__}")
        rows = tuple(self.full_count.shape)
        _check_index("full_count", self.full_count, 3, None)
        _check_index("partial_count", self.partial_count, 3, rows)
        _check_index("full_index", self.full_index, 4, rows + (lay.num_k_blocks,))
        _check_index("partial_index", self.partial_index, 4, rows + (lay.max_partial_blocks,))
        if rows[2] != lay.num_q_blocks:
            raise ValueError(f"full_count must have {lay.num_q_blocks} query blocks for "
                             f"{lay}, got shape {list(rows)}")
        devices = {t.device for t in (self.full_count, self.full_index, self.partial_count,
                                      self.partial_index)}
        if len(devices) != 1:
            raise ValueError(f"the plan's tensors must share one device, got {devices}")

    # -- shape ------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.full_count.shape[0]

    @property
    def heads(self) -> int:
        return self.full_count.shape[1]

    @property
    def device(self) -> torch.device:
        return self.full_count.device

    @property
    def kept_count(self) -> torch.Tensor:
        """int32 ``[B, H, nQB]``: kept blocks per row (full plus partial)."""
        return self.full_count + self.partial_count

    # -- construction -----------------------------------------------------------------------
    @staticmethod
    def empty(layout: BlockLayout, batch: int, heads: int, device: torch.device | str
              ) -> SparsePlan:
        """Uninitialised buffers of a plan (what the selection kernel writes into).

        One allocation cut into the four lists (a short call's host time is mostly allocations
        and launches); each list starts 16-byte aligned, as FA4 and vectorised loads want.
        """
        nqb, nkb, part = layout.num_q_blocks, layout.num_k_blocks, layout.max_partial_blocks
        shapes = [(batch, heads, nqb), (batch, heads, nqb, nkb), (batch, heads, nqb),
                  (batch, heads, nqb, part)]
        sizes = [math.prod(shape) for shape in shapes]
        padded = [-(-n // 4) * 4 for n in sizes]
        buf = _new_index_buffer((sum(padded),), device)
        parts, offset = [], 0
        for shape, n, width in zip(shapes, sizes, padded, strict=True):
            parts.append(buf[offset:offset + n].view(shape))
            offset += width
        return SparsePlan(layout, *parts)

    @staticmethod
    def from_mask(mask: torch.Tensor, layout: BlockLayout) -> SparsePlan:
        """The plan of a bool block mask ``[B, H, nQB, nKB]``; non-candidate blocks are dropped.

        Device ops only (a stable sort per list), no host sync.
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
            raise TypeError("mask must be a bool tensor [B, H, nQB, nKB]")
        if tuple(mask.shape[2:]) != (layout.num_q_blocks, layout.num_k_blocks):
            raise ValueError(f"mask must have {layout.num_q_blocks} x {layout.num_k_blocks} "
                             f"blocks for {layout}, got shape {list(mask.shape)}")
        dev = mask.device
        keep = mask & layout.candidate(dev)
        visible = layout.fully_visible(dev)
        full_count, full_index = _compact(keep & visible, layout.num_k_blocks)
        partial_count, partial_index = _compact(keep & ~visible, layout.max_partial_blocks)
        return SparsePlan(layout, full_count, full_index, partial_count, partial_index)

    # -- checks -----------------------------------------------------------------------------
    def check_contents(self) -> SparsePlan:
        """Raise ``ValueError`` where the lists break the plan's rules; return the plan.

        The kernels trust a plan (``from_mask`` and the selection always build valid ones): a
        hand-built plan with an index past ``nKB``, a count past its list, or a block in the
        wrong list would read out of bounds or skip the causal mask. This reads the lists (a
        host sync on CUDA), so ``block_sparse_attention`` runs it for plans on the CPU only;
        call it yourself on a hand-built CUDA plan.
        """
        lay = self.layout
        visible = lay.fully_visible(self.device)
        partial_ok = lay.candidate(self.device) & ~visible
        for name, count, index, allowed, what in (
                ("full", self.full_count, self.full_index, visible, "a fully visible block"),
                ("partial", self.partial_count, self.partial_index, partial_ok,
                 "a partial block (a candidate not fully visible)")):
            width = index.shape[-1]
            if bool(((count < 0) | (count > width)).any()):
                raise ValueError(f"SparsePlan.{name}_count must lie in [0, {width}], got "
                                 f"values {int(count.min())} .. {int(count.max())}")
            used = torch.arange(width, device=self.device) < count.unsqueeze(-1)
            idx = index.long()
            if bool(((idx < 0) | (idx >= lay.num_k_blocks))[used].any()):
                raise ValueError(f"SparsePlan.{name}_index holds a key block outside [0, "
                                 f"{lay.num_k_blocks}) among its first {name}_count entries")
            if width > 1 and bool(((idx[..., 1:] <= idx[..., :-1]) & used[..., 1:]).any()):
                raise ValueError(f"SparsePlan.{name}_index rows must be strictly ascending in "
                                 f"their first {name}_count entries")
            rows = allowed.expand(*idx.shape[:-1], lay.num_k_blocks)
            if not bool(rows.gather(-1, idx.clamp(0, lay.num_k_blocks - 1))[used].all()):
                raise ValueError(f"SparsePlan.{name}_index lists a key block that is not {what} "
                                 f"of its query block for {lay} (docs/design.md §14)")
        return self

    # -- views ------------------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """Bool ``[B, H, nQB, nKB]``: the kept blocks as a block mask."""
        lay = self.layout
        dense = torch.zeros(self.batch, self.heads, lay.num_q_blocks, lay.num_k_blocks,
                            dtype=torch.int8, device=self.device)
        for count, index in ((self.full_count, self.full_index),
                             (self.partial_count, self.partial_index)):
            slot = torch.arange(index.shape[-1], device=self.device)
            valid = (slot < count.unsqueeze(-1)).to(torch.int8)
            # scatter_add, not scatter: unused slots all point at block 0 with a 0 to add.
            dense.scatter_add_(-1, index.long(), valid)
        return dense > 0

    def density(self) -> float:
        """Kept blocks over candidate blocks, averaged over batch, heads and query blocks (a host
        read: for reporting, not for the call path)."""
        cand = self.layout.candidate(self.device).sum()
        kept = self.kept_count.sum(dtype=torch.float64)
        return float(kept / (cand * self.batch * self.heads))

    def density_per_head(self) -> torch.Tensor:
        """float32 ``[H]``: kept over candidate blocks per head (mean over batch), on device."""
        cand = self.layout.candidate(self.device).sum().to(torch.float64)
        kept = self.kept_count.sum(dim=(0, 2), dtype=torch.float64)
        return (kept / (cand * self.batch)).to(torch.float32)

    def expand(self, batch: int, heads: int) -> SparsePlan:
        """The plan for ``[batch, heads]``: size-1 dims broadcast (views, no copy); with ``heads``
        a multiple of :attr:`heads`, each plan head serves ``heads // self.heads`` consecutive
        query heads (GQA: one plan per KV head shared by its query group; a copy)."""
        if self.batch not in (1, batch):
            raise ValueError(f"a plan for batch {self.batch} cannot serve batch {batch}")
        if heads % self.heads:
            raise ValueError(f"a plan for {self.heads} heads cannot serve {heads} heads (not a "
                             "multiple)")
        group = heads // self.heads

        def widen(t: torch.Tensor) -> torch.Tensor:
            if group > 1 and self.heads > 1:
                t = t.repeat_interleave(group, dim=1)
            return t.expand(batch, heads, *t.shape[2:])

        return SparsePlan(self.layout, widen(self.full_count), widen(self.full_index),
                          widen(self.partial_count), widen(self.partial_index))

    def contiguous(self) -> SparsePlan:
        """A plan whose tensors are dense row-major (what kernels index directly)."""
        return SparsePlan(self.layout, *(t.contiguous() for t in (
            self.full_count, self.full_index, self.partial_count, self.partial_index)))


def _new_index_buffer(shape: tuple[int, ...], device) -> torch.Tensor:
    from ._backend import new_output

    return new_output(shape, _INDEX_DTYPE, torch.device(device))


def _compact(keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and the first ``width`` ascending indices of the True entries of each row."""
    count = keep.sum(-1, dtype=_INDEX_DTYPE)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    slot = torch.arange(width, device=keep.device)
    index = torch.where(slot < count.unsqueeze(-1), order, torch.zeros_like(order))
    return count.contiguous(), index.to(_INDEX_DTYPE).contiguous()


def _check_index(name: str, t: object, rank: int, shape: tuple[int, ...] | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != _INDEX_DTYPE:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != rank or (shape is not None and tuple(t.shape) != shape):
        want = list(shape) if shape is not None else f"rank {rank}"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
