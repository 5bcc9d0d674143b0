"""End-to-end xattention(): estimate + select + sparse attention, against the reference."""

import pytest
import torch
from inputs import ALL_DTYPES, DTYPE_IDS, OUT_TOL, pick_config, skip_unsupported
from reference import (
    cdiv,
    ref_block_scores,
    ref_candidates,
    ref_dense_attention,
    ref_forced,
    ref_select,
    ref_sparse_attention,
    ref_token_mask,
    robust_rows,
)

from xattention import estimate_block_scores, select_blocks, xattention

# B, Hq, Hkv, Lq, Lk, D, Bs, S
TORCH_CASES = {
    "square": (1, 2, 2, 96, 96, 16, 16, 4),
    "odd": (2, 2, 1, 77, 77, 16, 16, 8),
    "chunk_unaligned": (1, 4, 2, 45, 100, 16, 16, 4),
    "gqa6_1": (1, 6, 1, 50, 100, 32, 16, 8),
    "bs8": (1, 2, 2, 61, 61, 16, 8, 4),
}
TRITON_CASES = {
    "square": (1, 2, 2, 32, 32, 16, 16, 4),
    "chunk_unaligned": (1, 4, 2, 21, 45, 16, 16, 4),
}

def _case(backend, name):
    return pick_config(TORCH_CASES, TRITON_CASES, backend, name)


def _xa(q, k, v, backend, S, Bs, **kw):
    return xattention(q, k, v, stride=S, block_size=Bs, backend=backend, **kw)


# One case per feature rather than the full product: every shape runs causal and non-causal
# once between them, and each threshold on each side.
PIPELINE = [
    ("square", True, 0.9),
    ("square", False, 0.5),
    ("odd", True, 0.5),
    ("odd", False, 0.9),
    ("chunk_unaligned", True, 0.5),
    ("chunk_unaligned", False, 0.9),
    ("gqa6_1", True, 0.9),
    ("gqa6_1", False, 0.5),
    ("bs8", True, 0.5),
    ("bs8", False, 0.9),
]


@pytest.mark.parametrize(
    "name,causal,thr",
    PIPELINE,
    ids=[f"{n}-{'causal' if c else 'noncausal'}-t{t}" for n, c, t in PIPELINE],
)
def test_xattention_matches_reference_pipeline(backend, make_qkv, name, causal, thr):
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _case(backend, name)
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    out, mask = _xa(q, k, v, backend, S, Bs, threshold=thr, causal=causal, return_mask=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert mask.dtype == torch.bool
    assert mask.shape == (B, Hq, cdiv(Lq, Bs), cdiv(Lk, Bs))
    # the mask is the spec's selection on the spec's estimate (rows robust to float32 error)
    ref_scores = ref_block_scores(q, k, S, Bs, causal=causal)
    exp_mask = ref_select(ref_scores, thr, Lq, Lk, Bs, causal)
    ok = robust_rows(ref_scores, thr, Lq, Lk, Bs, causal, tol=1e-5)
    assert ok.float().mean() >= 0.5  # the comparison is not vacuous
    assert torch.equal(mask[ok], exp_mask[ok])
    # the output is the sparse attention of exactly that mask
    exp = ref_sparse_attention(q, k, v, mask, Bs, causal)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[torch.float32])
    # and the pipeline agrees with the public building blocks
    sc = estimate_block_scores(q, k, stride=S, block_size=Bs, causal=causal, backend=backend)
    m2 = select_blocks(sc, threshold=thr, q_len=Lq, k_len=Lk, block_size=Bs, causal=causal,
                       backend=backend)
    ok2 = robust_rows(sc, thr, Lq, Lk, Bs, causal, tol=1e-5)
    assert torch.equal(mask[ok2], m2[ok2])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
def test_xattention_dtypes(backend, make_qkv, dtype):
    skip_unsupported(backend, dtype)
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _case(backend, "chunk_unaligned")
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype)
    out, mask = _xa(q, k, v, backend, S, Bs, threshold=0.8, return_mask=True)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    exp = ref_sparse_attention(q, k, v, mask, Bs, True)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[dtype])
    # selection from the low-precision estimate still matches the spec on robust rows
    ref_scores = ref_block_scores(q, k, S, Bs, causal=True)
    ok = robust_rows(ref_scores, 0.8, Lq, Lk, Bs, True, tol=3e-2)
    exp_mask = ref_select(ref_scores, 0.8, Lq, Lk, Bs, True)
    assert torch.equal(mask[ok], exp_mask[ok])
    # forced blocks survive whatever the precision
    assert (mask | ~ref_forced(Lq, Lk, Bs, True)).all()


GE_ONE = [(n, c, t) for n in ["chunk_unaligned", "gqa6_1", "odd"] for c, t in [(True, 1.0),
                                                                               (False, 3.0)]]


