"""PagedKV: K/V read in place through a block table, against the same K/V passed contiguous.

The pages are scattered over a cache whose other pages are NaN, and the table's entries past the
last page a row needs point outside the cache, so reading a page the table does not list, or an
entry past the row's pages, fails. The Triton kernels run under the interpreter here (the paged
reads are the kernels' own code path, ``PAGE > 0``); tests/test_gpu_kernels.py runs them on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from reference import ref_sparse_attention

from xattention import PagedKV, xattention
from xattention.synthetic import structured_qkv


def scatter_pages(k: torch.Tensor, v: torch.Tensor, page: int, spare: int, gen: torch.Generator
                  ) -> PagedKV:
    """``k, v [B, Hkv, L, D]`` written over random pages of a NaN cache (``spare`` pages more
    than needed), in the ``[num_pages, page, Hkv, D]`` layout."""
    b, heads, length, dim = k.shape
    used = -(-length // page)
    num_pages = b * used + spare
    order = torch.randperm(num_pages, generator=gen)
    kp = torch.full((num_pages, page, heads, dim), float("nan"), dtype=k.dtype)
    vp = kp.clone()
    table = torch.full((b, used + 2), 10 ** 6, dtype=torch.int32)  # past the row: never read
    for row in range(b):
        for i in range(used):
            pg = int(order[row * used + i])
            table[row, i] = pg
            n = min(page, length - i * page)
            kp[pg, :n] = k[row, :, i * page:i * page + n].transpose(0, 1)
            vp[pg, :n] = v[row, :, i * page:i * page + n].transpose(0, 1)
    return PagedKV(kp, vp, table, length)


@pytest.mark.parametrize("page", [16, 24, 64])
def test_gather_returns_the_contiguous_kv(page, gen):
    k, v = torch.randn(2, 2, 2, 75, 8, generator=gen)
    kv = scatter_pages(k, v, page, spare=3, gen=gen)
    gk, gv = kv.gather()
    assert kv.shape == k.shape and gk.is_contiguous()
    assert torch.equal(gk, k) and torch.equal(gv, v)


CASES = [
    # b, hq, hkv, lq, lk, d, page, causal
    (1, 4, 2, 100, 161, 32, 16, True),   # GQA, Lq < Lk, ragged last page and block
    (1, 4, 2, 100, 161, 32, 16, False),
    (2, 2, 2, 96, 96, 16, 32, True),     # a batch: one table row each
    (1, 3, 1, 47, 130, 32, 24, True),    # a page size that is no power of two
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_reads_pages_as_contiguous(case, gen):
    b, hq, hkv, lq, lk, d, page, causal = case
    q, k, v = structured_qkv(b, hq, hkv, lq, lk, d, seed=lq + lk, dtype=torch.float16)[:3]
    kv = scatter_pages(k, v, page, spare=4, gen=gen)
    opts = dict(threshold=0.9, block_size=32, stride=8, causal=causal, backend="triton",
                min_sparse_len=0, return_plan=True, return_lse=True)
    got, got_lse, got_plan = xattention(q, kv, None, **opts)
    ref, ref_lse, ref_plan = xattention(q, k, v, **opts)
    assert torch.equal(got_plan.to_dense(), ref_plan.to_dense())
    assert not got.isnan().any()
    assert torch.equal(got, ref) and torch.equal(got_lse, ref_lse)
    oracle = ref_sparse_attention(q.double(), k.double(), v.double(), got_plan.to_dense(), 32,
                                  causal)
    torch.testing.assert_close(got.double(), oracle, rtol=1e-2, atol=1e-2)


def test_nonfinite_value_in_a_page_is_seen_as_in_contiguous(gen):
    """A NaN v in a kept page reaches the rows that see it, as with contiguous K/V: the
    estimate's non-finite flags read the pages too."""
    q, k, v = structured_qkv(1, 2, 1, 64, 128, 16, seed=3, dtype=torch.float16)[:3]
    v[0, 0, 5] = float("nan")
    kv = scatter_pages(k, v, 16, spare=2, gen=gen)
    opts = dict(threshold=0.5, block_size=32, stride=8, backend="triton", min_sparse_len=0)
    got, ref = xattention(q, kv, None, **opts), xattention(q, k, v, **opts)
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().any()
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(ref))


