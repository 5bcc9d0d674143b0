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

interpreter_only = pytest.mark.skipif(
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


@interpreter_only
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


# The FP8 estimate (estimate_dtype=float8_e4m3fn, the kernel's SCALED path) under the same tiles:
# e4m3 operands with per-(batch, head) scales against the PyTorch path on the same rounded operands.
# b, hq, hkv, lq, lk, d, block_size, stride, causal: non-causal GQA 4/2 (two heads per program)
# with 256-group key tiles ragged at the end (258 groups) and head_dim 24, padded to FP8's minimum
# of 32; causal, batch 2, Lq < Lk, S=8. (One causal mode each keeps the interpreter time down.)
FP8_ESTIMATE_SHAPES = [
    (1, 4, 2, 37, 1030, 24, 16, 4, False),
    (2, 2, 1, 150, 260, 32, 64, 8, True),
]


@interpreter_only
@pytest.mark.parametrize("tile", ESTIMATE_TILES, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("shape", FP8_ESTIMATE_SHAPES, ids=["gqa_bs16_s4_noncausal",
                                                         "b2_bs64_s8_causal"])
def test_fp8_estimate_each_tile_matches_torch_fp8(tile, shape, gen, monkeypatch):
    from xattention.kernels import estimate as est
    from xattention.kernels._tuning import force_config

    monkeypatch.setenv("XATTENTION_POISON_OUTPUTS", "1")
    b, hq, hkv, lq, lk, d, bs, s, causal = shape
    rows, bn, bd = tile
    if rows < bs // s or bn < bs // s:
        pytest.skip("tile narrower than a block's groups (the pruner never keeps it)")
    q, k, _ = _structured(gen, b, hq, hkv, lq, lk, d, torch.float32)
    # Heads at different amplitudes: their power-of-two scales differ.
    q = (q * torch.exp2(2 * torch.rand(b, hq, 1, 1, generator=gen) - 1)).half()
    k = (k * torch.exp2(2 * torch.rand(b, hkv, 1, 1, generator=gen) - 1)).half()
    fp8 = torch.float8_e4m3fn
    config = triton.Config({"ROWS": rows, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=4,
                           num_stages=1)
    with force_config(est._antidiagonal_estimate_fwd, config):
        got = estimate_block_scores(q, k, s, bs, causal, backend="triton", estimate_dtype=fp8)
    ref = estimate_block_scores(q, k, s, bs, causal, backend="torch", estimate_dtype=fp8)
    assert got.shape == (b, hq, cdiv(lq, bs), cdiv(lk, bs))
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, atol=1e-7, rtol=1e-5)


SPARSE_TILES = [(16, 16, False), (32, 16, True), (16, 32, False), (64, 64, True)]
# b, hq, hkv, lq, lk, d, block_size
SPARSE_SHAPES = [
    (1, 4, 2, 45, 101, 16, 64),  # GQA, Lq < Lk, ragged
    (1, 2, 2, 70, 70, 32, 32),  # plain prefill, odd length
]


@interpreter_only
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


@interpreter_only
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


# xattention() runs exact dense attention on inputs too short for the sparse pipeline to pay.


@pytest.mark.parametrize(("lq", "lk", "causal"), [(50, 50, True), (30, 70, True), (40, 60, False)])
def test_short_inputs_run_dense_when_asked(lq, lk, causal, gen):
    from reference import ref_dense_attention

    from xattention import xattention

    q, k, v = _structured(gen, 1, 4, 2, lq, lk, 16, torch.float32)
    out, mask = xattention(q, k, v, threshold=0.5, block_size=16, stride=4, causal=causal,
                           min_sparse_len=lk + 1, backend="torch", return_mask=True)
    ref = ref_dense_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    from xattention.block_layout import candidate_blocks

    assert torch.equal(mask, candidate_blocks(lq, lk, 16, causal).expand_as(mask))
    # At min_sparse_len <= Lk the sparse pipeline runs: threshold 0.5 drops blocks.
    _, sparse_mask = xattention(q, k, v, threshold=0.5, block_size=16, stride=4, causal=causal,
                                min_sparse_len=lk, backend="torch", return_mask=True)
    assert sparse_mask.sum() < mask.sum()


def test_automatic_switch_only_on_cuda_auto():
    from xattention.kernels.dense import DENSE_FLOP_CROSSOVER, dense_flops, runs_dense

    q, k = torch.zeros(1, 32, 4096, 128), torch.zeros(1, 8, 4096, 128)
    assert dense_flops(q, k, True) == 4.0 * 32 * (4096 * 4097 // 2) * 128
    assert not runs_dense(q, k, True, "auto", None)  # CPU tensors: never automatic
    assert runs_dense(q, k, True, "torch", 5000) and not runs_dense(q, k, True, "auto", 4096)
    assert DENSE_FLOP_CROSSOVER > 0


@pytest.mark.parametrize(("bad", "error"), [(-1, ValueError), (1.5, TypeError), ("8k", TypeError),
                                            (True, TypeError)])
def test_min_sparse_len_rejects_bad_values(bad, error):
    from xattention import xattention

    q = torch.randn(1, 2, 32, 16)
    with pytest.raises(error, match="min_sparse_len"):
        xattention(q, q, q, block_size=16, stride=4, backend="torch", min_sparse_len=bad)
