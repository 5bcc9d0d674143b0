"""Scores and inputs that are not plain finite numbers (docs/design.md, "Selection on user scores"
and "Non-finite inputs"): a documented answer on either backend, never plausible numbers."""

import math

import pytest
import torch
from reference import (
    cdiv,
    ref_candidates,
    ref_dense_attention,
    ref_forced,
    ref_select,
    ref_select_row,
)

from xattention import select_blocks, xattention

INF, NAN = math.inf, math.nan


_BACKEND = "torch"  # the backend of the running test (set by the select_path fixture)


@pytest.fixture
def select_path(backend, monkeypatch):
    """The conftest backend (torch, or triton under the interpreter), used by _select below."""
    monkeypatch.setitem(globals(), "_BACKEND", backend)
    return backend


def _select(scores, threshold, q_len, k_len, bs, causal):
    return select_blocks(scores, threshold=threshold, q_len=q_len, k_len=k_len, block_size=bs,
                         causal=causal, backend=_BACKEND)


def rule_row(row, thr, cand, forced):
    """The documented selection of one row of user scores, literally (docs/design.md)."""
    vals = [row[j] if cand[j] else 0.0 for j in range(len(row))]
    if thr >= 1.0 or any(math.isnan(x) for x in vals):
        return list(cand)
    if INF in vals:
        return [bool(forced[j] or vals[j] == INF) for j in range(len(row))]
    vals = [0.0 if x == -INF else x for x in vals]
    keep = ref_select_row(vals, thr, cand, forced)
    if not any(keep):
        top = max((j for j in range(len(row)) if cand[j]), key=lambda j: (vals[j], -j))
        keep[top] = True
    return keep


def rule_select(scores, thr, q_len, k_len, bs, causal):
    cand = ref_candidates(q_len, k_len, bs, causal).tolist()
    forced = ref_forced(q_len, k_len, bs, causal).tolist()
    out = torch.zeros(scores.shape, dtype=torch.bool)
    for b, h, i in torch.cartesian_prod(*(torch.arange(n) for n in scores.shape[:3])).tolist():
        out[b, h, i] = torch.tensor(rule_row(scores[b, h, i].tolist(), thr, cand[i], forced[i]))
    return out


# ------------------------------------------------------------------- select_blocks on user scores


def test_row_total_counts_candidates_only(select_path, gen):
    """Mass on non-candidate (future) blocks must not raise the bar for the candidates."""
    causal = True  # without causality every block is a candidate
    q_len, k_len, bs = (40, 100, 16) if select_path == "triton" else (70, 150, 16)
    s = torch.rand(1, 2, cdiv(q_len, bs), cdiv(k_len, bs), generator=gen)
    cand = ref_candidates(q_len, k_len, bs, causal)
    s = torch.where(cand, s, 50.0)  # most of the row's raw sum sits outside the candidates
    for thr in (0.3, 0.8):
        got = _select(s, thr, q_len, k_len, bs, causal)
        assert torch.equal(got, ref_select(s, thr, q_len, k_len, bs, causal)), thr
    # and a NaN or inf there changes nothing either
    s2 = s.clone()
    s2[..., -1] = torch.where(cand[:, -1], s2[..., -1], NAN)
    s2[..., -2] = torch.where(cand[:, -2], s2[..., -2], INF)
    assert torch.equal(_select(s2, 0.8, q_len, k_len, bs, causal),
                       _select(s, 0.8, q_len, k_len, bs, causal))


def test_plus_inf_keeps_forced_and_every_inf_block(select_path):
    # causal Lq=Lk=80, Bs=16, last query block 4: forced = sink 0 and diagonal 4
    s = torch.full((1, 1, 5, 5), 0.1)
    s[0, 0, 4] = torch.tensor([0.1, INF, 0.3, INF, 0.2])
    s[0, 0, 3] = torch.tensor([INF, 0.5, 0.1, 0.2, 0.0])  # +inf on a forced block
    for thr in (1e-3, 0.5, 0.99):
        got = _select(s, thr, 80, 80, 16, True)[0, 0]
        assert got[4].tolist() == [True, True, False, True, True], thr
        assert got[3].tolist() == [True, False, False, True, False], thr
    # threshold >= 1 still keeps every candidate
    assert _select(s, 1.0, 80, 80, 16, True)[0, 0, 4].all()
    # non-causal (no forced blocks): only the +inf blocks, never an empty row
    got = _select(s[:, :, 4:], 0.5, 16, 80, 16, False)[0, 0, 0]
    assert got.tolist() == [False, True, False, True, False]


def test_minus_inf_is_zero_mass(select_path):
    s = torch.tensor([0.5, -INF, 0.25, 0.25, -INF]).reshape(1, 1, 1, 5)
    z = torch.where(torch.isinf(s), 0.0, s)
    for thr in (0.3, 0.6, 0.9, 0.99):
        assert torch.equal(_select(s, thr, 16, 80, 16, False), _select(z, thr, 16, 80, 16, False))
    assert _select(s, 0.99, 16, 80, 16, False)[0, 0, 0].tolist() == [True, False, True, True,
                                                                       False]


def test_nan_candidate_keeps_the_whole_row(select_path):
    s = torch.full((1, 1, 5, 5), 0.2)
    s[0, 0, 2, 1] = NAN  # a candidate of query block 2
    s[0, 0, 1, 4] = NAN  # a non-candidate of query block 1: ignored
    got = _select(s, 0.3, 80, 80, 16, True)[0, 0]
    cand = ref_candidates(80, 80, 16, True)
    assert torch.equal(got[2], cand[2])
    plain = _select(torch.full((1, 1, 5, 5), 0.2), 0.3, 80, 80, 16, True)
    assert torch.equal(got[1], plain[0, 0, 1])
    assert not (got & ~cand).any()


