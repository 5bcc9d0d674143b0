"""The PyTorch block-sparse path: it skips dropped blocks, batches rows of equal kept count, and
stays exact to the float64 oracle on the masks where that is hardest (see docs/design.md)."""

import math

import pytest
import torch
from inputs import OUT_TOL
from reference import cdiv, ref_candidates, ref_forced, ref_sparse_attention, ref_token_mask

import xattention.sparse_attention as sa
from xattention import block_sparse_attention

FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["fused", "explicit"])
def softmax_path(request, monkeypatch):
    """Both ways the wholly visible blocks are attended: torch's fused CPU kernel or the explicit
    softmax (used off the CPU, or where torch lacks the kernel)."""
    if request.param == "explicit":
        monkeypatch.setattr(sa, "_fused_cpu_kernel", lambda: None)
    return request.param


@pytest.fixture
def tiny_chunks(monkeypatch):
    """A chunk budget of one item, so that every group of equal count splits into many chunks."""
    monkeypatch.setattr(sa, "_CHUNK_ELEMENTS", 1)


def _run(q, k, v, mask, bs, causal, **kw):
    return block_sparse_attention(q, k, v, mask, block_size=bs, causal=causal, backend="torch",
                                  **kw)


def _assert_exact(out, q, k, v, mask, bs, causal):
    torch.testing.assert_close(out.double(), ref_sparse_attention(q, k, v, mask, bs, causal),
                               **FP32)


