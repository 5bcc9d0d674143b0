"""Bad input raises ValueError/TypeError naming the argument (docs/design.md §5.2)."""

import math
import re

import pytest
import torch

from xattention import (
    block_density,
    block_sparse_attention,
    estimate_block_scores,
    select_blocks,
    xattention,
)

B, HQ, HKV, LQ, LK, D, BS, S = 1, 4, 2, 40, 50, 16, 16, 4
NQB, NKB = 3, 4


def names(*args):
    """pytest.raises for ValueError/TypeError whose message names one of ``args`` as a word."""
    pattern = "|".join(rf"(?<![A-Za-z0-9_]){re.escape(a)}(?![A-Za-z0-9_])" for a in args)
    return pytest.raises((ValueError, TypeError), match=pattern)


def qkv(dtype=torch.float32, hq=HQ, hkv=HKV, lq=LQ, lk=LK, d=D, b=B):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, hq, lq, d, generator=g).to(dtype),
        torch.randn(b, hkv, lk, d, generator=g).to(dtype),
        torch.randn(b, hkv, lk, d, generator=g).to(dtype),
    )


def good_mask():
    return torch.ones(B, HQ, NQB, NKB, dtype=torch.bool)


def good_scores():
    s = torch.rand(B, HQ, NQB, NKB)
    return s / s.sum(-1, keepdim=True)


# Each entry calls one public function with (q, k, v) replaced.
def call_xa(q, k, v, **kw):
    kw.setdefault("stride", S)
    kw.setdefault("block_size", BS)
    kw.setdefault("backend", "torch")
    return xattention(q, k, v, **kw)


def call_est(q, k, v, **kw):
    kw.setdefault("stride", S)
    kw.setdefault("block_size", BS)
    kw.setdefault("backend", "torch")
    return estimate_block_scores(q, k, **kw)


