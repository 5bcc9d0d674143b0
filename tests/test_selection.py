"""select_blocks vs the literal per-row reference (docs/design.md §2.4)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inputs import random_scores, robust_random_scores
from reference import (
    cdiv,
    ref_block_scores,
    ref_candidates,
    ref_forced,
    ref_select,
    robust_rows,
)

from xattention import estimate_block_scores, select_blocks

# (q_len, k_len, block_size): square, odd, chunked aligned / unaligned (diagonal band on 2 blocks)
SHAPES = [
    (64, 64, 16),
    (77, 77, 16),
    (45, 100, 16),
    (48, 112, 16),
    (100, 237, 32),
    (1, 50, 16),
    (130, 130, 8),
]
THRESHOLDS = [0.05, 0.3, 0.7, 0.9, 0.95, 0.99]


def _select(scores, threshold, q_len, k_len, bs, causal, backend):
    return select_blocks(scores, threshold=threshold, q_len=q_len, k_len=k_len, block_size=bs,
                         causal=causal, backend=backend)


def _small(backend):
    """The interpreter runs one program per block row and is slow: keep those runs tiny."""
    return backend == "triton"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}b{c}" for a, b, c in SHAPES])
def test_select_matches_reference_random_scores(backend, gen, shape, causal):
    q_len, k_len, bs = shape
    B, H, thresholds = 2, 3, THRESHOLDS
    if _small(backend):
        if cdiv(q_len, bs) > 4:
            pytest.skip("too many block rows for the interpreter")
        B, H, thresholds = 1, 1, [0.3 if causal else 0.9]  # one threshold per direction
    for thr in thresholds:
        s = robust_random_scores(gen, B, H, q_len, k_len, bs, causal, thr)
        got = _select(s, thr, q_len, k_len, bs, causal, backend)
        exp = ref_select(s, thr, q_len, k_len, bs, causal)
        assert got.dtype == torch.bool
        assert got.shape == s.shape
        assert torch.equal(got, exp), f"threshold={thr}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_select_per_head_threshold_tensor(backend, gen, causal):
    q_len, k_len, bs = (20, 100, 16) if _small(backend) else (70, 150, 16)
    B = 1 if _small(backend) else 2
    thr = torch.tensor([0.2, 0.6, 0.9, 0.99])
    s = robust_random_scores(gen, B, 4, q_len, k_len, bs, causal, thr)
    got = _select(s, thr, q_len, k_len, bs, causal, backend)
    assert torch.equal(got, ref_select(s, thr, q_len, k_len, bs, causal))
    for h in [0, 3] if _small(backend) else range(4):  # same as a float threshold head by head
        one = _select(s[:, h : h + 1], float(thr[h]), q_len, k_len, bs, causal, backend)
        assert torch.equal(got[:, h : h + 1], one)
    # the per-head thresholds are really used per head (not e.g. their mean or first entry)
    assert not torch.equal(got[:, 0], got[:, 3])


def test_select_per_head_threshold_float64_tensor(backend, gen):
    thr = torch.tensor([0.5, 0.95], dtype=torch.float64)
    s = robust_random_scores(gen, 1, 2, 64, 64, 16, True, thr)
    got = _select(s, thr, 64, 64, 16, True, backend)
    assert torch.equal(got, ref_select(s, thr, 64, 64, 16, True))


@pytest.mark.parametrize("thr", [1.0, 1.0 + 1e-6, 2.5], ids=["1", "1+eps", "2.5"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_threshold_ge_one_keeps_every_candidate(backend, gen, thr, causal):
    q_len, k_len, bs = 45, 100, 16
    s = random_scores(gen, 2, 2, q_len, k_len, bs, causal)
    # zero-score candidates must be kept too ("threshold >= 1 keeps every candidate")
    cand = ref_candidates(q_len, k_len, bs, causal)
    s[0, 0, :, -1] = 0.0
    s[1, 1, 0, :] = torch.where(cand[0], torch.tensor(0.0), s[1, 1, 0, :])
    s[1, 1, 0, 0] = 1.0
    # and rows whose float32 sum is not exactly 1
    s[0, 1] *= 1.0000001
    if _small(backend):
        s = s[:, :1]
    got = _select(s, thr, q_len, k_len, bs, causal, backend)
    assert torch.equal(got, cand.expand_as(got))


def test_tiny_threshold_keeps_exactly_the_forced_blocks_causal(backend, gen):
    shapes = [(64, 64, 16), (45, 100, 16), (20, 45, 16), (100, 237, 32)]
    if _small(backend):
        shapes = [(45, 100, 16), (20, 45, 16)]
    for q_len, k_len, bs in shapes:
        s = random_scores(gen, 1, 1 if _small(backend) else 2, q_len, k_len, bs, True)
        got = _select(s, 1e-6, q_len, k_len, bs, True, backend)
        forced = ref_forced(q_len, k_len, bs, True)
        assert torch.equal(got, forced.expand_as(got)), (q_len, k_len, bs)


def test_forced_band_spans_two_blocks_hand_example(backend):
    # Lq=20, Lk=45, Bs=16: p(r) = 25 + r; block 0 holds p in 25..40 -> key blocks 1 and 2.
    s = torch.zeros(1, 1, 2, 3)
    s[0, 0, 0] = torch.tensor([0.0, 0.01, 0.99])  # sink gets no score at all: still forced
    s[0, 0, 1] = torch.tensor([0.0, 0.99, 0.01])
    got = _select(s, 0.5, 20, 45, 16, True, backend)
    assert got[0, 0].tolist() == [[True, True, True], [True, True, True]]
    got = _select(s, 1e-3, 20, 45, 16, True, backend)
    assert got[0, 0].tolist() == [[True, True, True], [True, False, True]]


def test_tiny_threshold_noncausal_keeps_the_top_block(backend, gen):
    B, H = (1, 1) if _small(backend) else (2, 2)
    s = random_scores(gen, B, H, 77, 77, 16, False)
    got = _select(s, 1e-6, 77, 77, 16, False, backend)
    assert (got.sum(-1) == 1).all()
    assert torch.equal(got.float().argmax(-1), s.argmax(-1))


def test_ties_go_to_lower_block_index(backend):
    # non-causal, 1 query block, 6 key blocks, equal scores: keeps the lowest indices
    s = torch.full((1, 1, 1, 6), 1 / 6)
    got = _select(s, 0.4, 10, 96, 16, False, backend)
    # cum before j0 = 0, j1 = 1/6, j2 = 2/6 < 0.4 -> keep; j3: 3/6 >= 0.4 -> stop
    assert got[0, 0, 0].tolist() == [True, True, True, False, False, False]
    s = torch.tensor([0.1, 0.3, 0.1, 0.3, 0.1, 0.1]).reshape(1, 1, 1, 6)
    got = _select(s, 0.65, 10, 96, 16, False, backend)
    # order: j1 (0.3), j3 (0.3), j0 (0.1), j2, j4, j5; cum before j0 = 0.6 < 0.65 -> keep j0
    assert got[0, 0, 0].tolist() == [True, True, False, True, False, False]


def test_cumulative_rule_is_strictly_less_than(backend):
    # cum before the 3rd block equals threshold * total exactly (dyadic values): not kept
    s = torch.tensor([0.25, 0.25, 0.25, 0.25]).reshape(1, 1, 1, 4)
    got = _select(s, 0.5, 4, 64, 16, False, backend)
    assert got[0, 0, 0].tolist() == [True, True, False, False]


def test_forced_blocks_count_toward_cumulative(backend):
    # causal Lq=Lk=64, Bs=16, last query block: forced = sink (0) and diagonal (3)
    s = torch.zeros(1, 1, 4, 4)
    s[0, 0, 3] = torch.tensor([0.5, 0.125, 0.125, 0.25])
    s[0, 0, :3, 0] = 1.0
    got = _select(s, 0.75, 64, 64, 16, True, backend)
    # forced mass 0.75 is not < 0.75: nothing else kept
    assert got[0, 0, 3].tolist() == [True, False, False, True]
    got = _select(s, 0.8, 64, 64, 16, True, backend)
    # 0.75 < 0.8 -> keep j1 (tie with j2, lower j first); then 0.875 >= 0.8 stop
    assert got[0, 0, 3].tolist() == [True, True, False, True]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_selection_is_invariant_to_row_scaling(backend, gen, causal):
    """The rule compares with threshold * row total, so positive row scaling changes nothing."""
    q_len, k_len, bs = (40, 150, 16) if _small(backend) else (77, 150, 16)
    H = 1 if _small(backend) else 3
    s = robust_random_scores(gen, 1, H, q_len, k_len, bs, causal, 0.8)
    a = _select(s, 0.8, q_len, k_len, bs, causal, backend)
    b = _select(s * 4.0, 0.8, q_len, k_len, bs, causal, backend)  # exact in float
    assert torch.equal(a, b)
    f = torch.rand(1, H, s.shape[2], 1, generator=gen) * 10 + 0.1
    c = _select(s * f, 0.8, q_len, k_len, bs, causal, backend)
    ok = robust_rows(s * f, 0.8, q_len, k_len, bs, causal, tol=1e-5)
    exp = ref_select(s * f, 0.8, q_len, k_len, bs, causal)
    assert torch.equal(c[ok], exp[ok])
    assert ok.float().mean() >= 0.5


def test_non_candidates_never_kept_even_with_nonzero_scores(backend, gen):
    q_len, k_len, bs = (32, 96, 16) if _small(backend) else (64, 96, 16)
    B = 1 if _small(backend) else 2
    s = random_scores(gen, B, 2, q_len, k_len, bs, True, zero_noncand=False)
    cand = ref_candidates(q_len, k_len, bs, True)
    for thr in [0.5, 0.99, 1.0]:
        got = _select(s, thr, q_len, k_len, bs, True, backend)
        assert not (got & ~cand).any(), thr


def test_select_does_not_modify_scores(backend, gen):
    s = random_scores(gen, 1, 2, 32, 32, 16, True)
    s0 = s.clone()
    _select(s, 0.9, 32, 32, 16, True, backend)
    assert torch.equal(s, s0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_every_row_keeps_at_least_one_block(backend, gen, causal):
    shapes = SHAPES
    if _small(backend):
        shapes = [x for x in SHAPES if cdiv(x[0], x[2]) <= 3]
    for q_len, k_len, bs in shapes:
        s = random_scores(gen, 1, 1 if _small(backend) else 2, q_len, k_len, bs, causal)
        for thr in [1e-4, 0.95] if _small(backend) else [1e-4, 0.5, 0.95]:
            got = _select(s, thr, q_len, k_len, bs, causal, backend)
            assert got.any(-1).all()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
)
@given(
    q_len=st.integers(1, 100),
    extra=st.integers(0, 90),
    bs=st.sampled_from([4, 8, 16, 24]),
    causal=st.booleans(),
    thr=st.one_of(st.floats(0.01, 0.999), st.floats(1.0, 3.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_select_matches_reference_hypothesis(q_len, extra, bs, causal, thr, seed):
    """PyTorch path only (the interpreter is too slow for many examples)."""
    k_len = q_len + extra
    g = torch.Generator().manual_seed(seed)
    s = robust_random_scores(g, 1, 2, q_len, k_len, bs, causal, thr)
    got = _select(s, thr, q_len, k_len, bs, causal, "torch")
    assert torch.equal(got, ref_select(s, thr, q_len, k_len, bs, causal))


# ---------------------------------------------------------------------- on estimate outputs

EST_CASES = [
    # B, Hq, Hkv, Lq, Lk, D, Bs, S
    (1, 2, 2, 96, 96, 16, 16, 4),
    (1, 4, 2, 70, 150, 16, 16, 8),
    (2, 2, 1, 45, 100, 16, 16, 4),
    (1, 2, 2, 130, 130, 32, 8, 8),
]
SMALL_EST_CASE = (1, 2, 1, 40, 70, 16, 16, 4)


def _est_case(backend, i):
    if _small(backend):
        if i:
            pytest.skip("one small case on the interpreter")
        return SMALL_EST_CASE
    return EST_CASES[i]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("i", range(len(EST_CASES)), ids=[str(i) for i in range(len(EST_CASES))])
def test_select_on_estimate_outputs(backend, make_qkv, i, causal):
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _est_case(backend, i)
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    scores = estimate_block_scores(q, k, stride=S, block_size=Bs, causal=causal, backend="torch")
    thresholds = [0.5, 0.9, 0.97, torch.linspace(0.6, 0.99, Hq)]
    if _small(backend):
        thresholds = [0.9, torch.linspace(0.6, 0.99, Hq)]
    ref_scores = ref_block_scores(q, k, S, Bs, causal=causal)
    for thr in thresholds:
        got = _select(scores, thr, Lq, Lk, Bs, causal, backend)
        exp = ref_select(scores, thr, Lq, Lk, Bs, causal)
        ok = robust_rows(scores, thr, Lq, Lk, Bs, causal, tol=1e-6)
        assert ok.float().mean() >= 0.9
        assert torch.equal(got[ok], exp[ok]), f"threshold={thr}"
        # and against the float64 reference estimate (rows robust to the estimate's error)
        exp64 = ref_select(ref_scores, thr, Lq, Lk, Bs, causal)
        ok64 = robust_rows(ref_scores, thr, Lq, Lk, Bs, causal, tol=1e-4)
        assert torch.equal(got[ok64], exp64[ok64]), f"threshold={thr}"


@pytest.mark.parametrize("i", range(len(EST_CASES)), ids=[str(i) for i in range(len(EST_CASES))])
def test_kept_mass_reaches_threshold_and_is_minimal(backend, make_qkv, i):
    """kept mass >= thr * total, and dropping the weakest kept non-forced block falls below."""
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _est_case(backend, i)
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    scores = estimate_block_scores(q, k, stride=S, block_size=Bs, causal=True, backend="torch")
    s = scores.double()
    cand = ref_candidates(Lq, Lk, Bs, True)
    forced = ref_forced(Lq, Lk, Bs, True)
    for thr in [0.3, 0.8, 0.95] if not _small(backend) else [0.3, 0.95]:
        got = _select(scores, thr, Lq, Lk, Bs, True, backend)
        ok = robust_rows(scores, thr, Lq, Lk, Bs, True, tol=1e-6)
        total = (s * cand).sum(-1)
        kept = (s * got).sum(-1)
        assert (kept[ok] >= thr * total[ok]).all()
        nonforced_kept = got & ~forced
        weakest = torch.where(nonforced_kept, s, torch.full_like(s, float("inf"))).min(-1).values
        has = nonforced_kept.any(-1) & ok
        assert ((kept - weakest)[has] < thr * total[has]).all()
        # every non-forced kept block scores at least as much as every dropped candidate
        dropped = cand & ~got
        strongest_dropped = torch.where(dropped, s, torch.full_like(s, -1.0)).max(-1).values
        assert (weakest[has] >= strongest_dropped[has]).all()
        assert cdiv(Lq, Bs) == got.shape[2]
