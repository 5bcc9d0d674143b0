"""Charts of a suite summary (``summary.summarize``): averages, score change against density, and
density per layer. A method has the same colour in every panel; matplotlib runs headless.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .summary import ordered_methods

__all__ = ["plot_density_vs_delta", "plot_layer_density", "plot_summary"]


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
        methods = ordered_methods(by_length.values())
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
    methods = [m for m in ordered_methods(e for model in models for e in summary[model].values())
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
            for method in ordered_methods([entry]):
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
