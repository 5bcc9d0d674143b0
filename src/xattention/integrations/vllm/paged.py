"""Read one request's keys and values out of vLLM's paged KV cache.

vLLM hands every attention layer its cache as one tensor; a request's tokens live in the pages
its row of the block table lists, token ``t`` at page ``block_table[t // page_size]``, slot
``t % page_size``. vLLM 0.32's backends use the logical shape
``[num_blocks, num_kv_heads, page_size, 2 * head_dim]``, with two memory layouts behind it
(checked against the engines' own cache writers by ``tests/vllm/test_engine_layout.py``):

* ``"cpu"``: the CPU backend's ``vec``/``vec16`` kernels. Per (page, KV head) the
  ``2 * page_size * head_dim`` values hold K *transposed*, ``[head_dim, page_size]``, followed by
  V as ``[page_size, head_dim]``.
* ``"split"``: the CUDA backends (Triton, FlashAttention): per token and KV head, K is
  ``[..., :head_dim]`` and V ``[..., head_dim:]``; the strides may be permuted (vLLM's
  ``KVCacheLayout``), which indexing handles.

vLLM 0.25's CUDA backends (the CUDA engine this package runs on) stack K and V on a dimension of
their own instead:

* ``"stacked"``: ``[num_blocks, 2, page_size, num_kv_heads, head_dim]``, K at ``[:, 0]`` and V at
  ``[:, 1]``.

``paged_kv`` describes one request's K/V in place, as a :class:`xattention.PagedKV` over views
of the cache (no copy): the Triton kernels read it through the block table. ``gather_kv`` copies
the first ``seq_len`` tokens into contiguous ``[1, Hkv, seq_len, D]`` tensors instead (the
PyTorch path, ``XATTENTION_KV_READ=gather``): ``2 * Hkv * seq_len * D`` elements, as much as the
K/V of one dense prefill.
"""

from __future__ import annotations

import torch

from ...paged import PagedKV, check_page_ids

LAYOUTS = ("cpu", "split", "stacked")


