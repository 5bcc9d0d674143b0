"""Tables and charts from the suite's JSONL records.

Scores are compared *paired*: within one (model, length), only the (task, sample) pairs that every
method finished are counted, so a run cut short by time never compares different samples. The
suite average is the mean of the per-task means (RULER's average over tasks).

>>> from xattention.eval.report import summarize
>>> summarize([{"model": "m", "length": 2048, "task": "vt", "index": 0, "method": "full",
...             "score": 100.0, "density": 1.0}])["m"]["2048"]["full"]["average"]
100.0
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .runner import meta_path, read_records

__all__ = ["summarize", "markdown_table", "plot_summary", "plot_layer_density",
           "plot_density_vs_delta", "write_report"]


def _method_order(name: str, spec: dict[str, Any] | None) -> tuple:
    """Full attention first, then fixed thresholds by stride and threshold, then profiles (and
    records without a ``method_spec``) by name. ``spec`` is the record's ``method_spec``."""
    if spec is None:
        return (0 if name == "full" else 2, 0, 0.0, name)
    if spec.get("profile") is not None:
        return (2, 0, 0.0, name)
    if spec.get("threshold") is None:
        return (0, 0, 0.0, name)
    return (1, int(spec["stride"]), float(spec["threshold"]), name)


def _ordered(entries: Iterable[dict[str, Any]]) -> list[str]:
    """Method names of summary entries (``{method: {..., "spec"}}``), in ``_method_order``."""
    specs: dict[str, Any] = {}
    for entry in entries:
        for method, e in entry.items():
            specs.setdefault(method, e.get("spec"))
    return sorted(specs, key=lambda m: _method_order(m, specs[m]))


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
        methods = sorted(specs, key=lambda m: _method_order(m, specs[m]))
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
    per_task = {t: _mean([r["score"] for r in rows if r["task"] == t]) for t in tasks}
    layer_density: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        for layer, d in (r.get("layer_density") or {}).items():
            layer_density[layer].append(d)
    return {
        "tasks": per_task,
        "average": _mean(list(per_task.values())),
        "density": _mean([r["density"] for r in rows]),
        "task_density": {t: _mean([r["density"] for r in rows if r["task"] == t])
                         for t in tasks},
        "layer_density": {k: _mean(v) for k, v in sorted(layer_density.items(),
                                                         key=lambda kv: int(kv[0]))},
        "n": len(rows),
        "samples_per_task": {t: sum(1 for r in rows if r["task"] == t) for t in tasks},
        "mean_time_s": _mean([r.get("time_s", float("nan")) for r in rows]),
    }


def _mean(values: Sequence[float]) -> float:
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