@pytest.mark.parametrize(
    "name,causal,thr",
    GE_ONE,
    ids=[f"{n}-{'causal' if c else 'noncausal'}-t{t}" for n, c, t in GE_ONE],
)
def test_threshold_ge_one_equals_dense(backend, make_qkv, name, causal, thr):
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _case(backend, name)
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    out, mask = _xa(q, k, v, backend, S, Bs, threshold=thr, causal=causal, return_mask=True)
    assert torch.equal(mask, ref_candidates(Lq, Lk, Bs, causal).expand_as(mask))
    dense = ref_dense_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), dense, **OUT_TOL[torch.float32])


@pytest.mark.parametrize("name", ["chunk_unaligned", "gqa6_1"])
def test_xattention_gqa_equals_repeated_kv(backend, make_qkv, name):
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _case(backend, name)
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    g = Hq // Hkv
    a, ma = _xa(q, k, v, backend, S, Bs, threshold=0.8, return_mask=True)
    b, mb = _xa(
        q,
        k.repeat_interleave(g, 1),
        v.repeat_interleave(g, 1),
        backend,
        S,
        Bs,
        threshold=0.8,
        return_mask=True,
    )
    assert torch.equal(ma, mb)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_prefill_equals_tail_of_full(backend, make_qkv):
    """Lk - Lq a multiple of Bs: estimate, selection and attention of a chunk equal the last
    Lq rows of the full-length computation."""
    if backend == "torch":
        B, Hq, Hkv, L, D, Bs, S, n_chunk_blocks = 1, 4, 2, 150, 16, 16, 4, 3
    else:
        B, Hq, Hkv, L, D, Bs, S, n_chunk_blocks = 1, 2, 1, 45, 16, 16, 4, 1
    q_full, k, v = make_qkv(B, Hq, Hkv, L, L, D)
    Lq = L - (cdiv(L, Bs) - n_chunk_blocks) * Bs  # last partial block + whole blocks
    assert (L - Lq) % Bs == 0 and 0 < Lq < L
    q = q_full[:, :, L - Lq :]
    full, mfull = _xa(q_full, k, v, backend, S, Bs, threshold=0.85, return_mask=True)
    part, mpart = _xa(q, k, v, backend, S, Bs, threshold=0.85, return_mask=True)
    assert torch.equal(mpart, mfull[:, :, -cdiv(Lq, Bs) :])
    torch.testing.assert_close(part, full[:, :, L - Lq :], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["chunk_unaligned", "odd", "gqa6_1"])
def test_forced_blocks_kept_and_every_row_sees_a_key(backend, make_qkv, name):
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _case(backend, name)
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    forced = ref_forced(Lq, Lk, Bs, True)
    for thr in [0.3] if backend == "triton" else [1e-3, 0.3, 0.9]:
        out, mask = _xa(q, k, v, backend, S, Bs, threshold=thr, return_mask=True)
        assert (mask | ~forced).all(), thr
        assert torch.isfinite(out).all()
        for b in range(B):
            for h in range(Hq):
                vis = ref_token_mask(mask[b, h], Lq, Lk, Bs, True)
                assert vis.any(-1).all()
                # the query's own position is always visible (diagonal band is forced)
                r = torch.arange(Lq)
                assert vis[r, Lk - Lq + r].all()
    # with a tiny threshold only the forced blocks remain
    _, mask = _xa(q, k, v, backend, S, Bs, threshold=1e-6, return_mask=True)
    assert torch.equal(mask, forced.expand_as(mask))


def test_xattention_per_head_threshold(backend, make_qkv):
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _case(backend, "chunk_unaligned")
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    thr = torch.tensor([1e-3, 0.5, 0.9, 1.0])
    out, mask = _xa(q, k, v, backend, S, Bs, threshold=thr, return_mask=True)
    for h in range(Hq):
        o1, m1 = _xa(
            q[:, h : h + 1],
            k[:, h // 2 : h // 2 + 1],
            v[:, h // 2 : h // 2 + 1],
            backend,
            S,
            Bs,
            threshold=float(thr[h]),
            return_mask=True,
        )
        assert torch.equal(mask[:, h : h + 1], m1), h
        torch.testing.assert_close(out[:, h : h + 1], o1, rtol=1e-5, atol=1e-6)
    assert torch.equal(mask[:, 0], ref_forced(Lq, Lk, Bs, True).expand_as(mask[:, 0]))
    assert torch.equal(mask[:, 3], ref_candidates(Lq, Lk, Bs, True).expand_as(mask[:, 3]))


def test_return_mask_false_returns_tensor(backend, make_qkv):
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _case(backend, "square")
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    out = _xa(q, k, v, backend, S, Bs, threshold=0.9)
    assert isinstance(out, torch.Tensor)
    out2, _ = _xa(q, k, v, backend, S, Bs, threshold=0.9, return_mask=True)
    torch.testing.assert_close(out, out2, rtol=0, atol=0)


def test_xattention_explicit_scale(backend, make_qkv):
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _case(backend, "chunk_unaligned")
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    out, mask = _xa(q, k, v, backend, S, Bs, threshold=0.9, scale=0.4, return_mask=True)
    ref_scores = ref_block_scores(q, k, S, Bs, causal=True, scale=0.4)
    ok = robust_rows(ref_scores, 0.9, Lq, Lk, Bs, True, tol=1e-5)
    assert torch.equal(mask[ok], ref_select(ref_scores, 0.9, Lq, Lk, Bs, True)[ok])
    exp = ref_sparse_attention(q, k, v, mask, Bs, True, scale=0.4)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[torch.float32])


def test_xattention_defaults(make_qkv):
    """Defaults: threshold 0.9, stride 8, block 128, causal, scale 1/sqrt(D)."""
    B, Hq, Hkv, L, D = 1, 2, 1, 300, 16
    q, k, v = make_qkv(B, Hq, Hkv, L, L, D)
    out, mask = xattention(q, k, v, backend="torch", return_mask=True)
    ref_scores = ref_block_scores(q, k, 8, 128, causal=True)
    ok = robust_rows(ref_scores, 0.9, L, L, 128, True, tol=1e-5)
    assert mask.shape == (1, 2, 3, 3)
    assert torch.equal(mask[ok], ref_select(ref_scores, 0.9, L, L, 128, True)[ok])
    exp = ref_sparse_attention(q, k, v, mask, 128, True)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[torch.float32])


