"""The Triton kernels on a real GPU at real sizes, against the PyTorch reference path.

Skipped without CUDA (CI has none); run on the lent GPU with ``pytest tests/test_gpu_kernels.py``.
Outputs are NaN-poisoned before the kernels write them (XATTENTION_POISON_OUTPUTS), so an element a
kernel skips fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from xattention import block_sparse_attention, estimate_block_scores, select_blocks, xattention
from xattention.block_layout import BlockLayout
from xattention.plan import SparsePlan
from xattention.synthetic import structured_qkv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("XATTENTION_POISON_OUTPUTS", "1")


def _inputs(b, hq, hkv, lq, lk, d, dtype, seed):
    """Structured attention (sinks, local windows, heavy keys, ...) built on the GPU."""
    return structured_qkv(b, hq, hkv, lq, lk, d, seed=seed, dtype=dtype, device="cuda")[:3]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


SHAPES = [
    # b, hq, hkv, lq, lk, d, block_size, stride
    (1, 8, 2, 4096, 4096, 128, 128, 8),
    (2, 4, 4, 3001, 5000, 64, 128, 16),
    (1, 4, 1, 1000, 1000, 256, 64, 8),
    (1, 9, 3, 2177, 2177, 64, 128, 8),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_estimate_matches_reference(shape, causal, dtype):
    b, hq, hkv, lq, lk, d, bs, s = shape
    q, k, _ = _inputs(b, hq, hkv, lq, lk, d, dtype, seed=hash((shape, causal)) % 1000)
    got = estimate_block_scores(q, k, s, bs, causal, backend="triton")
    ref = estimate_block_scores(q, k, s, bs, causal, backend="torch")
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_attention_matches_reference(shape, causal, dtype):
    b, hq, hkv, lq, lk, d, bs, _ = shape
    q, k, v = _inputs(b, hq, hkv, lq, lk, d, dtype, seed=7)
    nqb, nkb = -(-lq // bs), -(-lk // bs)
    g = torch.Generator(device="cuda").manual_seed(3)
    mask = torch.rand(b, hq, nqb, nkb, device="cuda", generator=g) < 0.3
    mask[..., 0] = True
    got, lse = block_sparse_attention(q, k, v, mask, bs, causal, backend="triton",
                                      return_lse=True)
    ref, ref_lse = block_sparse_attention(q, k, v, mask, bs, causal, backend="torch",
                                          return_lse=True)
    assert not got.isnan().any()
    assert _rel(got, ref) < 1e-2
    torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("causal", [True, False])
def test_empty_rows_give_zero_and_minus_inf(causal):
    q, k, v = _inputs(1, 2, 1, 512, 512, 64, torch.bfloat16, seed=1)
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool, device="cuda")
    mask[:, :, 2:, 0] = True
    out, lse = block_sparse_attention(q, k, v, mask, 128, causal, backend="triton",
                                      return_lse=True)
    assert (out[:, :, :256] == 0).all() and torch.isneginf(lse[:, :, :256]).all()
    ref = block_sparse_attention(q, k, v, mask, 128, causal, backend="torch")
    assert _rel(out[:, :, 256:], ref[:, :, 256:]) < 1e-2


def test_xattention_end_to_end_matches_reference_path():
    q, k, v = _inputs(1, 8, 2, 8192, 8192, 128, torch.bfloat16, seed=11)
    out, mask = xattention(q, k, v, threshold=0.9, return_mask=True, backend="triton")
    ref_scores = estimate_block_scores(q, k, backend="torch")
    ref_mask = select_blocks(ref_scores, 0.9, q_len=8192, k_len=8192)
    # Scores agree to ~1e-6, so masks differ only where a block sits on the threshold.
    assert (mask != ref_mask).float().mean().item() < 1e-3
    ref = block_sparse_attention(q, k, v, mask, backend="torch")
    assert _rel(out, ref) < 1e-2


def test_threshold_one_is_dense_attention():
    q, k, v = _inputs(1, 8, 2, 4096, 4096, 128, torch.bfloat16, seed=5)
    out = xattention(q, k, v, threshold=1.0, backend="triton")
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    assert _rel(out, dense) < 1e-2


@pytest.mark.parametrize("causal", [True, False])
def test_selection_kernel_matches_reference(causal):
    g = torch.Generator(device="cuda").manual_seed(2)
    lq, lk, bs = 30000, 33000, 128
    scores = torch.rand(2, 5, -(-lq // bs), -(-lk // bs), device="cuda", generator=g) ** 4
    scores = scores / scores.sum(-1, keepdim=True)
    thr = torch.tensor([0.5, 0.8, 0.9, 0.95, 1.0], device="cuda")
    got = select_blocks(scores, thr, q_len=lq, k_len=lk, causal=causal, backend="triton")
    ref = select_blocks(scores, thr, q_len=lq, k_len=lk, causal=causal, backend="torch")
    assert got.view(torch.uint8).max() <= 1  # every element written
    assert torch.equal(got, ref)


def test_pointer_path_without_tma(monkeypatch):
    import xattention.kernels.sparse_attention as sa

    monkeypatch.setenv("XATTENTION_DISABLE_TMA", "1")
    q, k, v = _inputs(1, 4, 2, 1500, 1500, 128, torch.bfloat16, seed=9)
    mask = torch.rand(1, 4, 12, 12, device="cuda") < 0.5
    mask[..., 0] = True
    plan = SparsePlan.from_mask(mask, BlockLayout(1500, 1500, 128, True))
    got, _ = sa.block_sparse_attention_triton(q, k, v, plan, 128 ** -0.5)
    ref = block_sparse_attention(q, k, v, mask, backend="torch")
    assert _rel(got, ref) < 1e-2


# ---------------------------------------------------------------------------------------------
# Every config the pruners can keep, forced one by one (the tuner may pick any of them).
# ---------------------------------------------------------------------------------------------

# b, hq, hkv, lq, lk, d, block_size, stride: D=64/128/256, S=8/16, odd lengths, GQA, Lq < Lk.
EST_CONFIG_SHAPES = [
    (1, 4, 2, 2000, 3001, 256, 128, 8),  # the reported family: D=256, S=8, GQA 4/2
    (1, 8, 2, 2177, 2177, 128, 128, 8),
    (1, 4, 4, 1501, 2900, 64, 128, 16),
    (1, 2, 1, 999, 999, 128, 64, 8),
]


def _estimate_cases():
    from xattention.kernels import estimate as est

    cases = []
    for shape in EST_CONFIG_SHAPES:
        b, hq, hkv, lq, lk, d, bs, s = shape
        gpb, g_tile = bs // s, est._head_tile(hq // hkv)
        d_pad = est.padded_head_dim(d, 2)
        configs = est.kept_configs(gpb, g_tile, d_pad, False)
        configs += [c for c in est.kept_configs(gpb, g_tile, d_pad, True) if c not in configs]
        cases += [pytest.param(shape, c, id=f"{'-'.join(map(str, shape))}-{c}") for c in configs]
    return cases


@pytest.mark.parametrize(("shape", "config"), _estimate_cases())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_estimate_every_kept_config(shape, config, causal):
    from xattention.kernels import estimate as est
    from xattention.kernels._tuning import force_config

    b, hq, hkv, lq, lk, d, bs, s = shape
    q, k, _ = _inputs(b, hq, hkv, lq, lk, d, torch.bfloat16, seed=lq + d)
    with force_config(est._antidiagonal_estimate_fwd, config):
        got = estimate_block_scores(q, k, s, bs, causal, backend="triton")
    ref = estimate_block_scores(q.double(), k.double(), s, bs, causal, backend="torch")
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), ref.double(), atol=2e-5, rtol=1e-3)


# b, hq, hkv, lq, lk, d, block_size
SPARSE_CONFIG_SHAPES = [
    (1, 8, 2, 2177, 2177, 128, 128),
    (1, 4, 2, 1000, 3001, 64, 128),
    (1, 4, 1, 1000, 1000, 256, 64),
]


def _sparse_cases():
    from xattention.kernels import sparse_attention as sa

    cases = []
    for shape in SPARSE_CONFIG_SHAPES:
        for tma in (True, False):
            for c in sa.kept_configs(sa._gpu_configs(), shape[6], shape[5], tma):
                cases.append(pytest.param(shape, c, id=f"{'-'.join(map(str, shape))}-{c}"))
    return cases


@pytest.mark.parametrize(("shape", "config"), _sparse_cases())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_sparse_attention_every_kept_config(shape, config, causal, monkeypatch):
    from xattention.kernels import sparse_attention as sa
    from xattention.kernels._tuning import force_config

    b, hq, hkv, lq, lk, d, bs = shape
    if not config.kwargs["USE_TMA"]:
        monkeypatch.setenv("XATTENTION_DISABLE_TMA", "1")  # the pointer path's inputs
    q, k, v = _inputs(b, hq, hkv, lq, lk, d, torch.bfloat16, seed=lk + d)
    g = torch.Generator(device="cuda").manual_seed(lq)
    mask = torch.rand(b, hq, -(-lq // bs), -(-lk // bs), device="cuda", generator=g) < 0.4
    mask[..., 0] = True
    with force_config(sa._block_sparse_attention_fwd, config):
        got, lse = block_sparse_attention(q, k, v, mask, bs, causal, backend="triton",
                                          return_lse=True)
    ref, ref_lse = block_sparse_attention(q.double(), k.double(), v.double(), mask, bs, causal,
                                          backend="torch", return_lse=True)
    assert not got.isnan().any()
    assert _rel(got, ref) < 1e-2
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("k_len", [140_000, 300_000], ids=["8warps_select", "wide_rows"])
def test_selection_plan_wide_rows(k_len):
    """The selection kernel switches to 8 warps past 1024 key blocks: its plan against the plan
    of the PyTorch selection's mask (few query rows keep it cheap)."""
    from xattention.selection import _select_plan

    g = torch.Generator(device="cuda").manual_seed(k_len)
    lq, bs = 300, 128
    scores = torch.rand(1, 3, -(-lq // bs), -(-k_len // bs), device="cuda", generator=g) ** 4
    scores = scores / scores.sum(-1, keepdim=True)
    for causal in (True, False):
        lay = BlockLayout(lq, k_len, bs, causal)
        got = _select_plan(scores, 0.9, lay, "triton")
        ref = SparsePlan.from_mask(_select_plan(scores, 0.9, lay, "torch").to_dense(), lay)
        for name in ("full_count", "full_index", "partial_count", "partial_index"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name


# ---------------------------------------------------------------------------------------------
# The FP8 (e4m3) estimate: estimate_dtype=torch.float8_e4m3fn.
# ---------------------------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn
# Tolerance of the FP8 kernel against the PyTorch FP8 path. Both compute on exactly the same e4m3
# operands (quantize_per_head is deterministic and its power-of-two scales are exact), and each
# e4m3 x e4m3 product (4 x 4 significant bits) is exact in fp32, so only the accumulation differs:
# the PyTorch path sums in IEEE fp32, while Triton's FP8 MMA on sm90 keeps the whole K loop in the
# tensor core's reduced-precision accumulator by default (max_num_imprecise_acc = 2^30 on sm90,
# i.e. never promoted to full fp32; it reportedly keeps about 14 significant bits). A relative
# error ~1e-4 on logits of magnitude up to ~20 is an absolute error of a few 1e-3 in the exponent,
# i.e. that relative error in every probability: ~1e-3 absolute on small block scores, rtol 1e-2
# for the dominant ones (a score of 0.9 may move by a few 1e-3). A scale read for the wrong head
# or a skipped tile moves scores by 1e-2 to 1.
FP8_SCORE_TOL = dict(atol=1e-3, rtol=1e-2)


def _fp8_or_skip():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matrix products need an sm89+ GPU")


def _fp8_inputs(b, hq, hkv, lq, lk, d, seed):
    """bf16 structured inputs with each (batch, head) of q and of k at its own amplitude (0.5x-2x),
    so their power-of-two scales differ and a scale read for the wrong head shows."""
    q, k, v = _inputs(b, hq, hkv, lq, lk, d, torch.float32, seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = q * torch.exp2(2 * torch.rand(b, hq, 1, 1, device="cuda", generator=g) - 1)
    k = k * torch.exp2(2 * torch.rand(b, hkv, 1, 1, device="cuda", generator=g) - 1)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


FP8_SHAPES = [
    # b, hq, hkv, lq, lk, d, block_size, stride
    (1, 8, 2, 4096, 4096, 128, 128, 8),
    (2, 4, 4, 3001, 5000, 64, 128, 16),
    (1, 4, 1, 1000, 1000, 256, 64, 8),
    (1, 9, 3, 2177, 2177, 64, 128, 8),
    (1, 4, 2, 1500, 2100, 32, 128, 8),  # D=32: FP8's smallest reduced dim, no padding
    (1, 2, 1, 777, 1300, 16, 64, 16),  # D=16, padded to 32 for the FP8 dot
    (1, 4, 2, 1000, 1800, 80, 128, 8),  # D=80, padded to 128
]


@pytest.mark.parametrize("shape", FP8_SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_fp8_estimate_matches_torch_fp8_path(shape, causal):
    _fp8_or_skip()
    b, hq, hkv, lq, lk, d, bs, s = shape
    q, k, _ = _fp8_inputs(b, hq, hkv, lq, lk, d, seed=lq + d)
    got = estimate_block_scores(q, k, s, bs, causal, backend="triton", estimate_dtype=FP8)
    ref = estimate_block_scores(q, k, s, bs, causal, backend="torch", estimate_dtype=FP8)
    assert got.shape == ref.shape and not got.isnan().any()
    torch.testing.assert_close(got, ref, **FP8_SCORE_TOL)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]), atol=1e-4, rtol=0)
    # The FP8 rounding itself is visible (the comparison is with the rounded operands' scores).
    exact = estimate_block_scores(q, k, s, bs, causal, backend="torch")
    assert (exact - ref).abs().max() > 1e-3


# Every FP8 config the pruner can keep (elem=1: more fit shared memory than at 2 bytes) and the
# quick-tuning config, forced one by one. The D=32 shape has no kept config with BLOCK_D <= 32, so
# it runs kept_configs' fallback.
FP8_CONFIG_SHAPES = EST_CONFIG_SHAPES + [(1, 4, 2, 1200, 1900, 32, 128, 8)]


def _fp8_estimate_cases():
    from xattention.kernels import estimate as est
    from xattention.kernels._tuning import smem_limit

    smem = smem_limit(torch.device("cuda") if torch.cuda.is_available() else None)
    cases = []
    for shape in FP8_CONFIG_SHAPES:
        b, hq, hkv, lq, lk, d, bs, s = shape
        gpb, g_tile = bs // s, est._head_tile(hq // hkv)
        d_pad = est.padded_head_dim(d, 1)
        configs = est.kept_configs(gpb, g_tile, d_pad, False, elem=1, smem=smem)
        configs += [c for c in est.kept_configs(gpb, g_tile, d_pad, True, elem=1, smem=smem)
                    if c not in configs]
        cases += [pytest.param(shape, c, id=f"{'-'.join(map(str, shape))}-{c}") for c in configs]
        cases.append(pytest.param(shape, "quick", id=f"{'-'.join(map(str, shape))}-quick"))
    return cases


@pytest.mark.parametrize(("shape", "config"), _fp8_estimate_cases())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_fp8_estimate_every_kept_config(shape, config, causal):
    _fp8_or_skip()
    from xattention.kernels import estimate as est
    from xattention.kernels._tuning import force_config

    b, hq, hkv, lq, lk, d, bs, s = shape
    if isinstance(config, str):  # "quick": the quick-tuning config of this launch
        g_tile = est._head_tile(hq // hkv)
        row_groups = -(-lq // s) * b * hkv * (hq // hkv // g_tile)
        config = est._quick_config(bs // s, g_tile, est.padded_head_dim(d, 1),
                                   row_groups, torch.device("cuda"), elem=1)
    q, k, _ = _fp8_inputs(b, hq, hkv, lq, lk, d, seed=lq + d)
    with force_config(est._antidiagonal_estimate_fwd, config):
        got = estimate_block_scores(q, k, s, bs, causal, backend="triton", estimate_dtype=FP8)
    # float32 work on the same rounded operands (a float64 copy of q would round identically).
    ref = estimate_block_scores(q, k, s, bs, causal, backend="torch", estimate_dtype=FP8)
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, **FP8_SCORE_TOL)


@pytest.mark.parametrize(("b", "hq", "hkv", "lq", "lk", "d"),
                         [(1, 8, 2, 4096, 4096, 128), (1, 4, 2, 3000, 5001, 64)],
                         ids=["4096-gqa4", "chunk-gqa2"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_xattention_fp8_end_to_end(b, hq, hkv, lq, lk, d, causal):
    """The FP8 estimate only picks the mask; attention on that mask stays exact."""
    _fp8_or_skip()
    from xattention.block_layout import candidate_blocks

    q, k, v = _fp8_inputs(b, hq, hkv, lq, lk, d, seed=lk)
    out, mask = xattention(q, k, v, threshold=0.9, causal=causal, return_mask=True,
                           backend="triton", estimate_dtype=FP8)
    assert not out.isnan().any()
    ref = block_sparse_attention(q.double(), k.double(), v.double(), mask, causal=causal,
                                 backend="torch")
    assert _rel(out, ref) < 1e-2  # bf16 output
    cand = candidate_blocks(lq, lk, 128, causal, device="cuda")
    assert mask.sum() < cand.sum() * b * hq  # blocks were dropped
    assert not (mask & ~cand).any()
    # The mask is the FP8 estimate's: scores within FP8_SCORE_TOL of the PyTorch FP8 path, so the
    # kept sets differ only where a block sits on the threshold.
    ref_scores = estimate_block_scores(q, k, causal=causal, backend="torch", estimate_dtype=FP8)
    ref_mask = select_blocks(ref_scores, 0.9, q_len=lq, k_len=lk, causal=causal)
    assert (mask != ref_mask).float().mean().item() < 1e-2


# ---------------------------------------------------------------------------------------------
# The optional FlashAttention-4 sparse stage and the dense path for short inputs.
# ---------------------------------------------------------------------------------------------


def _fa4_or_skip():
    from xattention.kernels.fa4 import fa4_import_error

    reason = fa4_import_error()
    if reason:
        pytest.skip(f"flash-attn-4 not installed ({reason})")


# b, hq, hkv, lq, lk, d
FA4_SHAPES = [
    (1, 8, 2, 2177, 2177, 128),
    (2, 4, 4, 1000, 3001, 64),
    (1, 6, 2, 4096, 4096, 128),
]


@pytest.mark.parametrize("shape", FA4_SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_fa4_sparse_matches_reference(shape, causal):
    _fa4_or_skip()
    from xattention.kernels.fa4 import block_sparse_attention_fa4, fa4_unsupported_reason

    b, hq, hkv, lq, lk, d = shape
    q, k, v = _inputs(b, hq, hkv, lq, lk, d, torch.bfloat16, seed=lq)
    assert fa4_unsupported_reason(q, k, 128) is None
    g = torch.Generator(device="cuda").manual_seed(lk)
    mask = torch.rand(b, hq, -(-lq // 128), -(-lk // 128), device="cuda", generator=g) < 0.3
    mask[..., 0] = True
    plan = SparsePlan.from_mask(mask, BlockLayout(lq, lk, 128, causal))
    out, lse = block_sparse_attention_fa4(q, k, v, plan, d ** -0.5)
    ref, ref_lse = block_sparse_attention(q.double(), k.double(), v.double(), mask, 128, causal,
                                          backend="torch", return_lse=True)
    assert out.shape == q.shape and not out.isnan().any()
    assert _rel(out, ref) < 1e-2
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-2, rtol=1e-3)
    # backend="auto" serves this through FA4.
    auto = block_sparse_attention(q, k, v, mask, 128, causal)
    assert torch.equal(auto, out)


def test_fa4_through_xattention_matches_reference_path():
    _fa4_or_skip()
    q, k, v = _inputs(1, 8, 2, 8192, 8192, 128, torch.bfloat16, seed=12)
    out, mask = xattention(q, k, v, threshold=0.9, return_mask=True, min_sparse_len=0)
    ref = block_sparse_attention(q, k, v, mask, backend="torch")
    assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize(("lq", "lk", "causal"), [(1000, 1000, True), (700, 3000, True),
                                                  (999, 999, False)])
def test_short_inputs_run_dense_on_gpu(lq, lk, causal):
    from xattention.kernels.dense import runs_dense

    q, k, v = _inputs(1, 8, 2, lq, lk, 128, torch.bfloat16, seed=lq)
    assert runs_dense(q, k, causal, "auto", None)  # far below the crossover
    out, mask = xattention(q, k, v, threshold=0.5, causal=causal, return_mask=True)
    ref = block_sparse_attention(q.double(), k.double(), v.double(), mask, causal=causal,
                                 backend="torch")
    assert _rel(out, ref) < 1e-2
    sparse = xattention(q, k, v, threshold=0.5, causal=causal, min_sparse_len=0)
    assert _rel(sparse, ref) > 0  # the sparse pipeline ran (and dropped blocks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_quantize_kernel_is_bitwise_torch(dtype):
    """The one-pass Triton rounding to e4m3 gives the PyTorch rounding bit for bit: the same
    scales, the same bytes, ties to even included (values halfway between e4m3 neighbours)."""
    _fp8_or_skip()
    from xattention.fp8 import quantize_per_head
    from xattention.kernels.quantize import quantize_per_head_triton

    g = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(2, 3, 1001, 80, device="cuda", generator=g)
    x = x * torch.tensor([1.0, 37.0, 1e-3], device="cuda").view(1, 3, 1, 1)
    x[0, 0, :8, 0] = torch.tensor([124.0, 120.0, 132.0, 0.5 * (0.25 + 0.28125), -124.0,
                                   448.0, -448.0, 2.0 ** -9], device="cuda")
    x = x.to(dtype)
    layouts = {"contiguous": x, "[B, L, H, D] view": x.transpose(1, 2).contiguous().transpose(1, 2)}
    for center in (False, True):  # keys are centred (xattention.fp8)
        ref, ref_scale = quantize_per_head(x, center)
        for name, xi in layouts.items():
            got, scale = quantize_per_head_triton(xi, center)
            assert torch.equal(scale, ref_scale), (name, center)
            assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), (name, center)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
def test_selection_nonfinite_rules_match_torch(which, value):
    """The selection kernel's own non-finite rules (flags from q, k, v) give the PyTorch rules'
    mask on the same scores; GQA, Lq < Lk, odd lengths."""
    from xattention.estimate import _estimate
    from xattention.selection import _select

    q, k, v = _inputs(1, 8, 2, 3001, 5000, 128, torch.bfloat16, seed=13)
    x = {"q": q, "k": k, "v": v}[which]
    x[0, 1, x.shape[2] // 2, 5] = value
    from xattention.estimate import _estimate_with_flags
    from xattention.selection import _select_plan

    scores = _estimate(q, k, 8, 128, True, 128 ** -0.5, "triton")
    got = _select(scores, 0.9, 3001, 5000, 128, True, "triton", inputs=(q, k, v))
    ref = _select(scores, 0.9, 3001, 5000, 128, True, "torch", inputs=(q, k, v))
    assert torch.equal(got, ref)
    # The flags as the estimate kernel writes them (xattention()'s path) give the same plan.
    scores, flags = _estimate_with_flags(q, k, v, 8, 128, True, 128 ** -0.5, "triton")
    plan = _select_plan(scores, 0.9, BlockLayout(3001, 5000, 128, True), "triton", flags=flags)
    assert torch.equal(plan.to_dense(), ref)


# ---------------------------------------------------------------------------------------------
# The plan's call path: three launches, no host sync, capturable in a CUDA graph.
# ---------------------------------------------------------------------------------------------


def _kernel_launches(fn) -> list[str]:
    """Names of the GPU kernels one call of ``fn`` launches (torch profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"
            and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]


@pytest.mark.parametrize("length", [4096, 16384])
def test_sparse_call_is_three_launches(length, monkeypatch):
    # The suite poisons kernel outputs (conftest), one fill launch per output buffer; a user's
    # call allocates them empty. Counted with poisoning on, the H100 run saw 12: 9 fills.
    monkeypatch.setenv("XATTENTION_POISON_OUTPUTS", "0")
    q, k, v = _inputs(1, 8, 2, length, length, 128, torch.bfloat16, seed=21)
    names = _kernel_launches(lambda: xattention(q, k, v, threshold=0.9, min_sparse_len=0,
                                                backend="triton"))
    assert len(names) == 3, names  # estimate (+ flags), selection (-> plan), attention


def test_call_path_has_no_host_sync():
    q, k, v = _inputs(1, 8, 2, 8192, 8192, 128, torch.bfloat16, seed=22)
    for kw in ({}, {"return_lse": True}, {"estimate_dtype": None, "threshold": 0.95}):
        xattention(q, k, v, min_sparse_len=0, **kw)  # warm: autotuning syncs
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            xattention(q, k, v, min_sparse_len=0, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("min_sparse_len", [0, None], ids=["sparse", "auto"])
def test_graph_capture_and_replay_equal_eager(layout, min_sparse_len):
    from xattention.graphs import XAttentionGraph

    q, k, v = _inputs(1, 8, 2, 4096, 4096, 128, torch.bfloat16, seed=23)
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # strided views, read in place
    graph = XAttentionGraph(threshold=0.9, min_sparse_len=min_sparse_len, layout=layout)
    eager = xattention(q, k, v, threshold=0.9, min_sparse_len=min_sparse_len, layout=layout)
    first = graph(q, k, v).clone()
    torch.testing.assert_close(first, eager, atol=1e-3, rtol=1e-3)
    q2, k2, v2 = (x * 1.5 for x in (q, k, v))  # new values, same shape: a replay
    replay = graph(q2, k2, v2)
    want = xattention(q2, k2, v2, threshold=0.9, min_sparse_len=min_sparse_len, layout=layout)
    assert len(graph) == 1
    torch.testing.assert_close(replay, want, atol=1e-3, rtol=1e-3)
    out = torch.empty_like(want)
    graph(q, k, v, out=out)
    torch.testing.assert_close(out, eager, atol=1e-3, rtol=1e-3)


def test_transformers_cuda_graphs_equal_eager():
    """xt.enable(cuda_graphs=True): the second prefill at a shape replays every layer's capture
    and gives the eager path's logits exactly (the same kernels, the same plan)."""
    from inputs import tiny_llama

    import xattention.integrations.transformers as xt

    model = tiny_llama(256).to("cuda", torch.bfloat16)
    model.config.head_dim = model.config.hidden_size // model.config.num_attention_heads
    ids = torch.randint(1, 256, (1, 1000), device="cuda")
    with torch.no_grad():
        xt.enable(model, threshold=0.9, block_size=128, stride=8, min_prefill_len=0,
                  record_stats=False)
        eager = model(input_ids=ids).logits
        xt.enable(model, threshold=0.9, block_size=128, stride=8, min_prefill_len=0,
                  record_stats=False, cuda_graphs=True)
        first = model(input_ids=ids).logits   # captures
        second = model(input_ids=ids).logits  # replays
        graphs = dict(model._xattention_state.graphs)
        xt.disable(model)
    assert sorted(k[0] for k in graphs) == [0, 1]
    assert all(len(g) == 1 for g in graphs.values())
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(second, eager, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_cached_launches_equal_tritons_path(causal):
    """The launch cache (kernels/_launch.py) replays compiled kernels on repeat shapes: on fresh
    inputs of a seen shape, on views 2 bytes off a 16-byte boundary, and on a new shape, the
    output equals Triton's own launch path bit for bit and the reference path within bf16."""
    from xattention.kernels import _launch, estimate, selection, sparse_attention

    launchers = (estimate._estimate_launcher, selection._select_launcher,
                 sparse_attention._sparse_launcher)
    _launch.clear_launch_caches()
    cases = [(1, 12, 2, 4096, 4096), (1, 12, 2, 4096, 4096), (2, 8, 8, 1999, 3001)]
    for i, (b, hq, hkv, lq, lk) in enumerate(cases + [cases[0]]):
        q, k, v = _inputs(b, hq, hkv, lq, lk, 128, torch.bfloat16, seed=40 + i)
        if i == 3:  # the same shape, but base pointers no longer 16-byte aligned
            q, k, v = (torch.cat([x.new_zeros(1), x.flatten()])[1:].view_as(x) for x in (q, k, v))
        kw = dict(threshold=0.9, causal=causal, min_sparse_len=0, backend="triton")
        with _launch.launch_cache(True):
            got, plan = xattention(q, k, v, return_plan=True, **kw)
        with _launch.launch_cache(False):
            ref_triton, ref_plan = xattention(q, k, v, return_plan=True, **kw)
        assert torch.equal(plan.to_dense(), ref_plan.to_dense())
        assert torch.equal(got, ref_triton), f"case {i}"
        ref = block_sparse_attention(q, k, v, plan, causal=causal, backend="torch")
        assert _rel(got, ref) < 1e-2
    # A repeat of case 0 must not reach Triton's launch path at all: the kernels are swapped for
    # objects that fail when launched, so only the cached replay can produce the output.
    class _NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("Triton's launch path was taken on a cached shape")

    q, k, v = _inputs(*cases[0], 128, torch.bfloat16, seed=99)
    with _launch.launch_cache(False):
        expected = xattention(q, k, v, **kw)
    saved = [launcher.kernel for launcher in launchers]
    try:
        for launcher in launchers:
            launcher.kernel = _NoLaunch()
        with _launch.launch_cache(True):
            assert torch.equal(xattention(q, k, v, **kw), expected)
    finally:
        for launcher, kernel in zip(launchers, saved, strict=True):
            launcher.kernel = kernel


def _paged(k, v, page, seed):
    """``k, v`` scattered over random pages of a NaN cache: a :class:`xattention.PagedKV`."""
    from test_paged_kv import scatter_pages

    kv = scatter_pages(k.cpu(), v.cpu(), page, spare=5, gen=torch.Generator().manual_seed(seed))
    from xattention import PagedKV

    return PagedKV(kv.k_pages.cuda(), kv.v_pages.cuda(), kv.block_table.cuda(), kv.seq_len)


def _paged_config_cases():
    from xattention.kernels import estimate as est
    from xattention.kernels import sparse_attention as sa

    shape = (1, 12, 2, 3001, 5003, 128, 128, 8)  # Qwen2.5-1.5B's heads, Lq < Lk, ragged
    gpb, g_tile = 128 // 8, est._head_tile(6)
    cases = [pytest.param("estimate", c, id=f"estimate-{c}")
             for c in est.kept_configs(gpb, g_tile, est.padded_head_dim(128, 2), False)]
    cases += [pytest.param("sparse", c, id=f"sparse-{c}")
              for c in sa.kept_configs(sa._gpu_configs(), 128, 128, False)]
    return [pytest.param(shape, *p.values, id=p.id) for p in cases]


@pytest.mark.parametrize(("shape", "kernel", "config"), _paged_config_cases())
@pytest.mark.parametrize("page", [16, 64])
def test_paged_reads_equal_contiguous_every_config(shape, kernel, config, page):
    """Each kernel's every kept (pointer-path) config reads a PagedKV as it reads the same K/V
    contiguous: bit for bit."""
    from xattention.kernels import estimate as est
    from xattention.kernels import sparse_attention as sa
    from xattention.kernels._tuning import force_config
    from xattention.selection import select_plan

    b, hq, hkv, lq, lk, d, bs, s = shape
    q, k, v = _inputs(b, hq, hkv, lq, lk, d, torch.bfloat16, seed=page)
    kv = _paged(k, v, page, seed=page)
    scale = d ** -0.5
    if kernel == "estimate":
        with force_config(est._antidiagonal_estimate_fwd, config):
            got, got_flags = est.estimate_block_scores_triton(q, kv, s, bs, True, scale, v=kv)
            ref, ref_flags = est.estimate_block_scores_triton(q, k, s, bs, True, scale, v=v)
        assert torch.equal(got, ref)
        assert all(torch.equal(a, c) for a, c in zip(got_flags, ref_flags, strict=True))
        return
    plan = select_plan(estimate_block_scores(q, k, s, bs, True), 0.9, lq, lk, bs, True)
    with force_config(sa._block_sparse_attention_fwd, config):
        got, got_lse = sa.block_sparse_attention_triton(q, kv, None, plan, scale)
        ref, ref_lse = sa.block_sparse_attention_triton(q, k, v, plan, scale)
    assert not got.isnan().any()
    assert torch.equal(got, ref) and torch.equal(got_lse, ref_lse)


def test_xattention_over_pages_matches_reference_path():
    q, k, v = _inputs(1, 12, 2, 4096, 8192, 128, torch.bfloat16, seed=7)
    kv = _paged(k, v, 16, seed=7)
    got, plan = xattention(q, kv, None, threshold=0.9, min_sparse_len=0, return_plan=True)
    ref = block_sparse_attention(q.double(), k.double(), v.double(), plan, backend="torch")
    assert _rel(got, ref) < 1e-2


def test_paged_page_id_outside_the_cache_stops_the_process():
    """On CUDA the page-id check is a device-side assert (no host sync): a valid table passes, a
    bad id stops the process (CUDA reports a device-side assert, with or without the check's
    message). A subprocess, because a fired device assert leaves the CUDA context unusable."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from xattention import PagedKV\n"
        "k = torch.zeros(4, 16, 2, 8, device='cuda')\n"
        "for ids in ([0, 3], [0, 4]):\n"
        "    PagedKV(k, k, torch.tensor([ids], device='cuda'), 20)\n"
        "    torch.cuda.synchronize()\n"
        "    print('passed', ids, flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert "passed [0, 3]" in done.stdout and "passed [0, 4]" not in done.stdout, done.stdout
    reported = "page id outside [0, 4)" in done.stderr or "device-side assert" in done.stderr
    assert done.returncode != 0 and reported, done.stderr[-2000:]
