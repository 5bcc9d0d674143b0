"""What the engine tests run, identically on the stock engine and on the XAttention engines."""

from __future__ import annotations

from typing import Any

from _prompts import NEEDLE_KEY, filler, needle_messages
from conftest import greedy

NEW_TOKENS = 6


def _ids(tokenizer: Any, n: int, seed: int) -> list[int]:
    ids = tokenizer(filler(n // 4, seed))["input_ids"]
    assert len(ids) >= n, "filler too short"
    return ids[:n]


def _run(llm: Any, prompts: list[list[int]]) -> list[Any]:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(NEW_TOKENS),
                        use_tqdm=False)


def equality_workload(llm: Any, tokenizer: Any) -> dict[str, Any]:
    """Chunked prefill (700 tokens = 512 + 188), then a prompt sharing 650 tokens with it (a
    prefix-cache hit of 5 pages of 128; 210 new tokens), then two prompts of 150 and 600 tokens in
    one call: the first step prefills both (150 + 362 tokens), the next mixes A's decode with B's
    last 238 tokens at an offset (362) that is no multiple of the block size, then both decode
    together. Every prefill chunk has >= 128 new tokens, so all of them run through XAttention."""
    long = _ids(tokenizer, 700, seed=1)
    shared = long[:650] + _ids(tokenizer, 210, seed=2)
    a, b = _ids(tokenizer, 150, seed=3), _ids(tokenizer, 600, seed=4)
    first = _run(llm, [long])[0]
    hit = _run(llm, [shared])[0]
    pair = _run(llm, [a, b])
    return {
        "chunked": list(first.outputs[0].token_ids),
        "prefix_hit": list(hit.outputs[0].token_ids),
        "prefix_cached_tokens": hit.num_cached_tokens,
        "pair": [list(o.outputs[0].token_ids) for o in pair],
    }


def needle_prompt(tokenizer: Any) -> list[int]:
    ids = tokenizer.apply_chat_template(needle_messages(), add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


def needle_answer(llm: Any, tokenizer: Any) -> str:
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": needle_prompt(tokenizer)}],
                       SamplingParams(max_tokens=20, temperature=0.0), use_tqdm=False)
    return out[0].outputs[0].text


__all__ = ["NEEDLE_KEY", "equality_workload", "needle_answer", "needle_prompt"]
