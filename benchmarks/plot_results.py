"""Charts of the committed benchmark results (results/*.json -> results/*.png). Runs on the CPU.

    python benchmarks/plot_results.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def plot_sparse() -> Path:
    data = _load("sparse_attention")
    rows = data["rows"]
    lengths = sorted({r["L"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), sharey=True)
    for ax, length in zip(axes, lengths, strict=True):
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["L"] == length and r["method"] in ("xattention_sparse", "flex_attention"):
                groups.setdefault(r["method"], []).append((r["density"], r["tflops"]))
        width = 0.38
        for n, (method, pts) in enumerate(sorted(groups.items(), reverse=True)):
            pts.sort()
            xs = [i + (n - 0.5) * width for i in range(len(pts))]
            ax.bar(xs, [p[1] for p in pts], width, label=method)
            ax.set_xticks(range(len(pts)), [f"{p[0]:.0%}" for p in pts])
        cudnn = next(r["tflops"] for r in rows if r["L"] == length and r["method"] == "sdpa_cudnn")
        ax.axhline(cudnn, color="k", ls="--", lw=1, label="cuDNN dense causal")
        ax.set_title(f"L = {length // 1024}k")
        ax.set_xlabel("kept blocks (causal pairs)")
    axes[0].set_ylabel("TFLOP/s on computed blocks")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Block-sparse attention, same masks — {data['meta']['gpu']}, bf16, H=32, D=128")
    fig.tight_layout()
    out = RESULTS / "sparse_attention.png"
    fig.savefig(out, dpi=120)
    return out


def plot_crossover() -> Path:
    data = _load("xattention_crossover")
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for heads in sorted({r["heads"] for r in rows}):
        for stride in sorted({r["S"] for r in rows}):
            pts = sorted((r["L"], r["sparse_vs_cudnn"]) for r in rows
                         if r["heads"] == heads and r["S"] == stride)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"heads {heads}, S={stride}")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="cuDNN dense causal")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lengths = sorted({r["L"] for r in rows})
    ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
    ax.set_xlabel("sequence length")
    ax.set_ylabel("speedup over cuDNN (sparse call, t=0.9)")
    ax.set_title(f"Short inputs: where sparsity starts to pay — {data['meta']['gpu']}",
                 fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = RESULTS / "xattention_crossover.png"
    fig.savefig(out, dpi=120)
    return out


def plot_end_to_end(name: str = "xattention") -> Path:
    data = _load(name)
    rows = [r for r in data["rows"] if "~" in r["method"]]
    lengths = sorted({r["L"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 3.6))
    strides = sorted({int(r["method"].split("S=")[1].split()[0]) for r in rows})
    for stride in strides:
        for target in ("10%", "20%"):
            pts = sorted((r["L"], r["speedup_vs_cudnn"]) for r in rows
                         if f"~{target}" in r["method"] and f"S={stride} " in r["method"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"xattention(), S={stride}, ~{target} density")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="cuDNN dense causal")
    ax.axhline(3.5, color="r", ls=":", lw=1, label="target at 128k, ~20%")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
    ax.set_xlabel("sequence length")
    ax.set_ylabel("speedup over cuDNN")
    ax.set_title(f"Estimate + select + sparse attention — {data['meta']['gpu']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = RESULTS / ("xattention_speedup.png" if name == "xattention" else f"{name}_speedup.png")
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    for path in (plot_sparse(), plot_end_to_end(), plot_end_to_end("xattention_gqa"),
                 plot_crossover()):
        print("wrote", path)
