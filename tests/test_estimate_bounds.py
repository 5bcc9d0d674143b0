"""The PyTorch estimate's memory follows the actual lengths, never the block size or stride alone
(docs/design.md): a block or stride far beyond the input is exact and cheap."""

import pytest
import torch
from reference import ref_block_scores

import xattention.estimate as est
from xattention import estimate_block_scores

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lq,lk,stride,block_size,causal", [
    (100, 100, 1, 2**26, True),  # one block far larger than the input (used to ask for 200 GiB)
    (37, 53, 4, 2**20, False),
    (30, 70, 8, 2**23, True),
])
def test_huge_block_size_is_exact(make_qkv, lq, lk, stride, block_size, causal):
    q, k, _ = make_qkv(1, 4, 2, lq, lk, 16)
    got = estimate_block_scores(q, k, stride, block_size, causal, backend="torch")
    assert got.shape == (1, 4, 1, 1)
    torch.testing.assert_close(got.double(), ref_block_scores(q, k, stride, block_size, causal),
                               **TOL)


@pytest.mark.parametrize("lq,lk,stride", [(5, 7, 8), (7, 7, 2**24), (100, 300, 2**26)])
def test_stride_at_least_the_key_length(make_qkv, lq, lk, stride):
    """One key group: every score row is [1]; a NaN input still gives NaN, as padding would."""
    q, k, _ = make_qkv(1, 4, 2, lq, lk, 16)
    got = estimate_block_scores(q, k, stride, stride, backend="torch")
    assert torch.equal(got, torch.ones(1, 4, 1, 1))
    if stride * lk < 10**5:
        torch.testing.assert_close(got.double(), ref_block_scores(q, k, stride, stride), **TOL)
    q[0, 1, -1, 0] = float("nan")
    k[0, 1, 0, 0] = float("inf")  # KV head 1 serves query heads 2 and 3
    got = estimate_block_scores(q, k, stride, stride, backend="torch")
    assert got[0, 0].eq(1).all() and got[0, 1:].isnan().all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_chunks_that_split_a_block(make_qkv, monkeypatch, causal):
    """Chunks are runs of query groups: a block's sums accumulate over several of them."""
    monkeypatch.setattr(est, "_CHUNK_ELEMENTS", 1)
    q, k, _ = make_qkv(2, 4, 2, 45, 77, 16)
    got = estimate_block_scores(q, k, 4, 16, causal, backend="torch")
    torch.testing.assert_close(got.double(), ref_block_scores(q, k, 4, 16, causal), **TOL)
