"""``xattention demo``: XAttention against dense attention on synthetic, LLM-like attention.

The demo builds seeded Q/K/V with the structure real LLM heads show
(:mod:`xattention.synthetic`), runs dense causal attention (``torch`` SDPA) and XAttention at a
few thresholds, and reports per method: block density, relative output error, recall of the true
attention mass (:func:`xattention.stats.block_attention_mass`) by the kept blocks, and time. With
matplotlib it also draws, for one head, the true mass per block next to the selected masks.

Modules: :mod:`.run` measures and tabulates, :mod:`.plot` draws, :mod:`.cli` is the command.
Importing this package loads neither torch nor matplotlib, so ``xattention --help`` stays quick.
"""

from __future__ import annotations

from .cli import register_cli

__all__ = ["DemoResult", "DemoRow", "plot_demo", "register_cli", "run_demo"]


def __getattr__(name: str):
    if name in ("DemoResult", "DemoRow", "run_demo"):
        from . import run

        return getattr(run, name)
    if name == "plot_demo":
        from .plot import plot_demo

        return plot_demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
