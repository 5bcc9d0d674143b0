"""estimate_block_scores vs the float64 brute-force reference (docs/design.md §2.3)."""

from dataclasses import dataclass

import pytest
import torch
from inputs import (
    ALL_DTYPES,
    DTYPE_IDS,
    SCORE_TOL,
    config_names,
    pick_config,
    skip_unsupported,
)
from reference import cdiv, ref_block_scores, ref_candidates

from xattention import estimate_block_scores


@dataclass(frozen=True)
class Cfg:
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Bs: int
    S: int


# torch backend: odd lengths, Lq < Lk with and without block alignment, GQA, tiny, Bs=24
TORCH_CFGS = {
    "square": Cfg(1, 2, 2, 64, 64, 16, 16, 4),
    "odd": Cfg(2, 2, 2, 77, 77, 16, 16, 8),
    "chunk_unaligned": Cfg(1, 2, 2, 45, 100, 16, 16, 4),
    "chunk_aligned": Cfg(1, 2, 2, 48, 112, 16, 16, 8),
    "gqa4_2": Cfg(1, 4, 2, 50, 70, 16, 16, 4),
    "gqa6_1": Cfg(1, 6, 1, 33, 33, 32, 16, 8),
    "tiny_q": Cfg(1, 1, 1, 3, 5, 8, 16, 4),
    "one_row": Cfg(1, 2, 1, 1, 37, 16, 16, 8),
    "bs24": Cfg(1, 2, 2, 50, 61, 16, 24, 8),
    "larger": Cfg(1, 2, 1, 200, 260, 32, 32, 8),
    "s_eq_bs": Cfg(1, 2, 2, 40, 45, 16, 8, 8),
    "hd8_gqa8": Cfg(1, 8, 1, 20, 45, 8, 16, 4),
    "hd40_gqa4": Cfg(1, 4, 1, 20, 70, 40, 32, 1),
}
# triton backend (interpreter): a few tiles only. Between them: head tiles of 1, 2, 4 and 8 query
# heads; head_dim below, at and above the 16-wide chunk (8 and 40 are padded and masked); 16 and 32
# key groups per tile (the two interpreter configs; the block-size grid reaches the fallback).
TRITON_CFGS = {
    "square": Cfg(1, 2, 2, 32, 32, 16, 16, 4),
    "odd_chunk": Cfg(2, 2, 1, 37, 53, 16, 16, 8),
    "gqa4_2": Cfg(1, 4, 2, 20, 45, 16, 16, 4),
    "bs24": Cfg(1, 2, 1, 30, 50, 16, 24, 8),
    "hd8_gqa8": Cfg(1, 8, 1, 20, 45, 8, 16, 4),
    "hd40_gqa4": Cfg(1, 4, 1, 20, 70, 40, 32, 1),
}
ALL_CFGS = config_names(sorted(set(TORCH_CFGS) | set(TRITON_CFGS)))


def _cfg(backend, name):
    return pick_config(TORCH_CFGS, TRITON_CFGS, backend, name)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("name", ALL_CFGS)
def test_estimate_matches_reference_fp32(backend, make_qkv, name, causal):
    c = _cfg(backend, name)
    q, k, _ = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    got = estimate_block_scores(q, k, stride=c.S, block_size=c.Bs, causal=causal, backend=backend)
    exp = ref_block_scores(q, k, c.S, c.Bs, causal=causal)
    assert got.dtype == torch.float32
    assert got.shape == (c.B, c.Hq, cdiv(c.Lq, c.Bs), cdiv(c.Lk, c.Bs))
    assert got.device == q.device
    torch.testing.assert_close(got.double(), exp, **SCORE_TOL[torch.float32])


@pytest.mark.parametrize("dtype", ALL_DTYPES[1:], ids=DTYPE_IDS[1:])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("name", ["square", "chunk_unaligned", "gqa6_1", "odd_chunk"])
def test_estimate_matches_reference_half(backend, make_qkv, name, causal, dtype):
    skip_unsupported(backend, dtype)
    c = _cfg(backend, name)
    q, k, _ = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D, dtype=dtype)
    got = estimate_block_scores(q, k, stride=c.S, block_size=c.Bs, causal=causal, backend=backend)
    exp = ref_block_scores(q, k, c.S, c.Bs, causal=causal)  # from the same rounded inputs
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exp, **SCORE_TOL[dtype])


@pytest.mark.parametrize("name", ["chunk_unaligned", "odd_chunk"])
def test_estimate_random_inputs_and_explicit_scale(backend, make_qkv, name):
    c = _cfg(backend, name)
    q, k, _ = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D, kind="random", std=1.5)
    got = estimate_block_scores(
        q, k, stride=c.S, block_size=c.Bs, causal=True, scale=0.37, backend=backend
    )
    exp = ref_block_scores(q, k, c.S, c.Bs, causal=True, scale=0.37)
    torch.testing.assert_close(got.double(), exp, **SCORE_TOL[torch.float32])
    # and the scale really matters (guards against an ignored argument)
    default = ref_block_scores(q, k, c.S, c.Bs, causal=True)
    assert (default - exp).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("name", config_names(["chunk_unaligned", "odd", "odd_chunk", "bs24"]))
