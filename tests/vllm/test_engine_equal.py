"""Threshold >= 1 through the XAttention backend gives exactly the stock backend's greedy tokens.

One XAttention engine (XATTENTION_THRESHOLD=1.0, so every candidate block is kept and the sparse
code path computes dense attention) runs the same workload as the stock engine (conftest.stock):
chunked prefill in 512-token chunks, a prefix-cache hit, two prompts of different lengths
decoding together (see _workloads.equality_workload).
"""

from __future__ import annotations

import pytest
from _workloads import equality_workload
from conftest import engine

from xattention.integrations.vllm import read_stats


@pytest.fixture(scope="module")
def xa(checkpoint, tokenizer, tmp_path_factory):
    stats_dir = tmp_path_factory.mktemp("xa-stats")
    env = {"XATTENTION_THRESHOLD": "1.0", "XATTENTION_STATS_DIR": str(stats_dir)}
    with engine(checkpoint, env, attention_backend="CUSTOM") as llm:
        return {"out": equality_workload(llm, tokenizer), "stats": read_stats(stats_dir)}


def test_chunked_prefill_matches_stock(xa, stock):
    assert xa["out"]["chunked"] == stock["equal"]["chunked"]


def test_prefix_cache_hit_matches_stock(xa, stock):
    assert xa["out"]["prefix_cached_tokens"] >= 640, "the second prompt should hit the cache"
    assert xa["out"]["prefix_cached_tokens"] == stock["equal"]["prefix_cached_tokens"]
    assert xa["out"]["prefix_hit"] == stock["equal"]["prefix_hit"]


def test_two_prompts_decoding_together_match_stock(xa, stock):
    assert xa["out"]["pair"] == stock["equal"]["pair"]


def test_every_layer_ran_xattention_at_full_density(xa):
    stats = xa["stats"][0]  # rank 0 (the only one)
    assert sorted(int(i) for i in stats["per_layer"]) == list(range(30))
    # 700-token prompt: 2 chunks; prefix hit: 1; the pair: 3 (150, 362, 238 new tokens).
    assert all(n == 6 for n in stats["sparse_calls"].values()), stats["sparse_calls"]
    assert all(d == 1.0 for d in stats["per_layer"].values()), stats["per_layer"]
