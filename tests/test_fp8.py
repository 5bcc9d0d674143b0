"""The opt-in FP8 (e4m3) estimate: ``xattention.fp8`` and ``estimate_dtype=torch.float8_e4m3fn``.

The FP8 mode rounds q and k to e4m3 with one power-of-two scale per (batch, head) and then computes
the ordinary estimate on exactly those rounded operands. So the oracle is the float64 reference
(tests/reference.py) applied to the dequantized operands; the Triton kernel (under the CPU
interpreter here; tests/test_gpu_kernels.py runs it on a GPU) must match the PyTorch FP8 path.
"""

from __future__ import annotations

import math

import pytest
import torch
from inputs import SCORE_TOL, make_structured_qkv
from reference import cdiv, ref_block_scores, ref_candidates

from xattention import estimate_block_scores, xattention
from xattention.block_layout import candidate_blocks
from xattention.fp8 import dequantize, quantize_per_head

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6


def _is_power_of_two(x: torch.Tensor) -> torch.Tensor:
    mantissa, _ = torch.frexp(x.double())
    return (x > 0) & torch.isfinite(x) & (mantissa == 0.5)


def _wide_range(gen, b, h, length, d, dtype, lo, hi):
    """``[b, h, length, d]`` normal draws, each (batch, head) slice at its own magnitude 2^e,
    e uniform in [lo, hi] (not integers), so the slices need different scales."""
    e = lo + (hi - lo) * torch.rand(b, h, 1, 1, generator=gen, dtype=torch.float64)
    x = torch.randn(b, h, length, d, generator=gen, dtype=torch.float64) * torch.exp2(e)
    return x.to(dtype)


# ------------------------------------------------------------------------- quantize_per_head

WIDE = {torch.float32: (-30, 30), torch.bfloat16: (-30, 30), torch.float16: (-8, 12)}
DTYPES = list(WIDE)
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_scales_are_the_smallest_fitting_powers_of_two(gen, dtype):
    x = _wide_range(gen, 2, 5, 33, 24, dtype, *WIDE[dtype])
    x8, scale = quantize_per_head(x)
    assert x8.dtype == FP8 and x8.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (2, 5)
    assert _is_power_of_two(scale).all(), scale
    assert scale.unique().numel() > 1  # the slices really need different scales
    amax = x.double().abs().amax(dim=(-2, -1))
    # The slice's largest magnitude maps to at most e4m3's maximum, and (none of these slices is
    # small enough for the dtype's clamp) half the scale would not fit: the smallest such power.
    assert (amax / scale.double() <= E4M3_MAX).all()
    assert (amax / scale.double() > E4M3_MAX / 2).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_relative_error_at_most_one_sixteenth(gen, dtype):
    x = _wide_range(gen, 2, 3, 64, 32, dtype, *WIDE[dtype])
    x8, scale = quantize_per_head(x)
    back = dequantize(x8, scale, torch.float64)
    x64 = x.double()
    # e4m3's normal range (|x / scale| >= 2^-6): 3 mantissa bits, round to nearest.
    normal = x64.abs() >= E4M3_MIN_NORMAL * scale.double()[..., None, None]
    assert normal.float().mean() > 0.9
    err = (back - x64).abs()
    assert (err[normal] <= x64.abs()[normal] * 2.0**-4).all(), (err / x64.abs())[normal].max()
    # Below it (e4m3 subnormals), the absolute error is at most half the subnormal step 2^-9.
    assert (err[~normal] <= 2.0**-10 * scale.double()[..., None, None].expand_as(x64)[~normal]
            ).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_largest_magnitude_fits_e4m3(gen, dtype):
    """Even a slice whose largest magnitude sits just above 448 * 2^k (log2 of amax / 448 rounds
    down to k in float32) must not map past 448, where e4m3fn has no finite values."""
    x = _wide_range(gen, 1, 6, 16, 16, dtype, -4, 4)
    for h, k in enumerate([-3, 0, 1, 2, 5, -7]):
        target = torch.tensor(E4M3_MAX * 2.0**k, dtype=dtype)
        edge = torch.nextafter(target, torch.tensor(math.inf, dtype=dtype)) if h % 2 else target
        x[0, h, 3, 5] = edge * (-1 if h % 3 == 0 else 1)
    x8, scale = quantize_per_head(x)
    v = x8.float()
    assert torch.isfinite(v).all()
    assert (v.abs().amax(dim=(-2, -1)) <= E4M3_MAX).all()
    back = dequantize(x8, scale, torch.float64)
    big = x.double().abs() >= x.double().abs().amax(dim=(-2, -1), keepdim=True) / 2
    assert ((back - x.double()).abs()[big] <= x.double().abs()[big] * 2.0**-4).all()