def _ref_lse(q, k, mask, bs, causal):
    """float64 log-sum-exp [B, Hq, Lq] of the visible logits (-inf where a row sees nothing)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    mask = mask.expand(b, hq, -1, -1)
    out = torch.empty(b, hq, lq, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            vis = ref_token_mask(mask[bi, h], lq, lk, bs, causal)
            logits = q[bi, h].double() @ k[bi, h // (hq // hkv)].double().T / math.sqrt(d)
            out[bi, h] = torch.logsumexp(logits.masked_fill(~vis, float("-inf")), -1)
    return out


def _equal_count_mask(gen, b, h, lq, lk, bs, causal, count):
    """Every row keeps exactly ``count`` candidates (all when fewer), forced blocks among them."""
    cand = ref_candidates(lq, lk, bs, causal)
    forced = ref_forced(lq, lk, bs, causal)
    score = torch.rand(b, h, *cand.shape, generator=gen) + 2.0 * forced
    score = score.masked_fill(~cand, -1.0)
    top = score.topk(min(count, cand.shape[1]), dim=-1).indices
    mask = torch.zeros(b, h, *cand.shape, dtype=torch.bool).scatter_(-1, top, True)
    return mask & cand


@pytest.mark.parametrize("lq,lk,bs,causal", [
    (77, 77, 16, True),  # odd lengths: short last query and key block
    (45, 100, 16, True),  # Lq < Lk, offset not a multiple of Bs: a two-block diagonal band
    (48, 112, 16, True),  # Lq < Lk, aligned offset
    (61, 83, 16, False),  # non-causal with a short last key block
])
def test_equal_counts_in_many_chunks(make_qkv, gen, softmax_path, tiny_chunks, lq, lk, bs, causal):
    q, k, v = make_qkv(2, 4, 2, lq, lk, 16)
    mask = _equal_count_mask(gen, 2, 4, lq, lk, bs, causal, count=3)
    out, lse = _run(q, k, v, mask, bs, causal, return_lse=True)
    _assert_exact(out, q, k, v, mask, bs, causal)
    torch.testing.assert_close(lse.double(), _ref_lse(q, k, mask, bs, causal), **FP32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("lq,lk", [(70, 70), (33, 90)])
def test_all_blocks_kept_is_dense(make_qkv, softmax_path, causal, lq, lk):
    q, k, v = make_qkv(1, 6, 2, lq, lk, 32)
    mask = torch.ones(1, 1, cdiv(lq, 16), cdiv(lk, 16), dtype=torch.bool)
    out = _run(q, k, v, mask, 16, causal)
    _assert_exact(out, q, k, v, mask, 16, causal)


@pytest.mark.parametrize("lq,lk,causal", [(50, 50, True), (40, 75, True), (50, 70, False)])
def test_one_block_per_row(make_qkv, gen, softmax_path, lq, lk, causal):
    """One kept block per row: the diagonal block (causal) or a random one (non-causal)."""
    q, k, v = make_qkv(1, 2, 1, lq, lk, 16)
    nqb, nkb = cdiv(lq, 16), cdiv(lk, 16)
    mask = torch.zeros(1, 2, nqb, nkb, dtype=torch.bool)
    if causal:  # the block holding each query block's first position: every row sees a key
        first = torch.arange(nqb) * 16 + (lk - lq)
        mask[..., torch.arange(nqb), first // 16] = True
    else:
        mask.scatter_(-1, torch.randint(nkb, (1, 2, nqb, 1), generator=gen), True)
    out = _run(q, k, v, mask, 16, causal)
    _assert_exact(out, q, k, v, mask, 16, causal)


def test_very_uneven_rows(make_qkv, gen, softmax_path):
    """Rows keeping every candidate next to rows keeping the sink only, in every head."""
    lq, lk, bs = 90, 130, 16
    q, k, v = make_qkv(2, 4, 1, lq, lk, 16)
    cand = ref_candidates(lq, lk, bs, True)
    mask = torch.zeros(2, 4, *cand.shape, dtype=torch.bool)
    mask[..., 0] = True
    dense_rows = torch.rand(2, 4, cand.shape[0], generator=gen) < 0.5
    mask |= dense_rows[..., None] & cand
    out = _run(q, k, v, mask, bs, True)
    _assert_exact(out, q, k, v, mask, bs, True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(make_qkv, gen, softmax_path, dtype):
    q, k, v = make_qkv(1, 4, 2, 75, 99, 32, dtype=dtype)
    mask = _equal_count_mask(gen, 1, 4, 75, 99, 16, True, count=3)
    out = _run(q, k, v, mask, 16, True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_sparse_attention(q, k, v, mask, 16, True),
                               **OUT_TOL[dtype])


def test_work_is_proportional_to_kept_blocks(make_qkv, gen, monkeypatch):
    """The attention calls see exactly the kept candidate keys: dropped blocks are never read."""
    lq = lk = 96
    q, k, v = make_qkv(1, 2, 1, lq, lk, 16)
    mask = _equal_count_mask(gen, 1, 2, lq, lk, 16, True, count=2)
    mask[0, 0, -1] = True  # one row keeps everything
    pairs = []
    for name in ("_fused_part", "_masked_part"):
        original = getattr(sa, name)

        def counted(qs, ks, *rest, _original=original, **kw):
            pairs.append(qs.shape[0] * qs.shape[1] * ks.shape[1])
            return _original(qs, ks, *rest, **kw)

        monkeypatch.setattr(sa, name, counted)
    _run(q, k, v, mask, 16, True)
    kept = (mask & ref_candidates(lq, lk, 16, True)).sum().item()
    assert sum(pairs) == kept * 16 * 16


def test_rows_that_see_no_key_are_zero_with_minus_inf_lse(make_qkv):
    """Only a user mask can do this: with Lk - Lq not a multiple of Bs, keeping only the upper
    block of the diagonal band hides every key from the block's first rows."""
    lq, lk, bs = 32, 40, 16  # query block 0 sits at positions 8..23: band = key blocks 0 and 1
    q, k, v = make_qkv(1, 2, 1, lq, lk, 16)
    mask = torch.zeros(1, 1, 2, 3, dtype=torch.bool)
    mask[..., 0, 1] = True  # keys 16..31: rows 0..7 (positions 8..15) see none of them
    mask[..., 1, :] = True
    out, lse = _run(q, k, v, mask, bs, True, return_lse=True)
    assert (out[:, :, :8] == 0).all() and torch.isneginf(lse[:, :, :8]).all()
    assert torch.isfinite(out[:, :, 8:]).all() and torch.isfinite(lse[:, :, 8:]).all()
    full = ref_sparse_attention(q[:, :, 8:], k, v, torch.ones(1, 1, 2, 3, dtype=torch.bool),
                                bs, True)
    torch.testing.assert_close(out[:, :, 16:].double(), full[:, :, 8:], **FP32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_in_a_kept_key_reaches_the_rows_that_see_it(make_qkv, softmax_path, bad):
    """A NaN (or inf) must come out where dense attention would put it, never as a plausible
    number, and rows that cannot see it stay finite (the fused diagonal's additive mask would
    turn it into NaN there: that path must step aside)."""
    lq = lk = 64
    q, k, v = make_qkv(1, 2, 1, lq, lk, 16)
    k[0, 0, 20, 3] = bad  # key block 1
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 0] = True
    mask[..., torch.arange(4), torch.arange(4)] = True
    mask[..., 3, 1] = True  # query block 3 also reads key block 1
    out = _run(q, k, v, mask, 16, True)
    sees_nan = torch.zeros(lq, dtype=torch.bool)
    sees_nan[20:32] = True  # the diagonal block 1, rows at or after the NaN key
    sees_nan[48:] = True
    if math.isnan(bad):
        assert out[:, :, sees_nan].isnan().all()
    else:  # q . inf is +-inf: a row whose logit is -inf gives the key no weight, as dense does
        ref = ref_sparse_attention(q, k, v, mask, 16, True)
        assert torch.equal(torch.isfinite(out[:, :, sees_nan]), torch.isfinite(ref[:, :, sees_nan]))
        assert not torch.isfinite(out[:, :, sees_nan]).all()
    assert torch.isfinite(out[:, :, ~sees_nan]).all()


