"""Every KV-cache class transformers offers, through ``generate``: XAttention at threshold 1.0
gives stock SDPA's scores.

A static cache hands the prefill the whole cache as keys, its unwritten tail included; transformers
skips that mask (torch's upper-left ``is_causal`` hides the tail) and the XAttention function, which
reads a missing mask as lower-right causal, once let the prompt attend to the empty slots (scores
~5e-3 off stock while the dynamic cache matched to 1e-7).

Tiny random float32 models (2-4 layers, 4 query / 1-2 KV heads), a 300-token prompt, blocks of 64.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
xt = pytest.importorskip("xattention.integrations.transformers")
from inputs import tiny_gemma3  # noqa: E402
from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS  # noqa: E402

PROMPT = 300
ATOL = 1e-5  # float32 scores of O(1); a threshold of 1.0 keeps every block


def _text(**extra):
    return dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM, LlamaConfig(**_text())


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM, MistralConfig(**_text())


def _qwen_vl(kind):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    patch = dict(patch_size=2, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    text = _text(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                  "rope_theta": 10000.0})
    if kind == "qwen2_vl":
        cls, config_cls = Qwen2VLForConditionalGeneration, Qwen2VLConfig
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, **patch)
    else:
        cls, config_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig
        vision = dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                      num_heads=2, window_size=8, fullatt_block_indexes=[0], **patch)
    return cls, config_cls(text_config=text, vision_config=vision, image_token_id=120,
                           video_token_id=121, vision_start_token_id=122,
                           vision_end_token_id=123)


def _build(name):
    if name == "gemma3":
        return tiny_gemma3()
    cls, config = {"llama": _llama, "mistral": _mistral,
                   "qwen2_vl": lambda: _qwen_vl("qwen2_vl"),
                   "qwen2_5_vl": lambda: _qwen_vl("qwen2_5_vl")}[name]()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config).eval()


MODELS = ["llama", "mistral", "gemma3", "qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return _build(request.param)


def _scores(model, ids, cache):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, cache_implementation=cache,
                             pad_token_id=0)
    return torch.stack(out.scores)


@pytest.mark.parametrize("cache", ALL_CACHE_IMPLEMENTATIONS)
def test_every_cache_matches_stock(model, cache):
    ids = torch.randint(3, 120, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    try:
        ref = _scores(model, ids, cache)
    except (ImportError, ValueError, NotImplementedError, RuntimeError, AssertionError) as exc:
        # e.g. "quantized" needs optimum-quanto / hqq; offloading needs CUDA (an AssertionError
        # from torch.cuda on a CPU build)
        pytest.skip(f"stock generate cannot use cache_implementation={cache!r} here: {exc}")
    xt.enable(model, threshold=1.0, block_size=64, stride=8)
    try:
        out = _scores(model, ids, cache)
        assert xt.last_stats(model).sparse_layers(), "the prefill never ran XAttention"
    finally:
        xt.disable(model)
    assert torch.allclose(out, ref, atol=ATOL), (cache, (out - ref).abs().max())