def test_quantize_all_zero_slice_has_scale_one(gen):
    x = torch.randn(2, 3, 10, 8, generator=gen)
    x[1, 2] = 0.0
    x[0, 0] = -0.0
    x8, scale = quantize_per_head(x)
    assert scale[1, 2] == 1.0 and scale[0, 0] == 1.0
    assert (x8[1, 2].float() == 0).all() and (x8[0, 0].float() == 0).all()
    assert (dequantize(x8, scale, torch.float32)[1, 2] == 0).all()
    assert (scale[0, 1:] != 1.0).any()  # the other slices have scales of their own


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_nonfinite_spoils_only_its_slice(gen, dtype, value):
    x = _wide_range(gen, 2, 3, 12, 16, dtype, -3, 3)
    bad = x.clone()
    bad[1, 0, 7, 2] = value
    x8, scale = quantize_per_head(bad)
    back = dequantize(x8, scale, torch.float64)
    assert not torch.isfinite(back[1, 0]).any()  # every value of the slice
    others = torch.ones(2, 3, dtype=torch.bool)
    others[1, 0] = False
    assert torch.isfinite(back[others]).all()
    clean8, clean_scale = quantize_per_head(x)
    assert torch.equal(x8.float()[others], clean8.float()[others])
    assert torch.equal(scale[others], clean_scale[others])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_tiny_magnitudes_stay_finite(gen, dtype):
    """Slices at the dtype's smallest normals and subnormals: no inf/NaN from a scale that
    underflows (a float16 scale below 2^-14 would not even be exact in float16)."""
    fi = torch.finfo(dtype)
    x = torch.randn(1, 4, 16, 8, generator=gen, dtype=torch.float64)
    x[0, 0] *= fi.tiny * 4
    x[0, 1] *= fi.tiny / 64  # mostly subnormal
    x[0, 2] = fi.tiny * fi.eps  # all the smallest subnormal
    x[0, 3] *= fi.tiny * 2.0**20
    x = x.to(dtype)
    assert (x[0, 2] != 0).all()
    x8, scale = quantize_per_head(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert _is_power_of_two(scale).all()
    assert torch.isfinite(x8.float()).all()
    for work in (dtype, torch.float32, torch.float64):
        assert torch.isfinite(dequantize(x8, scale, work)).all()
    # The scale is exact in the input dtype (the division by it is exact).
    assert torch.equal(scale.to(dtype).double(), scale.double())
    # The largest slice is well inside the range: the usual error bound holds.
    back = dequantize(x8, scale, torch.float64)[0, 3]
    ok = x[0, 3].double().abs() >= E4M3_MIN_NORMAL * scale[0, 3].double()
    assert ((back - x[0, 3].double()).abs()[ok] <= x[0, 3].double().abs()[ok] / 16).all()


def test_dequantize_is_exact(gen):
    x = _wide_range(gen, 2, 4, 20, 16, torch.float32, -20, 20)
    x8, scale = quantize_per_head(x)
    by_hand = x8.float() * scale[..., None, None]
    assert torch.equal(by_hand.double(), dequantize(x8, scale, torch.float64))
    assert torch.equal(by_hand, dequantize(x8, scale, torch.float32))
    assert dequantize(x8, scale, torch.float16).dtype == torch.float16


# ------------------------------------------------------------------------- the FP8 estimate

# b, hq, hkv, lq, lk, d, block_size, stride: S = 8 / 16, block sizes 64 / 128, odd lengths, GQA,
# Lq < Lk; head_dim 16 and 24 (padded to the FP8 kernel's 32), 32, 40 (padded to 64).
FP8_CASES = {
    "square_bs64_s8": (1, 2, 2, 256, 256, 32, 64, 8),
    "gqa2_odd_chunk_bs64_s8": (1, 4, 2, 77, 205, 16, 64, 8),
    "gqa4_b2_bs128_s16": (2, 4, 1, 150, 301, 32, 128, 16),
    "hd40_chunk_bs128_s8": (1, 2, 1, 129, 389, 40, 128, 8),
    "gqa2_hd24_bs64_s16": (1, 6, 3, 200, 333, 24, 64, 16),
}
CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
CASES = pytest.mark.parametrize("name", list(FP8_CASES))


def _fp8_inputs(gen, name, dtype):
    """Structured q, k with each (batch, head) of q and each of k at its own amplitude (0.5x-2x),
    so their power-of-two scales differ and a scale read for the wrong head shows."""
    b, hq, hkv, lq, lk, d, _, _ = FP8_CASES[name]
    q, k, _ = make_structured_qkv(gen, b, hq, hkv, lq, lk, d)
    q = q * torch.exp2(2 * torch.rand(b, hq, 1, 1, generator=gen) - 1)
    k = k * torch.exp2(2 * torch.rand(b, hkv, 1, 1, generator=gen) - 1)
    return q.to(dtype), k.to(dtype)


def _ref_fp8(q, k, stride, block_size, causal):
    """float64 reference on the rounded operands."""
    # Keys are centred before rounding (xattention.fp8), queries are not.
    q64 = dequantize(*quantize_per_head(q), torch.float64)
    k64 = dequantize(*quantize_per_head(k, center=True), torch.float64)
    return ref_block_scores(q64, k64, stride, block_size, causal)


@CAUSAL
@CASES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_fp8_torch_path_matches_reference_on_rounded_operands(gen, name, causal, dtype):
    half_case = {torch.float16: "gqa2_odd_chunk_bs64_s8", torch.bfloat16: "gqa4_b2_bs128_s16"}
    if dtype in half_case and name != half_case[dtype]:
        pytest.skip("half-precision inputs on one case each")
    b, hq, hkv, lq, lk, d, bs, s = FP8_CASES[name]
    q, k = _fp8_inputs(gen, name, dtype)
    got = estimate_block_scores(q, k, s, bs, causal, backend="torch", estimate_dtype=FP8)
    assert got.dtype == torch.float32 and got.shape == (b, hq, cdiv(lq, bs), cdiv(lk, bs))
    ref = _ref_fp8(q, k, s, bs, causal)
    torch.testing.assert_close(got.double(), ref, **SCORE_TOL[torch.float32])
    # The rounding is visible: the exact estimate differs by far more than the tolerance.
    exact = estimate_block_scores(q, k, s, bs, causal, backend="torch")
    assert (exact - got).abs().max() > 1e-3


@CAUSAL
def test_fp8_torch_path_float64_inputs(gen, causal):
    """float64 is a supported input dtype; the FP8 path works in float64 on it."""
    name = "gqa2_odd_chunk_bs64_s8"
    _, _, _, _, _, _, bs, s = FP8_CASES[name]
    q, k = _fp8_inputs(gen, name, torch.float64)
    got = estimate_block_scores(q, k, s, bs, causal, backend="torch", estimate_dtype=FP8)
    torch.testing.assert_close(got.double(), _ref_fp8(q, k, s, bs, causal), rtol=1e-6, atol=1e-9)


interpreter_only = pytest.mark.skipif(
    not __import__("xattention._backend", fromlist=["x"]).interpreter_enabled(),
    reason="runs the kernels under TRITON_INTERPRET=1 (tests/test_gpu_kernels.py on a GPU)",
)


@interpreter_only
@CAUSAL
@CASES
def test_fp8_triton_matches_torch_fp8_path(gen, name, causal, monkeypatch):
    """The kernel's SCALED path (e4m3 operands, scales multiplied into the products) against the
    PyTorch path on the same rounded operands; NaN-poisoned outputs catch unwritten scores."""
    monkeypatch.setenv("XATTENTION_POISON_OUTPUTS", "1")
    b, hq, hkv, lq, lk, d, bs, s = FP8_CASES[name]
    dtype = torch.float16 if name.startswith("gqa") else torch.float32
    q, k = _fp8_inputs(gen, name, dtype)
    got = estimate_block_scores(q, k, s, bs, causal, backend="triton", estimate_dtype=FP8)
    ref = estimate_block_scores(q, k, s, bs, causal, backend="torch", estimate_dtype=FP8)
    assert got.shape == ref.shape and not got.isnan().any()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-5)
    assert (got * ~ref_candidates(lq, lk, bs, causal)).abs().max() <= 1e-6


