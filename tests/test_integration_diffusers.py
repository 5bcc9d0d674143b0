"""The diffusers switch on tiny random Wan / HunyuanVideo / CogVideoX / Flux transformers.

Models are built locally from each class's config (no weights). Blocks of 16 tokens, so a few
hundred video tokens give a grid of blocks to drop; the PyTorch backend (tensors on the CPU).
The joint text-video rule is checked against a float64 reference built from the returned masks.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from reference import ref_token_mask

pytest.importorskip("diffusers")
xd = pytest.importorskip("xattention.integrations.diffusers")
from diffusers import (  # noqa: E402  (after the importorskip above)
    CogVideoXTransformer3DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    WanTransformer3DModel,
)

from xattention import _backend  # noqa: E402
from xattention.integrations.diffusers.joint import joint_attention  # noqa: E402
from xattention.integrations.diffusers.masks import key_padding  # noqa: E402

BS, STRIDE = 16, 4
OPTS = dict(block_size=BS, stride=STRIDE, backend="torch")
ATOL = 2e-5  # float32 models: the merged pieces differ from one SDPA call by rounding only


# --------------------------------------------------------------------------------------------
# Tiny models and their inputs
# --------------------------------------------------------------------------------------------


def _wan():
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
                                  attention_head_dim=16, in_channels=4, out_channels=4,
                                  text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                  rope_max_seq_len=32)

    def inputs(gen, t=900.0):  # 4 x 8 x 8 = 256 video tokens; text through cross-attention
        return dict(hidden_states=torch.randn(1, 4, 4, 16, 16, generator=gen),
                    timestep=torch.tensor([t]),
                    encoder_hidden_states=torch.randn(1, 5, 16, generator=gen))
    return model, inputs


def _hunyuan():
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                           attention_head_dim=16, num_layers=1,
                                           num_single_layers=1, num_refiner_layers=1,
                                           text_embed_dim=16, pooled_projection_dim=8,
                                           rope_axes_dim=(4, 6, 6))

    def inputs(gen, t=900.0):  # 3 x 8 x 8 = 192 video tokens, then 12 text tokens, padded tails
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[0, 7:] = 0
        mask[1, 10:] = 0
        return dict(hidden_states=torch.randn(2, 4, 3, 16, 16, generator=gen),
                    timestep=torch.tensor([t, t]),
                    encoder_hidden_states=torch.randn(2, 12, 16, generator=gen),
                    encoder_attention_mask=mask,
                    pooled_projections=torch.randn(2, 8, generator=gen),
                    guidance=torch.tensor([6000.0, 6000.0]))
    return model, inputs


def _cogvideox():
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16,
                                        in_channels=4, out_channels=4, time_embed_dim=8,
                                        text_embed_dim=16, num_layers=2, sample_width=16,
                                        sample_height=16, sample_frames=9, patch_size=2,
                                        max_text_seq_length=8,
                                        use_rotary_positional_embeddings=True)

    def inputs(gen, t=900.0):  # 8 text tokens first, then 3 x 8 x 8 = 192 video tokens
        return dict(hidden_states=torch.randn(1, 3, 4, 16, 16, generator=gen),
                    encoder_hidden_states=torch.randn(1, 8, 16, generator=gen),
                    timestep=torch.tensor([t]))
    return model, inputs


def _flux():
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                   num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, guidance_embeds=False,
                                   axes_dims_rope=(4, 6, 6))
    ids = torch.zeros(256, 3)
    ids[:, 1], ids[:, 2] = torch.arange(256) // 16, torch.arange(256) % 16

    def inputs(gen, t=0.9):  # 8 text tokens first, then 16 x 16 image tokens
        return dict(hidden_states=torch.randn(1, 256, 4, generator=gen),
                    encoder_hidden_states=torch.randn(1, 8, 16, generator=gen),
                    pooled_projections=torch.randn(1, 8, generator=gen),
                    timestep=torch.tensor([t]), img_ids=ids, txt_ids=torch.zeros(8, 3))
    return model, inputs


BUILDERS = {"wan": _wan, "hunyuan": _hunyuan, "cogvideox": _cogvideox, "flux": _flux}
_built: dict[str, tuple] = {}


@pytest.fixture(params=sorted(BUILDERS))
def tiny(request):
    """(model, inputs(gen, t)) of each supported class; built once, disabled after each test."""
    name = request.param
    if name not in _built:
        torch.manual_seed(0)
        model, inputs = BUILDERS[name]()
        _built[name] = (model.eval(), inputs)
    model, inputs = _built[name]
    yield model, inputs
    xd.disable(model)


@pytest.fixture
def wan():
    if "wan" not in _built:
        torch.manual_seed(0)
        model, inputs = _wan()
        _built["wan"] = (model.eval(), inputs)
    model, inputs = _built["wan"]
    yield model, inputs
    xd.disable(model)


def _run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs).sample


# --------------------------------------------------------------------------------------------
# The joint rule against a float64 reference
# --------------------------------------------------------------------------------------------


def _ref_joint(q, k, v, video, valid, block_mask, scale):
    """float64: video rows see kept video blocks + valid text keys, text rows all valid keys."""
    b_, h_, n, _ = q.shape
    v0, v1 = video
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            vis = valid[b][None, :].repeat(n, 1).clone()
            vis[v0:v1, v0:v1] = ref_token_mask(block_mask[b, h], v1 - v0, v1 - v0, BS, False)
            logits = q[b, h].double() @ k[b, h].double().T * scale
            probs = torch.softmax(logits.masked_fill(~vis, float("-inf")), dim=-1)
            out[b, h] = probs @ v[b, h].double()
    return out


@pytest.mark.parametrize("layout", ["first", "last", "none"])
def test_joint_attention_matches_float64_reference(layout, gen, make_qkv):
    text, video_len = (0 if layout == "none" else 13), 150  # odd lengths: partial last block
    n = video_len + text
    q, k, v = make_qkv(2, 3, 3, n, n, 32)
    video = (text, n) if layout == "first" else (0, video_len)
    valid = torch.ones(2, n, dtype=torch.bool)
    text_pos = torch.arange(video[0]) if layout == "first" else torch.arange(video[1], n)
    if layout != "none":
        valid[1, text_pos[-5:]] = False  # padded tail of the second prompt
    scale = 1 / math.sqrt(32)
    out = torch.empty_like(q)
    masks = []
    for b in range(2):
        keys = valid[b].nonzero().squeeze(1)
        keys = keys[(keys < video[0]) | (keys >= video[1])]
        out[b:b + 1], mask = joint_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], video=video,
                                             text_keys=keys, threshold=0.6, stride=STRIDE,
                                             block_size=BS, scale=scale, backend="torch")
        masks.append(mask)
    mask = torch.cat(masks)
    assert mask.shape == (2, 3, 10, 10)
    assert 0 < mask.float().mean() < 1  # really sparse, so the reference checks the cut-out
    ref = _ref_joint(q, k, v, video, valid, mask, scale)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_joint_attention_kernel_paths_match_reference(backend, make_qkv):
    """The same rule through the Triton kernels (CPU interpreter in CI): small, one sequence."""
    q, k, v = make_qkv(1, 2, 2, 90, 90, 16)
    video, valid = (0, 80), torch.ones(1, 90, dtype=torch.bool)
    valid[0, 86:] = False
    out, mask = joint_attention(q, k, v, video=video, text_keys=torch.arange(80, 86),
                                threshold=0.6, stride=STRIDE, block_size=BS, scale=0.25,
                                backend=backend)
    assert 0 < mask.float().mean() < 1
    ref = _ref_joint(q, k, v, video, valid, mask, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_key_padding_reads_only_key_masks():
    n = 6
    m = torch.ones(2, 1, 1, n, dtype=torch.bool)
    m[1, ..., 4:] = False
    assert torch.equal(key_padding(m, 2, n, n), m[:, 0, 0])
    additive = torch.zeros(1, 1, n, n).masked_fill(~m[1:].expand(1, 1, n, n), float("-inf"))
    assert torch.equal(key_padding(additive, 2, n, n), m[1, 0, 0].expand(2, n))
    assert key_padding(None, 2, n, n) is True
    rows_differ = torch.ones(1, 1, n, n, dtype=torch.bool).tril()
    assert key_padding(rows_differ, 2, n, n) is None
    assert key_padding(torch.full((1, 1, 1, n), 0.5), 2, n, n) is None  # a bias, not padding


# --------------------------------------------------------------------------------------------
# On the models
# --------------------------------------------------------------------------------------------


def test_threshold_one_reproduces_stock_output(tiny, gen):
    model, inputs = tiny
    kwargs = inputs(gen)
    ref = _run(model, kwargs)
    xd.enable(model, threshold=1.0, warmup_steps=0, **OPTS)
    out = _run(model, kwargs)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    stats = xd.last_stats(model)
    assert stats.sparse_steps() == [0]  # the XAttention path ran, it did not fall back
    assert stats.overall() == 1.0
    assert sorted(stats.per_layer()) == list(range(2))


def test_low_threshold_sparsifies(tiny, gen):
    model, inputs = tiny
    kwargs = inputs(gen)
    ref = _run(model, kwargs)
    xd.enable(model, threshold=0.3, warmup_steps=0, **OPTS)
    out = _run(model, kwargs)
    stats = xd.last_stats(model)
    assert sorted(stats.per_layer()) == [0, 1]
    assert 0 < stats.overall() < 0.8
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-3)


def test_fp8_estimate_option_reaches_the_video_attention(tiny, gen, monkeypatch):
    import xattention.integrations.diffusers.joint as joint

    model, inputs = tiny
    seen = []

    def spy(real):
        def call(*args, **kwargs):
            seen.append(kwargs.get("estimate_dtype"))
            return real(*args, **kwargs)
        return call

    # One xattention() call serves the video part with and without text tokens.
    monkeypatch.setattr(joint, "xattention", spy(joint.xattention))
    xd.enable(model, threshold=0.3, warmup_steps=0, estimate_dtype=torch.float8_e4m3fn, **OPTS)
    out = _run(model, inputs(gen))
    assert torch.isfinite(out).all()
    assert seen and set(seen) == {torch.float8_e4m3fn}
    assert 0 < xd.last_stats(model).overall() < 0.8


def test_warmup_steps_stay_dense_and_count_cfg_calls_once(wan, gen):
    model, inputs = wan
    timesteps = [900.0, 900.0, 800.0, 700.0, 700.0]  # CFG: two calls per step at the same t
    calls = [inputs(gen, t) for t in timesteps]
    refs = [_run(model, kwargs) for kwargs in calls]
    xd.enable(model, threshold=0.3, warmup_steps=2, **OPTS)
    outs = [_run(model, kwargs) for kwargs in calls]
    assert [torch.equal(o, r) for o, r in zip(outs, refs, strict=True)] == [True] * 3 + [False] * 2
    stats = xd.last_stats(model)
    assert stats.dense_steps() == [0, 1] and stats.sparse_steps() == [2]
    assert stats.steps[0].layers[0].dense_calls == 2  # both CFG calls, one step
    assert stats.steps[2].layers[0].sparse_calls == 2
    assert stats.per_step()[0] == 1.0 and stats.per_step()[2] < 1.0


def test_step_count_follows_timesteps_and_resets_on_a_new_generation(wan, gen):
    model, inputs = wan
    xd.enable(model, threshold=0.3, warmup_steps=1, **OPTS)
    seen = []
    for t in (999.0, 999.0, 500.0, 1.0, 999.0):
        _run(model, inputs(gen, t))
        seen.append(xd.current_step(model))
    assert seen == [0, 0, 1, 2, 0]
    stats = xd.last_stats(model)  # the last call started a new generation: its stats only
    assert list(stats.steps) == [0] and stats.dense_steps() == [0]
    xd.reset_steps(model)
    _run(model, inputs(gen, 10.0))
    assert xd.current_step(model) == 0


def test_per_layer_and_per_head_thresholds(wan, gen):
    model, inputs = wan
    xd.enable(model, thresholds=[[1.0, 0.2], 1.0], warmup_steps=0, **OPTS)
    _run(model, inputs(gen))
    per_head = xd.last_stats(model).per_head(0)
    assert per_head[0][0] == 1.0 and per_head[0][1] < 1.0
    assert per_head[1].tolist() == [1.0, 1.0]
    xd.enable(model, threshold=0.2, dense_layers=[-1], warmup_steps=0, **OPTS)
    _run(model, inputs(gen))
    layers = xd.last_stats(model).steps[0].layers
    assert layers[1].dense_calls == 1 and layers[1].sparse_calls == 0
    assert layers[0].sparse_calls == 1 and layers[0].density < 1.0


def test_disable_restores_the_stock_processors(tiny, gen):
    model, inputs = tiny
    kwargs = inputs(gen)
    ref = _run(model, kwargs)
    before = dict(model.attn_processors)
    xd.enable(model, threshold=0.3, warmup_steps=0, **OPTS)
    xd.enable(model, threshold=0.5, warmup_steps=0, **OPTS)  # again: replaces the settings
    wrapped = [k for k, p in model.attn_processors.items() if isinstance(p, xd.XAttentionProcessor)]
    assert len(wrapped) == 2  # only the video self-attention layers
    assert all(model.attn_processors[k] is p for k, p in before.items() if k not in wrapped)
    xd.disable(model)
    assert not xd.is_enabled(model)
    after = model.attn_processors
    assert all(after[k] is p for k, p in before.items())
    assert not model._forward_pre_hooks
    assert torch.equal(_run(model, kwargs), ref)


def test_attention_backend_setting_reaches_the_stock_processor(wan):
    from diffusers.models.attention_dispatch import AttentionBackendName

    model, _ = wan
    xd.enable(model, **OPTS)
    model.set_attention_backend("native")
    inner = model.blocks[0].attn1.processor.inner
    assert inner._attention_backend == AttentionBackendName.NATIVE
    model.blocks[0].attn1.processor._attention_backend = None
    assert inner._attention_backend is None


def test_a_mask_that_is_not_key_padding_runs_the_stock_kernel(wan, gen):
    model, _ = wan
    attn = model.blocks[0].attn1
    x = torch.randn(1, 64, attn.inner_dim, generator=gen)
    causal = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
    with torch.no_grad():
        ref = attn(x, attention_mask=causal)
        xd.enable(model, threshold=0.3, warmup_steps=0, **OPTS)
        _backend._warned.clear()
        with pytest.warns(RuntimeWarning, match="not padding of text keys"):
            out = attn(x, attention_mask=causal)
    assert torch.equal(out, ref)
    assert xd.last_stats(model).steps[0].layers[0].dense_calls == 1


class _NotATransformer:
    transformer = torch.nn.Linear(2, 2)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(threshold=0.0), ValueError, "threshold"),
    (dict(threshold="high"), TypeError, "threshold"),
    (dict(stride=3), ValueError, "stride"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps"),
    (dict(warmup_steps=1.5), TypeError, "warmup_steps"),
    (dict(dense_layers=[2]), ValueError, "dense_layers"),
    (dict(dense_layers=["0"]), TypeError, "dense_layers"),
    (dict(thresholds=[0.9]), ValueError, "2 rows"),
    (dict(thresholds=[[0.9, 0.9, 0.9], 0.9]), ValueError, r"thresholds\[0\]"),
    (dict(thresholds=[0.9, -1.0]), ValueError, r"thresholds\[1\]"),
    (dict(thresholds="0.9"), ValueError, "thresholds='0.9': no such file"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(estimate_dtype="fp8"), TypeError, "estimate_dtype"),
    (dict(estimate_dtype=torch.float16), ValueError, "estimate_dtype"),
])
def test_bad_arguments_are_named(wan, kwargs, error, match):
    model, _ = wan
    with pytest.raises(error, match=match):
        xd.enable(model, **{"block_size": BS, "stride": STRIDE, **kwargs})
    assert not xd.is_enabled(model)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(stride=3), r"stride \(3\) must divide block_size \(128\)"),
    (dict(block_size=100), r"stride \(8\) must divide block_size \(100\)"),
])
def test_block_params_checked_against_the_defaults(wan, kwargs, match):
    model, _ = wan
    with pytest.raises(ValueError, match=match):
        xd.enable(model, **kwargs)
    assert not xd.is_enabled(model)


def test_every_layer_dense_is_said_once(wan):
    model, _ = wan
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="nothing will be sparsified"):
        xd.enable(model, dense_layers=range(len(model.blocks)), **OPTS)
    xd.disable(model)


def test_unsupported_models_are_refused_with_the_supported_list(wan):
    with pytest.raises(TypeError, match="WanTransformer3DModel.*CogVideoXTransformer3DModel"):
        xd.enable(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="pass pipe.transformer"):
        xd.enable(_NotATransformer())
    model, _ = wan
    stock = model.blocks[0].attn1.processor
    model.blocks[0].attn1.set_processor(object())
    try:
        with pytest.raises(ValueError, match="layer 0 .* processor object"):
            xd.enable(model, **OPTS)
    finally:
        model.blocks[0].attn1.set_processor(stock)
    with pytest.raises(ValueError, match="not enabled"):
        xd.last_stats(torch.nn.Linear(2, 2))


def test_no_warnings_on_the_plain_path(wan, gen):
    model, inputs = wan
    xd.enable(model, threshold=0.5, warmup_steps=0, **OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(model, inputs(gen))


def test_video_benchmark_runs_in_smoke_mode(tmp_path):
    """benchmarks/bench_video.py --smoke: tiny sizes on the CPU, both parts, files written."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_video.py"
    spec = importlib.util.spec_from_file_location("bench_video", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "video.json").read_text())
    methods = [r["method"] for r in result["attention"]]
    assert methods[:3] == ["sdpa", "xattention@0.9", "xattention@0.95"]
    assert methods[3].startswith("sdpa masked joint")
    assert methods[4:] == ["xattention joint@0.9", "xattention joint@0.95"]
    assert all(0 < r["density"] <= 1 for r in result["attention"] + result["forward"])
    assert len(result["forward"]) == 3
    assert "cannot tell" in (tmp_path / "video.md").read_text()


