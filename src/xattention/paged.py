"""Keys and values in a paged cache, read in place through a block table.

Serving engines (vLLM, SGLang, TensorRT-LLM) keep K/V in fixed-size pages and give each request a
row of page ids. :class:`PagedKV` describes such a cache to :func:`xattention.xattention`: pass
it as ``k`` (with ``v=None``) and the Triton kernels read every key and value row where it lies,
token ``t`` of batch row ``b`` at page ``block_table[b, t // page_size]``, slot
``t % page_size``, with no copy of the request's K/V.

Where a stage cannot read pages (the PyTorch path, the FP8 estimate's rounding, the dense branch
of short inputs), it reads the contiguous copy :meth:`PagedKV.gather` makes:
``2 * B * Hkv * seq_len * D`` elements, the copy an engine integration made before this existed.
FlashAttention-4 takes contiguous K/V, so a paged call's sparse stage stays on the Triton kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import SUPPORTED_DTYPES


def check_page_ids(ids: torch.Tensor, num_pages: int, name: str) -> None:
    """Every page id in ``ids`` (the table entries that are read) must lie in ``[0, num_pages)``.

    The kernels index the cache with these ids unchecked, so one stale or foreign id reads
    outside the cache. On the CPU the check raises ``ValueError`` naming the first bad entry. On
    CUDA it is a device-side assert (``torch._assert_async``): raising there would need a host
    sync per call, which graph capture and the serving engine's step loop cannot afford; the
    assert stops the process at the next synchronisation (torch reports a device-side assert,
    which may not carry the message below).
    """
    if ids.numel() == 0:
        return
    low, high = ids.aminmax()
    if ids.is_cuda:
        torch._assert_async((low >= 0) & (high < num_pages),
                            f"xattention: {name} holds a page id outside [0, {num_pages})")
        return
    if low < 0 or high >= num_pages:
        bad = ((ids < 0) | (ids >= num_pages)).nonzero()[0].tolist()
        where = ", ".join(map(str, bad))
        raise ValueError(f"{name}[{where}] = {int(ids[tuple(bad)])} is not a page of the cache "
                         f"(page ids must lie in [0, {num_pages}))")


@dataclass(frozen=True)
class PagedKV:
    """K/V of ``batch`` sequences of ``seq_len`` tokens, in pages.

    Attributes:
        k_pages, v_pages: ``[num_pages, page_size, Hkv, D]`` views of the cache (any strides;
            the Triton kernels need the head dim contiguous), e.g. vLLM's
            ``kv_cache[:, 0]`` for a ``[num_blocks, 2, page_size, Hkv, D]`` cache.
        block_table: int32/int64 ``[batch, pages_per_row]`` page ids on the cache's device;
            entries past ``ceil(seq_len / page_size)`` are never read.
        seq_len: tokens per row (``Lk``); every row has the same length.
    """

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor
    seq_len: int

    def __post_init__(self) -> None:
        for name in ("k_pages", "v_pages"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"PagedKV.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"PagedKV.{name} must be [num_pages, page_size, kv_heads, "
                                 f"head_dim], got shape {tuple(t.shape)}")
            if t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"PagedKV.{name} must be float16, bfloat16, float32 or float64, "
                                f"got {t.dtype}")
        k, v, table = self.k_pages, self.v_pages, self.block_table
        if v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
            raise ValueError(f"PagedKV.v_pages ({tuple(v.shape)}, {v.dtype}, {v.device}) must "
                             f"match k_pages ({tuple(k.shape)}, {k.dtype}, {k.device})")
        if min(k.shape) == 0:
            raise ValueError(f"PagedKV.k_pages must be non-empty, got shape {tuple(k.shape)}")
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or \
                table.dtype not in (torch.int32, torch.int64):
            raise TypeError("PagedKV.block_table must be an int32/int64 tensor [batch, "
                            f"pages_per_row], got {getattr(table, 'shape', type(table))}")
        if table.stride(1) != 1:  # the kernels step along a row by 1
            raise ValueError("PagedKV.block_table rows must be contiguous (stride(1) == 1), got "
                             f"strides {table.stride()}")
        if table.device != k.device:
            raise ValueError(f"PagedKV.block_table is on {table.device} but the pages are on "
                             f"{k.device}")
        seq = self.seq_len
        if isinstance(seq, bool) or not isinstance(seq, int) or seq <= 0:
            raise ValueError(f"PagedKV.seq_len must be a positive int, got {seq!r}")
        if self.pages_per_row > table.shape[1]:
            raise ValueError(f"PagedKV.seq_len={seq} needs {self.pages_per_row} pages of "
                             f"{self.page_size} tokens, block_table rows have {table.shape[1]}")
        check_page_ids(table[:, : self.pages_per_row], k.shape[0], "PagedKV.block_table")

    # -- sizes ------------------------------------------------------------------------------
    @property
    def page_size(self) -> int:
        return self.k_pages.shape[1]

    @property
    def pages_per_row(self) -> int:
        """Pages one row's ``seq_len`` tokens occupy (the table entries that are read)."""
        return -(-self.seq_len // self.page_size)

    @property
    def shape(self) -> torch.Size:
        """The logical ``[B, Hkv, seq_len, D]`` of the keys (what a contiguous ``k`` would have)."""
        _, _, heads, dim = self.k_pages.shape
        return torch.Size((self.block_table.shape[0], heads, self.seq_len, dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.k_pages.dtype

    @property
    def device(self) -> torch.device:
        return self.k_pages.device

    @property
    def is_cuda(self) -> bool:
        return self.k_pages.is_cuda

    # -- reading ----------------------------------------------------------------------------
    def token_pages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``(page, slot)`` of every token, each ``[B, seq_len]`` (device ops, no sync)."""
        t = torch.arange(self.seq_len, device=self.device)
        pages = self.block_table[:, : self.pages_per_row].long()
        return pages[:, t // self.page_size], (t % self.page_size).expand(pages.shape[0], -1)

    def gather(self, which: str = "kv") -> tuple[torch.Tensor, ...]:
        """Contiguous copies ``[B, Hkv, seq_len, D]``: ``(k, v)``, or ``(k,)`` for ``"k"``."""
        page, slot = self.token_pages()
        out = []
        for t in (self.k_pages, self.v_pages)[: len(which)]:
            out.append(t[page, slot].permute(0, 2, 1, 3).contiguous())  # [B, L, H, D] -> BHLD
        return tuple(out)

    def kernel_strides(self, which: str) -> tuple[int, int, int]:
        """``(page, head, slot)`` element strides of ``k_pages`` or ``v_pages``."""
        t = self.k_pages if which == "k" else self.v_pages
        return t.stride(0), t.stride(2), t.stride(1)
