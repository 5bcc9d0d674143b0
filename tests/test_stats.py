"""block_density: kept blocks / candidate blocks (candidates as in docs/design.md §8)."""

import pytest
import torch
from inputs import random_scores
from reference import cdiv, ref_candidates, ref_density, ref_forced

from xattention import block_density, select_blocks


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", [(64, 64, 16), (45, 100, 16), (77, 77, 8)])
def test_density_matches_reference(gen, shape, causal):
    q_len, k_len, bs = shape
    s = random_scores(gen, 2, 3, q_len, k_len, bs, causal)
    mask = select_blocks(
        s,
        threshold=torch.tensor([0.3, 0.7, 0.95]),
        q_len=q_len,
        k_len=k_len,
        block_size=bs,
        causal=causal,
        backend="torch",
    )
    d = block_density(mask, q_len, k_len, block_size=bs, causal=causal)
    overall, per_head = ref_density(mask, q_len, k_len, bs, causal)
    assert set(d) >= {"overall", "per_head"}
    assert isinstance(d["overall"], float)
    assert isinstance(d["per_head"], torch.Tensor) and d["per_head"].shape == (3,)
    assert d["overall"] == pytest.approx(overall, rel=1e-6)
    torch.testing.assert_close(d["per_head"].double(), per_head, rtol=1e-6, atol=1e-7)
    assert d["per_head"][0] < d["per_head"][2]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_density_of_all_candidates_is_one(causal):
    q_len, k_len, bs = 45, 100, 16
    cand = ref_candidates(q_len, k_len, bs, causal)
    mask = cand.expand(1, 2, *cand.shape).clone()
    d = block_density(mask, q_len, k_len, block_size=bs, causal=causal)
    assert d["overall"] == pytest.approx(1.0)
    torch.testing.assert_close(d["per_head"].double(), torch.ones(2, dtype=torch.float64))


def test_density_counts_candidates_not_the_full_grid():
    q_len = k_len = 64
    bs = 16
    forced = ref_forced(q_len, k_len, bs, True)
    mask = forced.expand(1, 1, 4, 4).clone()
    d = block_density(mask, q_len, k_len, block_size=bs, causal=True)
    # forced: 1 + 2 + 2 + 2 = 7 blocks; causal candidates: 1 + 2 + 3 + 4 = 10
    assert d["overall"] == pytest.approx(7 / 10)
    d = block_density(mask, q_len, k_len, block_size=bs, causal=False)
    assert d["overall"] == pytest.approx(7 / 16)


def test_density_per_head_values_hand_example():
    q_len, k_len, bs = 32, 48, 16  # causal candidates: row0 -> blocks 0,1 ; row1 -> 0,1,2
    mask = torch.zeros(2, 2, 2, 3, dtype=torch.bool)
    mask[:, 0, :, 0] = True  # head 0: 2 kept per batch of 5 candidates
    mask[0, 1] = torch.tensor([[True, True, False], [True, True, True]])  # head 1 batch 0: 5/5
    mask[1, 1] = torch.tensor([[True, False, False], [True, False, True]])  # head 1 batch 1: 3/5
    assert cdiv(q_len, bs) == 2
    d = block_density(mask, q_len, k_len, block_size=bs, causal=True)
    torch.testing.assert_close(
        d["per_head"].double(), torch.tensor([4 / 10, 8 / 10], dtype=torch.float64)
    )
    assert d["overall"] == pytest.approx(12 / 20)


def test_density_ignores_non_candidate_blocks_of_user_masks():
    """An all-True causal mask keeps every candidate: density 1 (blocks above the diagonal are
    not candidates, so they are neither kept nor counted)."""
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    d = block_density(mask, 64, 64, block_size=16, causal=True)
    assert d["overall"] == pytest.approx(1.0)
    torch.testing.assert_close(d["per_head"].double(), torch.ones(2, dtype=torch.float64))
