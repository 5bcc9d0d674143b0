"""The layer under the three integrations (``integrations/_common``): one threshold resolver and
profile policy, one layer-set parser, one option spelling, one device-side statistics type; and
the bugs found where the integrations each had their own copy.
"""

from __future__ import annotations

import ast
import pathlib
import warnings

import numpy as np
import pytest
import torch

from xattention.integrations._common import (
    AttentionStats,
    ThresholdTable,
    layer_set,
    resolve_thresholds,
)
from xattention.profile import ThresholdProfile

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "xattention"


def _profile(layers=2, heads=4, stride=4, block_size=16, value=0.8):
    return ThresholdProfile(thresholds=[[value] * heads] * layers, stride=stride,
                            block_size=block_size,
                            model_config={"num_layers": layers, "num_q_heads": heads})


# ------------------------------------------------------------------------------------------
# Thresholds: one resolver, one policy
# ------------------------------------------------------------------------------------------


def test_profile_sets_stride_and_block_size_when_left_unset(tmp_path):
    path = tmp_path / "p.json"
    _profile().save(path)
    for given in (_profile(), path, str(path)):
        table, stride, block = resolve_thresholds(0.9, given, stride=None, block_size=None,
                                                  num_layers=2, num_heads=4)
        assert (stride, block) == (4, 16)
        assert torch.equal(table[1], torch.full((4,), 0.8))
    # the same values spelled out are no contradiction
    resolve_thresholds(0.9, _profile(), stride=4, block_size=16, num_layers=2, num_heads=4)


@pytest.mark.parametrize("kw", [dict(stride=8), dict(block_size=128)])
def test_profile_contradicted_by_explicit_block_params_is_an_error(kw):
    args = {"stride": None, "block_size": None, **kw}
    with pytest.raises(ValueError, match=f"{next(iter(kw))}=.*contradicts the threshold profile"):
        resolve_thresholds(0.9, _profile(), num_layers=2, num_heads=4, **args)


def test_defaults_without_a_profile():
    table, stride, block = resolve_thresholds(0.9, None, stride=None, block_size=None,
                                              num_layers=3, num_heads=2)
    assert (stride, block) == (8, 128) and table == {0: 0.9, 1: 0.9, 2: 0.9}


@pytest.mark.parametrize("value", [np.float32(0.9), np.float64(0.9), np.int64(1)])
def test_numpy_thresholds_accepted(value):
    table, _, _ = resolve_thresholds(value, {0: value, 1: np.array([value] * 2)}, stride=None,
                                     block_size=None, num_layers=2, num_heads=2)
    assert table[0] == pytest.approx(float(value))
    assert torch.allclose(table[1], torch.full((2,), float(value)))


def test_bool_threshold_rejected():
    with pytest.raises(TypeError, match="threshold"):
        resolve_thresholds(True, None, stride=None, block_size=None, num_layers=1, num_heads=1)


def test_missing_profile_file_names_the_argument():
    with pytest.raises(ValueError, match="thresholds='nope.json': no such file") as info:
        resolve_thresholds(0.9, "nope.json", stride=None, block_size=None, num_layers=1,
                           num_heads=1)
    assert isinstance(info.value, FileNotFoundError)  # what code catching the OS error expects


def test_threshold_table_moves_each_tensor_once():
    t = ThresholdTable({0: 0.5, 1: torch.tensor([0.8, 0.9])})
    meta = torch.device("meta")
    first = t.for_layer(1, meta)
    assert first.device == meta and t.for_layer(1, meta) is first
    assert t.for_layer(0, meta) == 0.5 and t[1].device.type == "cpu"


# ------------------------------------------------------------------------------------------
# Layer sets
# ------------------------------------------------------------------------------------------


def test_layer_set():
    assert layer_set([0, -1, np.int64(1)], 4) == frozenset({0, 1, 3})
    with pytest.raises(ValueError, match="dense_layers has 4, the model has 4 layers"):
        layer_set([4], 4)
    with pytest.raises(TypeError, match="dense_layers must hold ints"):
        layer_set([True], 4)
    with pytest.raises(TypeError, match="dense_layers must be an iterable"):
        layer_set("0,1", 4)


# ------------------------------------------------------------------------------------------
# Statistics: counted on the device, read on the host
# ------------------------------------------------------------------------------------------