@pytest.mark.parametrize("how", ["torch", "fp8", "dense"])
def test_paths_that_cannot_read_pages_gather(how, gen):
    q, k, v = structured_qkv(1, 2, 2, 64, 96, 16, seed=5, dtype=torch.float32)[:3]
    kv = scatter_pages(k, v, 16, spare=2, gen=gen)
    opts = {"torch": dict(backend="torch"),
            "fp8": dict(backend="torch", estimate_dtype=torch.float8_e4m3fn),
            "dense": dict(min_sparse_len=10 ** 6)}[how]
    got = xattention(q, kv, None, threshold=0.9, block_size=32, **opts)
    assert torch.equal(got, xattention(q, k, v, threshold=0.9, block_size=32, **opts))


def test_bad_paged_input_is_rejected():
    k = torch.zeros(4, 16, 2, 8)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_len"):
        PagedKV(k, k, table, 33)
    with pytest.raises(ValueError, match="seq_len"):
        PagedKV(k, k, table, 0)
    with pytest.raises(TypeError, match="block_table"):
        PagedKV(k, k, table.float(), 8)
    with pytest.raises(TypeError, match="block_table"):
        PagedKV(k, k, table[0], 8)
    with pytest.raises(ValueError, match="k_pages"):
        PagedKV(k[0], k[0], table, 8)
    with pytest.raises(ValueError, match="v_pages"):
        PagedKV(k, k.half(), table, 8)
    kv = PagedKV(k, k, table, 20)
    q = torch.zeros(1, 4, 10, 8)
    with pytest.raises(TypeError, match="v must be None"):
        xattention(q, kv, q)
    with pytest.raises(ValueError, match="batch"):
        xattention(q.expand(2, -1, -1, -1), kv, None)
    with pytest.raises(TypeError, match="dtype"):
        xattention(q.half(), kv, None)
    with pytest.raises(ValueError, match="head_dim"):
        xattention(torch.zeros(1, 4, 10, 16), kv, None)
    with pytest.raises(ValueError, match="multiple"):
        xattention(torch.zeros(1, 3, 10, 8), kv, None)
    with pytest.raises(ValueError, match="seq_len"):
        xattention(torch.zeros(1, 4, 21, 8), kv, None)


@pytest.mark.parametrize("bad", [-1, 4, 2**31 - 1])
def test_page_ids_outside_the_cache_are_rejected(bad):
    """The kernels index pages unchecked: a stale id must fail at the boundary, naming the entry;
    entries past the pages ``seq_len`` needs are never read, so padding there stays allowed."""
    from xattention.integrations.vllm.paged import gather_kv, paged_kv

    k = torch.zeros(4, 16, 2, 8)
    table = torch.tensor([[0, 1, 2], [3, bad, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"block_table\[1, 1\] = {bad} .*\[0, 4\)"):
        PagedKV(k, k, table, 20)
    assert PagedKV(k, k, table[:, [0, 0, 1]], 20).pages_per_row == 2
    assert PagedKV(k, k, torch.tensor([[2, bad]], dtype=torch.int32), 16).shape[2] == 16
    cache = torch.zeros(4, 2, 16, 16)
    for reader in (gather_kv, paged_kv):
        # paged_kv's PagedKV names the entry in the one-row table it builds: [0, 1].
        with pytest.raises(ValueError, match=rf"block_table\[(0, )?1\] = {bad} "):
            reader(cache, table[1], 20, "split")
        reader(cache, torch.tensor([3, bad]), 16, "split")  # the unread entry is not checked


@pytest.mark.parametrize("layout", ["cpu", "split", "stacked"])
def test_vllm_page_views_read_what_gather_kv_reads(layout, gen):
    """The engine's layouts (xattention.integrations.vllm.paged; no vLLM needed): the in-place
    views give the tokens the copying reader gives."""
    from xattention.integrations.vllm.paged import gather_kv, paged_kv

    heads, page, dim, num = 2, 16, 8, 9
    shape = (num, 2, page, heads, dim) if layout == "stacked" else (num, heads, page, 2 * dim)
    cache = torch.randn(shape, generator=gen)
    table = torch.randperm(num, generator=gen)[:5].to(torch.int32)
    kv = paged_kv(cache, table, 70, layout)
    for got, want in zip(kv.gather(), gather_kv(cache, table, 70, layout), strict=True):
        assert torch.equal(got, want)