def test_auto_backend_on_cpu(make_qkv):
    q, k, v = make_qkv(1, 2, 1, 20, 33, 16)
    out, mask = xattention(q, k, v, stride=4, block_size=16, backend="auto", return_mask=True)
    exp = ref_sparse_attention(q, k, v, mask, 16, True)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[torch.float32])


def test_xattention_sparse_on_structured_inputs_is_accurate(make_qkv):
    """Not a spec rule but a sanity bound: at 0.95 on sink+local inputs the sparse result is
    close to dense and actually drops blocks."""
    q, k, v = make_qkv(1, 2, 1, 256, 256, 32, sink_strength=8.0, local_strength=6.0)
    out, mask = xattention(
        q, k, v, threshold=0.95, stride=8, block_size=16, backend="torch", return_mask=True
    )
    dense = ref_dense_attention(q, k, v, causal=True)
    cand = ref_candidates(256, 256, 16, True)
    assert mask.sum() < 0.9 * cand.sum() * 2
    err = (out.double() - dense).norm() / dense.norm()
    assert err < 0.25


@pytest.mark.parametrize("bs,stride", [(24, 8), (48, 8), (128, 4), (256, 8)])
def test_auto_backend_xattention_every_valid_block_size(make_qkv, bs, stride):
    q, k, v = make_qkv(1, 2, 1, 30, 70, 16)
    out, mask = xattention(q, k, v, stride=stride, block_size=bs, backend="auto", return_mask=True)
    exp = ref_sparse_attention(q, k, v, mask, bs, True)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[torch.float32])


def test_integer_threshold_is_accepted(backend, make_qkv):
    """threshold=1 (a Python int) is a valid value in (0, +inf): keeps every candidate."""
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _case(backend, "chunk_unaligned")
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    out = _xa(q, k, v, backend, S, Bs, threshold=1)
    dense = ref_dense_attention(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), dense, **OUT_TOL[torch.float32])


def test_xattention_is_deterministic(backend, make_qkv):
    B, Hq, Hkv, Lq, Lk, D, Bs, S = _case(backend, "square")
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    a, ma = _xa(q, k, v, backend, S, Bs, threshold=0.9, return_mask=True)
    b, mb = _xa(q, k, v, backend, S, Bs, threshold=0.9, return_mask=True)
    assert torch.equal(ma, mb)
    assert torch.equal(a, b)


@pytest.mark.parametrize("budget", [1, 7 * 50, 1 << 24])  # one row per call, 7 rows, one call
@pytest.mark.parametrize("lq, lk", [(37, 50), (1, 50), (50, 50)])
def test_dense_branch_bounds_its_causal_mask(budget, lq, lk, monkeypatch, gen):
    """Short inputs run dense (SDPA); with Lq < Lk the lower-right causal mask goes in chunks
    of query rows whose masks stay within the budget, and the result is the float64 oracle's."""
    from xattention.kernels import dense

    monkeypatch.setattr(dense, "MASK_ELEMENTS", budget)
    sizes = []
    real_mask = dense.lower_right_mask

    def recording_mask(*args):
        m = real_mask(*args)
        sizes.append(m.numel())
        return m

    monkeypatch.setattr(dense, "lower_right_mask", recording_mask)
    q = torch.randn(2, 4, lq, 16, generator=gen)
    k, v = (torch.randn(2, 2, lk, 16, generator=gen) for _ in range(2))
    k[:, :, 3] *= 8  # a heavy key
    got = xattention(q, k, v, min_sparse_len=10**9, backend="torch")
    want = ref_dense_attention(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert all(n <= max(budget, lk) for n in sizes)  # one row at the least
    if lq < lk:
        assert len(sizes) == -(-lq // max(1, budget // lk))