def _check_inputs(kv_cache: object, block_table: object, seq_len: object, layout: object,
                  head_dim: object) -> tuple[int, int, int, int]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    shape = getattr(kv_cache, "shape", type(kv_cache))
    if layout == "stacked":
        if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
            raise ValueError("kv_cache (layout='stacked') must be a tensor [num_blocks, 2, "
                             f"page_size, num_kv_heads, head_dim], got {shape}")
        num_blocks, _, page, _, dim = kv_cache.shape
        width = 2 * dim
    else:
        if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 4:
            raise ValueError(f"kv_cache (layout={layout!r}) must be a tensor [num_blocks, "
                             f"num_kv_heads, page_size, 2 * head_dim], got {shape}")
        num_blocks, _, page, width = kv_cache.shape
    if head_dim is None:
        if width % 2:
            raise ValueError(f"kv_cache's last dim ({width}) must be 2 * head_dim")
        head_dim = width // 2
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or \
            2 * head_dim != width:
        raise ValueError(f"head_dim must be a positive int with 2 * head_dim == {width}, "
                         f"got {head_dim!r}")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 1 or \
            block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_table must be a 1-D int32/int64 tensor (one request's row), "
                         f"got {getattr(block_table, 'shape', type(block_table))}")
    if block_table.device != kv_cache.device:
        raise ValueError(f"block_table is on {block_table.device} but kv_cache is on "
                         f"{kv_cache.device}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    pages = -(-seq_len // page)
    if pages > block_table.shape[0]:
        raise ValueError(f"seq_len={seq_len} needs {pages} pages of {page} tokens, the block "
                         f"table row has {block_table.shape[0]}")
    return num_blocks, page, head_dim, pages


def page_views(kv_cache: torch.Tensor, layout: str, head_dim: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``k_pages, v_pages [num_blocks, page_size, Hkv, D]``: views of the cache, no copy."""
    if layout == "stacked":
        return kv_cache[:, 0], kv_cache[:, 1]
    if layout == "split":
        return (kv_cache[..., :head_dim].transpose(1, 2), kv_cache[..., head_dim:].transpose(1, 2))
    # "cpu": per (page, head) [K^T (D x page) | V (page x D)]; K's head dim is then strided.
    num, heads, page = kv_cache.shape[:3]
    if kv_cache.stride(-1) != 1 or kv_cache.stride(-2) != kv_cache.shape[-1]:
        raise ValueError("layout='cpu' needs a kv_cache contiguous within each page and head")
    s0, s1 = kv_cache.stride(0), kv_cache.stride(1)
    off = kv_cache.storage_offset()
    k = kv_cache.as_strided((num, page, heads, head_dim), (s0, 1, s1, page), off)
    v = kv_cache.as_strided((num, page, heads, head_dim), (s0, head_dim, s1, 1),
                            off + page * head_dim)
    return k, v


def paged_kv(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    layout: str,
    head_dim: int | None = None,
) -> PagedKV:
    """One request's K/V read in place: a :class:`xattention.PagedKV` over the cache's pages.

    Same arguments as :func:`gather_kv`.

    Example:
        >>> cache = torch.randn(8, 2, 16, 2 * 64)
        >>> kv = paged_kv(cache, torch.tensor([3, 5, 0]), seq_len=20, layout="split")
        >>> kv.shape, torch.equal(kv.gather()[0], gather_kv(cache, torch.tensor([3, 5]), 20,
        ...                                                  "split")[0])
        (torch.Size([1, 2, 20, 64]), True)
    """
    _, _, head_dim, _ = _check_inputs(kv_cache, block_table, seq_len, layout, head_dim)
    k_pages, v_pages = page_views(kv_cache, layout, head_dim)
    return PagedKV(k_pages, v_pages, block_table.unsqueeze(0), seq_len)


def gather_kv(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    layout: str,
    head_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``k, v [1, Hkv, seq_len, D]`` of one request from a paged cache.

    Args:
        kv_cache: one layer's cache, ``[num_blocks, Hkv, page_size, 2 * D]`` (``"stacked"``:
            ``[num_blocks, 2, page_size, Hkv, D]``; see module doc).
        block_table: the request's block-table row (page ids, int32/int64, on the cache's
            device); entries past ``ceil(seq_len / page_size)`` are ignored.
        seq_len: number of context tokens to read (the request's ``seq_lens`` entry).
        layout: ``"cpu"``, ``"split"`` or ``"stacked"`` (module doc).
        head_dim: ``D``; default ``kv_cache.shape[-1] // 2``.

    Example:
        >>> cache = torch.randn(8, 2, 16, 2 * 64)
        >>> k, v = gather_kv(cache, torch.tensor([3, 5, 0]), seq_len=20, layout="split")
        >>> k.shape, torch.equal(k[0, :, 16:], cache[5, :, :4, :64])
        (torch.Size([1, 2, 20, 64]), True)
    """
    num_blocks, page, head_dim, pages = _check_inputs(kv_cache, block_table, seq_len, layout,
                                                      head_dim)
    ids = block_table[:pages].long()
    check_page_ids(ids, num_blocks, "block_table")  # paged_kv's PagedKV checks its own
    if layout == "split":
        k_pages = kv_cache[ids, :, :, :head_dim]          # [pages, Hkv, page, D]
        v_pages = kv_cache[ids, :, :, head_dim:]
    elif layout == "stacked":
        k_pages = kv_cache[ids, 0].transpose(1, 2)        # [pages, page, Hkv, D] -> Hkv second
        v_pages = kv_cache[ids, 1].transpose(1, 2)
    else:
        # Each (page, head) row of 2*page*D values is [K^T (D x page) | V (page x D)].
        # A view, never a copy of the whole cache: the CPU cache is contiguous per page and head.
        if kv_cache.stride(-1) != 1 or kv_cache.stride(-2) != kv_cache.shape[-1]:
            raise ValueError("layout='cpu' needs a kv_cache contiguous within each page and head")
        rows = kv_cache.as_strided((kv_cache.shape[0], kv_cache.shape[1], 2, page * head_dim),
                                   (kv_cache.stride(0), kv_cache.stride(1), page * head_dim, 1),
                                   kv_cache.storage_offset())
        sel = rows[ids]                                    # [pages, Hkv, 2, page*D]
        k_pages = sel[:, :, 0].unflatten(-1, (head_dim, page)).transpose(-1, -2)
        v_pages = sel[:, :, 1].unflatten(-1, (page, head_dim))
    heads = k_pages.shape[1]
    k = k_pages.transpose(0, 1).reshape(heads, pages * page, head_dim)[:, :seq_len]
    v = v_pages.transpose(0, 1).reshape(heads, pages * page, head_dim)[:, :seq_len]
    return k.unsqueeze(0).contiguous(), v.unsqueeze(0).contiguous()
