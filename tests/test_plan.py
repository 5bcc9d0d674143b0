"""BlockLayout and SparsePlan: the layout predicates, the plan the selection kernel writes, every
consumer of a plan against the float64 oracle, the LSE merge, and the core fixes that came with
them (empty batch, NumPy thresholds, the inf-in-v rows of docs/design.md §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from inputs import random_block_mask
from reference import (
    ref_block_scores,
    ref_candidates,
    ref_dense_attention,
    ref_forced,
    ref_select,
    ref_sparse_attention,
    ref_token_mask,
)

from xattention import (
    SparsePlan,
    block_density,
    block_sparse_attention,
    merge_attention,
    select_plan,
    xattention,
)
from xattention._backend import triton_import_error
from xattention.block_layout import BlockLayout
from xattention.selection import _nonfinite_blocks, _select_plan
from xattention.synthetic import structured_qkv

LAYOUTS = [(64, 64, 16), (70, 150, 16), (33, 100, 32), (100, 100, 24), (5, 77, 16), (16, 16, 16)]
LAYOUT_IDS = [f"{a}x{b}bs{c}" for a, b, c in LAYOUTS]


def needs_triton():
    if triton_import_error():
        pytest.skip(triton_import_error())


def ref_fully_visible(q_len, k_len, bs, causal):
    """Token-level: every row of query block i sees every key of block j."""
    nqb, nkb = -(-q_len // bs), -(-k_len // bs)
    ones = torch.ones(nqb, nkb, dtype=torch.bool)
    vis = ref_token_mask(ones, q_len, k_len, bs, causal)
    out = torch.zeros(nqb, nkb, dtype=torch.bool)
    for i in range(nqb):
        rows = vis[i * bs:(i + 1) * bs]
        for j in range(nkb):
            block = rows[:, j * bs:(j + 1) * bs]
            out[i, j] = block.shape[1] == bs and bool(block.all())
    return out


# ------------------------------------------------------------------------- BlockLayout


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk,bs", LAYOUTS, ids=LAYOUT_IDS)
def test_layout_predicates_match_token_level_definitions(lq, lk, bs, causal):
    lay = BlockLayout(lq, lk, bs, causal)
    assert (lay.num_q_blocks, lay.num_k_blocks) == (math.ceil(lq / bs), math.ceil(lk / bs))
    assert torch.equal(lay.candidate(), ref_candidates(lq, lk, bs, causal))
    assert torch.equal(lay.forced(), ref_forced(lq, lk, bs, causal))
    full = lay.fully_visible()
    assert torch.equal(full, ref_fully_visible(lq, lk, bs, causal))
    partial = (lay.candidate() & ~full).sum(-1)
    assert int(partial.max()) <= lay.max_partial_blocks


# ------------------------------------------------------------------------- SparsePlan


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk,bs", LAYOUTS, ids=LAYOUT_IDS)
def test_plan_from_mask_round_trips_and_drops_non_candidates(lq, lk, bs, causal, gen):
    lay = BlockLayout(lq, lk, bs, causal)
    mask = torch.rand(2, 3, lay.num_q_blocks, lay.num_k_blocks, generator=gen) < 0.5
    plan = SparsePlan.from_mask(mask, lay)
    cand, full = lay.candidate(), lay.fully_visible()
    assert torch.equal(plan.to_dense(), mask & cand)
    assert torch.equal(plan.full_count, (mask & cand & full).sum(-1, dtype=torch.int32))
    assert torch.equal(plan.partial_count, (mask & cand & ~full).sum(-1, dtype=torch.int32))
    for count, index in ((plan.full_count, plan.full_index),
                         (plan.partial_count, plan.partial_index)):
        for row_c, row_i in zip(count.flatten().tolist(), index.flatten(0, 2), strict=True):
            assert row_i[:row_c].tolist() == sorted(row_i[:row_c].tolist())  # ascending
            assert not row_i[row_c:].any()  # unused slots are block 0 (FA4 loads them)
    assert plan.check_contents() is plan  # every plan from_mask builds passes its own check
    ref_overall, ref_per_head = block_density(mask, lq, lk, bs, causal).values()
    assert plan.density() == pytest.approx(ref_overall)
    torch.testing.assert_close(plan.density_per_head(), ref_per_head)
    assert block_density(plan)["overall"] == pytest.approx(ref_overall)


def test_plan_expand_broadcasts_and_serves_gqa(gen):
    lay = BlockLayout(70, 150, 16, True)
    mask = torch.rand(1, 2, lay.num_q_blocks, lay.num_k_blocks, generator=gen) < 0.5
    plan = SparsePlan.from_mask(mask, lay)
    wide = plan.expand(3, 6)  # one plan head per GQA group of 3 query heads
    assert torch.equal(wide.to_dense(),
                       (mask & lay.candidate()).repeat_interleave(3, 1).expand(3, 6, -1, -1))
    one = SparsePlan.from_mask(mask[:, :1], lay).expand(2, 4)
    assert one.full_index.stride(0) == 0  # a view, no copy
    with pytest.raises(ValueError, match="cannot serve 5 heads"):
        plan.expand(1, 5)


def test_plan_validators_name_the_field():
    lay = BlockLayout(64, 64, 16, True)
    good = SparsePlan.from_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), lay)
    with pytest.raises(TypeError, match="full_index must be int32"):
        SparsePlan(lay, good.full_count, good.full_index.long(), good.partial_count,
                   good.partial_index)
    with pytest.raises(ValueError, match="partial_index must have shape"):
        SparsePlan(lay, good.full_count, good.full_index, good.partial_count,
                   good.full_index)
    with pytest.raises(TypeError, match="layout must be a BlockLayout"):
        SparsePlan((64, 64, 16, True), *list(vars(good).values())[1:])


def _edited(plan, **changes):
    fields = {n: getattr(plan, n).clone() for n in
              ("full_count", "full_index", "partial_count", "partial_index")}
    for name, (where, value) in changes.items():
        fields[name][where] = value
    return SparsePlan(plan.layout, **fields)


@pytest.mark.parametrize(("changes", "match"), [
    (dict(full_count=((0, 0, 3), 5)), r"full_count must lie in \[0, 4\]"),
    (dict(partial_count=((0, 0, 3), -1)), r"partial_count must lie in \[0, 2\]"),
    (dict(full_index=((0, 0, 3, 0), 7)), r"full_index holds a key block outside \[0, 4\)"),
    (dict(full_index=((0, 0, 3, 1), 0)), "strictly ascending"),
    (dict(partial_index=((0, 0, 1, 0), 3)), "not a partial block"),
    (dict(full_index=((0, 0, 3, 2), 3)), "not a fully visible block"),  # the diagonal as full
])
def test_hand_built_plan_contents_are_checked(changes, match):
    """The kernels trust a plan's lists: a hand-built one that breaks them is refused where a
    plan on the CPU enters block_sparse_attention (and by check_contents anywhere)."""
    lay = BlockLayout(64, 64, 16, True)
    good = SparsePlan.from_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), lay)
    bad = _edited(good, **changes)
    with pytest.raises(ValueError, match=match):
        bad.check_contents()
    q = k = v = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, bad, backend="torch")


def test_block_sparse_attention_checks_the_plan_against_the_call():
    q = k = v = torch.randn(1, 2, 64, 16)
    plan = SparsePlan.from_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool),
                                BlockLayout(64, 64, 16, True))
    with pytest.raises(ValueError, match=r"block_size \(32\) differs from the plan's"):
        block_sparse_attention(q, k, v, plan, block_size=32)
    with pytest.raises(ValueError, match=r"causal \(False\) differs"):
        block_sparse_attention(q, k, v, plan, causal=False)
    with pytest.raises(ValueError, match="the plan is for q_len=64"):
        block_sparse_attention(q[:, :, :32], k, v, SparsePlan.from_mask(
            torch.ones(1, 1, 4, 4, dtype=torch.bool), BlockLayout(64, 64, 16, True)))


# ------------------------------------------------------------ selection writes the plan


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk,bs", [(70, 150, 16), (100, 100, 16), (33, 100, 32)],
                         ids=["70x150", "100x100", "33x100bs32"])
def test_selection_kernel_plan_equals_plan_of_reference_mask(lq, lk, bs, causal, gen):
    """The kernel's plan (device copies of the layout predicates included) against the plan of
    the float64 reference selection, entry by entry, with every threshold regime."""
    needs_triton()
    lay = BlockLayout(lq, lk, bs, causal)
    s = torch.rand(2, 3, lay.num_q_blocks, lay.num_k_blocks, generator=gen)
    s = (s * lay.candidate()) / (s * lay.candidate()).sum(-1, keepdim=True)
    for thr in (1e-6, 0.5, 0.9, 1.0):
        got = _select_plan(s, thr, lay, "triton")
        want = SparsePlan.from_mask(ref_select(s, thr, lq, lk, bs, causal), lay)
        for name in ("full_count", "full_index", "partial_count", "partial_index"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (thr, name)


def test_public_select_plan_matches_select_blocks(gen):
    lay = BlockLayout(70, 150, 16, True)
    s = torch.rand(1, 2, lay.num_q_blocks, lay.num_k_blocks, generator=gen)
    plan = select_plan(s, 0.7, q_len=70, k_len=150, block_size=16, backend="torch")
    assert torch.equal(plan.to_dense(), ref_select(s * lay.candidate(), 0.7, 70, 150, 16, True))


# ---------------------------------------------------------------- consumers of the plan


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 4, 2, 70, 150, 32), (2, 2, 2, 100, 100, 16),
                                   (1, 6, 2, 33, 33, 64)], ids=["gqa-lq<lk", "mha", "gqa-odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sparse_attention_plan_equals_mask_and_oracle(backend, shape, causal, dtype, gen):
    b, hq, hkv, lq, lk, d = shape
    bs = 16
    q, k, v, _ = structured_qkv(b, hq, hkv, lq, lk, d, generator=gen, dtype=dtype)
    mask = random_block_mask(gen, b, hq, lq, lk, bs, causal)
    plan = SparsePlan.from_mask(mask, BlockLayout(lq, lk, bs, causal))
    out_m, lse_m = block_sparse_attention(q, k, v, mask, bs, causal, backend=backend,
                                          return_lse=True)
    out_p, lse_p = block_sparse_attention(q, k, v, plan, backend=backend, return_lse=True)
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(out_p, out_m, atol=tol, rtol=tol)
    torch.testing.assert_close(lse_p, lse_m, atol=tol, rtol=tol)
    ref = ref_sparse_attention(q, k, v, mask, bs, causal)
    torch.testing.assert_close(out_p.double(), ref, atol=tol * 2, rtol=tol * 2)


@pytest.mark.parametrize("causal", [True, False])
def test_xattention_lse_and_plan_against_the_oracle(backend, causal, gen):
    q, k, v, _ = structured_qkv(1, 4, 2, 70, 150, 32, generator=gen)
    out, lse, mask, plan = xattention(q, k, v, threshold=0.8, stride=4, block_size=16,
                                      causal=causal, backend=backend, return_lse=True,
                                      return_mask=True, return_plan=True)
    assert torch.equal(plan.to_dense(), mask)
    ref = ref_sparse_attention(q, k, v, mask, 16, causal)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    # The reference log-sum-exp of the visible pairs.
    scale = 32 ** -0.5
    kk = k.double().repeat_interleave(2, 1)
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    vis = torch.stack([ref_token_mask(mask[0, h], 70, 150, 16, causal) for h in range(4)])
    ref_lse = logits.masked_fill(~vis[None], -math.inf).logsumexp(-1)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)
    ref_scores = ref_block_scores(q, k, 4, 16, causal)
    assert ref_scores.shape == mask.shape


def test_estimate_kernel_writes_the_non_finite_flags(gen):
    needs_triton()
    from xattention.kernels.estimate import estimate_block_scores_triton

    q, k, v, _ = structured_qkv(1, 4, 2, 75, 150, 16, generator=gen)
    q[0, 1, 40, 3] = math.nan
    k[0, 0, 17, 0] = math.inf
    v[0, 1, 149, 5] = -math.inf
    v[0, 1, 64, 2] = math.nan
    _, (row_bad, key_bad) = estimate_block_scores_triton(q, k, 4, 16, True, 0.25, v=v)
    assert torch.equal(row_bad.bool(), _nonfinite_blocks(q, 16))
    assert torch.equal(key_bad.bool(), _nonfinite_blocks(k, 16) | _nonfinite_blocks(v, 16))


# ---------------------------------------------------------------------------- LSE merge


def test_merge_attention_equals_attention_over_the_union(gen):
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for n in (5, 9, 9))

    def part(sl):
        logits = q @ k[:, :, sl].transpose(-1, -2) / 8 ** 0.5
        return torch.softmax(logits, -1) @ v[:, :, sl], torch.logsumexp(logits, -1)

    out, lse = merge_attention([part(slice(0, 3)), part(slice(3, 7)), part(slice(7, 9))],
                               return_lse=True)
    logits = q @ k.transpose(-1, -2) / 8 ** 0.5
    torch.testing.assert_close(out, torch.softmax(logits, -1) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))


def test_merge_attention_non_finite_rows():
    o = torch.ones(1, 1, 3, 2)
    seen = torch.zeros(1, 1, 3)
    nothing = (torch.zeros(1, 1, 3, 2), torch.full((1, 1, 3), -math.inf))
    nan_row = o.clone()
    nan_row[0, 0, 1] = math.nan
    out = merge_attention([(nan_row, seen), nothing])
    assert torch.isnan(out[0, 0, 1]).all() and torch.isfinite(out[0, 0, [0, 2]]).all()
    out = merge_attention([nothing, nothing])  # no part saw a key: 0, not NaN
    assert torch.equal(out, torch.zeros_like(out))
    lse_nan = seen.clone()
    lse_nan[0, 0, 2] = math.nan
    assert torch.isnan(merge_attention([(o, lse_nan), (o, seen)])[0, 0, 2]).all()
    # A NaN behind a weight that underflows to 0 stays NaN (dense attention's 0 * NaN).
    far = torch.full((1, 1, 3), -200.0)
    assert torch.isnan(merge_attention([(o, seen), (nan_row, far)])[0, 0, 1]).all()
    # A part that saw only -inf logits (NaN output, lse -inf) adds nothing beside mass, and
    # alone gives NaN, as dense attention over its keys does.
    minus_inf = (torch.full((1, 1, 3, 2), math.nan), torch.full((1, 1, 3), -math.inf))
    assert torch.equal(merge_attention([(o, seen), minus_inf]), o)
    assert torch.isnan(merge_attention([minus_inf, nothing])).all()
    with pytest.raises(ValueError, match=r"parts\[1\]"):
        merge_attention([(o, seen), (o, seen[..., :2])])


# -------------------------------------------------------------------- core input fixes


def test_empty_batch_returns_empty_output_like_sdpa(backend):
    q, k, v = torch.randn(0, 4, 64, 16), torch.randn(0, 2, 64, 16), torch.randn(0, 2, 64, 16)
    out, lse, mask = xattention(q, k, v, block_size=16, stride=4, backend=backend,
                                return_lse=True, return_mask=True)
    assert out.shape == (0, 4, 64, 16) and lse.shape == (0, 4, 64) and mask.shape == (0, 4, 4, 4)
    assert block_sparse_attention(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool),
                                  block_size=16, backend=backend).shape == (0, 4, 64, 16)


@pytest.mark.parametrize("thr", [np.float32(0.9), np.float64(0.9), np.int64(1)],
                         ids=["np.float32", "np.float64", "np.int64"])
def test_numpy_threshold_is_accepted(thr):
    q = k = v = torch.randn(1, 2, 64, 16)
    want = xattention(q, k, v, threshold=float(thr), block_size=16, stride=4, backend="torch")
    got = xattention(q, k, v, threshold=thr, block_size=16, stride=4, backend="torch")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("thr", [True, np.bool_(True)], ids=["bool", "np.bool_"])
def test_bool_threshold_is_rejected(thr):
    q = k = v = torch.randn(1, 2, 64, 16)
    with pytest.raises(TypeError, match="^threshold must be a number"):
        xattention(q, k, v, threshold=thr, block_size=16, stride=4, backend="torch")


def test_block_density_causal_must_be_a_bool():
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(TypeError, match="^causal must be True or False"):
        block_density(mask, 256, 256, 128, causal="yes")
    with pytest.raises(TypeError, match="^mask must be a bool tensor"):
        block_density(mask.int(), 256, 256, 128)


def test_inf_in_v_follows_the_non_finite_rules_row_by_row():
    """Issue 20's case: with an inf in v, every row that can see that value must come out
    non-finite (as dense attention does); rows that cannot see it may be anything finite."""
    q, k, v, _ = structured_qkv(2, 8, 2, 233, 233, 16, seed=4)
    v[0, 0, 173, 4] = math.inf
    out = xattention(q, k, v, threshold=0.3, stride=8, block_size=32, backend="torch")
    dense = ref_dense_attention(q, k, v)
    # Query heads 0..3 share KV head 0; rows r >= 173 (causal) see key 173.
    sees = torch.zeros(2, 8, 233, dtype=torch.bool)
    sees[0, :4, 173:] = True
    assert not torch.isfinite(dense[sees][:, 4]).any()
    bad_rows = [(h, r) for h in range(4) for r in range(173, 233)
                if bool(torch.isfinite(out[0, h, r, 4]))]
    assert not bad_rows, f"rows that see v[0, 0, 173] came out finite: {bad_rows[:10]}"
    # Rows that cannot see it may be either (0 * inf in a partly hidden block is NaN, in dense
    # attention too); rows of other KV heads and batches never touch it and stay finite.
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[0, 4:]).all()
