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

No host synchronisation in ``forward``: the counts stay on the device while the step runs. When
the step's last XAttention layer of this process has run (:func:`layer_done`), :func:`publish`
queues non-blocking copies of the counts to pinned memory and an event behind them; a writer
thread waits on the event and writes the file, so the forward pass never waits for the GPU. A
``.rank<r>.pending`` marker, created before the step's output can reach the user and removed
after the write, lets :func:`read_stats` wait for a write still in flight. On the CPU the counts
are host tensors already and the file is written at once.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from .._common.stats import AttentionStats

_stats = AttentionStats()
_dirty = False
_layers_this_step = 0


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


def layer_done(stats_dir: str | None, rank: int, layers_per_step: int) -> None:
    """Called after every XAttention layer of a step that planned sparse rows; the step's last
    one (``layers_per_step`` of them: this process's XAttention layers, so pipeline stages and
    hybrid models count only their own) publishes."""
    global _layers_this_step
    _layers_this_step += 1
    if _layers_this_step >= layers_per_step:
        _layers_this_step = 0
        publish(stats_dir, rank)


def publish(stats_dir: str | None, rank: int) -> None:
    """Have ``<stats_dir>/rank<rank>.json`` rewritten with the totals so far, without waiting for
    the device (module docstring); nothing to do if nothing was recorded since the last time."""
    global _dirty
    if stats_dir is None or not _dirty:
        return
    _dirty = False
    snapshot = _stats.host_copy()
    if not any(s.counts.is_pinned() for s in snapshot.layers.values()):
        write(snapshot, stats_dir, rank)
        return
    event = torch.cuda.Event()
    event.record()
    _writer().submit(event, snapshot, stats_dir, rank)


def write(summary: AttentionStats, stats_dir: str | os.PathLike[str], rank: int) -> None:
    """Write ``<stats_dir>/rank<rank>.json`` atomically (readers never see half a file)."""
    folder = Path(stats_dir)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"rank": rank, "pid": os.getpid(), **summary.as_dict()}
    partial = folder / f".rank{rank}.json.{os.getpid()}"
    partial.write_text(json.dumps(data, allow_nan=True))
    partial.replace(folder / f"rank{rank}.json")


class _Waitable(Protocol):
    def synchronize(self) -> None: ...


class StatsWriter:
    """One thread per worker process that writes the snapshots :func:`publish` queues, each once
    the device work before it (``ready``, a CUDA event) has finished. A later snapshot holds
    everything an earlier one does (totals since engine start), so a backlog is written once,
    as its newest."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[_Waitable, AttentionStats, Path, int] | None] = \
            queue.SimpleQueue()
        # Marker-and-queue on one side, queue-empty-and-unlink on the other: without the lock a
        # marker just written for a new snapshot could be removed as the old one lands.
        self._marker_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="xattention-stats", daemon=True)
        self._thread.start()

    def submit(self, ready: _Waitable, snapshot: AttentionStats,
               stats_dir: str | os.PathLike[str], rank: int) -> None:
        folder = Path(stats_dir)
        folder.mkdir(parents=True, exist_ok=True)
        # Before this call returns, hence before the step's tokens can reach the user: a reader
        # that finds the marker knows a newer file is coming (read_stats waits for it).
        with self._marker_lock:
            _pending_marker(folder, rank).write_text(str(os.getpid()))
            self._queue.put((ready, snapshot, folder, rank))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            while True:  # keep only the newest of a backlog
                try:
                    newer = self._queue.get_nowait()
                except queue.Empty:
                    break
                if newer is None:
                    stop = True
                else:
                    item = newer
            if item is None:
                return
            ready, snapshot, folder, rank = item
            ready.synchronize()
            write(snapshot, folder, rank)
            with self._marker_lock:
                if self._queue.empty():  # no newer snapshot on its way: the file is current
                    _pending_marker(folder, rank).unlink(missing_ok=True)


_writer_instance: StatsWriter | None = None


def _writer() -> StatsWriter:
    global _writer_instance
    if _writer_instance is None:
        _writer_instance = StatsWriter()
        atexit.register(_writer_instance.close)
    return _writer_instance


def _pending_marker(folder: Path, rank: int) -> Path:
    return folder / f".rank{rank}.pending"


def _writer_alive(marker: Path) -> bool:
    try:
        pid = int(marker.read_text() or 0)
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def read_stats(stats_dir: str | os.PathLike[str], *, merge: bool = False,
               wait: float = 10.0) -> dict[Any, Any]:
    """``{rank: summary}`` written by the workers (keys of ``AttentionStats.as_dict``); with
    ``merge=True`` one summary of the whole model over every rank (:func:`merge_ranks`).

    A write still in flight (a live worker's ``.rank<r>.pending`` marker) is waited for, up to
    ``wait`` seconds; then the files are read as they are.

    Example:
        >>> read_stats("/tmp/xa-stats")[0]["overall"]     # doctest: +SKIP
        0.37
        >>> read_stats("/tmp/xa-stats", merge=True)["per_head"]["0"]  # all heads  # doctest: +SKIP
    """
    if not isinstance(merge, bool):
        raise TypeError(f"merge must be a bool, got {type(merge).__name__}")
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
        raise ValueError(f"wait must be a number of seconds >= 0, got {wait!r}")
    folder = Path(stats_dir)
    if not folder.is_dir():
        raise ValueError(f"stats_dir {str(folder)!r} does not exist: set XATTENTION_STATS_DIR "
                         "to it before the engine starts, and run a prefill")
    deadline = time.monotonic() + wait
    while any(_writer_alive(m) for m in folder.glob(".rank*.pending")) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
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
