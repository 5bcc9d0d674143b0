"""XATTENTION_* parsing: every bad value names its variable (no vLLM needed)."""

from __future__ import annotations

import json

import pytest
import torch

from xattention.calibration import ThresholdProfile
from xattention.integrations.vllm.settings import check_against_model, settings_from_env


def test_defaults():
    s = settings_from_env({})
    assert (s.threshold, s.stride, s.block_size, s.min_prefill_len) == (0.95, 8, 128, 128)
    assert s.thresholds is None and s.dense_layers == () and s.stats_dir is None
    assert settings_from_env({"XATTENTION_BLOCK_SIZE": "64"}).min_prefill_len == 64
    assert s.estimate_dtype is None


@pytest.mark.parametrize(("raw", "fp8"), [("fp8", True), (" FP8 ", True), ("exact", False),
                                          ("", False)])
def test_estimate_dtype_setting(raw, fp8):
    expected = torch.float8_e4m3fn if fp8 else None
    assert settings_from_env({"XATTENTION_ESTIMATE": raw}).estimate_dtype is expected


def test_old_min_prefill_name_is_read_with_a_warning():
    with pytest.warns(DeprecationWarning, match="XATTENTION_MIN_PREFILL_LEN"):
        assert settings_from_env({"XATTENTION_MIN_PREFILL": "300"}).min_prefill_len == 300
    with pytest.raises(ValueError, match="XATTENTION_MIN_PREFILL_LEN only"):
        settings_from_env({"XATTENTION_MIN_PREFILL": "300", "XATTENTION_MIN_PREFILL_LEN": "9"})


@pytest.mark.parametrize("env, name", [
    ({"XATTENTION_THRESHOLD": "0"}, "XATTENTION_THRESHOLD"),
    ({"XATTENTION_THRESHOLD": "-0.5"}, "XATTENTION_THRESHOLD"),
    ({"XATTENTION_THRESHOLD": "nan"}, "XATTENTION_THRESHOLD"),
    ({"XATTENTION_THRESHOLD": "high"}, "XATTENTION_THRESHOLD"),
    ({"XATTENTION_STRIDE": "5"}, "XATTENTION_STRIDE"),
    ({"XATTENTION_STRIDE": "0"}, "XATTENTION_STRIDE"),
    ({"XATTENTION_BLOCK_SIZE": "1.5"}, "XATTENTION_BLOCK_SIZE"),
    ({"XATTENTION_MIN_PREFILL_LEN": "1"}, "XATTENTION_MIN_PREFILL_LEN"),
    ({"XATTENTION_DENSE_LAYERS": "0,one"}, "XATTENTION_DENSE_LAYERS"),
    ({"XATTENTION_PROFILE": "/nonexistent/profile.json"}, "XATTENTION_PROFILE"),
    ({"XATTENTION_ESTIMATE": "bf16"}, "XATTENTION_ESTIMATE"),
])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ValueError, match=name):
        settings_from_env(env)


def _profile(tmp_path, layers=30, heads=9, stride=8, block_size=128):
    path = tmp_path / "profile.json"
    ThresholdProfile(thresholds=[[0.9] * heads] * layers, stride=stride, block_size=block_size,
                     model_config={"num_layers": layers, "num_q_heads": heads}).save(path)
    return str(path)


def test_profile_sets_thresholds_stride_and_block_size(tmp_path):
    s = settings_from_env({"XATTENTION_PROFILE": _profile(tmp_path, stride=16, block_size=64)})
    assert (s.stride, s.block_size, s.min_prefill_len) == (16, 64, 64)
    assert s.threshold_for(3) == (0.9,) * 9


def test_profile_conflicts_and_bad_files(tmp_path):
    path = _profile(tmp_path, stride=16)
    with pytest.raises(ValueError, match="XATTENTION_STRIDE"):
        settings_from_env({"XATTENTION_PROFILE": path, "XATTENTION_STRIDE": "8"})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="XATTENTION_PROFILE"):
        settings_from_env({"XATTENTION_PROFILE": str(bad)})


def test_check_against_model(tmp_path):
    class Config:  # the fields of a transformers text config that are compared
        num_hidden_layers, num_attention_heads, num_key_value_heads = 30, 9, 3

    check_against_model(settings_from_env({"XATTENTION_PROFILE": _profile(tmp_path)}), Config())
    wrong = settings_from_env({"XATTENTION_PROFILE": _profile(tmp_path, layers=24)})
    with pytest.raises(ValueError, match="XATTENTION_PROFILE"):
        check_against_model(wrong, Config())
    with pytest.raises(ValueError, match="XATTENTION_DENSE_LAYERS"):
        check_against_model(settings_from_env({"XATTENTION_DENSE_LAYERS": "0,30"}), Config())