@pytest.mark.parametrize("budget", [1, 5, 40, 10**9])
def test_chunks_cover_every_item_once_within_budget(budget):
    groups, sizes = [0, 3, 4, 9], [2, 7, 1, 5]
    cost = {0: 1, 3: 4, 4: 9, 9: 6}
    chunks = list(sa._chunks(groups, sizes, cost.__getitem__, budget))
    start, seen = 0, []
    for first, pieces in chunks:
        assert first == start and pieces
        used = sum(cost[g] * c for g, c in pieces)
        assert used <= budget or sum(c for _, c in pieces) == 1
        start += sum(c for _, c in pieces)
        seen += [g for g, c in pieces for _ in range(c)]
    assert seen == [g for g, c in zip(groups, sizes, strict=True) for _ in range(c)]
    if budget >= sum(cost[g] * c for g, c in zip(groups, sizes, strict=True)):
        assert len(chunks) == 1


@pytest.mark.parametrize("lq,lk", [(96, 96), (64, 112), (77, 77)])
def test_aligned_causal_diagonal_is_one_masked_fused_call_per_group(make_qkv, gen, monkeypatch,
                                                                     lq, lk):
    """Query blocks aligned with key blocks: each group (equal count) is one fused call whose
    broadcast mask hides the diagonal's future keys, exact to the oracle."""
    if sa._fused_cpu_kernel() is None:
        pytest.skip("this torch has no fused CPU attention kernel")
    q, k, v = make_qkv(1, 2, 1, lq, lk, 16)
    mask = _equal_count_mask(gen, 1, 2, lq, lk, 16, True, count=3)
    calls = []
    original = sa._fused_part

    def counted(qs, ks, vs, scale, mask=None):
        calls.append(mask is not None)
        return original(qs, ks, vs, scale, mask=mask)

    monkeypatch.setattr(sa, "_fused_part", counted)
    monkeypatch.setattr(sa, "_masked_part", lambda *a, **kw: pytest.fail("explicit softmax used"))
    out = _run(q, k, v, mask, 16, True)
    _assert_exact(out, q, k, v, mask, 16, True)
    counts = (mask & ref_candidates(lq, lk, 16, True)).sum(-1).unique()
    assert len(calls) == counts.numel() and all(calls)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_every_block_dropped_gives_zeros_and_minus_inf_lse(make_qkv, softmax_path, causal):
    """A user mask that keeps nothing (every group has zero blocks) is the FlashAttention
    convention everywhere, not a crash."""
    q, k, v = make_qkv(1, 2, 1, 64, 64, 16)
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    out, lse = _run(q, k, v, mask, 16, causal, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def _minus_inf_logits(gen, causal):
    """Every row that sees key 16 gets a -inf logit to it (k holds +inf there, q the opposite
    sign): dense attention gives that key weight 0 and the rows stay finite."""
    q, k, v = (torch.randn(1, 2, 32, 16, generator=gen) for _ in range(3))
    k[0, :, 16, 0] = math.inf
    q[0, :, 16 if causal else 0:, 0] = -1.0
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
def test_minus_inf_logits_weigh_nothing(softmax_path, gen, causal):
    """Key 16 opens the causal diagonal block of rows 16..31, where it is the only key row 16
    sees: that partial part has no mass and must add nothing (it once made the row NaN)."""
    q, k, v = _minus_inf_logits(gen, causal)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    out, lse = block_sparse_attention(q, k, v, mask, block_size=16, causal=causal,
                                      backend="torch", return_lse=True)
    ref = ref_sparse_attention(q.double(), k.double(), v.double(), mask[0], 16, causal)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out.double(), ref, **FP32)
    assert torch.isfinite(lse).all()


