"""Moderate sizes: several chunks / tiles / default block size, still CPU-friendly."""

import pytest
import torch
from inputs import OUT_TOL, SCORE_TOL, pick_config
from reference import (
    cdiv,
    ref_block_scores,
    ref_dense_attention,
    ref_select,
    ref_sparse_attention,
    robust_rows,
)

from xattention import block_sparse_attention, estimate_block_scores, xattention

# B, Hq, Hkv, Lq, Lk, D, Bs, S
TORCH_CASES = {
    "long_square_b16": (1, 2, 1, 1500, 1500, 16, 16, 8),
    "long_chunk_b128": (1, 2, 2, 333, 1201, 32, 128, 16),
    "short_q_long_k": (1, 4, 1, 5, 900, 16, 128, 8),
    "default_like": (2, 2, 1, 520, 520, 64, 128, 8),
}
TRITON_CASES = {
    # two row tiles and two key tiles of the estimate at block size 128 (16 groups per tile)
    "two_tiles": (1, 1, 1, 140, 200, 16, 128, 8),
    "short_q_long_k": (1, 2, 1, 7, 400, 16, 64, 8),
}
ALL = sorted(set(TORCH_CASES) | set(TRITON_CASES))


def _case(backend, name):
    return pick_config(TORCH_CASES, TRITON_CASES, backend, name)


@pytest.mark.parametrize("name", ALL)
def test_estimate_moderate(backend, make_qkv, name):
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _case(backend, name)
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    got = estimate_block_scores(q, k, stride=S, block_size=Bs, backend=backend)
    exp = ref_block_scores(q, k, S, Bs, causal=True)
    torch.testing.assert_close(got.double(), exp, **SCORE_TOL[torch.float32])


@pytest.mark.parametrize("name", ALL)
def test_xattention_moderate(backend, make_qkv, gen, name):
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _case(backend, name)
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    out, mask = xattention(
        q, k, v, threshold=0.9, stride=S, block_size=Bs, backend=backend, return_mask=True
    )
    ref_scores = ref_block_scores(q, k, S, Bs, causal=True)
    ok = robust_rows(ref_scores, 0.9, Lq, Lk, Bs, True, tol=1e-5)
    assert torch.equal(mask[ok], ref_select(ref_scores, 0.9, Lq, Lk, Bs, True)[ok])
    exp = ref_sparse_attention(q, k, v, mask, Bs, True)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[torch.float32])


@pytest.mark.parametrize("name", ALL)
def test_sparse_moderate_dense_and_random(backend, make_qkv, gen, name):
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _case(backend, name)
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    full = torch.ones(1, 1, cdiv(Lq, Bs), cdiv(Lk, Bs), dtype=torch.bool)
    out = block_sparse_attention(q, k, v, full, block_size=Bs, backend=backend)
    torch.testing.assert_close(
        out.double(), ref_dense_attention(q, k, v, causal=True), **OUT_TOL[torch.float32]
    )
    m = torch.rand(B, Hq, cdiv(Lq, Bs), cdiv(Lk, Bs), generator=gen) < 0.3
    m[..., 0] = True
    out = block_sparse_attention(q, k, v, m, block_size=Bs, backend=backend)
    exp = ref_sparse_attention(q, k, v, m, Bs, True)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[torch.float32])
