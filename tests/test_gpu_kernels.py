"""The Triton kernels on a real GPU at real sizes, against the PyTorch reference path.

Skipped without CUDA (CI has none); run on the lent GPU with ``pytest tests/test_gpu_kernels.py``.
Outputs are NaN-poisoned before the kernels write them (XATTENTION_POISON_OUTPUTS), so an element a
kernel skips fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from xattention import block_sparse_attention, estimate_block_scores, select_blocks, xattention
from xattention.synthetic import structured_qkv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("XATTENTION_POISON_OUTPUTS", "1")


def _inputs(b, hq, hkv, lq, lk, d, dtype, seed):
    """Structured attention (sinks, local windows, heavy keys, ...) built on the GPU."""
    return structured_qkv(b, hq, hkv, lq, lk, d, seed=seed, dtype=dtype, device="cuda")[:3]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


SHAPES = [
    # b, hq, hkv, lq, lk, d, block_size, stride
    (1, 8, 2, 4096, 4096, 128, 128, 8),
    (2, 4, 4, 3001, 5000, 64, 128, 16),
    (1, 4, 1, 1000, 1000, 256, 64, 8),
    (1, 9, 3, 2177, 2177, 64, 128, 8),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_estimate_matches_reference(shape, causal, dtype):
    b, hq, hkv, lq, lk, d, bs, s = shape
    q, k, _ = _inputs(b, hq, hkv, lq, lk, d, dtype, seed=hash((shape, causal)) % 1000)
    got = estimate_block_scores(q, k, s, bs, causal, backend="triton")
    ref = estimate_block_scores(q, k, s, bs, causal, backend="torch")
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_attention_matches_reference(shape, causal, dtype):
    b, hq, hkv, lq, lk, d, bs, _ = shape
    q, k, v = _inputs(b, hq, hkv, lq, lk, d, dtype, seed=7)
    nqb, nkb = -(-lq // bs), -(-lk // bs)
    g = torch.Generator(device="cuda").manual_seed(3)
    mask = torch.rand(b, hq, nqb, nkb, device="cuda", generator=g) < 0.3
    mask[..., 0] = True
    got, lse = block_sparse_attention(q, k, v, mask, bs, causal, backend="triton",
                                      return_lse=True)
    ref, ref_lse = block_sparse_attention(q, k, v, mask, bs, causal, backend="torch",
                                          return_lse=True)
    assert not got.isnan().any()
    assert _rel(got, ref) < 1e-2
    torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("causal", [True, False])
def test_empty_rows_give_zero_and_minus_inf(causal):
    q, k, v = _inputs(1, 2, 1, 512, 512, 64, torch.bfloat16, seed=1)
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool, device="cuda")
    mask[:, :, 2:, 0] = True
    out, lse = block_sparse_attention(q, k, v, mask, 128, causal, backend="triton",
                                      return_lse=True)
    assert (out[:, :, :256] == 0).all() and torch.isneginf(lse[:, :, :256]).all()
    ref = block_sparse_attention(q, k, v, mask, 128, causal, backend="torch")
    assert _rel(out[:, :, 256:], ref[:, :, 256:]) < 1e-2


def test_xattention_end_to_end_matches_reference_path():
    q, k, v = _inputs(1, 8, 2, 8192, 8192, 128, torch.bfloat16, seed=11)
    out, mask = xattention(q, k, v, threshold=0.9, return_mask=True, backend="triton")
    ref_scores = estimate_block_scores(q, k, backend="torch")
    ref_mask = select_blocks(ref_scores, 0.9, q_len=8192, k_len=8192)
    # Scores agree to ~1e-6, so masks differ only where a block sits on the threshold.
    assert (mask != ref_mask).float().mean().item() < 1e-3
    ref = block_sparse_attention(q, k, v, mask, backend="torch")
    assert _rel(out, ref) < 1e-2


def test_threshold_one_is_dense_attention():
    q, k, v = _inputs(1, 8, 2, 4096, 4096, 128, torch.bfloat16, seed=5)
    out = xattention(q, k, v, threshold=1.0, backend="triton")
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    assert _rel(out, dense) < 1e-2


@pytest.mark.parametrize("causal", [True, False])
def test_selection_kernel_matches_reference(causal):
    g = torch.Generator(device="cuda").manual_seed(2)
    lq, lk, bs = 30000, 33000, 128
    scores = torch.rand(2, 5, -(-lq // bs), -(-lk // bs), device="cuda", generator=g) ** 4
    scores = scores / scores.sum(-1, keepdim=True)
    thr = torch.tensor([0.5, 0.8, 0.9, 0.95, 1.0], device="cuda")
    got = select_blocks(scores, thr, q_len=lq, k_len=lk, causal=causal, backend="triton")
    ref = select_blocks(scores, thr, q_len=lq, k_len=lk, causal=causal, backend="torch")
    assert got.view(torch.uint8).max() <= 1  # every element written
    assert torch.equal(got, ref)


def test_pointer_path_without_tma(monkeypatch):
    import xattention.kernels.sparse_attention as sa

    monkeypatch.setenv("XATTENTION_DISABLE_TMA", "1")
    q, k, v = _inputs(1, 4, 2, 1500, 1500, 128, torch.bfloat16, seed=9)
    mask = torch.rand(1, 4, 12, 12, device="cuda") < 0.5
    got, _ = sa.block_sparse_attention_triton(q, k, v, mask, 128, True, 128 ** -0.5)
    ref = block_sparse_attention(q, k, v, mask, backend="torch")
    assert _rel(got, ref) < 1e-2
