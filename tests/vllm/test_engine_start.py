"""Bad XAttention settings stop ``LLM(...)`` in the calling process, naming the variable.

The engine is started with multiprocessing on (vLLM's default): a check that only ran inside the
engine-core or worker process would surface here as vLLM's generic "Engine core initialization
failed" RuntimeError, not as a ValueError naming the setting.
"""

from __future__ import annotations

import pytest
from conftest import engine, on_cpu

from xattention.calibration import ThresholdProfile


def _profile(tmp_path, layers):
    path = tmp_path / f"profile{layers}.json"
    ThresholdProfile(thresholds=[[0.9] * 9] * layers, model_id="smollm2").save(path)
    return str(path)


@pytest.mark.parametrize("case", ["threshold0", "unknown_profile", "stride", "profile_model",
                                  "dense_layers"])
def test_bad_setting_fails_at_engine_start(case, checkpoint, tmp_path):
    env, name = {
        "threshold0": ({"XATTENTION_THRESHOLD": "0"}, "XATTENTION_THRESHOLD"),
        "unknown_profile": ({"XATTENTION_PROFILE": str(tmp_path / "missing.json")},
                            "XATTENTION_PROFILE"),
        "stride": ({"XATTENTION_STRIDE": "48"}, "XATTENTION_STRIDE"),
        # A profile made for a 24-layer model; SmolLM2 has 30 layers.
        "profile_model": ({"XATTENTION_PROFILE": _profile(tmp_path, 24)}, "XATTENTION_PROFILE"),
        "dense_layers": ({"XATTENTION_DENSE_LAYERS": "31"}, "XATTENTION_DENSE_LAYERS"),
    }[case]
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    with pytest.raises(ValueError, match=name), engine(checkpoint, env,
                                                        attention_backend="CUSTOM"):
        pass


def test_quantised_kv_cache_fails_at_engine_start(checkpoint):
    """Both engines take an FP8 cache; XAttention reads the cache as it is, so it refuses."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'"), engine(
            checkpoint, env, attention_backend="CUSTOM", kv_cache_dtype="fp8"):
        pass


def test_backend_declares_what_it_serves():
    import torch
    from vllm.v1.attention.backend import AttentionType

    from xattention.integrations.vllm.plugin import backend_class

    cls = backend_class()
    assert cls.__name__ == ("XAttentionCPUBackend" if on_cpu() else "XAttentionCUDABackend")
    assert cls.supports_kv_cache_dtype("auto") and not cls.supports_kv_cache_dtype("fp8")
    assert cls.supports_attn_type(AttentionType.DECODER)
    assert not cls.supports_attn_type(AttentionType.ENCODER_ONLY)
    assert cls.supports_head_size(64) and cls.supports_dtype(torch.float32)
    reasons = cls.validate_configuration(
        head_size=64, dtype=torch.float32, kv_cache_dtype="fp8_e4m3", block_size=32,
        use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
        use_per_head_quant_scales=False, device_capability=None,
        attn_type=AttentionType.ENCODER_ONLY)
    assert any("kv_cache_dtype" in r for r in reasons)
    assert any("attention type" in r for r in reasons)


def test_unquantised_cache_dtypes_are_served():
    """The dtypes the class declares (engine start accepts them) are the ones a layer serves
    sparse; a float16/bfloat16 cache is read as it is (cast to the query's dtype if it differs)."""
    from xattention.integrations.vllm.backend import XAttentionBackendMixin, _unsupported_reason

    for dtype in XAttentionBackendMixin.supported_kv_cache_dtypes:
        assert _unsupported_reason({"kv_cache_dtype": dtype}) is None
    assert "kv_cache_dtype='fp8'" in _unsupported_reason({"kv_cache_dtype": "fp8"})
