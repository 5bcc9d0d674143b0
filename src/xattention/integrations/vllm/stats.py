"""Block densities of the vLLM backend, per worker process, and how the user reads them.

The attention runs in vLLM's worker processes (one per tensor-parallel rank), not in the process
that called ``LLM(...)``, so the counts live there: :func:`worker_stats` is that process's
:class:`~xattention.integrations._common.stats.AttentionStats` (the same type and definition as the
other integrations: kept blocks over causal candidate blocks, per layer and per query head
of this rank, dense = 1.0).

To read them from the user's process, set ``XATTENTION_STATS_DIR`` before the engine starts: after
every engine step that prefilled through the backend, each rank rewrites
``<dir>/rank<r>.json`` (atomically) with its totals since engine start, and :func:`read_stats`
loads them::

    os.environ["XATTENTION_STATS_DIR"] = "/tmp/xa-stats"
    llm = LLM(model, attention_backend="CUSTOM", ...)
    llm.generate(prompts, params)
    read_stats("/tmp/xa-stats")[0]["per_layer"]     # rank 0: {"0": 0.41, "1": 0.22, ...}

The same works for ``vllm serve``. Counted calls are prefill chunks of at least
``XATTENTION_MIN_PREFILL_LEN`` new tokens; with tensor parallelism every rank reports its own heads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .._common.stats import AttentionStats

_stats = AttentionStats()
_dirty = False


def worker_stats() -> AttentionStats:
    """This process's accumulated statistics (empty in a process that runs no attention)."""
    return _stats


def record(layer: int, mask: torch.Tensor | None, q_len: int, k_len: int, heads: int,
           block_size: int) -> None:
    """Add one request's prefill chunk of one layer (``mask`` None: ran dense)."""
    global _dirty
    _stats.record(layer, mask, q_len=q_len, k_len=k_len, block_size=block_size, causal=True,
                  heads=heads)
    _dirty = True


def flush(stats_dir: str | None, rank: int) -> None:
    """Write ``<stats_dir>/rank<rank>.json`` if anything was recorded since the last flush."""
    global _dirty
    if stats_dir is None or not _dirty:
        return
    folder = Path(stats_dir)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"rank": rank, "pid": os.getpid(), **_stats.as_dict()}
    partial = folder / f".rank{rank}.json.{os.getpid()}"
    partial.write_text(json.dumps(data, allow_nan=True))
    partial.replace(folder / f"rank{rank}.json")
    _dirty = False


def read_stats(stats_dir: str | os.PathLike[str], *, merge: bool = False) -> dict[Any, Any]:
    """``{rank: summary}`` written by the workers (keys of ``AttentionStats.as_dict``); with
    ``merge=True`` one summary of the whole model over every rank (:func:`merge_ranks`).

    Example:
        >>> read_stats("/tmp/xa-stats")[0]["overall"]     # doctest: +SKIP
        0.37
        >>> read_stats("/tmp/xa-stats", merge=True)["per_head"]["0"]  # all heads  # doctest: +SKIP
    """
    if not isinstance(merge, bool):
        raise TypeError(f"merge must be a bool, got {type(merge).__name__}")
    folder = Path(stats_dir)
    if not folder.is_dir():
        raise ValueError(f"stats_dir {str(folder)!r} does not exist: set XATTENTION_STATS_DIR "
                         "to it before the engine starts, and run a prefill")
    out = {}
    for path in sorted(folder.glob("rank*.json")):
        data = json.loads(path.read_text())
        out[int(data["rank"])] = data
    return merge_ranks(out) if merge else out


def merge_ranks(per_rank: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One summary from the tensor-parallel ranks' own: rank ``r`` holds a contiguous slice of
    the query heads, so a layer's heads are the ranks' lists in rank order, and its density is
    kept over candidate blocks summed over every rank's heads. Call counts are rank 0's (every
    rank runs every call)."""
    if not per_rank:
        raise ValueError("no rank wrote statistics: run a prefill through the backend first")
    ranks = sorted(per_rank)
    layers = sorted({int(i) for r in ranks for i in per_rank[r]["per_head"]})
    per_head, per_layer = {}, {}
    kept_all = total_all = 0.0
    for i in layers:
        heads, kept, total = [], 0.0, 0.0
        for r in ranks:
            data = per_rank[r]
            densities = data["per_head"].get(str(i), [])
            candidates = float(data.get("candidates", {}).get(str(i), 1.0))
            heads += densities
            kept += sum(densities) * candidates
            total += candidates * len(densities)
        per_head[str(i)] = heads
        per_layer[str(i)] = kept / total if total else float("nan")
        kept_all += kept
        total_all += total
    first = per_rank[ranks[0]]
    return {"ranks": ranks, "overall": kept_all / total_all if total_all else float("nan"),
            "per_layer": per_layer, "per_head": per_head,
            "sparse_calls": first["sparse_calls"], "dense_calls": first["dense_calls"]}