def test_estimate_rows_normalised_and_zero_outside_candidates(backend, make_qkv, name, causal):
    c = _cfg(backend, name)
    q, k, _ = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    got = estimate_block_scores(q, k, stride=c.S, block_size=c.Bs, causal=causal, backend=backend)
    assert torch.isfinite(got).all()
    assert (got >= 0).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-5)
    cand = ref_candidates(c.Lq, c.Lk, c.Bs, causal)
    assert (got * ~cand).abs().max() <= 1e-6
    assert (got[..., cand] > 0).all()  # softmax over allowed groups is strictly positive


def test_estimate_gqa_equals_repeated_kv(backend, make_qkv):
    c = _cfg(backend, "gqa4_2")
    q, k, _ = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    kr = k.repeat_interleave(c.Hq // c.Hkv, dim=1)
    a = estimate_block_scores(q, k, stride=c.S, block_size=c.Bs, backend=backend)
    b = estimate_block_scores(q, kr, stride=c.S, block_size=c.Bs, backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_estimate_chunk_equals_tail_of_full(backend, make_qkv):
    """Lk - Lq a multiple of Bs: the chunk's block rows are the full computation's last rows."""
    c = _cfg(backend, "chunk_aligned" if backend == "torch" else "square")
    Lk = c.Lk
    q_full, k, _ = make_qkv(c.B, c.Hq, c.Hkv, Lk, Lk, c.D)
    Lq = Lk - 2 * c.Bs if Lk > 2 * c.Bs else Lk - c.Bs
    q = q_full[:, :, Lk - Lq :]
    full = estimate_block_scores(q_full, k, stride=c.S, block_size=c.Bs, backend=backend)
    part = estimate_block_scores(q, k, stride=c.S, block_size=c.Bs, backend=backend)
    torch.testing.assert_close(part, full[:, :, -cdiv(Lq, c.Bs) :], rtol=1e-5, atol=1e-6)


def test_estimate_does_not_modify_inputs(backend, make_qkv):
    c = _cfg(backend, "square")
    q, k, _ = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    q0, k0 = q.clone(), k.clone()
    estimate_block_scores(q, k, stride=c.S, block_size=c.Bs, backend=backend)
    assert torch.equal(q, q0) and torch.equal(k, k0)


def test_estimate_non_contiguous_inputs(backend, make_qkv):
    c = _cfg(backend, "gqa4_2")
    q, k, _ = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    # [B, L, H, D] storage viewed as [B, H, L, D] (the layout transformers hands over)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    got = estimate_block_scores(qt, kt, stride=c.S, block_size=c.Bs, backend=backend)
    exp = ref_block_scores(q, k, c.S, c.Bs, causal=True)
    torch.testing.assert_close(got.double(), exp, **SCORE_TOL[torch.float32])


# (block_size, stride): groups per block from 1 to 128
BS_STRIDE = [
    (16, 16),
    (16, 8),
    (32, 2),
    (32, 1),
    (64, 4),
    (64, 2),
    (128, 16),
    (128, 8),
    (128, 4),
    (128, 1),
    (256, 16),
    (256, 8),
]


@pytest.mark.parametrize("bs,stride", BS_STRIDE, ids=[f"b{b}s{s}" for b, s in BS_STRIDE])
def test_estimate_block_size_stride_grid(backend, make_qkv, bs, stride):
    """Every power-of-two block size with any stride dividing it is valid input (S | Bs)."""
    q, k, _ = make_qkv(1, 2, 1, 30, 70, 16)
    got = estimate_block_scores(q, k, stride=stride, block_size=bs, backend=backend)
    exp = ref_block_scores(q, k, stride, bs, causal=True)
    torch.testing.assert_close(got.double(), exp, **SCORE_TOL[torch.float32])


@pytest.mark.parametrize("bs,stride", [(24, 8), (48, 8), (128, 4), (256, 8)])
def test_auto_backend_serves_every_valid_block_size(make_qkv, bs, stride):
    """backend='auto' must serve any S | Bs (falling back if a kernel cannot)."""
    q, k, v = make_qkv(1, 2, 1, 30, 70, 16)
    got = estimate_block_scores(q, k, stride=stride, block_size=bs, backend="auto")
    exp = ref_block_scores(q, k, stride, bs, causal=True)
    torch.testing.assert_close(got.double(), exp, **SCORE_TOL[torch.float32])
