"""``calibrate()``: measure per-head curves, optimise, verify end to end, emit a profile.

The procedure, the reasoning behind each step and its limits are in ``docs/calibration.md``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from .calibrator import Calibrator
from .config import CalibrationConfig
from .profile import ThresholdProfile
from .search import degeneracy

__all__ = ["calibrate"]


def calibrate(
    model: Any,
    tokenizer: Any,
    texts: str | Sequence[str] | None = None,
    config: CalibrationConfig | None = None,
    *,
    heldout_texts: str | Sequence[str] | None = None,
    log: Callable[[str], None] | None = print,
    **options: Any,
) -> ThresholdProfile:
    """Calibrate per-(layer, head) XAttention thresholds for ``model``.

    Args:
        model: a Hugging Face causal LM that ``xattention.integrations.transformers`` supports.
        tokenizer: its tokenizer.
        texts: calibration text(s) for ``data="prose"``; the Paul Graham haystack when None.
            Without texts the default data is retrieval prompts (on the suite, retrieval
            profiles held their score where prose ones lost 3-4 points:
            ``eval/results/README.md``).
        config: a ``CalibrationConfig``; ``options`` (its field names, e.g. ``seq_len=2048,
            min_recall=0.9``) replace its fields.
        heldout_texts: verification text(s); disjoint windows of ``texts`` when None.
        log: where progress lines go (None: silent).

    Returns:
        the ``ThresholdProfile``. ``measured`` holds the calibration and held-out numbers, and
        ``degenerate`` (the profile is of no use: effectively dense, or nothing to trade) and
        ``warnings`` (its reasons, and caveats such as a uniform threshold that is sparser
        within the same bound); a ``RuntimeWarning`` repeats any of them.

    Example:
        >>> profile = calibrate(model, tok, seq_len=4096, calib_windows=16)   # doctest: +SKIP
        >>> enable(model, thresholds=profile)                                 # doctest: +SKIP
    """
    cal = Calibrator(model, tokenizer, texts, config, heldout_texts=heldout_texts, log=log,
                     **options)
    cfg = cal.config
    was_training = getattr(model, "training", False)
    try:
        profile = _run(cal, cfg)
    finally:
        if was_training:
            model.train()
    m = profile.measured
    cal.say(f"calibrate: done in {time.time() - cal.t_start:.0f}s, calib density "
            f"{m['calib_density']:.4f}"
            + (f", held-out density {m['heldout_density']:.4f}, KL {m['heldout_kl']:.5f}, "
               f"loss {m['heldout_loss_increase']:+.5f}" if "heldout_density" in m else ""))
    if m["warnings"]:
        warnings.warn(("calibration is degenerate: " if m["degenerate"] else "calibration: ")
                      + "; ".join(m["warnings"]) + ". More or longer calibration windows, a "
                      "lower min_recall or a uniform threshold may serve better.",
                      RuntimeWarning, stacklevel=2)
    return profile


def _run(cal: Calibrator, cfg: CalibrationConfig) -> ThresholdProfile:
    cal.measure()
    max_kl = cfg.max_kl
    extra: dict[str, Any] = {}
    if cfg.reference_threshold is not None and cfg.verify:
        ref = cal.evaluate(cal.uniform(float(cfg.reference_threshold)))
        extra["uniform_reference"] = {"threshold": float(cfg.reference_threshold), **ref}
        cal.say(f"calibrate: uniform {cfg.reference_threshold}: held-out density "
                f"{ref['density']:.4f} KL {ref['kl']:.5f} loss {ref['loss_increase']:+.5f}")
        if max_kl is None and cfg.max_loss_increase is None:
            # KL only: the loss increase of one reference run is a noisy difference of two
            # means (it can even be negative), a poor bound to hold other runs to.
            max_kl = ref["kl"]
    budget = {"min_recall": cfg.min_recall, "max_kl": max_kl,
              "max_loss_increase": cfg.max_loss_increase,
              "reference_threshold": cfg.reference_threshold, "proxy": cfg.proxy,
              "method": cfg.method}
    search_log: list[dict[str, Any]] = []
    distinct = None
    if cfg.proxy_budget is not None:
        alloc = cal.allocate(float(cfg.proxy_budget), cfg.min_recall, cfg.method)
        chosen_budget = float(cfg.proxy_budget)
        metrics = cal.evaluate(cal.thresholds(alloc)) if cfg.verify else None
    else:
        found = cal.search(cfg.min_recall, max_kl, cfg.max_loss_increase, cfg.method,
                           cfg.ladder, cfg.refine)
        alloc, chosen_budget, metrics = found.allocation, found.budget, found.metrics
        search_log, distinct = found.log, found.distinct
    extra.update({"proxy_budget": chosen_budget,
                  "proxy_budget_range": list(cal.budget_range(cfg.min_recall))})
    if metrics is not None:
        ok = (max_kl is None or metrics["kl"] <= max_kl) and (
            cfg.max_loss_increase is None
            or metrics["loss_increase"] <= cfg.max_loss_increase + 1e-9)
        extra["meets_budget"] = bool(ok)
    profile = cal.make_profile(alloc, budget, metrics, extra, cfg.model_id, search_log)
    degenerate, caveats = degeneracy(
        profile.measured, sparse_share=cal.curves.sparse_share(cfg.min_recall),
        distinct=distinct, min_recall=cfg.min_recall, max_kl=max_kl)
    profile.measured["degenerate"] = bool(degenerate)
    profile.measured["warnings"] = degenerate + caveats
    return profile
