"""At threshold 0.95 the XAttention engine still retrieves a needle that dense attention finds."""

from __future__ import annotations

import pytest
from _workloads import NEEDLE_KEY, needle_answer, needle_prompt
from conftest import engine

from xattention.integrations.vllm import read_stats


@pytest.fixture(scope="module")
def xa(checkpoint, tokenizer, tmp_path_factory):
    stats_dir = tmp_path_factory.mktemp("xa-stats")
    env = {"XATTENTION_THRESHOLD": "0.95", "XATTENTION_STATS_DIR": str(stats_dir)}
    with engine(checkpoint, env, attention_backend="CUSTOM") as llm:
        return {"answer": needle_answer(llm, tokenizer), "stats": read_stats(stats_dir)}


def test_needle_prompt_is_long(tokenizer):
    assert 1800 <= len(needle_prompt(tokenizer)) <= 4000


def test_dense_answers_the_needle(stock):
    assert NEEDLE_KEY in stock["needle"], f"stock backend answered {stock['needle']!r}"


def test_xattention_answers_the_needle(xa):
    assert NEEDLE_KEY in xa["answer"], f"XAttention answered {xa['answer']!r}"


def test_xattention_skipped_blocks(xa):
    stats = xa["stats"][0]
    assert 0 < stats["overall"] < 1.0, stats["overall"]
