"""The transformers switch on more model families, as tiny random models built from their configs
(no weights): a padded non-causal encoder (BERT), Mistral's model-wide sliding window, and the
video LLMs Qwen2-VL / Qwen2.5-VL (language model sparsified, vision tower left alone).

Tolerances: float32 models; a threshold >= 1 runs the sparse code path with every block kept, so
outputs match stock SDPA up to float32 summation order.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
xt = pytest.importorskip("xattention.integrations.transformers")
from xattention import _backend  # noqa: E402  (after the importorskip above)

ATOL = 1e-5  # float32 logits of O(1), a handful of layers
XA = dict(block_size=16, stride=4, min_prefill_len=0, backend="torch")


def _tiny(config):
    config._attn_implementation = "sdpa"
    return config


@pytest.fixture(autouse=True)
def _fresh_warnings():
    _backend._warned.clear()
    yield


# ------------------------------------------------------------------------------------------
# BERT: non-causal attention with a padded batch
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = _tiny(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=128,
                              max_position_embeddings=256))
    return BertModel(config).eval()


def _bert_out(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("side", ["right", "left"])
def test_bert_padded_batch_matches_stock(bert, side):
    # Lengths 77 and 45 of a 77-token batch: the padded sequence has more query rows than valid
    # keys, which once reached xattention as Lq > Lk.
    ids = torch.randint(1, 128, (2, 77))
    mask = torch.ones(2, 77, dtype=torch.long)
    if side == "right":
        mask[1, 45:] = 0
    else:
        mask[1, :32] = 0
    ref = _bert_out(bert, ids, mask)
    xt.enable(bert, threshold=1.0, **XA)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # exact path, no dense fallback
            out = _bert_out(bert, ids, mask)
        stats = xt.last_stats(bert)
        assert all(s.sparse_calls == 2 for s in stats.layers.values())
        assert stats.overall() == pytest.approx(1.0)
        assert torch.allclose(out, ref, atol=ATOL), (out - ref).abs().max()

        xt.enable(bert, threshold=0.3, **XA)
        _bert_out(bert, ids, mask)
        assert 0.0 < xt.last_stats(bert).overall() < 1.0  # non-causal blocks really dropped
    finally:
        xt.disable(bert)


# ------------------------------------------------------------------------------------------
# Mistral: one sliding window for every layer
# ------------------------------------------------------------------------------------------


def _mistral(**kw):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = _tiny(MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                                 **kw))
    return MistralForCausalLM(config).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_mistral_default_window_longer_than_prompt_is_sparsified():
    model = _mistral()  # sliding_window=4096 by default
    assert model.config.sliding_window == 4096
    ids = torch.randint(3, 128, (1, 100))
    ref = _logits(model, ids)
    xt.enable(model, threshold=1.0, **XA)
    out = _logits(model, ids)
    assert xt.last_stats(model).sparse_layers() == [0, 1]
    assert torch.allclose(out, ref, atol=ATOL)
    xt.enable(model, threshold=0.3, **XA)
    _logits(model, ids)
    assert xt.last_stats(model).overall() < 1.0
    assert xt.sliding_layers(model) == frozenset({0, 1})        # windowed layers ...
    assert xt.sliding_layers(model, seq_len=100) == frozenset()  # ... that cover 100 tokens


def test_mistral_window_shorter_than_prompt_warns_once_and_stays_exact():
    model = _mistral(sliding_window=32)
    ids = torch.randint(3, 128, (1, 100))
    ref = _logits(model, ids)
    xt.enable(model, threshold=0.3, **XA)
    with pytest.warns(RuntimeWarning, match=r"sliding window \(32 tokens\).*nothing is sparsified"):
        out = _logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _logits(model, ids)  # once only
    assert torch.equal(out, ref)  # the window's own attention ran, untouched
    assert xt.last_stats(model).layers == {}
    # The same model on a prompt that fits in the window is sparsified.
    _logits(model, ids[:, :32])
    assert xt.last_stats(model).sparse_layers() == [0, 1]


def test_dense_layers_covering_every_layer_warns():
    model = _mistral()
    with pytest.warns(RuntimeWarning, match="nothing will be sparsified"):
        xt.enable(model, dense_layers=[0, 1], **XA)


# ------------------------------------------------------------------------------------------
# Video LLMs: Qwen2-VL and Qwen2.5-VL
# ------------------------------------------------------------------------------------------

IMG, VID, V_START, V_END = 120, 121, 122, 123
PATCH = dict(patch_size=2, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
PATCH_DIM = 3 * 2 * 2 * 2  # channels * temporal * patch * patch


def _qwen_vl(kind):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                 "rope_theta": 10000.0})
    if kind == "qwen2_vl":
        cls, config_cls = Qwen2VLForConditionalGeneration, Qwen2VLConfig
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, **PATCH)
    else:
        cls, config_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                      num_heads=2, window_size=8, fullatt_block_indexes=[1], **PATCH)
    torch.manual_seed(0)
    config = config_cls(text_config=text, vision_config=vision, image_token_id=IMG,
                        video_token_id=VID, vision_start_token_id=V_START,
                        vision_end_token_id=V_END)
    config._attn_implementation = "sdpa"
    return cls(config).eval()


def _vl_inputs(gen, video=False):
    """Text, one image (grid 1x4x4: 4 tokens) or one video (grid 2x4x4: 8 tokens), text."""
    grid = (2, 4, 4) if video else (1, 4, 4)
    patches = grid[0] * grid[1] * grid[2]
    n_tokens = patches // 4  # spatial_merge_size ** 2
    token = VID if video else IMG
    ids = torch.cat([torch.randint(3, 100, (30,), generator=gen), torch.tensor([V_START]),
                     torch.full((n_tokens,), token), torch.tensor([V_END]),
                     torch.randint(3, 100, (60,), generator=gen)])[None]
    pixels = torch.randn(patches, PATCH_DIM, generator=gen)
    kw = {"input_ids": ids, "mm_token_type_ids": (ids == token).int() * (2 if video else 1)}
    if video:
        kw.update(pixel_values_videos=pixels, video_grid_thw=torch.tensor([grid]))
    else:
        kw.update(pixel_values=pixels, image_grid_thw=torch.tensor([grid]))
    return kw


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen_vl(request):
    return _qwen_vl(request.param)


def _vision_modules(model):
    return list(model.model.visual.modules())


def test_qwen_vl_language_sparsified_vision_untouched(qwen_vl, gen):
    model = qwen_vl
    kw = _vl_inputs(gen)
    seen = {}

    def keep_output(module, inp, out):
        seen[len(seen)] = out.pooler_output  # returns None: the output stays as it is

    hook = model.model.visual.register_forward_hook(keep_output)
    try:
        with torch.no_grad():
            ref = model(**kw, use_cache=False).logits
        xt.enable(model, threshold=1.0, **XA)
        with torch.no_grad():
            out = model(**kw, use_cache=False).logits
    finally:
        hook.remove()
    try:
        assert model.config.text_config._attn_implementation == "xattention"
        assert model.config.vision_config._attn_implementation == "sdpa"
        assert not any(hasattr(m, "_xattention_state") for m in _vision_modules(model))
        assert torch.equal(seen[0], seen[1])  # the vision encoder ran exactly as before
        assert torch.allclose(out, ref, atol=ATOL), (out - ref).abs().max()
        layers = model.config.text_config.num_hidden_layers
        assert xt.last_stats(model).sparse_layers() == list(range(layers))
    finally:
        xt.disable(model)
    assert model.config.text_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_qwen_vl_generate(qwen_vl, gen, video):
    model = qwen_vl
    kw = _vl_inputs(gen, video=video)
    args = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        dense = model.generate(**kw, **args)
    xt.enable(model, threshold=1.0, **XA)
    try:
        with torch.no_grad():
            same = model.generate(**kw, **args)
        assert torch.equal(same, dense)
        xt.enable(model, threshold=0.3, **XA)
        with torch.no_grad():
            sparse = model.generate(**kw, **args)
        assert sparse.shape == dense.shape
        per_layer = xt.last_stats(model).per_layer()
        assert sorted(per_layer) == [0, 1] and all(0 < d < 1 for d in per_layer.values())
    finally:
        xt.disable(model)


def test_qwen_vl_vision_encoder_only_when_asked(qwen_vl, gen):
    model = qwen_vl
    kw = _vl_inputs(gen)
    with torch.no_grad():
        ref = model(**kw, use_cache=False).logits
    xt.enable(model, threshold=1.0, vision=True, **XA)
    try:
        assert model.config.vision_config._attn_implementation == "xattention"
        with torch.no_grad():
            out = model(**kw, use_cache=False).logits
        assert torch.allclose(out, ref, atol=ATOL), (out - ref).abs().max()
        vision = xt.last_stats(model, vision=True)
        n_blocks = len(xt.model_info.vision_attention_modules(model))
        assert vision.sparse_layers() == list(range(n_blocks))
        assert vision.overall() == pytest.approx(1.0)
        assert xt.last_stats(model).sparse_layers() == [0, 1]
    finally:
        xt.disable(model)
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_xattention_state") for m in _vision_modules(model))
    with pytest.raises(ValueError, match="vision"):
        xt.enable(_mistral(), vision=True)
