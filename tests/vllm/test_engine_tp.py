"""Tensor parallelism on the CPU engine: Qwen2.5-Coder-0.5B (14 query / 2 KV heads) with
``tensor_parallel_size=2`` through XAttention at threshold 1 gives the greedy tokens of the stock
single-process engine, and both ranks write their statistics, which ``read_stats(merge=True)``
joins into the whole model's 14 heads per layer.

Each rank holds 7 query heads and 1 KV head; the backend slices a per-head profile by its rank
(backend.py), so this also checks that the rank and head bookkeeping hold beyond one process.
"""

from __future__ import annotations

import os

import pytest
from _workloads import equality_workload
from conftest import engine, on_cpu

from xattention.integrations.vllm import read_stats

pytestmark = pytest.mark.skipif(not on_cpu(), reason="the CPU engine (one GPU on the card)")


@pytest.fixture(scope="module")
def qwen() -> dict:
    from _model import model_checkpoint
    from transformers import AutoTokenizer

    path = str(model_checkpoint("qwen2.5-0.5b"))
    return {"path": path, "tokenizer": AutoTokenizer.from_pretrained(path)}


@pytest.fixture(scope="module")
def stock_tp1(qwen) -> dict:
    with engine(qwen["path"]) as llm:
        return equality_workload(llm, qwen["tokenizer"])


@pytest.fixture(scope="module")
def xa_tp2(qwen, tmp_path_factory) -> dict:
    stats_dir = tmp_path_factory.mktemp("xa-tp2-stats")
    # vLLM's CPU workers bind their threads one NUMA node each unless told which cores to use;
    # a machine with one node (CI's) needs the cores split by hand: "0|1" on 2 cores.
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    bind = "|".join(",".join(map(str, part)) for part in (cores[:half], cores[half:2 * half]))
    env = {"XATTENTION_THRESHOLD": "1.0", "XATTENTION_STATS_DIR": str(stats_dir),
           "VLLM_CPU_OMP_THREADS_BIND": bind}
    with engine(qwen["path"], env, attention_backend="CUSTOM", tensor_parallel_size=2,
                distributed_executor_backend="mp") as llm:
        return {"out": equality_workload(llm, qwen["tokenizer"]), "stats_dir": stats_dir}


def test_tp2_at_threshold_1_gives_the_tp1_stock_tokens(xa_tp2, stock_tp1):
    for part in ("chunked", "prefix_hit", "pair"):
        assert xa_tp2["out"][part] == stock_tp1[part], part


def test_each_rank_writes_its_heads_and_the_merge_has_all(xa_tp2):
    per_rank = read_stats(xa_tp2["stats_dir"])
    assert sorted(per_rank) == [0, 1]
    for data in per_rank.values():
        assert sorted(int(i) for i in data["per_layer"]) == list(range(24))
        assert all(len(h) == 7 for h in data["per_head"].values())
    merged = read_stats(xa_tp2["stats_dir"], merge=True)
    assert all(len(h) == 14 for h in merged["per_head"].values())
    assert merged["overall"] == 1.0
    assert merged["sparse_calls"] == per_rank[0]["sparse_calls"]