def test_stats_record_counts_candidates_and_stays_lazy():
    stats = AttentionStats()
    mask = torch.ones(2, 3, 4, 4, dtype=torch.bool)  # B=2, H=3, 4x4 blocks
    mask[:, 0] = False
    stats.record(0, mask, q_len=64, k_len=64, block_size=16, causal=True, heads=3, batch=2)
    entry = stats.layers[0]
    assert entry.counts.dtype == torch.float64  # an accumulator, not yet a host copy
    assert entry.total == 2 * 10  # causal candidates of a 4x4 grid, per batch entry
    assert entry.kept.tolist() == [0.0, 20.0, 20.0]
    stats.record(0, None, q_len=64, k_len=64, block_size=16, causal=True, heads=3, batch=2)
    assert stats.per_layer()[0] == pytest.approx(100 / 120)
    assert stats.sparse_layers() == [0] and entry.dense_calls == 1


# ------------------------------------------------------------------------------------------
# Imports: core <- integrations <- calibration / eval; no integration imports another
# ------------------------------------------------------------------------------------------


def _imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.append("." * node.level + (node.module or ""))
    return out


@pytest.mark.parametrize("integration", ["diffusers", "vllm", "transformers", "_common"])
def test_integrations_import_no_sibling_and_no_calibration(integration):
    for path in (SRC / "integrations" / integration).glob("*.py"):
        for module in _imports(path):
            assert "calibration" not in module, (path, module)
            siblings = {"..transformers", "..diffusers", "..vllm"} - {f"..{integration}"}
            assert not any(module == s or module.startswith(s + ".") for s in siblings), \
                (path, module)


# ------------------------------------------------------------------------------------------
# The same option names everywhere
# ------------------------------------------------------------------------------------------


def test_enable_signatures_agree():
    import inspect

    xt = pytest.importorskip("xattention.integrations.transformers")
    xd = pytest.importorskip("xattention.integrations.diffusers")
    shared = ["threshold", "thresholds", "stride", "block_size", "dense_layers",
              "min_prefill_len", "backend", "estimate_dtype", "record_stats"]
    for enable in (xt.enable, xd.enable):
        params = inspect.signature(enable).parameters
        first, *rest = params.values()
        assert first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest), enable
        assert all(name in params for name in shared), enable
        assert params["stride"].default is None and params["block_size"].default is None


def test_min_query_len_is_read_with_a_deprecation_warning():
    xt = pytest.importorskip("xattention.integrations.transformers")
    from inputs import tiny_gemma3

    model = tiny_gemma3()
    with pytest.warns(DeprecationWarning, match="min_prefill_len"):
        xt.enable(model, min_query_len=7, backend="torch")
    assert model._xattention_state.min_prefill_len == 7
    with pytest.raises(TypeError, match="min_prefill_len= only"):
        xt.enable(model, min_query_len=7, min_prefill_len=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        xt.enable(model, min_prefill_len=3)
    xt.disable(model)


# ------------------------------------------------------------------------------------------
# calibrated_layers runs exactly the layers enable() runs
# ------------------------------------------------------------------------------------------


def test_calibrated_layers_match_sparse_layers_at_the_calibration_length():
    xt = pytest.importorskip("xattention.integrations.transformers")
    from transformers import MistralConfig, MistralForCausalLM

    from xattention.calibration.layers import calibrated_layers

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           sliding_window=256)
    config._attn_implementation = "sdpa"
    model = MistralForCausalLM(config).eval()
    # A 256-token window covers a 200-token context: enable() sparsifies both layers there.
    assert xt.sparse_layers(model, 200) == [0, 1]
    assert calibrated_layers(model, seq_len=200) == [0, 1]
    assert calibrated_layers(model, seq_len=1000) == xt.sparse_layers(model, 1000) == []
    assert calibrated_layers(model, [-1], seq_len=200) == [0]


def test_enable_names_a_missing_profile_and_takes_numpy_thresholds():
    xt = pytest.importorskip("xattention.integrations.transformers")
    from inputs import tiny_gemma3

    model = tiny_gemma3()
    with pytest.raises(ValueError, match="thresholds='nope.json': no such file"):
        xt.enable(model, thresholds="nope.json")
    with pytest.raises(TypeError, match="a profile file goes to thresholds=PATH"):
        xt.enable(model, threshold="nope.json")
    xt.enable(model, threshold=np.float32(0.8), backend="torch")  # a config read with numpy
    assert model._xattention_state.thresholds[0] == pytest.approx(0.8)
    xt.disable(model)
