"""Choosing per-head thresholds: a multiple-choice knapsack over heads.

Problem. Calibration measures, for every head ``h`` (all layers flattened) and every threshold
``t`` of a grid, the block density ``d[h, t]``, the recall ``r[h, t]`` (share of the true attention
mass inside the kept blocks) and a loss proxy ``c[h, t] >= 0`` (the error the sparsity adds to the
head's output). We pick one option per head::

    minimise   sum_h d[h, t_h]
    subject to r[h, t_h] >= r_min           for every head   (per-head recall floor)
               sum_h c[h, t_h] <= B                            (global accuracy budget)

The recall floor only removes options, head by head. What is left is the *multiple-choice
knapsack problem* (MCKP): NP-hard in general, but pseudo-polynomial and small here (a few hundred
heads, a few dozen options).

``solve_dp`` (default) -- exact dynamic programming over heads on a discretised budget. The budget
is cut into ``K`` units of ``delta = B / K``; each cost is rounded *up* to whole units, so every
solution the DP returns also satisfies the true (unrounded) budget. The DP is exact for the
rounded problem, and every solution whose true cost is at most ``B - N * delta`` stays feasible
after rounding, hence::

    OPT(B - N * delta)  >=  density(DP)  >=  OPT(B)

With the default ``K = 50 * N`` the DP loses at most 2% of the budget. It costs
``O(N * T * K)`` vectorised operations (about 10^8 for 270 heads x 25 thresholds: a second).
When all costs are multiples of ``delta`` the rounding is exact and the DP is optimal.

``solve_lagrangian`` -- the classic alternative. For a multiplier ``lam >= 0`` every head
independently minimises ``d + lam * c``; the total cost falls as ``lam`` grows, so bisection finds
the smallest ``lam`` whose choice fits the budget. By Everett's theorem that choice is optimal for
the budget it actually uses, and ``L(lam) = sum_h min_t (d + lam c) - lam B`` is a lower bound on
``OPT(B)``, so its distance to optimal is at most ``density - L(lam)`` (returned as
``gap_bound``). It only reaches points on the lower convex hull of each head's (cost, density)
curve, so a final greedy pass spends leftover budget on the single-head moves with the best
density gain per unit cost. It is near-optimal when there are many heads (the relaxation has at
most one "fractional" head) and needs no discretisation, but the DP is what we use by default
because it gives optimality up to a stated, small budget slack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike


@dataclass
class Allocation:
    """One option per head and what it costs.

    Attributes:
        choice: int array ``[N]``, the chosen option (column) for each head.
        density: total density ``sum_h d[h, choice[h]]``.
        cost: total proxy cost ``sum_h c[h, choice[h]]``.
        info: solver details (budget, resolution, multiplier, gap bound, ...).
    """

    choice: np.ndarray
    density: float
    cost: float
    info: dict = field(default_factory=dict)


def _prepare(density, cost, feasible):
    d = np.asarray(density, dtype=np.float64)
    c = np.asarray(cost, dtype=np.float64)
    if d.ndim != 2 or d.shape != c.shape:
        raise ValueError(f"density and cost must be 2-D arrays [heads, options] of one shape, got "
                         f"{d.shape} and {c.shape}")
    if d.shape[0] == 0 or d.shape[1] == 0:
        raise ValueError("density must have at least one head and one option")
    if feasible is None:
        f = np.isfinite(d) & np.isfinite(c)
    else:
        f = np.asarray(feasible, dtype=bool)
        if f.shape != d.shape:
            raise ValueError(f"feasible must have shape {d.shape}, got {f.shape}")
        f = f & np.isfinite(d) & np.isfinite(c)
    if np.any(c[f] < 0):
        raise ValueError("costs must be >= 0")
    empty = np.flatnonzero(~f.any(axis=1))
    if empty.size:
        raise ValueError(f"head(s) {empty[:10].tolist()} have no feasible option (recall floor "
                         "too high for every threshold in the grid?)")
    return d, c, f


def _min_cost(c, f) -> float:
    return float(np.where(f, c, np.inf).min(axis=1).sum())


def _check_budget(budget, c, f):
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
    need = _min_cost(c, f)
    if need > budget * (1 + 1e-12) + 1e-15:
        raise ValueError(f"budget {budget:.6g} is infeasible: the cheapest feasible option of "
                         f"every head already costs {need:.6g} in total")


def _result(choice, d, c, info) -> Allocation:
    idx = np.arange(len(choice))
    return Allocation(choice=choice.astype(np.int64), density=float(d[idx, choice].sum()),
                      cost=float(c[idx, choice].sum()), info=info)


def solve_dp(density: ArrayLike, cost: ArrayLike, budget: float,
             feasible: ArrayLike | None = None, resolution: int | None = None) -> Allocation:
    """Exact DP for the multiple-choice knapsack on a budget cut into ``resolution`` units.

    Args:
        density: ``[N, T]`` density of option ``t`` for head ``h`` (to minimise, summed).
        cost: ``[N, T]`` non-negative proxy cost (summed, must stay ``<= budget``).
        budget: the bound on the summed cost.
        feasible: optional bool ``[N, T]``; infeasible options are never chosen.
        resolution: number of budget units ``K`` (default ``max(1000, 50 * N)``).

    Returns:
        an ``Allocation`` whose true cost is ``<= budget`` and whose density is at most
        ``OPT(budget - N * budget / K)`` (see the module docstring).
    """
    d, c, f = _prepare(density, cost, feasible)
    _check_budget(budget, c, f)
    n, t = d.shape
    k = int(resolution) if resolution is not None else max(1000, 50 * n)
    if k < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if budget == 0:
        # Only zero-cost options fit.
        f = f & (c <= 0)
        k = 0
        units = np.zeros_like(c, dtype=np.int64)
        delta = 0.0
    else:
        delta = budget / k
        # Round up (tiny tolerance so that exact multiples stay exact). Options over the budget
        # are dropped before the cast: with a tiny budget their unit count overflows int64.
        units_f = np.maximum(np.ceil(c / delta - 1e-9), 0)
        f = f & (units_f <= k)
        units = np.where(f, units_f, 0).astype(np.int64)
    f = f & (units <= k)
    inf = np.inf
    best = np.zeros(k + 1)  # best[j]: min density of heads so far with rounded cost <= j
    back = np.zeros((n, k + 1), dtype=np.int32)
    for h in range(n):
        new = np.full(k + 1, inf)
        arg = np.zeros(k + 1, dtype=np.int32)
        for o in np.flatnonzero(f[h]):
            w = int(units[h, o])
            cand = np.full(k + 1, inf)
            cand[w:] = best[: k + 1 - w] + d[h, o]
            better = cand < new
            new[better] = cand[better]
            arg[better] = o
        best = new
        back[h] = arg
    if not np.isfinite(best[k]):
        raise ValueError(f"budget {budget:.6g} is infeasible after rounding to {k} units; raise "
                         "the resolution or the budget")
    choice = np.zeros(n, dtype=np.int64)
    j = k
    for h in range(n - 1, -1, -1):
        o = int(back[h, j])
        choice[h] = o
        j -= int(units[h, o])
    return _result(choice, d, c, {"method": "dp", "budget": float(budget), "resolution": k,
                                  "unit": delta, "slack_bound": n * delta})


def _lagrange_pick(d, c, f, lam):
    val = np.where(f, d + lam * c, np.inf)
    # Ties: prefer the cheaper option so that cost is monotone in lam.
    best = val.min(axis=1, keepdims=True)
    tie = f & (val <= best + 1e-12 * (1 + np.abs(best)))
    cc = np.where(tie, c, np.inf)
    return cc.argmin(axis=1)


def solve_lagrangian(density: ArrayLike, cost: ArrayLike, budget: float,
                     feasible: ArrayLike | None = None, iters: int = 100) -> Allocation:
    """Lagrangian relaxation + greedy fill (see the module docstring).

    Returns an ``Allocation`` with ``info["gap_bound"]``: the returned density exceeds the true
    optimum by at most this much.
    """
    d, c, f = _prepare(density, cost, feasible)
    _check_budget(budget, c, f)
    n = d.shape[0]
    idx = np.arange(n)

    def total_cost(ch: np.ndarray) -> float:
        return float(c[idx, ch].sum())

    choice = _lagrange_pick(d, c, f, 0.0)
    lam = 0.0
    if total_cost(choice) > budget:
        hi = 1.0
        while total_cost(_lagrange_pick(d, c, f, hi)) > budget and hi < 1e300:
            hi *= 4.0
        lo = 0.0
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if total_cost(_lagrange_pick(d, c, f, mid)) > budget:
                lo = mid
            else:
                hi = mid
        lam = hi
        choice = _lagrange_pick(d, c, f, lam)
    lower = float(np.where(f, d + lam * c, np.inf).min(axis=1).sum() - lam * budget)
    # Greedy fill: repeatedly take the single-head move that lowers density most per unit of
    # extra cost while staying within the budget.
    spent = total_cost(choice)
    while True:
        cur_d = d[idx, choice][:, None]
        cur_c = c[idx, choice][:, None]
        gain = cur_d - d
        extra = c - cur_c
        ok = f & (gain > 1e-15) & (spent + extra <= budget + 1e-12 * max(budget, 1e-300))
        if not ok.any():
            break
        ratio = np.where(ok, gain / np.maximum(extra, 1e-300), -np.inf)
        h, o = np.unravel_index(np.argmax(ratio), ratio.shape)
        spent += float(extra[h, o])
        choice[h] = o
    res = _result(choice, d, c, {"method": "lagrangian", "budget": float(budget),
                                 "multiplier": lam, "lower_bound": lower})
    res.info["gap_bound"] = max(0.0, res.density - lower)
    return res


def solve(density: ArrayLike, cost: ArrayLike, budget: float,
          feasible: ArrayLike | None = None, method: str = "dp", **kwargs: Any) -> Allocation:
    """Dispatch to ``solve_dp`` (``method="dp"``) or ``solve_lagrangian``."""
    if method == "dp":
        return solve_dp(density, cost, budget, feasible, **kwargs)
    if method == "lagrangian":
        return solve_lagrangian(density, cost, budget, feasible, **kwargs)
    raise ValueError(f"method must be 'dp' or 'lagrangian', got {method!r}")


def cost_range(cost: ArrayLike, feasible: ArrayLike | None = None,
               density: ArrayLike | None = None) -> tuple[float, float]:
    """Smallest useful budget (every head at its cheapest option) and the largest one that still
    matters (every head at its lowest-density feasible option)."""
    c = np.asarray(cost, dtype=np.float64)
    f = np.ones_like(c, dtype=bool) if feasible is None else np.asarray(feasible, dtype=bool)
    lo = _min_cost(c, f)
    if density is None:
        hi = float(np.where(f, c, -np.inf).max(axis=1).sum())
    else:
        d = np.where(f, np.asarray(density, dtype=np.float64), np.inf)
        pick = d.argmin(axis=1)
        hi = float(c[np.arange(len(pick)), pick].sum())
    return lo, max(hi, lo)
