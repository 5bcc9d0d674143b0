"""The demo picture: one head's true attention mass per block next to the blocks each threshold
keeps, with a legend for the three kinds of block."""

from __future__ import annotations

from pathlib import Path

from ..block_layout import candidate_blocks

KEPT = "#1f6fb4"  # blue: computed
DROPPED = "#ffffff"  # white: could be seen, skipped
CAUSAL = "#8c8c8c"  # mid grey, far from both: in every row's future, never computed


def plot_demo(result, out: str | Path, head: int = 0) -> Path:
    """Save the true block mass of ``head`` next to the kept blocks of each threshold as PNG.

    ``result`` is a ``DemoResult``. Raises ImportError when matplotlib is missing.
    """
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm, to_rgba
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    cfg = result.config
    seq_len, bs = cfg["seq_len"], cfg["block_size"]
    cand = candidate_blocks(seq_len, seq_len, bs, True).numpy()
    mass = result.mass[0, head].double().numpy()
    sparse_rows = [r for r in result.rows if r.threshold is not None]

    panels = 1 + len(sparse_rows)
    fig = Figure(figsize=(3.9 * panels + 0.6, 4.9), dpi=110)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    extent = (-0.5, mass.shape[1] - 0.5, mass.shape[0] - 0.5, -0.5)

    shown = np.where(cand, np.maximum(mass, 1e-6), np.nan)
    cmap = matplotlib.colormaps["magma"].with_extremes(bad=CAUSAL)
    im = axes[0].imshow(shown, cmap=cmap, norm=LogNorm(vmin=1e-4, vmax=1.0),
                        interpolation="nearest", extent=extent)
    axes[0].set_title(f"true attention mass per block\nhead {head} ({result.profiles[head].kind})",
                      fontsize=10)
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.03)

    kept_rgba, dropped_rgba = np.array(to_rgba(KEPT)), np.array(to_rgba(DROPPED))
    causal_rgba = np.array(to_rgba(CAUSAL))
    for ax, row in zip(axes[1:], sparse_rows, strict=True):
        mask = row.mask[0, head].numpy()
        img = np.where(mask[..., None], kept_rgba, dropped_rgba)
        img = np.where(cand[..., None], img, causal_rgba)
        ax.imshow(img, interpolation="nearest", extent=extent)
        head_density = mask[cand].mean()
        head_recall = (mass * mask).sum(-1).mean()
        ax.set_title(f"XAttention blocks kept, threshold {row.threshold:g}\n"
                     f"head density {head_density:.2f}, mass recall {head_recall:.3f}",
                     fontsize=10)
    for ax in axes:
        ax.set_xlabel(f"key block ({bs} tokens)")
        ax.set_ylabel("query block")
        # A thin frame: white "not kept" blocks on the picture's edge stay visible.
        for spine in ax.spines.values():
            spine.set_edgecolor("#444444")
    handles = [Patch(facecolor=KEPT, edgecolor="#444444", label="kept (computed)"),
               Patch(facecolor=DROPPED, edgecolor="#444444", label="not kept (skipped)"),
               Patch(facecolor=CAUSAL, edgecolor="#444444",
                     label="causally masked (future keys, never computed)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(f"XAttention demo: L={seq_len}, stride {cfg['stride']}, block {bs}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out = Path(out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
