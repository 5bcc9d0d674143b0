"""read_stats(merge=True): the ranks' statistics of a tensor-parallel engine, merged, equal those
one process holding every head would have counted (no vLLM needed)."""

from __future__ import annotations

import json

import pytest
import torch

from xattention.integrations._common.stats import AttentionStats
from xattention.integrations.vllm import read_stats


def test_merged_ranks_equal_one_process_with_every_head(tmp_path, gen):
    heads, ranks = 6, 2
    whole = AttentionStats()
    parts = [AttentionStats() for _ in range(ranks)]
    for layer in range(3):
        for q_len, k_len in ((384, 384), (200, 584)):  # a prompt, then a chunk at an offset
            nq, nk = -(-q_len // 128), -(-k_len // 128)
            mask = torch.rand(1, heads, nq, nk, generator=gen) < 0.5
            whole.record(layer, mask, q_len=q_len, k_len=k_len, block_size=128, causal=True,
                         heads=heads)
            for r, part in enumerate(parts):  # rank r holds heads [r*3, r*3+3)
                sl = slice(r * heads // ranks, (r + 1) * heads // ranks)
                part.record(layer, mask[:, sl], q_len=q_len, k_len=k_len, block_size=128,
                            causal=True, heads=heads // ranks)
    for r, part in enumerate(parts):
        (tmp_path / f"rank{r}.json").write_text(json.dumps({"rank": r, **part.as_dict()}))
    merged = read_stats(tmp_path, merge=True)
    ref = whole.as_dict()
    assert merged["ranks"] == [0, 1]
    assert merged["overall"] == pytest.approx(ref["overall"], abs=1e-6)
    for layer, density in ref["per_layer"].items():
        assert merged["per_layer"][layer] == pytest.approx(density, abs=1e-6)
        assert merged["per_head"][layer] == pytest.approx(ref["per_head"][layer], abs=1e-6)
    assert merged["sparse_calls"] == ref["sparse_calls"]
    # Per rank stays available, and a wrong flag type is named.
    assert sorted(read_stats(tmp_path)) == [0, 1]
    with pytest.raises(TypeError, match="merge"):
        read_stats(tmp_path, merge="yes")


def test_merge_of_nothing_says_why(tmp_path):
    with pytest.raises(ValueError, match="no rank wrote"):
        read_stats(tmp_path, merge=True)
