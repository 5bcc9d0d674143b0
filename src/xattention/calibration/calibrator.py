"""``Calibrator``: the calibration procedure, one explicit step at a time.

``Calibrator(model, tokenizer, config)`` only checks its options and reads the model's layout;
``measure()`` builds the windows and measures the per-head curves (steps 1-2 of
``docs/calibration.md``); ``allocate`` / ``evaluate`` / ``search`` / ``make_profile`` do steps 3-5.
:func:`~xattention.calibration.calibrate` runs them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .config import CalibrationConfig
from .curves import Curves, measure_curves
from .data import CalibrationWindow, calibration_windows
from .layers import calibrated_layers
from .optimize import Allocation, cost_range, solve
from .profile import PROFILE_VERSION, ThresholdProfile, model_structure
from .search import SearchResult, budget_ladder, search_budget
from .verify import HeldOut

__all__ = ["Calibrator"]


class Calibrator:
    """Measure once, then allocate, verify and profile as often as wanted.

    Keeping the object lets a caller trace the whole density / fidelity frontier (``allocate`` at
    several budgets, ``evaluate`` each on the held-out windows), or compare with uniform
    thresholds measured on exactly the same windows (``evaluate(uniform(t))``).

    Args:
        model: a Hugging Face causal LM that ``xattention.integrations.transformers`` supports.
        tokenizer: its tokenizer.
        texts, heldout_texts: prose to calibrate / verify on (see ``calibrate``).
        config: a ``CalibrationConfig``; ``options`` replace its fields.
        log: where progress lines go (None: silent).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        texts: str | Sequence[str] | None = None,
        config: CalibrationConfig | None = None,
        *,
        heldout_texts: str | Sequence[str] | None = None,
        log: Callable[[str], None] | None = print,
        **options: Any,
    ) -> None:
        self.config = cfg = CalibrationConfig.build(config, **options)
        self.model, self.tokenizer = model, tokenizer
        self.texts, self.heldout_texts = texts, heldout_texts
        self.say = log or (lambda _msg: None)
        self.t_start = time.time()
        self.struct = model_structure(model)
        self.n_layers, self.n_heads = self.struct["num_layers"], self.struct["num_q_heads"]
        self.grid = cfg.thresholds
        layers = cfg.layers
        if layers is None:
            layers = calibrated_layers(model, cfg.enable_kwargs.get("dense_layers", ()),
                                       cfg.seq_len)
        self.layers = sorted({int(x) for x in layers})
        if not self.layers or any(not 0 <= x < self.n_layers for x in self.layers):
            raise ValueError(f"layers must be a non-empty list in [0, {self.n_layers}), got "
                             f"{list(layers)}")
        self.calib: list[CalibrationWindow] = []
        self.held: list[CalibrationWindow] = []
        self.data: str | None = None
        self.text_source: str | None = None
        self._curves: Curves | None = None
        self._heldout: HeldOut | None = None

    # ----------------------------------------------------------------------------------------
    def measure(self) -> Curves:
        """Steps 1-2: the calibration / held-out windows, then the per-head curves."""
        cfg = self.config
        self.calib, self.held, self.data, self.text_source = calibration_windows(
            self.tokenizer, cfg.data, self.texts, self.heldout_texts, tasks=cfg.tasks,
            chat=cfg.chat, seq_len=cfg.seq_len, calib_windows=cfg.calib_windows,
            heldout_windows=cfg.heldout_windows if cfg.verify else 0,
            eval_tokens=cfg.eval_tokens, seed=cfg.seed, progress=cfg.progress)
        self._heldout = None
        self.say(f"calibrate: layers {self.layers} x {self.n_heads} heads, {len(self.calib)} "
                 f"{self.data} windows of ~{cfg.seq_len} tokens, grid of {len(self.grid)} "
                 "thresholds")
        self.model.eval()
        t0 = time.time()
        sums = measure_curves(self.model, self.calib, self.grid, layers=self.layers,
                              stride=cfg.stride, block_size=cfg.block_size, backend=cfg.backend,
                              progress=cfg.progress)
        self._curves = Curves.from_sums(sums, self.grid, self.n_layers, cfg.proxy,
                                        time.time() - t0)
        self.say(f"calibrate: curves measured in {self._curves.seconds:.1f}s")
        return self._curves

    @property
    def curves(self) -> Curves:
        """The measured curves (``measure()`` first)."""
        if self._curves is None:
            raise RuntimeError("no curves yet: call Calibrator.measure() first")
        return self._curves

    def budget_range(self, min_recall: float) -> tuple[float, float]:
        """Proxy budgets from "nothing lost" to "every head at its sparsest allowed option"."""
        c = self.curves
        return cost_range(c.cost, c.feasible(min_recall), c.density)

    def allocate(self, budget: float, min_recall: float, method: str = "dp") -> Allocation:
        """Per-head options minimising the summed density under the proxy ``budget``."""
        c = self.curves
        return solve(c.density, c.cost, budget, c.feasible(min_recall), method=method)

    def thresholds(self, alloc: Allocation) -> list[list[float]]:
        """``[layer][head]`` thresholds of an allocation (1.0 on uncalibrated layers)."""
        th = [[1.0] * self.n_heads for _ in range(self.n_layers)]
        for (layer, head), o in zip(self.curves.keys, alloc.choice, strict=True):
            th[layer][head] = float(self.grid[int(o)])
        return th

    def uniform(self, threshold: float) -> list[list[float]]:
        """``threshold`` on every calibrated layer, 1.0 elsewhere."""
        return [[float(threshold) if li in self.layers else 1.0] * self.n_heads
                for li in range(self.n_layers)]

    def calib_stats(self, alloc: Allocation) -> dict[str, float]:
        """Mean density / recall and the proxy cost of an allocation on the calibration windows."""
        c = self.curves
        idx = np.arange(len(c.keys))
        return {"calib_density": float(c.density[idx, alloc.choice].mean()),
                "calib_mean_recall": float(c.recall[idx, alloc.choice].mean()),
                "calib_min_head_recall": float(c.recall[idx, alloc.choice].min()),
                "proxy_cost": float(alloc.cost)}

    @property
    def heldout(self) -> HeldOut:
        """Held-out windows with their dense reference (computed on first use)."""
        if self._heldout is None:
            if self._curves is None:
                raise RuntimeError("no held-out windows yet: call Calibrator.measure() first")
            if not self.held:
                raise ValueError("no held-out windows (heldout_windows=0 or verify=False)")
            cfg = self.config
            self._heldout = HeldOut.prepare(self.model, self.held, self.layers, cfg.stride,
                                            cfg.block_size, cfg.backend, cfg.progress)
        return self._heldout

    def evaluate(self, thresholds: list[list[float]]) -> dict[str, float]:
        """Held-out KL(dense || sparse), loss, loss increase and density of a threshold table."""
        return self.heldout.evaluate(thresholds, **self.config.enable_kwargs)

    def search(self, min_recall: float, max_kl: float | None, max_loss_increase: float | None,
               method: str = "dp", ladder: int = 24, refine: int = 2) -> SearchResult:
        """Step 4: the sparsest allocation on the budget ladder that held-out windows accept."""
        if max_kl is None and max_loss_increase is None:
            raise ValueError("search needs max_kl or max_loss_increase")

        def acceptable(m: dict[str, float]) -> bool:
            ok = max_kl is None or m["kl"] <= max_kl
            if max_loss_increase is not None:
                ok = ok and m["loss_increase"] <= max_loss_increase + 1e-9
            return bool(ok)

        c = self.curves
        rungs = budget_ladder(c.cost, c.feasible(min_recall), c.density, ladder)
        return search_budget(rungs, lambda b: self.allocate(b, min_recall, method),
                             lambda a: self.evaluate(self.thresholds(a)), acceptable,
                             refine=refine, say=self.say, heads=len(c.keys),
                             progress=self.config.progress)

    # ----------------------------------------------------------------------------------------
    def make_profile(
        self,
        alloc: Allocation,
        budget: dict[str, Any],
        heldout_metrics: dict[str, float] | None = None,
        extra_measured: dict[str, Any] | None = None,
        model_id: str | None = None,
        search_log: list[dict[str, Any]] | None = None,
    ) -> ThresholdProfile:
        """Step 5: the ``ThresholdProfile`` of an allocation with what was measured."""
        cfg, curves = self.config, self.curves
        thresholds = self.thresholds(alloc)
        measured: dict[str, Any] = dict(extra_measured or {})
        measured.update(self.calib_stats(alloc))
        measured["solver"] = {k: v for k, v in alloc.info.items()
                              if isinstance(v, (int, float, str))}
        if heldout_metrics is not None:
            measured.update({"heldout_density": heldout_metrics["density"],
                             "heldout_runtime_density": heldout_metrics.get("runtime_density"),
                             "heldout_kl": heldout_metrics["kl"],
                             "heldout_loss": heldout_metrics["loss"],
                             "heldout_loss_increase": heldout_metrics["loss_increase"],
                             "heldout_dense_loss": self.heldout.dense_loss})
        per_layer = {}
        for layer in self.layers:
            s = curves.sums[layer]
            cols = [self.grid.index(t) for t in thresholds[layer]]
            per_layer[str(layer)] = {
                "density": [round(float(s.density[h, c]), 5) for h, c in enumerate(cols)],
                "recall": [round(float(s.recall[h, c]), 5) for h, c in enumerate(cols)],
            }
        measured["per_layer_calib"] = per_layer
        name = model_id or cfg.model_id or str(
            getattr(getattr(self.model, "config", None), "_name_or_path", "") or "")
        return ThresholdProfile(
            thresholds=thresholds, stride=cfg.stride, block_size=cfg.block_size,
            model_id=name, budget=budget, measured=measured, version=PROFILE_VERSION,
            model_config=dict(self.struct),
            metadata={
                "grid": self.grid, "seq_len": cfg.seq_len, "calib_windows": len(self.calib),
                "heldout_windows": len(self.held),
                "eval_tokens": cfg.eval_tokens if self.data == "prose" else None,
                "seed": cfg.seed, "layers": self.layers, "proxy": cfg.proxy,
                "search": search_log or [], "seconds": round(time.time() - self.t_start, 1),
                "curves_seconds": round(curves.seconds, 1), "texts": self.text_source,
                "data": self.data,
                "windows": {"calibration": [w.source for w in self.calib if w.source],
                            "heldout": [w.source for w in self.held if w.source]},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "xattention_version": _version(),
            },
        )


def _version() -> str:
    from .. import __version__

    return __version__
