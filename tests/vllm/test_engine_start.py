"""Bad XAttention settings stop ``LLM(...)`` in the calling process, naming the variable.

The engine is started with multiprocessing on (vLLM's default): a check that only ran inside the
engine-core or worker process would surface here as vLLM's generic "Engine core initialization
failed" RuntimeError, not as a ValueError naming the setting.
"""

from __future__ import annotations

import pytest
from conftest import engine

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
