"""Step 4 of a calibration: which proxy budget, checked end to end, and whether the result is any
use.

The proxy budget ``B`` (the summed per-head output error allowed) decides how sparse the
allocation is; only the model can tell how much is too much. ``budget_ladder`` lays out the
budgets worth trying: from "nothing lost" up to "every head at its sparsest allowed option",
never below the cheapest single sparse move (a smaller budget buys exactly the same allocation),
one rung per distinct allocation. ``search_budget`` bisects that ladder on held-out windows for the
sparsest allocation within the bound. ``degeneracy`` names what makes a finished calibration
useless (effectively dense, nothing to trade) or short of its aim (a sparser uniform threshold
just as faithful), so that a run never hands back a dense profile without a word.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .optimize import Allocation, cost_range

__all__ = ["DENSE", "SearchResult", "budget_ladder", "degeneracy", "search_budget"]

# A profile keeping at least this share of the candidate blocks is, in effect, dense attention.
DENSE = 0.98
# The ladder spans at most this many decades below its top: a smaller budget's error is noise.
DECADES = 4


def budget_ladder(cost: np.ndarray, feasible: np.ndarray, density: np.ndarray, rungs: int
                  ) -> list[float]:
    """Budgets worth probing, ascending: the cheapest allocation's cost, then ``rungs``
    geometric steps from the cheapest positive option cost (or ``top * 1e-4`` when that is
    larger) up to the cost of the sparsest feasible allocation. ``[lo]`` alone when no budget
    changes anything."""
    lo, hi = cost_range(cost, feasible, density)
    positive = cost[feasible & (cost > 0)]
    if hi <= lo or positive.size == 0:
        return [lo]
    floor = max(lo, hi * 10.0 ** -DECADES, float(positive.min()))
    if floor >= hi:
        return [lo, hi]
    return [lo] + [float(b) for b in np.geomspace(floor, hi, max(rungs, 2))]


@dataclass
class SearchResult:
    """The chosen allocation, its budget and held-out metrics, and every probe made."""

    allocation: Allocation
    budget: float
    metrics: dict[str, float]
    log: list[dict[str, Any]] = field(default_factory=list)
    distinct: int = 1  # distinct allocations on the ladder (1: nothing to trade)


def search_budget(
    ladder: list[float],
    allocate: Callable[[float], Allocation],
    evaluate: Callable[[Allocation], dict[str, float]],
    acceptable: Callable[[dict[str, float]], bool],
    *,
    refine: int = 2,
    say: Callable[[str], None] = lambda _msg: None,
    heads: int = 1,
    progress: bool = False,
) -> SearchResult:
    """Bisect ``ladder`` for the largest budget whose allocation is ``acceptable`` on held-out
    windows, then ``refine`` geometric bisections between the last accepted and first rejected
    budget. The cheapest rung is taken as acceptable without a probe (it is what the bound is
    relative to); it is probed at the end if it is the answer. ``progress`` shows a bar of the
    probes (each one a held-out evaluation, seconds to minutes).

    Rungs that give the same allocation as a smaller one are dropped, so every probe runs a
    different threshold table. The search assumes held-out loss grows with the budget (true of
    the trend, not guaranteed step by step; every probe is in ``log``).
    """
    budgets: list[float] = []
    upper: list[float] = []  # the largest ladder budget that gives the same allocation
    allocs: list[Allocation] = []
    for b in ladder:
        a = allocate(b)
        if allocs and np.array_equal(a.choice, allocs[-1].choice):
            upper[-1] = b
            continue
        budgets.append(b)
        upper.append(b)
        allocs.append(a)
    distinct = len(allocs)
    evals: dict[int, dict[str, float]] = {}
    log: list[dict[str, Any]] = []
    from tqdm.auto import tqdm

    # bisection probes, the refinements, and possibly the cheapest rung at the end
    expected = math.ceil(math.log2(max(distinct, 1))) + refine + 1
    bar = tqdm(total=expected, desc="calibrate: budget search", unit="probe",
               disable=not progress, leave=False)

    def probe(i: int) -> bool:
        m = evaluate(allocs[i])
        bar.update(1)
        evals[i] = m
        ok = acceptable(m)
        log.append({"budget": budgets[i], "calib_density": allocs[i].density / heads, **m,
                    "accepted": ok})
        say(f"calibrate: budget {budgets[i]:.4g}: calib density {allocs[i].density / heads:.4f}, "
            f"held-out density {m['density']:.4f} KL {m['kl']:.5f} loss "
            f"{m['loss_increase']:+.5f} -> {'ok' if ok else 'too lossy'}")
        return ok

    lo_i, hi_i = 0, len(budgets)
    while hi_i - lo_i > 1:
        mid = (lo_i + hi_i) // 2
        if probe(mid):
            lo_i = mid
        else:
            hi_i = mid
    for _ in range(refine if hi_i < len(budgets) else 0):
        below = upper[lo_i]
        if below <= 0 or below >= budgets[hi_i]:
            break  # nothing between the two rungs but their own allocations
        b = math.sqrt(below * budgets[hi_i])
        a = allocate(b)
        if any(np.array_equal(a.choice, x.choice) for x in (allocs[lo_i], allocs[hi_i])):
            break
        budgets.append(b)
        upper.append(b)
        allocs.append(a)
        if probe(len(budgets) - 1):
            lo_i = len(budgets) - 1
        else:
            hi_i = len(budgets) - 1
    if lo_i not in evals:
        probe(lo_i)
    bar.close()
    return SearchResult(allocs[lo_i], budgets[lo_i], evals[lo_i], log, distinct)


def degeneracy(measured: dict[str, Any], *, sparse_share: float, distinct: int | None,
               min_recall: float, max_kl: float | None) -> tuple[list[str], list[str]]:
    """What is wrong with a finished calibration: ``(degenerate, caveats)``, one sentence a
    reason (both empty: it is fine).

    Degenerate: the profile is no use at all (effectively dense, hardly any head with a sparse
    option, nothing to trade). Caveats: it works but misses its aim (a uniform threshold is
    sparser within the same bound, or nothing met the bound). ``measured`` is the profile's
    ``measured`` record; ``sparse_share`` the share of heads with a sparse option meeting
    ``min_recall``; ``distinct`` the number of distinct allocations the budget ladder offered
    (None: the budget was given, not searched).
    """
    degenerate, caveats = [], []
    density = measured.get("heldout_density", measured.get("calib_density"))
    if density is not None and density >= DENSE:
        where = "held-out" if "heldout_density" in measured else "calibration"
        degenerate.append(f"the profile is effectively dense ({where} density {density:.3f})")
    if sparse_share < 0.5:
        degenerate.append(f"only {sparse_share:.0%} of the heads have a sparse threshold with "
                          f"recall >= min_recall={min_recall:g} on the calibration windows")
    if distinct == 1:
        degenerate.append("no proxy budget changes the allocation: there is nothing to trade")
    ref = measured.get("uniform_reference")
    if ref is not None and density is not None and ref["density"] < density - 0.05 \
            and (max_kl is None or ref["kl"] <= max_kl):
        caveats.append(f"uniform threshold {ref['threshold']:g} is sparser (density "
                       f"{ref['density']:.3f}) and within the same bound")
    if measured.get("meets_budget") is False:
        caveats.append("no allocation probed, not even the cheapest, kept within the bound")
    return degenerate, caveats