def test_fp8_estimate_non_contiguous_inputs(backend, gen):
    """[B, L, H, D] storage viewed as [B, H, L, D] (what transformers hands over): the quantized
    copies keep that layout, and the scores are those of the contiguous tensors."""
    q, k = _fp8_inputs(gen, "gqa2_odd_chunk_bs64_s8", torch.float16)
    qt, kt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))
    assert not qt.is_contiguous()
    _, _, _, _, _, _, bs, s = FP8_CASES["gqa2_odd_chunk_bs64_s8"]
    got = estimate_block_scores(qt, kt, s, bs, backend=backend, estimate_dtype=FP8)
    ref = estimate_block_scores(q, k, s, bs, backend="torch", estimate_dtype=FP8)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fp8_estimate_of_tiny_inputs_is_finite(backend, gen, dtype):
    """float16 heads near the smallest normal: the clamped scale keeps everything finite."""
    tiny = torch.finfo(dtype).tiny
    q = (torch.randn(1, 2, 40, 16, generator=gen) * tiny * 8).to(dtype)
    k = (torch.randn(1, 2, 70, 16, generator=gen) * tiny * 8).to(dtype)
    got = estimate_block_scores(q, k, 4, 16, True, backend=backend, estimate_dtype=FP8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- validation


def _call_estimate(estimate_dtype):
    q = torch.randn(1, 2, 32, 16)
    return estimate_block_scores(q, q, 4, 16, backend="torch", estimate_dtype=estimate_dtype)


def _call_xattention(estimate_dtype):
    q = torch.randn(1, 2, 32, 16)
    return xattention(q, q, q, stride=4, block_size=16, backend="torch",
                      estimate_dtype=estimate_dtype)


CALLS = pytest.mark.parametrize("call", [_call_estimate, _call_xattention],
                                ids=["estimate_block_scores", "xattention"])


@CALLS
@pytest.mark.parametrize("bad", ["fp8", "torch.float8_e4m3fn", 8, torch.zeros(1, dtype=FP8)],
                         ids=["str", "str_name", "int", "tensor"])
def test_estimate_dtype_not_a_dtype_is_a_type_error(call, bad):
    with pytest.raises(TypeError, match="estimate_dtype"):
        call(bad)


@CALLS
@pytest.mark.parametrize("bad", [torch.float16, torch.bfloat16, torch.float8_e5m2, torch.int8],
                         ids=["fp16", "bf16", "e5m2", "int8"])
def test_estimate_dtype_other_dtype_is_a_value_error(call, bad):
    with pytest.raises(ValueError, match="estimate_dtype"):
        call(bad)


@CALLS
def test_estimate_dtype_accepts_none_and_e4m3(call):
    call(None)
    call(FP8)


# ------------------------------------------------------------------------- non-finite inputs


@pytest.mark.parametrize("which", ["q", "k"])
@CAUSAL
def test_fp8_nonfinite_head_keeps_every_candidate(backend, make_qkv, gen, which, causal):
    """A NaN in one head's q (or k: every query head of its group) makes that head's scale NaN,
    so its scores are NaN and selection keeps all its candidate blocks; other heads see exactly
    the mask of the clean input."""
    if backend == "triton" and (which == "k" or not causal):
        pytest.skip("the interpreter runs one case")
    lq, lk = (40, 80) if backend == "triton" else (75, 150)
    b, hq, hkv, d, bs = 1, 4, 2, 16, 16
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d)
    kw = dict(threshold=0.3, stride=4, block_size=bs, causal=causal, backend=backend,
              return_mask=True, estimate_dtype=FP8)
    _, clean = xattention(q, k, v, **kw)
    x = {"q": q, "k": k}[which].clone()
    x[0, 1, int(torch.randint(0, x.shape[2], (1,), generator=gen)), 3] = math.nan
    qq, kk = (x, k) if which == "q" else (q, x)
    _, mask = xattention(qq, kk, v, **kw)
    spoiled = [1] if which == "q" else [2, 3]  # kv head 1 serves query heads 2 and 3
    cand = candidate_blocks(lq, lk, bs, causal)
    for h in range(hq):
        if h in spoiled:
            assert not torch.equal(clean[0, h], cand)  # the clean head is sparse
            assert torch.equal(mask[0, h], cand), h
        else:
            assert torch.equal(mask[0, h], clean[0, h]), h