def _panels(count: int, width: float, height: float, rows: int = 1
            ) -> tuple[Any, Any, list[Any]]:
    """``(plt, fig, axes)``: ``count`` panels (at least one) in ``rows`` rows, filled row by
    row (unused cells hidden), headless backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, rows)
    cols = max(1, math.ceil(count / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[max(1, count):]:
        ax.axis("off")
    return plt, fig, flat


def _save(plt: Any, fig: Any, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary(summary: dict[str, Any], path: str | Path) -> None:
    """Suite average per method and length (bars, density written on them), one panel a model."""
    models = list(summary)
    plt, fig, axes = _panels(len(models), 7, 4.5)
    for ax, model in zip(axes, models, strict=False):
        by_length = summary[model]
        lengths = sorted(by_length, key=int)
        methods = _ordered(by_length.values())
        width = 0.8 / max(1, len(methods))
        for j, m in enumerate(methods):
            xs, ys, dens = [], [], []
            for i, length in enumerate(lengths):
                e = by_length[length].get(m)
                if e is None:
                    continue
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(e["average"])
                dens.append(e["density"])
            bars = ax.bar(xs, ys, width, label=m)
            for bar, d in zip(bars, dens, strict=True):
                ax.annotate(f"{d:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(lengths)), [f"{int(n) // 1024}k" if int(n) % 1024 == 0 else n
                                            for n in lengths])
        ax.set_ylabel("RULER-style average score")
        ax.set_title(f"{model} (numbers on bars: block density)")
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    _save(plt, fig, path)


def plot_density_vs_delta(summary: dict[str, Any], path: str | Path) -> None:
    """Score change vs full attention against block density: one row of panels per model, one
    panel per length; the trade-off every XAttention setting (and calibration profile) makes.
    Error bars = SE of the paired difference; a method has the same colour in every panel."""
    models = list(summary)
    lengths = {m: sorted(summary[m], key=int) for m in models}
    cols = max((len(v) for v in lengths.values()), default=1)
    plt, fig, axes = _panels(cols * max(1, len(models)), 4.6, 4, rows=len(models))
    methods = [m for m in _ordered(e for model in models for e in summary[model].values())
               if m != "full"]
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    color = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    markers = {"8": "o", "16": "s"}
    for r, model in enumerate(models):
        for c in range(cols):
            ax = axes[r * cols + c]
            if c >= len(lengths[model]):
                ax.axis("off")
                continue
            length = lengths[model][c]
            plotted = 0
            entry = summary[model][length]
            for method in _ordered([entry]):
                e = entry[method]
                if method == "full" or "delta_vs_full" not in e:
                    continue
                plotted += 1
                spec = e.get("spec") or {}
                fixed = spec.get("threshold") is not None and spec.get("profile") is None
                stride = str(spec["stride"]) if fixed else None
                ax.errorbar(e["density"], e["delta_vs_full"], yerr=e.get("delta_se", 0),
                            fmt=markers.get(stride, "*"), markersize=7 if stride else 12,
                            capsize=3, label=method, color=color[method])
            if not plotted:
                ax.text(0.5, 0.5, "no full-attention run\nin these files to compare with",
                        ha="center", va="center", transform=ax.transAxes)
            ax.axhline(0, color="black", lw=0.8)
            ax.axhspan(-1, 1, color="green", alpha=0.08)  # the "within 1 point" target
            ax.set_xlabel("block density (1 = dense)")
            ax.set_ylabel("score - full attention (points)")
            ax.set_title(f"{model} {int(length) // 1024}k")
            ax.grid(alpha=0.3)
        # One legend per row, on its first panel, naming every method of the row's model.
        seen: dict[str, Any] = {}
        for c in range(len(lengths[model])):
            handles, labels = axes[r * cols + c].get_legend_handles_labels()
            for h, lab in zip(handles, labels, strict=True):
                seen.setdefault(lab, h)
        if seen:
            order = [m for m in methods if m in seen]
            axes[r * cols].legend([seen[m] for m in order], order, fontsize=7)
    _save(plt, fig, path)


def plot_layer_density(summary: dict[str, Any], path: str | Path) -> None:
    """Mean block density per layer, one line per (length, XAttention method)."""
    models = list(summary)
    plt, fig, axes = _panels(len(models), 7, 4)
    for ax, model in zip(axes, models, strict=False):
        for length, entry in sorted(summary[model].items(), key=lambda kv: int(kv[0])):
            for method, e in entry.items():
                layers = e.get("layer_density") or {}
                if method == "full" or not layers:
                    continue
                xs = [int(k) for k in layers]
                ax.plot(xs, list(layers.values()), marker="o", markersize=3,
                        label=f"{length} {method}")
        ax.set_xlabel("layer")
        ax.set_ylabel("block density")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{model}: density per layer (prefill)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def _machines(result_files: Sequence[str | Path]) -> list[dict[str, Any]]:
    machines = []
    for f in result_files:
        meta = meta_path(f)
        if meta.exists():
            for run in json.loads(meta.read_text()).get("runs", []):
                machines.append({"file": Path(f).name, "started": run.get("started"),
                                 "settings": run.get("settings"), "machine": run.get("machine")})
    return machines


def write_report(result_files: Sequence[str | Path], out_dir: str | Path,
                 fidelity: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Write ``summary.json``, ``results.md`` and ``ruler.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [r for f in result_files for r in read_records(f)]
    summary = summarize(records)
    machines = _machines(result_files)
    (out_dir / "summary.json").write_text(json.dumps(
        {"summary": summary, "runs": machines,
         "files": [Path(f).name for f in result_files]}, indent=1))
    if summary:
        plot_summary(summary, out_dir / "ruler.png")
        plot_layer_density(summary, out_dir / "layer_density.png")
        plot_density_vs_delta(summary, out_dir / "density_vs_delta.png")
    md = ["# XAttention on the RULER-style suite\n",
          "Generated by `xattention eval report` from: " +
          ", ".join(f"`{Path(f).name}`" for f in result_files) + ".\n",
          "Scores: RULER metrics (string_match_all; QA string_match_part), 0-100, mean over "
          "tasks. Density: kept / causal candidate blocks, measured from the block masks of "
          "every prefill call of the layers XAttention handles (1.0 = dense). Each XAttention "
          "row is paired with full attention on the same (task, sample) pairs: 'full, same "
          "samples' is full attention's average on exactly those, and the delta is taken "
          "against it; ± is the standard error of the mean paired per-sample difference.\n",
          markdown_table(summary)]
    if summary:
        md.append("![suite average per method](ruler.png)\n")
        md.append("![score change vs density](density_vs_delta.png)\n")
        md.append("![density per layer](layer_density.png)\n")
    for f in fidelity:
        md.append(_fidelity_section(Path(f)))
    md.append("## Machines\n")
    seen = set()
    for m in machines:
        info = m["machine"] or {}
        key = json.dumps(info, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        md.append(f"- {info.get('cpu_model', info.get('processor', '?'))}, "
                  f"{info.get('cpu_count', '?')} cores, {info.get('mem_total', '?')} RAM, "
                  f"device {info.get('device')}{' (' + info['gpu'] + ')' if 'gpu' in info else ''}"
                  f"; torch {info.get('torch')}, transformers {info.get('transformers')}, "
                  f"{info.get('torch_threads')} torch threads; {info.get('platform')}")
    (out_dir / "results.md").write_text("\n".join(md) + "\n")
    return summary


def _fidelity_section(path: Path) -> str:
    res = json.loads(path.read_text())
    lines = [f"## Attention fidelity: {res['model']}, {res['length']} tokens "
             f"(stride {res['stride']}, block {res['block_size']})\n",
             "Head means; recall = share of the dense attention mass inside the kept blocks.\n",
             "| layer | threshold | recall (mean / min head) | output error (mean / max head) "
             "| density |", "|---|---|---|---|---|"]
    for layer, r in res["layers"].items():
        for i, t in enumerate(r["thresholds"]):
            rec, err, den = r["recall"][i], r["output_error"][i], r["density"][i]
            lines.append(f"| {layer} | {t:g} | {_mean(rec):.4f} / {min(rec):.4f} | "
                         f"{_mean(err):.4f} / {max(err):.4f} | {_mean(den):.3f} |")
    png = path.with_suffix(".png")
    if png.exists():
        lines.append(f"\n![fidelity]({png.name})\n")
    return "\n".join(lines) + "\n"
