"""Self-checks of tests/reference.py against independent formulations and hand-worked cases.

If these fail, the reference (not the implementation) is wrong.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from reference import (
    cdiv,
    ref_antidiagonal_logits,
    ref_block_scores,
    ref_candidates,
    ref_dense_attention,
    ref_forced,
    ref_select,
    ref_select_row,
    ref_sparse_attention,
    ref_token_mask,
)


def _strided_trick_logits(q, k, S, scale):
    """Independent formulation: reverse rows inside each query group, reshape to S*D."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    qp = F.pad(q.double(), (0, 0, 0, cdiv(Lq, S) * S - Lq))
    kp = F.pad(k.double(), (0, 0, 0, cdiv(Lk, S) * S - Lk))
    qg = qp.reshape(B, H, -1, S, D).flip(-2).reshape(B, H, -1, S * D)
    kg = kp.reshape(B, H, -1, S * D)
    return qg @ kg.transpose(-1, -2) * scale / S


@pytest.mark.parametrize("Lq,Lk,S", [(16, 16, 4), (13, 29, 4), (7, 7, 8), (1, 9, 2)])
def test_logits_match_strided_trick(gen, Lq, Lk, S):
    q = torch.randn(2, 3, Lq, 5, generator=gen)
    k = torch.randn(2, 3, Lk, 5, generator=gen)
    A = ref_antidiagonal_logits(q, k, S, scale=0.7)
    torch.testing.assert_close(A, _strided_trick_logits(q, k, S, 0.7))


def test_logits_hand_example():
    # S = 2, D = 1: A(a, b) = scale/2 * (q[2a+1] k[2b] + q[2a] k[2b+1])
    q = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1)
    k = torch.tensor([10.0, 20.0, 30.0]).reshape(1, 1, 3, 1)
    A = ref_antidiagonal_logits(q, k, 2, scale=1.0)[0, 0]
    expected = torch.tensor(
        [
            [(2 * 10 + 1 * 20) / 2, (2 * 30 + 1 * 0) / 2],
            [(0 * 10 + 3 * 20) / 2, (0 * 30 + 3 * 0) / 2],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(A, expected)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Lq,Lk,Bs", [(20, 20, 4), (9, 23, 4), (5, 12, 3)])
def test_block_scores_stride1_is_block_sum_of_softmax(gen, causal, Lq, Lk, Bs):
    """With S = 1 the estimate is the exact attention map summed per block."""
    q = torch.randn(1, 2, Lq, 4, generator=gen)
    k = torch.randn(1, 2, Lk, 4, generator=gen)
    s = ref_block_scores(q, k, 1, Bs, causal=causal)
    logits = q.double() @ k.double().transpose(-1, -2) / 2.0
    if causal:
        r = torch.arange(Lq)[:, None] + Lk - Lq
        logits = logits.masked_fill(torch.arange(Lk)[None, :] > r, -math.inf)
    P = torch.softmax(logits, -1)
    nqb, nkb = cdiv(Lq, Bs), cdiv(Lk, Bs)
    P = F.pad(P, (0, nkb * Bs - Lk, 0, nqb * Bs - Lq))
    blk = P.reshape(1, 2, nqb, Bs, nkb, Bs).sum(dim=(3, 5))
    blk = blk / blk.sum(-1, keepdim=True)
    torch.testing.assert_close(s, blk)


def test_candidates_and_forced_hand_example():
    # Lq=20, Lk=45, Bs=16: p(r) = 25 + r. Block 0 rows 0..15 -> p 25..40 (key blocks 1, 2);
    # block 1 rows 16..19 -> p 41..44 (key block 2).
    cand = ref_candidates(20, 45, 16, True)
    forced = ref_forced(20, 45, 16, True)
    assert cand.tolist() == [[True, True, True], [True, True, True]]
    assert forced.tolist() == [[True, True, True], [True, False, True]]
    # Lq=Lk=40, Bs=16: diagonal band is one block
    assert ref_forced(40, 40, 16, True).tolist() == [
        [True, False, False],
        [True, True, False],
        [True, False, True],
    ]
    assert ref_candidates(40, 40, 16, True).tolist() == [
        [True, False, False],
        [True, True, False],
        [True, True, True],
    ]
    assert not ref_forced(40, 40, 16, False).any()
    assert ref_candidates(40, 40, 16, False).all()


def test_select_row_hand_examples():
    all4 = [True] * 4
    none4 = [False] * 4
    # ties -> lower j first; cum before must be < thr * total
    assert ref_select_row([0.25] * 4, 0.3, all4, none4) == [True, True, False, False]
    assert ref_select_row([0.25] * 4, 0.5, all4, none4) == [True, True, False, False]
    assert ref_select_row([0.25] * 4, 0.5000001, all4, none4) == [True, True, True, False]
    assert ref_select_row([0.1, 0.6, 0.2, 0.1], 0.7, all4, none4) == [False, True, True, False]
    # forced blocks count toward the cumulative score
    forced = [True, False, False, True]
    assert ref_select_row([0.3, 0.2, 0.1, 0.4], 0.7, all4, forced) == [True, False, False, True]
    assert ref_select_row([0.3, 0.2, 0.1, 0.4], 0.71, all4, forced) == [True, True, False, True]
    # threshold >= 1 keeps every candidate, even zero-score ones
    cand = [True, True, True, False]
    assert ref_select_row([0.5, 0.5, 0.0, 0.0], 1.0, cand, none4) == [True, True, True, False]


def test_select_per_head_threshold_tensor(gen):
    s = torch.rand(1, 2, 3, 3, generator=gen)
    m = ref_select(s, torch.tensor([0.1, 1.0]), 40, 40, 16, True)
    assert m[0, 1].tolist() == ref_candidates(40, 40, 16, True).tolist()
    assert m[0, 0].tolist() == ref_forced(40, 40, 16, True).tolist()


@pytest.mark.parametrize("Lq,Lk", [(12, 12), (5, 17)])
def test_dense_matches_sdpa(gen, Lq, Lk):
    q = torch.randn(1, 2, Lq, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, Lk, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, Lk, 8, generator=gen, dtype=torch.float64)
    r = torch.arange(Lq)[:, None] + Lk - Lq
    allowed = torch.arange(Lk)[None, :] <= r
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(ref_dense_attention(q, k, v, causal=True), expected)
    full = torch.ones(1, 1, cdiv(Lq, 4), cdiv(Lk, 4), dtype=torch.bool)
    torch.testing.assert_close(ref_sparse_attention(q, k, v, full, 4, True), expected)
    expected_nc = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(ref_dense_attention(q, k, v, causal=False), expected_nc)


@pytest.mark.parametrize("causal", [True, False])
def test_token_mask_matches_loops(gen, causal):
    Lq, Lk, Bs = 13, 30, 4
    bm = torch.rand(cdiv(Lq, Bs), cdiv(Lk, Bs), generator=gen) < 0.5
    vis = ref_token_mask(bm, Lq, Lk, Bs, causal)
    for r in range(Lq):
        for c in range(Lk):
            exp = bool(bm[r // Bs, c // Bs]) and (not causal or c <= Lk - Lq + r)
            assert bool(vis[r, c]) == exp
