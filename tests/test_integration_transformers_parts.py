"""The pieces of the transformers integration on tiny random models: threshold arguments and
their one error wording, capture as a context manager, model_info, and the import graph
(core <- integrations <- calibration/eval)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from inputs import tiny_gemma3

transformers = pytest.importorskip("transformers")
xt = pytest.importorskip("xattention.integrations.transformers")
from xattention import xattention  # noqa: E402
from xattention.profile import ThresholdProfile  # noqa: E402

XA = dict(block_size=16, stride=4, min_prefill_len=0, backend="torch")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    return _tiny_llama()


@pytest.fixture(autouse=True)
def _disabled(llama):
    yield
    xt.disable(llama)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# ------------------------------------------------------------------------------------------
# Threshold arguments
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["0.9", Path("0.9")], ids=["str", "path"])
def test_string_threshold_is_a_type_error(llama, bad):
    with pytest.raises(TypeError, match=r"^threshold .*thresholds="):
        xt.enable(llama, threshold=bad)
    assert not xt.is_enabled(llama)


def test_profile_path_goes_through_thresholds(llama, tmp_path):
    profile = ThresholdProfile(thresholds=[[0.5] * 4, [1.0] * 4, [0.7] * 4], stride=4,
                               block_size=16)
    path = tmp_path / "p.json"
    profile.save(path)
    xt.enable(llama, thresholds=str(path), min_prefill_len=0, backend="torch")
    state = llama._xattention_state
    assert (state.stride, state.block_size) == (4, 16)
    assert torch.equal(state.thresholds[2], torch.full((4,), 0.7))


def test_one_wording_for_a_bad_threshold(llama, gen):
    q = torch.randn(1, 2, 32, 16, generator=gen)
    wording = r"must be a finite number in \(0, inf\), got 0.0"
    with pytest.raises(ValueError, match="threshold " + wording):
        xattention(q, q, q, threshold=0.0, backend="torch")
    with pytest.raises(ValueError, match="threshold " + wording):
        xt.enable(llama, threshold=0.0)
    with pytest.raises(ValueError, match=r"thresholds\[1\]\[2\] " + wording):
        xt.enable(llama, thresholds=[[0.9] * 4, [0.9, 0.9, 0.0, 0.9], [0.9] * 4])
    with pytest.raises(ValueError, match=r"'thresholds\[0\]\[1\]' " + wording):
        ThresholdProfile(thresholds=[[0.9, 0.0]])


# ------------------------------------------------------------------------------------------
# Capture
# ------------------------------------------------------------------------------------------


def test_capture_context_manager_records_what_the_layer_attends_with(llama, gen):
    ids = torch.randint(3, 128, (1, 50), generator=gen)
    seen = {}

    def keep_input(module, inp, out):
        seen.setdefault("x", inp[0].detach())  # returns None: the output stays as it is

    hook = llama.model.layers[1].self_attn.o_proj.register_forward_hook(keep_input)
    try:
        with xt.capture(llama, layers=[1], stop_early=False) as cap:
            logits = llama(input_ids=ids, use_cache=False).logits
    finally:
        hook.remove()
    assert torch.allclose(logits, _logits(llama, ids), atol=1e-5)  # the pass itself is dense
    q, k, v = cap.qkv[1]
    assert q.shape == (1, 4, 50, 16) and k.shape == (1, 2, 50, 16)
    att = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert torch.allclose(att.transpose(1, 2).reshape(1, 50, -1), seen["x"], atol=1e-5)
    assert llama.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_xattention_capture") for m in llama.modules())


def test_capture_stops_early_and_leaves_an_enabled_model_as_it_was(llama, gen):
    ids = torch.randint(3, 128, (1, 40), generator=gen)
    xt.enable(llama, threshold=0.5, **XA)
    _logits(llama, ids)
    before = {i: s.sparse_calls for i, s in xt.last_stats(llama).layers.items()}
    ran = []
    with xt.capture(llama, layers=[0]) as cap:
        llama(input_ids=ids, use_cache=False)
        ran.append("after")  # never reached: the pass stops after layer 0
    assert ran == [] and sorted(cap.qkv) == [0]
    assert xt.is_enabled(llama) and llama.config._attn_implementation == "xattention"
    assert {i: s.sparse_calls for i, s in xt.last_stats(llama).layers.items()} == before
    caps = xt.capture_attention_inputs(llama, ids, layers=[2, 0])
    assert sorted(caps) == [0, 2] and torch.equal(caps[0][0], cap.qkv[0][0])
    with pytest.raises(ValueError, match="layers"):
        with xt.capture(llama, layers=[7]):
            pass
    # Layer indices as everywhere else: negative from the end; a bool or a float is no index.
    assert sorted(xt.capture_attention_inputs(llama, ids, layers=[-1])) == [2]
    for bad in ([True], [1.7]):
        with pytest.raises(TypeError, match="layers must hold ints"):
            xt.capture_attention_inputs(llama, ids, layers=bad)
    assert llama.config._attn_implementation == "xattention"


# ------------------------------------------------------------------------------------------
# model_info
# ------------------------------------------------------------------------------------------


def test_model_info_on_gemma3_windows():
    model = tiny_gemma3()
    info = xt.model_info
    assert info.text_config(model) is model.config
    assert info.layer_windows(model) == {0: 48, 1: None, 2: 48, 3: None}
    assert info.sliding_layers(model) == frozenset({0, 2})
    assert info.sliding_layers(model, seq_len=48) == frozenset()
    assert info.sparse_layers(model, seq_len=100, dense_layers=[-1]) == [1]
    # A prompt that fits in the window: local layers are causal attention, sparsified too.
    ids = torch.randint(1, 128, (1, 40))
    ref = _logits(model, ids)
    xt.enable(model, threshold=1.0, **XA)
    assert torch.allclose(_logits(model, ids), ref, atol=1e-5)
    assert xt.last_stats(model).sparse_layers() == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------
# Import graph
# ------------------------------------------------------------------------------------------


def test_import_graph_points_one_way():
    # One fresh interpreter: the profile first (a core leaf), then the integration.
    code = ("import sys\n"
            "def loaded():\n"
            "    return ' '.join(m for m in sys.modules if m.startswith('xattention'))\n"
            "import xattention.profile\n"
            "print(loaded())\n"
            "import xattention.integrations.transformers\n"
            "print(loaded())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    profile, integration = set(out[0].split()), set(out[1].split())
    assert "xattention.profile" in profile
    assert not {m for m in profile if m.startswith(("xattention.integrations",
                                                    "xattention.calibration"))}
    assert "xattention.integrations.transformers.switch" in integration
    assert not {m for m in integration if m.startswith(("xattention.calibration",
                                                        "xattention.eval"))}
    from xattention.calibration import profile as old_home

    assert old_home.ThresholdProfile is ThresholdProfile  # old imports keep working


@pytest.mark.parametrize("budget", [1, 5 * 70, 1 << 24])
def test_dense_path_without_a_mask_is_lower_right_causal_in_bounded_chunks(llama, budget,
                                                                           monkeypatch, gen):
    """A prefill chunk after cached tokens (Lq < Lk) with no mask from transformers: the dense
    path builds the lower-right causal mask in chunks of query rows within the budget."""
    from reference import ref_dense_attention

    from xattention.integrations.transformers.attention import dense_attention
    from xattention.kernels import dense

    monkeypatch.setattr(dense, "MASK_ELEMENTS", budget)
    module = llama.model.layers[0].self_attn  # 4 query heads on 2 KV heads
    q = torch.randn(1, 4, 23, 16, generator=gen)
    k, v = (torch.randn(1, 2, 70, 16, generator=gen) for _ in range(2))
    out, _ = dense_attention(module, q, k, v, None, 0.0, 0.25, causal=True)
    want = ref_dense_attention(q.double(), k.double(), v.double(), causal=True, scale=0.25)
    torch.testing.assert_close(out.double(), want.transpose(1, 2), rtol=1e-5, atol=1e-5)