def call_bsa(q, k, v, **kw):
    kw.setdefault("block_size", BS)
    kw.setdefault("backend", "torch")
    mask = kw.pop("mask", None)
    if mask is None:
        axis = 1 if kw.get("layout") == "bshd" else 2
        nqb = -(-q.shape[axis] // kw["block_size"])
        nkb = -(-k.shape[axis] // kw["block_size"])
        mask = torch.ones(1, 1, max(nqb, 1), max(nkb, 1), dtype=torch.bool)
    return block_sparse_attention(q, k, v, mask, **kw)


QK_FUNCS = [call_xa, call_est, call_bsa]
QKV_FUNCS = [call_xa, call_bsa]
FIDS = ["xattention", "estimate_block_scores", "block_sparse_attention"]


def test_valid_inputs_do_not_raise():
    q, k, v = qkv()
    for f in QK_FUNCS:
        f(q, k, v)
    select_blocks(good_scores(), threshold=0.9, q_len=LQ, k_len=LK, block_size=BS)
    block_density(good_mask(), LQ, LK, block_size=BS)


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
def test_wrong_rank_q(f):
    q, k, v = qkv()
    with names("q"):
        f(q[0], k, v)
    with names("q"):
        f(q[None], k, v)


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
def test_wrong_rank_k(f):
    q, k, v = qkv()
    with names("k"):
        f(q, k[0], v)


@pytest.mark.parametrize("f", QKV_FUNCS, ids=FIDS[::2])
def test_wrong_rank_v(f):
    q, k, v = qkv()
    with names("v"):
        f(q, k, v[0])


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
@pytest.mark.parametrize("hq,hkv", [(3, 2), (4, 3), (2, 4), (0, 2)])
def test_heads_do_not_divide(f, hq, hkv):
    q, k, v = qkv(hq=hq, hkv=hkv)
    with names("q", "k", "Hq", "Hkv", "heads", "num_heads"):
        f(q, k, v)


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
def test_lq_greater_than_lk(f):
    q, k, v = qkv(lq=60, lk=50)
    with names("q", "k", "Lq", "Lk", "q_len", "k_len"):
        f(q, k, v)


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
def test_dtype_mismatch_k(f):
    q, k, v = qkv()
    with names("k", "dtype"):
        f(q, k.half(), v)


@pytest.mark.parametrize("f", QKV_FUNCS, ids=FIDS[::2])
def test_dtype_mismatch_v(f):
    q, k, v = qkv()
    with names("v", "dtype"):
        f(q, k, v.to(torch.bfloat16))


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
def test_integer_dtype_rejected(f):
    q, k, v = qkv()
    q, k, v = (t.to(torch.int64) for t in (q, k, v))
    with names("q", "dtype"):
        f(q, k, v)


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
def test_head_dim_mismatch(f):
    q, k, v = qkv()
    k = torch.randn(B, HKV, LK, D // 2)
    v = torch.randn(B, HKV, LK, D // 2)
    with names("q", "k", "head_dim", "D"):
        f(q, k, v)


@pytest.mark.parametrize("f", QKV_FUNCS, ids=FIDS[::2])
def test_v_shape_mismatch(f):
    q, k, v = qkv()
    with names("v"):
        f(q, k, v[:, :, :-1])
    with names("v"):
        f(q, k, v[:, :1])


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
def test_batch_mismatch(f):
    q, _, _ = qkv(b=2)
    _, k, v = qkv(b=1)
    with names("q", "k", "batch", "B"):
        f(q, k, v)


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
def test_device_mismatch(f):
    q, k, v = qkv()
    km = k.to("meta")
    vm = v.to("meta")
    with names("k", "device"):
        f(q, km, vm)


@pytest.mark.parametrize("f", [call_xa, call_est], ids=FIDS[:2])
@pytest.mark.parametrize("stride,bs", [(6, 16), (3, 16), (32, 16), (0, 16), (-4, 16)])
def test_stride_must_divide_block_size(f, stride, bs):
    q, k, v = qkv()
    with names("stride"):
        f(q, k, v, stride=stride, block_size=bs)


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
@pytest.mark.parametrize("bs", [0, -16])
def test_bad_block_size(f, bs):
    q, k, v = qkv()
    with names("block_size", "stride"):
        if f is call_bsa:
            f(q, k, v, block_size=bs, mask=good_mask())
        else:
            f(q, k, v, block_size=bs, stride=4)


BAD_THRESHOLDS = [0.0, -0.5, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("thr", BAD_THRESHOLDS, ids=["0", "neg", "nan", "inf", "-inf"])
def test_bad_threshold_xattention(thr):
    q, k, v = qkv()
    with names("threshold"):
        call_xa(q, k, v, threshold=thr)


@pytest.mark.parametrize("thr", BAD_THRESHOLDS, ids=["0", "neg", "nan", "inf", "-inf"])
def test_bad_threshold_select(thr):
    with names("threshold"):
        select_blocks(good_scores(), threshold=thr, q_len=LQ, k_len=LK, block_size=BS)


@pytest.mark.parametrize(
    "thr",
    [
        torch.full((HQ + 1,), 0.9),
        torch.full((HQ - 1,), 0.9),
        torch.full((2, HQ), 0.9),
        torch.tensor([0.9, 0.0, 0.9, 0.9]),
        torch.tensor([0.9, math.nan, 0.9, 0.9]),
        torch.tensor([0.9, -1.0, 0.9, 0.9]),
    ],
    ids=["long", "short", "2d", "zero", "nan", "neg"],
)
def test_bad_per_head_threshold(thr):
    q, k, v = qkv()
    with names("threshold"):
        select_blocks(good_scores(), threshold=thr, q_len=LQ, k_len=LK, block_size=BS)
    with names("threshold"):
        call_xa(q, k, v, threshold=thr)


def test_threshold_wrong_type():
    with names("threshold"):
        select_blocks(good_scores(), threshold="0.9", q_len=LQ, k_len=LK, block_size=BS)


@pytest.mark.parametrize(
    "mask",
    [
        torch.ones(B, HQ, NQB + 1, NKB, dtype=torch.bool),
        torch.ones(B, HQ, NQB, NKB - 1, dtype=torch.bool),
        torch.ones(B, HQ + 1, NQB, NKB, dtype=torch.bool),
        torch.ones(2, HQ, NQB, NKB, dtype=torch.bool),
        torch.ones(HQ, NQB, NKB, dtype=torch.bool),
        torch.ones(B, HQ, NQB, NKB, dtype=torch.int64),
        torch.ones(B, HQ, NQB, NKB, dtype=torch.float32),
    ],
    ids=["rows+1", "cols-1", "heads+1", "batch2", "rank3", "int", "float"],
)
def test_bad_mask(mask):
    q, k, v = qkv()
    with names("mask"):
        call_bsa(q, k, v, mask=mask)


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
@pytest.mark.parametrize("backend", ["cuda-magic", "", "Torch"])
def test_unknown_backend(f, backend):
    q, k, v = qkv()
    with names("backend"):
        f(q, k, v, backend=backend)


def test_select_scores_shape_inconsistent():
    s = good_scores()
    with names("scores", "q_len", "k_len", "block_size"):
        select_blocks(s, threshold=0.9, q_len=LQ + BS, k_len=LK, block_size=BS)
    with names("scores", "q_len", "k_len", "block_size"):
        select_blocks(s, threshold=0.9, q_len=LQ, k_len=LK - BS, block_size=BS)
    with names("scores"):
        select_blocks(s[0], threshold=0.9, q_len=LQ, k_len=LK, block_size=BS)


def test_select_q_len_greater_than_k_len():
    s = torch.rand(1, 1, 4, 4)
    with names("q_len", "k_len"):
        select_blocks(s, threshold=0.9, q_len=60, k_len=50, block_size=BS)


def test_block_density_bad_mask():
    with names("mask"):
        block_density(torch.ones(B, HQ, NQB + 1, NKB, dtype=torch.bool), LQ, LK, block_size=BS)
    with names("mask"):
        block_density(torch.ones(B, HQ, NQB, NKB), LQ, LK, block_size=BS)


def test_no_bare_assert_in_validation():
    """Validation must not rely on assert (stripped by python -O)."""
    q, k, v = qkv(hq=3, hkv=2)
    try:
        call_xa(q, k, v)
    except AssertionError as exc:  # pragma: no cover - only on failure
        pytest.fail(f"bare assert used for validation: {exc!r}")
    except (ValueError, TypeError):
        pass


# ---------------------------------------------------------------- devices, dtypes, bool options


def test_mask_on_another_device():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"mask is on meta but q is on cpu"):
        call_bsa(q, k, v, mask=good_mask().to("meta"))


def test_threshold_tensor_on_another_device():
    q, k, v = qkv()
    for thr in (torch.full((HQ,), 0.9, device="meta"), torch.tensor(0.9, device="meta")):
        with pytest.raises(ValueError, match=r"threshold tensor is on meta"):
            call_xa(q, k, v, threshold=thr)
        with pytest.raises(ValueError, match=r"threshold tensor is on meta"):
            select_blocks(good_scores(), threshold=thr, q_len=LQ, k_len=LK, block_size=BS)


def test_scalar_cpu_threshold_tensor_is_a_number():
    q, k, v = qkv()
    a = call_xa(q, k, v, threshold=torch.tensor(0.5))
    b = call_xa(q, k, v, threshold=0.5)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "thr",
    [
        torch.ones(HQ, dtype=torch.bool),
        torch.tensor(True),
        torch.full((HQ,), 0.9 + 0.5j),
        torch.tensor(0.9 + 0j),
    ],
    ids=["bool", "bool0d", "complex", "complex0d"],
)
def test_threshold_tensor_must_be_real(thr):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"threshold"):
        call_xa(q, k, v, threshold=thr)
    with pytest.raises(TypeError, match=r"threshold"):
        select_blocks(good_scores(), threshold=thr, q_len=LQ, k_len=LK, block_size=BS)


NOT_BOOLS = ["False", "no", 0, 1, None, torch.tensor(True)]
NOT_BOOL_IDS = ["str-False", "str-no", "0", "1", "None", "tensor"]


def call_sel(q, k, v, **kw):
    return select_blocks(good_scores(), threshold=0.9, q_len=LQ, k_len=LK, block_size=BS, **kw)


@pytest.mark.parametrize("value", NOT_BOOLS, ids=NOT_BOOL_IDS)
@pytest.mark.parametrize("f", QK_FUNCS + [call_sel], ids=FIDS + ["select_blocks"])
def test_causal_must_be_a_bool(f, value):
    if f is call_bsa and value is None:
        pytest.skip("block_sparse_attention: causal=None means the default (or the plan's)")
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"^causal must be True or False"):
        f(q, k, v, causal=value)


@pytest.mark.parametrize("value", NOT_BOOLS, ids=NOT_BOOL_IDS)
def test_return_flags_must_be_bools(value):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"^return_mask must be True or False"):
        call_xa(q, k, v, return_mask=value)
    with pytest.raises(TypeError, match=r"^return_lse must be True or False"):
        call_bsa(q, k, v, return_lse=value)


