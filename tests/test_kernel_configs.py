"""Every tile shape of the Triton kernels, forced one at a time, against the float64 reference.

The autotuners pick the fastest config per shape, so a config that computes a wrong answer only
shows where the tuner happens to choose it (a 256-wide key tile of the estimate once wrote past its
scratch row). These tests force each tile shape in turn under the CPU interpreter at tiny sizes;
tests/test_gpu_kernels.py walks the full GPU lists the same way. fp32/fp16 only: the interpreter's
bf16 dot is not exact.
"""

from __future__ import annotations

import pytest
import torch
import triton
from reference import cdiv, ref_block_scores, ref_sparse_attention

from xattention import block_sparse_attention, estimate_block_scores

pytestmark = pytest.mark.skipif(
    not __import__("xattention._backend", fromlist=["x"]).interpreter_enabled(),
    reason="runs the kernels under TRITON_INTERPRET=1",
)


def _structured(gen, b, hq, hkv, lq, lk, d, dtype):
    from inputs import make_structured_qkv

    return make_structured_qkv(gen, b, hq, hkv, lq, lk, d, dtype=dtype)


# (ROWS, BLOCK_N, BLOCK_D): row tiles of 16-64 groups, key tiles narrower than, equal to and wider
# than 128 key groups (256 is the width that overflowed), head_dim whole or walked in 16s.
ESTIMATE_TILES = [(16, 16, 16), (32, 64, 32), (16, 256, 16), (64, 256, 32), (32, 128, 32)]
# b, hq, hkv, lq, lk, d, block_size, stride: ragged last key tile, GQA, Lq < Lk.
ESTIMATE_SHAPES = [
    (1, 2, 1, 40, 2176, 32, 128, 8),  # the reported case: Lk=2176 with 256-group tiles
    (1, 4, 2, 37, 1100, 32, 16, 4),  # GQA 4/2 (two heads per program), 2+ ragged key tiles
]


@pytest.mark.parametrize("tile", ESTIMATE_TILES, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("shape", ESTIMATE_SHAPES, ids=["bs128_s8", "gqa_bs16_s4"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_estimate_each_tile_matches_reference(tile, shape, causal, gen, monkeypatch):
    from xattention.kernels import estimate as est
    from xattention.kernels._tuning import force_config

    monkeypatch.setenv("XATTENTION_POISON_OUTPUTS", "1")
    b, hq, hkv, lq, lk, d, bs, s = shape
    rows, bn, bd = tile
    if rows < bs // s or bn < bs // s:
        pytest.skip("tile narrower than a block's groups (the pruner never keeps it)")
    q, k, _ = _structured(gen, b, hq, hkv, lq, lk, d, torch.float32)
    config = triton.Config({"ROWS": rows, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=4,
                           num_stages=1)
    with force_config(est._antidiagonal_estimate_fwd, config):
        got = estimate_block_scores(q, k, s, bs, causal, backend="triton")
    ref = ref_block_scores(q, k, s, bs, causal)
    assert got.shape == (b, hq, cdiv(lq, bs), cdiv(lk, bs))
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)


SPARSE_TILES = [(16, 16, False), (32, 16, True), (16, 32, False), (64, 64, True)]
# b, hq, hkv, lq, lk, d, block_size
SPARSE_SHAPES = [
    (1, 4, 2, 45, 101, 16, 64),  # GQA, Lq < Lk, ragged
    (1, 2, 2, 70, 70, 32, 32),  # plain prefill, odd length
]


@pytest.mark.parametrize("tile", SPARSE_TILES, ids=lambda t: f"{t[0]}x{t[1]}{'tma' * t[2]}")
@pytest.mark.parametrize("shape", SPARSE_SHAPES, ids=["gqa_chunk", "square"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_sparse_attention_each_tile_matches_reference(tile, shape, causal, gen, monkeypatch):
    from xattention.kernels import sparse_attention as sa
    from xattention.kernels._tuning import force_config

    monkeypatch.setenv("XATTENTION_POISON_OUTPUTS", "1")
    b, hq, hkv, lq, lk, d, bs = shape
    bm, bn, tma = tile
    if bs % bm or bs % bn:
        pytest.skip("tile does not divide the block (the pruner never keeps it)")
    q, k, v = _structured(gen, b, hq, hkv, lq, lk, d, torch.float16)
    mask = torch.rand(b, hq, cdiv(lq, bs), cdiv(lk, bs), generator=gen) < 0.5
    mask[..., 0] = True  # every row sees a key (causal or not)
    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma}, num_warps=4,
                           num_stages=1)
    with force_config(sa._block_sparse_attention_fwd, config):
        got = block_sparse_attention(q, k, v, mask, bs, causal, backend="triton")
    ref = ref_sparse_attention(q, k, v, mask, bs, causal)
    assert not got.isnan().any()
    err = ((got.double() - ref).norm() / ref.norm()).item()
    assert err < 2e-3  # fp16 operands and output


def test_forced_config_is_released():
    """Leaving force_config restores the pruner's own choice (and clears the tuner's cache)."""
    from xattention.kernels import estimate as est
    from xattention.kernels._tuning import force_config, forced_config

    config = triton.Config({"ROWS": 16, "BLOCK_N": 256, "BLOCK_D": 16}, num_warps=4,
                           num_stages=1)
    with force_config(est._antidiagonal_estimate_fwd, config):
        assert forced_config("_antidiagonal_estimate_fwd") is config
        assert est._prune(est._configs(), {}, GPB=16, G_TILE=1, D_PAD=64) == [config]
    assert forced_config("_antidiagonal_estimate_fwd") is None
    assert est._prune(est._configs(), {}, GPB=16, G_TILE=1, D_PAD=64) != [config]