def test_a_part_whose_logits_are_all_minus_inf_has_no_mass(softmax_path, gen):
    """Every logit of a part -inf: dense attention over that part alone is NaN, and its
    log-sum-exp says "no mass" (-inf), so that merged with a finite part it adds nothing
    (torch's fused CPU kernel reports output 0 with lse 0, a mass of 1: it is not used then)."""
    from xattention import merge_attention

    q = torch.randn(1, 1, 16, 16, generator=gen)
    q[..., 0] = -1.0
    k_a, v_a, k_b, v_b = (torch.randn(1, 1, 16, 16, generator=gen) for _ in range(4))
    k_a[..., 0] = math.inf
    whole = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    for causal in (False, True):
        out_a, lse_a = block_sparse_attention(q, k_a, v_a, whole, block_size=16, causal=causal,
                                              backend="torch", return_lse=True)
        assert torch.isnan(out_a).all() and (lse_a == -math.inf).all()  # as dense: NaN rows
    out_b, lse_b = block_sparse_attention(q, k_b, v_b, whole, block_size=16, causal=False,
                                          backend="torch", return_lse=True)
    merged = merge_attention([(out_a, lse_a), (out_b, lse_b)])
    k, v = torch.cat([k_a, k_b], 2).double(), torch.cat([v_a, v_b], 2).double()
    dense = torch.softmax(q.double() @ k.transpose(-1, -2) / 4, -1) @ v
    torch.testing.assert_close(merged.double(), dense, **FP32)


def test_a_nan_value_behind_an_underflowing_weight_stays_nan(softmax_path, gen):
    """Rows 17..31 see a NaN in v (key 17, in their diagonal block) through a weight that
    underflows to 0 in float32 (block 0's logits are 200 larger): dense attention's 0 * NaN is
    NaN, so the merge of the parts must keep it (only a part without mass, lse -inf, adds
    nothing). Rows that cannot see it may be NaN too (docs/design.md §4)."""
    q, k, v = (torch.randn(1, 1, 32, 16, generator=gen) for _ in range(3))
    q[..., 0], k[..., 0] = 20.0, 0.0
    k[:, :, :16, 0] = 40.0  # logits to block 0: 800 / sqrt(16) = 200 above the diagonal's
    v[0, 0, 17, 3] = math.nan
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, mask, block_size=16, causal=True, backend="torch")
    assert not torch.isfinite(out[0, 0, 17:]).all(-1).any()