# ---------------------------------------------------------------- [B, L, H, D] by mistake

LAYOUT_HINT = (r"^q \[.*\], k \[.*\] look like \[B, L, H, D\] \(FlashAttention's layout\): "
               r"pass layout='bshd'")


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
def test_blhd_input_gets_a_layout_hint_first(f):
    q, k, v = qkv(hq=8, hkv=2, lq=40, lk=40)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, L, H, D]: "q length 8 > k length 2"
    with pytest.raises(ValueError, match=LAYOUT_HINT + r".*q length \(8\) must not exceed k "
                       r"length \(2\)"):
        f(q, k, v)
    q, k, v = qkv(hq=8, hkv=2, lq=40, lk=50)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # "heads" 40 and 50 do not divide
    with pytest.raises(ValueError, match=LAYOUT_HINT + r".*q heads \(40\) must be a multiple"):
        f(q, k, v)


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
def test_equal_heads_blhd_input_warns(f):
    """[1, L, H, D] with equal head counts is valid as [B, H, L, D] and silently wrong: warn."""
    q, k, v = qkv(hq=4, hkv=4, lq=40, lk=40)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    with pytest.warns(UserWarning, match="layout='bshd'"):
        f(q, k, v)


@pytest.mark.parametrize("f", QK_FUNCS, ids=FIDS)
def test_bshd_layout_matches_bhsd(f):
    q, k, v = qkv(hq=4, hkv=2, lq=40, lk=50)
    want = f(q, k, v)
    got = f(*(x.transpose(1, 2) for x in (q, k, v)), layout="bshd")
    if f is not call_est:  # outputs come back in the caller's layout
        got = got.transpose(1, 2)
    torch.testing.assert_close(got, want)


