"""block_sparse_attention with arbitrary user masks vs the token-mask float64 reference."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from inputs import (
    ALL_DTYPES,
    DTYPE_IDS,
    OUT_TOL,
    config_names,
    pick_config,
    random_block_mask,
    skip_unsupported,
)
from reference import cdiv, ref_dense_attention, ref_sparse_attention

from xattention import block_sparse_attention


@dataclass(frozen=True)
class Cfg:
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Bs: int


TORCH_CFGS = {
    "square": Cfg(1, 2, 2, 64, 64, 16, 16),
    "odd": Cfg(2, 2, 2, 77, 77, 16, 16),
    "chunk_unaligned": Cfg(1, 2, 2, 45, 100, 16, 16),
    "chunk_aligned": Cfg(1, 2, 1, 48, 112, 32, 16),
    "gqa4_2": Cfg(1, 4, 2, 50, 70, 16, 16),
    "gqa6_1": Cfg(1, 6, 1, 33, 33, 32, 8),
    "one_row": Cfg(1, 2, 1, 1, 37, 16, 16),
    "bs24": Cfg(1, 2, 2, 50, 61, 16, 24),
    "hd40": Cfg(1, 4, 1, 20, 40, 40, 16),
    "hd12": Cfg(1, 2, 1, 20, 37, 12, 16),
}
# Interpreter: a few tiles. head_dim 40 is padded to 64 and masked; in float16, head_dim 12 gives
# rows of 24 bytes, which the bulk-copy (TMA) path cannot address: that runs the plain-load config.
TRITON_CFGS = {
    "square": Cfg(1, 2, 2, 32, 32, 16, 16),
    "odd_chunk": Cfg(2, 2, 1, 37, 53, 16, 16),
    "gqa4_2": Cfg(1, 4, 2, 20, 45, 16, 16),
    "bs24": Cfg(1, 2, 1, 30, 50, 16, 24),
    "hd40": Cfg(1, 4, 1, 20, 40, 40, 16),
    "hd12": Cfg(1, 2, 1, 20, 37, 12, 16),
}
ALL_CFGS = config_names(sorted(set(TORCH_CFGS) | set(TRITON_CFGS)))


def _cfg(backend, name):
    return pick_config(TORCH_CFGS, TRITON_CFGS, backend, name)


def _bsa(q, k, v, mask, c, causal, backend, **kw):
    return block_sparse_attention(
        q, k, v, mask, block_size=c.Bs, causal=causal, backend=backend, **kw
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("name", ALL_CFGS)
def test_sparse_matches_reference_random_masks_fp32(backend, make_qkv, gen, name, causal):
    c = _cfg(backend, name)
    q, k, v = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    mask = random_block_mask(gen, c.B, c.Hq, c.Lq, c.Lk, c.Bs, causal)
    out = _bsa(q, k, v, mask, c, causal, backend)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    exp = ref_sparse_attention(q, k, v, mask, c.Bs, causal)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[torch.float32])


@pytest.mark.parametrize("dtype", ALL_DTYPES[1:], ids=DTYPE_IDS[1:])
@pytest.mark.parametrize("name", ["chunk_unaligned", "gqa6_1", "odd_chunk", "hd12"])
def test_sparse_matches_reference_half(backend, make_qkv, gen, name, dtype):
    skip_unsupported(backend, dtype)
    c = _cfg(backend, name)
    q, k, v = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D, dtype=dtype)
    mask = random_block_mask(gen, c.B, c.Hq, c.Lq, c.Lk, c.Bs, True)
    out = _bsa(q, k, v, mask, c, True, backend)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    exp = ref_sparse_attention(q, k, v, mask, c.Bs, True)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[dtype])


@pytest.mark.parametrize("bshape", ["11", "B1", "1H"])
def test_sparse_mask_broadcasts_over_batch_and_heads(backend, make_qkv, gen, bshape):
    c = _cfg(backend, "gqa4_2" if backend == "torch" else "square")
    B = 2
    q, k, v = make_qkv(B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    mb = {"11": 1, "B1": B, "1H": 1}[bshape]
    mh = {"11": 1, "B1": 1, "1H": c.Hq}[bshape]
    mask = random_block_mask(gen, mb, mh, c.Lq, c.Lk, c.Bs, True)
    out = _bsa(q, k, v, mask, c, True, backend)
    exp = ref_sparse_attention(q, k, v, mask, c.Bs, True)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[torch.float32])
    full = _bsa(q, k, v, mask.expand(B, c.Hq, -1, -1), c, True, backend)
    torch.testing.assert_close(out, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("name", ["chunk_unaligned", "gqa4_2", "odd_chunk"])
def test_all_true_mask_equals_dense_sdpa(backend, make_qkv, name, causal):
    c = _cfg(backend, name)
    q, k, v = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    mask = torch.ones(c.B, c.Hq, cdiv(c.Lq, c.Bs), cdiv(c.Lk, c.Bs), dtype=torch.bool)
    out = _bsa(q, k, v, mask, c, causal, backend)
    g = c.Hq // c.Hkv
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    attn_mask = None
    if causal:
        r = torch.arange(c.Lq)[:, None] + c.Lk - c.Lq
        attn_mask = torch.arange(c.Lk)[None, :] <= r
    sdpa = F.scaled_dot_product_attention(q.double(), kr.double(), vr.double(), attn_mask=attn_mask)
    torch.testing.assert_close(out.double(), sdpa, **OUT_TOL[torch.float32])
    torch.testing.assert_close(
        sdpa, ref_dense_attention(q, k, v, causal=causal), rtol=1e-9, atol=1e-9
    )


def test_causal_masks_tokens_inside_kept_blocks(backend, make_qkv):
    """Kept blocks above or on the diagonal still hide c > p(r) (token-level causality)."""
    c = _cfg(backend, "square")
    q, k, v = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    n = cdiv(c.Lq, c.Bs)
    mask = torch.ones(c.B, c.Hq, n, n, dtype=torch.bool)
    # changing keys/values strictly in the future of every row must not change the output
    out = _bsa(q, k, v, mask, c, True, backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 5.0
    v2[:, :, -1] += 5.0
    out2 = _bsa(q, k2, v2, mask, c, True, backend)
    torch.testing.assert_close(out[:, :, :-1], out2[:, :, :-1], rtol=0, atol=0)
    assert (out[:, :, -1] - out2[:, :, -1]).abs().max() > 1e-3


def test_dropped_blocks_are_really_skipped(backend, make_qkv, gen):
    """Changing K/V inside dropped blocks must not change the output at all."""
    c = _cfg(backend, "odd_chunk" if backend == "triton" else "chunk_unaligned")
    q, k, v = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    n_qb, n_kb = cdiv(c.Lq, c.Bs), cdiv(c.Lk, c.Bs)
    mask = torch.zeros(1, 1, n_qb, n_kb, dtype=torch.bool)
    mask[..., 0] = True
    mask[..., -1] = True
    out = _bsa(q, k, v, mask, c, True, backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, c.Bs : (n_kb - 1) * c.Bs] = 100.0
    v2[:, :, c.Bs : (n_kb - 1) * c.Bs] = 1e4  # any nonzero weight on these would show
    out2 = _bsa(q, k2, v2, mask, c, True, backend)
    assert torch.isfinite(out2).all()
    torch.testing.assert_close(out, out2, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gqa4_2", "gqa6_1"])
def test_sparse_gqa_equals_repeated_kv(backend, make_qkv, gen, name):
    c = _cfg(backend, name)
    q, k, v = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    mask = random_block_mask(gen, c.B, c.Hq, c.Lq, c.Lk, c.Bs, True)
    g = c.Hq // c.Hkv
    a = _bsa(q, k, v, mask, c, True, backend)
    b = _bsa(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), mask, c, True, backend)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_sparse_explicit_scale(backend, make_qkv, gen):
    c = _cfg(backend, "gqa4_2")
    q, k, v = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    mask = random_block_mask(gen, c.B, c.Hq, c.Lq, c.Lk, c.Bs, True)
    out = _bsa(q, k, v, mask, c, True, backend, scale=0.61)
    exp = ref_sparse_attention(q, k, v, mask, c.Bs, True, scale=0.61)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[torch.float32])


def test_sparse_does_not_modify_inputs(backend, make_qkv, gen):
    c = _cfg(backend, "square")
    q, k, v = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    mask = random_block_mask(gen, c.B, c.Hq, c.Lq, c.Lk, c.Bs, True)
    saved = [t.clone() for t in (q, k, v, mask)]
    _bsa(q, k, v, mask, c, True, backend)
    for a, b in zip((q, k, v, mask), saved, strict=True):
        assert torch.equal(a, b)


def test_sparse_non_contiguous_inputs(backend, make_qkv, gen):
    c = _cfg(backend, "gqa4_2")
    q, k, v = make_qkv(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    mask = random_block_mask(gen, c.B, c.Hq, c.Lq, c.Lk, c.Bs, True)
    out = _bsa(qt, kt, vt, mask, c, True, backend)
    exp = ref_sparse_attention(q, k, v, mask, c.Bs, True)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[torch.float32])


@pytest.mark.parametrize("bs", [16, 32, 64, 128, 256])
def test_sparse_block_size_grid(backend, make_qkv, gen, bs):
    if backend == "triton" and bs in (32, 128):
        pytest.skip("the interpreter runs 16, 64 and 256: the same loop with 1, 4 and 16 tiles")
    q, k, v = make_qkv(1, 2, 1, 30, 70, 16)
    mask = random_block_mask(gen, 1, 2, 30, 70, bs, True, p=0.5)
    out = block_sparse_attention(q, k, v, mask, block_size=bs, backend=backend)
    exp = ref_sparse_attention(q, k, v, mask, bs, True)
    torch.testing.assert_close(out.double(), exp, **OUT_TOL[torch.float32])