def test_joint_attention_keeps_the_non_finite_rules_with_text_keys(backend, make_qkv):
    """A NaN in a video value every video row can see (non-causal) makes every row NaN in that
    dim, as dense attention does, also where the selection would have dropped its block and the
    video part is merged with text keys (the path that used to skip the rules)."""
    q, k, v = make_qkv(1, 2, 2, 90, 90, 16)
    video = (0, 80)
    _, mask = joint_attention(q, k, v, video=video, text_keys=torch.arange(80, 90),
                              threshold=0.3, stride=STRIDE, block_size=BS, scale=0.25,
                              backend=backend)
    dropped = (~mask[0, 0].any(0)).nonzero().flatten()
    assert dropped.numel(), "the test needs a key block no query block keeps"
    key = int(dropped[0]) * BS
    v[0, 0, key, 3] = float("nan")
    out, _ = joint_attention(q, k, v, video=video, text_keys=torch.arange(80, 90),
                             threshold=0.3, stride=STRIDE, block_size=BS, scale=0.25,
                             backend=backend)
    assert torch.isnan(out[0, 0, :, 3]).all()  # every row sees that key
    assert torch.isfinite(out[0, 1]).all()  # the other head never reads it


def test_profile_accepted(wan, tmp_path):
    """A ThresholdProfile (or its path) goes to thresholds= as in the transformers switch; its
    stride and block size are used. Once raised "must be a ThresholdProfile ... or a list"."""
    from xattention.profile import ThresholdProfile

    model, _ = wan
    profile = ThresholdProfile(thresholds=[[0.7, 0.8], [0.9, 0.95]], stride=STRIDE,
                               block_size=BS, model_config={"num_layers": 2, "num_q_heads": 2})
    path = tmp_path / "video.json"
    profile.save(path)
    for given in (profile, path):
        xd.enable(model, thresholds=given, backend="torch")
        state = model._xattention_video_state
        assert (state.stride, state.block_size) == (STRIDE, BS)
        assert torch.allclose(state.thresholds[1], torch.tensor([0.9, 0.95]))
    with pytest.raises(ValueError, match="block_size=32 contradicts"):
        xd.enable(model, thresholds=profile, block_size=32)
    wrong = ThresholdProfile(thresholds=[[0.9, 0.9]] * 3, stride=STRIDE, block_size=BS)
    with pytest.raises(ValueError, match="layer count"):
        xd.enable(model, thresholds=wrong)
