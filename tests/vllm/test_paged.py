"""gather_kv: a request's K/V read from a paged cache through its block table (no vLLM needed).

The caches are written here token by token, the way the layouts are documented in
``xattention.integrations.vllm.paged`` (test_engine_layout.py checks that vLLM's own CPU kernel
writes that layout). Pages the request does not own are NaN, so reading a wrong page fails.
"""

from __future__ import annotations

import pytest
import torch
from reference import ref_dense_attention

from xattention import xattention
from xattention.integrations.vllm.paged import gather_kv


def write_paged(k: torch.Tensor, v: torch.Tensor, num_pages: int, page: int, layout: str,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter ``k, v [Hkv, L, D]`` into a NaN cache ``[num_pages, Hkv, page, 2D]`` (``stacked``:
    ``[num_pages, 2, page, Hkv, D]``) over random pages; returns ``(cache, block_table)``."""
    heads, length, dim = k.shape
    used = -(-length // page)
    table = torch.randperm(num_pages, generator=gen)[:used + 2].to(torch.int32)  # 2 unused pages
    shape = (num_pages, 2, page, heads, dim) if layout == "stacked" else \
        (num_pages, heads, page, 2 * dim)
    cache = torch.full(shape, float("nan"), dtype=k.dtype)
    for t in range(length):
        blk, slot = int(table[t // page]), t % page
        if layout == "stacked":
            cache[blk, 0, slot] = k[:, t]
            cache[blk, 1, slot] = v[:, t]
        elif layout == "split":
            cache[blk, :, slot, :dim] = k[:, t]
            cache[blk, :, slot, dim:] = v[:, t]
        else:  # per (page, head): K^T [D, page] then V [page, D]
            flat = cache[blk].view(heads, 2 * page * dim)
            flat[:, slot:page * dim:page] = k[:, t]
            flat[:, page * dim + slot * dim:page * dim + (slot + 1) * dim] = v[:, t]
    return cache.to(k.device), table.to(k.device)


@pytest.mark.parametrize("layout", ["cpu", "split", "stacked"])
@pytest.mark.parametrize("length, page", [(1, 16), (37, 16), (96, 32), (161, 32)])
def test_gather_returns_what_was_written(layout, length, page, gen):
    heads, dim = 3, 16
    k = torch.randn(heads, length, dim, generator=gen)
    v = torch.randn(heads, length, dim, generator=gen)
    cache, table = write_paged(k, v, num_pages=-(-length // page) + 5, page=page, layout=layout,
                               gen=gen)
    gk, gv = gather_kv(cache, table, length, layout)
    assert gk.shape == gv.shape == (1, heads, length, dim) and gk.is_contiguous()
    torch.testing.assert_close(gk[0], k, rtol=0, atol=0)
    torch.testing.assert_close(gv[0], v, rtol=0, atol=0)
    # A shorter read (a prefix) stops at seq_len and never touches later pages.
    gk2, _ = gather_kv(cache, table, max(1, length // 2), layout)
    torch.testing.assert_close(gk2[0], k[:, :max(1, length // 2)], rtol=0, atol=0)


def _chunk_against_dense(device: str, dtype: torch.dtype, layout: str, gen: torch.Generator,
                         backend: str) -> None:
    """A prefill chunk (the last Lq of Lk positions) over gathered K/V equals dense attention
    at threshold 1 and equals XAttention over the contiguous K/V at threshold 0.9."""
    hq, hkv, lq, lk, dim, page = 4, 2, 70, 203, 32, 32
    q = torch.randn(1, hq, lq, dim, generator=gen)
    k = torch.randn(hkv, lk, dim, generator=gen)
    v = torch.randn(hkv, lk, dim, generator=gen)
    k[:, :5] *= 4  # a structured context: a few heavy early keys
    cache, table = write_paged(k.to(dtype), v.to(dtype), num_pages=12, page=page, layout=layout,
                               gen=gen)
    cache, table = cache.to(device), table.to(device)
    q = q.to(device, dtype)
    gk, gv = gather_kv(cache, table, lk, layout)
    dense = xattention(q, gk, gv, threshold=1.0, block_size=32, stride=8, causal=True,
                       backend=backend)
    ref = ref_dense_attention(q.double().cpu(), gk.double().cpu(), gv.double().cpu(), causal=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(dense.double().cpu(), ref, rtol=tol, atol=tol)
    sparse = xattention(q, gk, gv, threshold=0.9, block_size=32, stride=8, causal=True,
                        backend=backend)
    direct = xattention(q, k[None].to(device, dtype), v[None].to(device, dtype), threshold=0.9,
                        block_size=32, stride=8, causal=True, backend=backend)
    torch.testing.assert_close(sparse, direct, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["cpu", "split", "stacked"])
def test_prefill_chunk_over_paged_cache_matches_dense(layout, gen):
    _chunk_against_dense("cpu", torch.float32, layout, gen, backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["split", "stacked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_chunk_over_paged_cache_matches_dense_gpu(dtype, layout, gen, monkeypatch):
    monkeypatch.setenv("XATTENTION_POISON_OUTPUTS", "1")
    _chunk_against_dense("cuda", dtype, layout, gen, backend="auto")


def test_gather_rejects_bad_input():
    cache = torch.zeros(4, 2, 16, 64)
    table = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="layout"):
        gather_kv(cache, table, 8, "nhd")
    with pytest.raises(ValueError, match="seq_len"):
        gather_kv(cache, table, 33, "split")
    with pytest.raises(ValueError, match="seq_len"):
        gather_kv(cache, table, 0, "split")
    with pytest.raises(ValueError, match="block_table"):
        gather_kv(cache, table.float(), 8, "split")
    with pytest.raises(ValueError, match="kv_cache"):
        gather_kv(cache[0], table, 8, "split")
    with pytest.raises(ValueError, match="head_dim"):
        gather_kv(cache, table, 8, "split", head_dim=16)
    with pytest.raises(ValueError, match="stacked"):
        gather_kv(cache, table, 8, "stacked")  # a 4-D cache is not vLLM 0.25's 5-D one