def test_bad_layout_is_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^layout must be one of"):
        call_xa(q, k, v, layout="blhd")


def test_no_layout_hint_for_bhld_input():
    q, k, v = qkv(hq=3, hkv=2)
    with pytest.raises(ValueError) as info:
        call_xa(q, k, v)
    assert "[B, L, H, D]" not in str(info.value)
    q, k, v = qkv(lq=60, lk=50)
    with pytest.raises(ValueError) as info:
        call_xa(q, k, v)
    assert "[B, L, H, D]" not in str(info.value)


def test_merge_attention_bad_parts_and_options_are_named():
    from xattention import merge_attention

    out, lse = torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match=r"parts\[1\].*first part's shape"):
        merge_attention([(out, lse), (out[..., :1], lse)])  # 1 would broadcast to 8
    with pytest.raises(ValueError, match=r"parts\[1\].*first part's shape"):
        merge_attention([(out, lse), (out[..., :4], lse)])
    with pytest.raises(ValueError, match=r"parts\[1\] is on meta"):
        merge_attention([(out, lse), (out.to("meta"), lse.to("meta"))])
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        merge_attention([(out, lse)], dtype="float16")
    with pytest.raises(TypeError, match="return_lse"):
        merge_attention([(out, lse)], return_lse="no")


@pytest.mark.parametrize("option", ["causal", "per_row"])
def test_block_attention_mass_flags_must_be_bools(option):
    from xattention.stats import block_attention_mass

    q, k, _ = qkv()
    with names(option):
        block_attention_mass(q, k, block_size=BS, **{option: "no"})


@pytest.mark.parametrize(("kwargs", "error", "name"), [
    (dict(threshold=-1.0), ValueError, "threshold"),
    (dict(threshold="0.9"), TypeError, "threshold"),
    (dict(stride=3), ValueError, "stride"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(scale=0.0), ValueError, "scale"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(min_sparse_len=-1), ValueError, "min_sparse_len"),
    (dict(estimate_dtype="fp8"), TypeError, "estimate_dtype"),
    (dict(layout="blhd"), ValueError, "layout"),
    (dict(warmup=True), TypeError, "warmup"),
    (dict(warmup=0), ValueError, "warmup"),
    (dict(max_graphs=2.0), TypeError, "max_graphs"),
    (dict(max_graphs=0), ValueError, "max_graphs"),
])
def test_graph_options_are_checked_where_the_object_is_made(kwargs, error, name):
    from xattention import XAttentionGraph

    with pytest.raises(error, match=rf"^{name}"):
        XAttentionGraph(**kwargs)


def test_graph_on_the_cpu_is_the_eager_call():
    from xattention import XAttentionGraph

    q, k, v = qkv()
    graph = XAttentionGraph(threshold=0.9, stride=S, block_size=BS, backend="torch")
    torch.testing.assert_close(graph(q, k, v), call_xa(q, k, v, threshold=0.9), rtol=0, atol=0)


def test_v_none_goes_only_with_a_paged_k():
    q, k, _ = qkv()
    with pytest.raises(TypeError, match=r"^v must be a torch.Tensor .* got None"):
        call_xa(q, k, None)
    with pytest.raises(TypeError, match=r"^v must be a torch.Tensor .* got None"):
        block_sparse_attention(q, k, None, good_mask(), block_size=BS)
