"""How far a resumable suite run is from its sample targets.

    python -m xattention.eval.progress eval/results/qwen2.5-1.5b/*.jsonl.gz \\
        --target 4096=40 8192=40 16384=40 32768=24 --methods full t0.9-s8

prints, per length and method, the fewest samples any task has (the number a paired comparison
over every task can use), against the target, and how many records remain.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .records import read_records

__all__ = ["progress", "format_progress"]


def progress(records: Iterable[dict[str, Any]], targets: Mapping[int, int],
             methods: Sequence[str], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (length, method): ``min_per_task``, ``target`` and ``remaining`` records."""
    done: dict[tuple[int, str, str], set[int]] = defaultdict(set)
    for r in records:
        done[(int(r["length"]), r["method"], r["task"])].add(int(r["index"]))
    rows = []
    for length, target in sorted(targets.items()):
        for method in methods:
            counts = [len({i for i in done[(length, method, t)] if i < target}) for t in tasks]
            rows.append({"length": length, "method": method, "target": target,
                         "min_per_task": min(counts, default=0),
                         "remaining": sum(target - c for c in counts)})
    return rows


def format_progress(rows: list[dict[str, Any]]) -> str:
    lines = ["| length | method | samples (fewest over tasks) / target | records to go |",
             "|---|---|---|---|"]
    lines += [f"| {r['length']} | {r['method']} | {r['min_per_task']} / {r['target']} | "
              f"{r['remaining']} |" for r in rows]
    lines.append(f"\n{sum(r['remaining'] for r in rows)} records to go in all.")
    return "\n".join(lines)


def _target(text: str) -> tuple[int, int]:
    length, sep, n = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected LENGTH=N, got {text!r}")
    return int(length), int(n)


def main(argv: Sequence[str] | None = None) -> int:
    from .ruler import DEFAULT_TASKS

    ap = argparse.ArgumentParser(prog="python -m xattention.eval.progress",
                                 description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("results", nargs="+", help="JSONL files (plain or .gz)")
    ap.add_argument("--target", type=_target, nargs="+", required=True, metavar="LENGTH=N")
    ap.add_argument("--methods", nargs="+", required=True)
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    args = ap.parse_args(argv)
    from .runner import Method

    names = [Method.parse(m).name for m in args.methods]
    records = [r for f in args.results for r in read_records(f)]
    print(format_progress(progress(records, dict(args.target), names, args.tasks)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