# Key centring (xattention.fp8): subtracting each head's mean key shifts a query row's logits by
# one amount, so the estimate is unchanged; rounding then spends e4m3's bits on what varies.


@CAUSAL
@pytest.mark.parametrize("lk", [256, 250], ids=["whole_groups", "partial_last_group"])
def test_centring_keys_leaves_the_estimate_unchanged(gen, causal, lk):
    q = torch.randn(1, 4, 200, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, lk, 16, generator=gen, dtype=torch.float64) + 3.0
    centred = k - k.mean(dim=-2, keepdim=True)
    a, b = (ref_block_scores(q, x, 8, 32, causal) for x in (k, centred))
    if lk % 8 == 0:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    else:  # the zero padding of the last key group is not centred: only blocks holding it move
        torch.testing.assert_close(a[..., :-1], b[..., :-1], rtol=0.5, atol=0.05)
        assert (a - b).abs().max() > 1e-6


def test_centred_rounding_survives_a_large_per_head_key_offset(gen):
    """Keys carrying a large constant (Qwen2.5's first layer: |k| up to 362, under 10 once the
    head's mean is removed): uncentred, one scale per head leaves 3 bits for the offset and none
    for what tells keys apart; centred, the FP8 estimate stays close to the exact one."""
    q = torch.randn(1, 4, 512, 32, generator=gen)
    k = torch.randn(1, 2, 512, 32, generator=gen) * 3
    k[..., :4] += 300.0
    exact = estimate_block_scores(q, k, 8, 64, True, backend="torch")
    fp8 = estimate_block_scores(q, k, 8, 64, True, backend="torch", estimate_dtype=FP8)
    uncentred = ref_block_scores(dequantize(*quantize_per_head(q), torch.float64),
                                 dequantize(*quantize_per_head(k), torch.float64), 8, 64, True)
    centred_err = (fp8 - exact).abs().max().item()
    uncentred_err = (uncentred.float() - exact).abs().max().item()
    assert centred_err < 0.05
    assert uncentred_err > 4 * centred_err


def test_centred_scales_match_the_explicit_shift(gen):
    x = (torch.randn(2, 3, 301, 24, generator=gen) * 5 + 40).to(torch.bfloat16)
    x8, scale = quantize_per_head(x, center=True)
    shifted = x.float() - x.float().mean(dim=-2, keepdim=True)
    amax = shifted.abs().amax(dim=(-2, -1))
    assert torch.equal(scale, torch.exp2(torch.ceil(torch.log2(amax / 448))))
    assert (x8.float().abs() <= 448).all()
    rel = (x8.float() * scale[..., None, None] - shifted).abs() / shifted.abs().clamp(min=1e-2)
    assert rel.max() <= 2.0 ** -4 + 1e-6
