"""The suite's records summarised: paired per-method averages and the Markdown table.

Scores are compared *paired*: within one (model, length), only the (task, sample) pairs that every
method finished are counted, so a run cut short by time never compares different samples. The
suite average is the mean of the per-task means (RULER's average over tasks). Methods are ordered
by the setting each record carries (``method_spec``), never by parsing their names.

>>> summarize([{"model": "m", "length": 2048, "task": "vt", "index": 0, "method": "full",
...             "score": 100.0, "density": 1.0}])["m"]["2048"]["full"]["average"]
100.0
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["finite_mean", "markdown_table", "method_order", "ordered_methods", "summarize"]


def method_order(name: str, spec: dict[str, Any] | None) -> tuple:
    """Full attention first, then fixed thresholds by stride and threshold, then profiles (and
    records without a ``method_spec``) by name. ``spec`` is the record's ``method_spec``."""
    if spec is None:
        return (0 if name == "full" else 2, 0, 0.0, name)
    if spec.get("profile") is not None:
        return (2, 0, 0.0, name)
    if spec.get("threshold") is None:
        return (0, 0, 0.0, name)
    return (1, int(spec["stride"]), float(spec["threshold"]), name)


def ordered_methods(entries: Iterable[dict[str, Any]]) -> list[str]:
    """Method names of summary entries (``{method: {..., "spec"}}``), in ``method_order``."""
    specs: dict[str, Any] = {}
    for entry in entries:
        for method, e in entry.items():
            specs.setdefault(method, e.get("spec"))
    return sorted(specs, key=lambda m: method_order(m, specs[m]))


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """``{model: {length: {method: {"tasks": {task: mean}, "average", "density", "n", ...}}}}``.

    Every XAttention method is paired with ``full`` on the (task, sample) pairs both finished:
    ``full_same`` is full attention's average on exactly those pairs and ``delta_vs_full`` the
    difference. The ``full`` row itself covers the pairs that any other method also finished.
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[(rec["model"], int(rec["length"]))].append(rec)
    out: dict[str, Any] = {}
    for (model, length), recs in sorted(groups.items()):
        specs = {r["method"]: r.get("method_spec") for r in recs}
        methods = sorted(specs, key=lambda m: method_order(m, specs[m]))
        by_method: dict[str, dict[tuple[str, int], dict[str, Any]]] = defaultdict(dict)
        for r in recs:
            by_method[r["method"]][(r["task"], int(r["index"]))] = r
        full = by_method.get("full")
        others = [m for m in methods if m != "full"]
        entry: dict[str, Any] = {}
        for m in methods:
            if m == "full":
                union = set().union(*(set(by_method[o]) for o in others)) if others else None
                keys = set(full) if union is None else set(full) & union
            else:
                keys = set(by_method[m]) if full is None else set(by_method[m]) & set(full)
            entry[m] = _aggregate([by_method[m][k] for k in sorted(keys)])
            entry[m]["spec"] = specs[m]
            if full is not None and m != "full":
                same = _aggregate([full[k] for k in sorted(keys)])
                entry[m]["full_same"] = same["average"]
                entry[m]["delta_vs_full"] = entry[m]["average"] - same["average"]
                # Spread of the paired per-sample differences: how much of the delta is noise.
                diffs = [by_method[m][k]["score"] - full[k]["score"] for k in sorted(keys)]
                entry[m]["delta_se"] = (statistics.stdev(diffs) / math.sqrt(len(diffs))
                                        if len(diffs) > 1 else float("nan"))
                entry[m]["samples_changed"] = sum(1 for d in diffs if d != 0)
        # A method with no sample in common with full attention has nothing to report.
        entry = {m: e for m, e in entry.items() if e["n"] > 0}
        out.setdefault(model, {})[str(length)] = entry
    return out


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tasks = sorted({r["task"] for r in rows})
    per_task = {t: finite_mean([r["score"] for r in rows if r["task"] == t]) for t in tasks}
    layer_density: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        for layer, d in (r.get("layer_density") or {}).items():
            layer_density[layer].append(d)
    return {
        "tasks": per_task,
        "average": finite_mean(list(per_task.values())),
        "density": finite_mean([r["density"] for r in rows]),
        "task_density": {t: finite_mean([r["density"] for r in rows if r["task"] == t])
                         for t in tasks},
        "layer_density": {k: finite_mean(v) for k, v in sorted(layer_density.items(),
                                                         key=lambda kv: int(kv[0]))},
        "n": len(rows),
        "samples_per_task": {t: sum(1 for r in rows if r["task"] == t) for t in tasks},
        "mean_time_s": finite_mean([r.get("time_s", float("nan")) for r in rows]),
    }


def finite_mean(values: Sequence[float]) -> float:
    """Mean of the values that are numbers (None and NaN left out); NaN when none is."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _fmt(x: float, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(summary: dict[str, Any]) -> str:
    """One table per model: rows (length, method), columns tasks, average, delta, density."""
    lines: list[str] = []
    for model, by_length in summary.items():
        tasks = sorted({t for e in by_length.values() for m in e.values() for t in m["tasks"]})
        lines.append(f"### {model}\n")
        head = ["length", "method", *tasks, "**avg**", "full, same samples", "Δ vs full ± SE",
                "density", "tasks", "samples/task"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for length, entry in sorted(by_length.items(), key=lambda kv: int(kv[0])):
            for method, e in entry.items():
                spt = sorted(set(e["samples_per_task"].values()))
                cells = [length, method, *(_fmt(e["tasks"].get(t)) for t in tasks),
                         f"**{_fmt(e['average'])}**",
                         "" if method == "full" else _fmt(e.get("full_same", float("nan"))),
                         "" if method == "full" else
                         f"{_fmt(e.get('delta_vs_full', float('nan')))} ± "
                         f"{_fmt(e.get('delta_se', float('nan')))}",
                         _fmt(e["density"], 3), str(len(e["tasks"])),
                         "-".join(str(x) for x in (spt[0], spt[-1])) if len(spt) > 1
                         else str(spt[0]) if spt else "0"]
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)