@pytest.mark.parametrize("row", [[0.0] * 5, [-1.0, -0.5, -2.0, -0.5, -3.0]], ids=["zero", "neg"])
def test_noncausal_row_without_mass_keeps_its_top_block(select_path, row):
    s = torch.tensor(row).reshape(1, 1, 1, 5)
    got = _select(s, 0.9, 16, 80, 16, False)[0, 0, 0]
    top = max(range(5), key=lambda j: (row[j], -j))  # the lowest index among ties
    assert got.tolist() == [j == top for j in range(5)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_special_scores_match_the_documented_rules(select_path, gen, causal):
    """Random rows mixing NaN, +-inf, zeros and negatives against the literal rules. Values are
    dyadic, so every sum is exact and no row sits on the threshold by rounding."""
    q_len, k_len, bs = (30, 90, 16) if select_path == "triton" else (61, 150, 16)
    shape = (1, 3, cdiv(q_len, bs), cdiv(k_len, bs))
    values = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0, 4.0, -0.5, INF, -INF, NAN])
    weights = torch.tensor([3.0, 4, 4, 4, 3, 2, 1, 0.3, 0.5, 0.15])
    draw = torch.multinomial(weights, math.prod(shape), replacement=True, generator=gen)
    s = values[draw].reshape(shape)
    s0 = s.clone()
    for thr in (0.2, 0.7, 1.0):
        got = _select(s, thr, q_len, k_len, bs, causal)
        assert torch.equal(got, rule_select(s, thr, q_len, k_len, bs, causal)), thr
        assert got.any(-1).all()
    assert torch.equal(s.isnan(), s0.isnan()) and torch.equal(s.nan_to_num(), s0.nan_to_num())


# ------------------------------------------------------------------- non-finite q, k, v


def _poison(q, k, v, which, value, gen):
    """Copies with ``value`` at one random element of ``which`` (head 0, dim 3)."""
    q, k, v = q.clone(), k.clone(), v.clone()
    x = {"q": q, "k": k, "v": v}[which]
    pos = int(torch.randint(x.shape[2] // 3, x.shape[2], (1,), generator=gen))
    x[0, 0, pos, 3] = value
    return q, k, v


def _nonfinite_rows(out):
    return ~torch.isfinite(out.double()).all(-1)


def _rows_seeing_bad_values(v, q_len, causal, group):
    """Rows whose softmax puts weight on a non-finite value: every row that can see it."""
    bad = ~torch.isfinite(v.double()).all(-1)  # [B, Hkv, Lk]
    k_len = v.shape[2]
    if causal:  # row r sees keys c <= k_len - q_len + r
        seen = bad.cumsum(-1).bool()[..., k_len - q_len:]
    else:
        seen = bad.any(-1, keepdim=True).expand(*bad.shape[:2], q_len)
    return seen.repeat_interleave(group, dim=1)


def _check_nonfinite_outputs(q, k, v, which, causal, backend, bs, stride):
    out = xattention(q, k, v, threshold=0.3, stride=stride, block_size=bs, causal=causal,
                     backend=backend)
    got = _nonfinite_rows(out)
    if which == "v":
        # Rows that see the bad value must show it; others may too (0 * NaN in p @ v), as in
        # dense implementations that multiply masked weights by every value.
        need = _rows_seeing_bad_values(v, q.shape[2], causal, q.shape[1] // k.shape[1])
        assert need.any()
        assert (got | ~need).all(), f"{int((need & ~got).sum())} rows came back finite"
    else:
        exp = _nonfinite_rows(ref_dense_attention(q, k, v, causal=causal))
        assert exp.any()
        assert torch.equal(got, exp), (f"{int((exp & ~got).sum())} rows finite where dense is "
                                       f"not, {int((got & ~exp).sum())} the other way")


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_nonfinite_inputs_torch(make_qkv, gen, which, value, causal):
    # GQA, Lq < Lk, odd lengths; threshold 0.3 keeps few blocks, so skipping is visible
    q, k, v = make_qkv(1, 4, 2, 75, 150, 16)
    q, k, v = _poison(q, k, v, which, value, gen)
    _check_nonfinite_outputs(q, k, v, which, causal, "torch", bs=16, stride=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_nonfinite_inputs_triton(make_qkv, gen, which, dtype):
    pytest.importorskip("triton")
    q, k, v = make_qkv(1, 2, 1, 40, 64, 16, dtype=dtype)
    q, k, v = _poison(q, k, v, which, NAN, gen)
    _check_nonfinite_outputs(q, k, v, which, True, "triton", bs=16, stride=4)


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_nonfinite_rules_triton_selection_matches_torch(make_qkv, gen, which, value, causal):
    """The selection kernel applies the non-finite rules itself (flags from q, k and v): the same
    mask as the PyTorch rules on the same scores. GQA, Lq < Lk, odd lengths."""
    pytest.importorskip("triton")
    from xattention.estimate import _estimate
    from xattention.selection import _select

    q, k, v = make_qkv(1, 4, 2, 75, 150, 16, dtype=torch.float16)
    x = {"q": q, "k": k, "v": v}[which]
    x[0, 1, x.shape[2] // 2, 3] = value  # mid-sequence: a block the plain cut can leave out
    scores = _estimate(q, k, 4, 16, causal, 0.25, "torch")
    masks = [_select(scores, 0.3, 75, 150, 16, causal, backend, inputs=(q, k, v))
             for backend in ("torch", "triton")]
    assert torch.equal(masks[0], masks[1])
    clean = _select(scores.nan_to_num(0.0, 0.0, 0.0), 0.3, 75, 150, 16, causal, "torch")
    assert (masks[1] & ~clean).any()  # the rules kept blocks the plain cut would not
