"""Per-head threshold calibration ("minimum threshold prediction", ``docs/design.md``).

One global threshold wastes work: some heads keep their attention mass with a few blocks, others
need many. ``calibrate`` measures, per (layer, head), how block density, recall of the true
attention mass and output error move with the threshold on calibration data (by default
RULER-style needle prompts with their answers, scored where the answer is predicted; or prose),
chooses per-head thresholds that minimise the total density under an accuracy budget (a
multiple-choice knapsack solved by DP over heads), verifies the choice end to end on held-out
prompts and returns a versioned ``ThresholdProfile`` that
``integrations.transformers.enable(model, thresholds=...)`` accepts. ``docs/calibration.md``
describes the procedure step by step.

Modules, in the order of the procedure: ``config`` (``CalibrationConfig``, threshold grids),
``data`` (prose windows, or retrieval prompts with their answers), ``layers`` (which layers, their
scales), ``measure`` (curves from one layer's q/k/v), ``curves`` (curves of a model),
``optimize`` (the knapsack solvers), ``verify`` (held-out runs), ``search`` (the budget search and
its sanity checks), ``calibrator`` (the steps as one object), ``run`` (``calibrate()``),
``profile`` (the JSON profile) and ``cli`` (``xattention calibrate``).

Names are imported on first use, so ``xattention calibrate --help`` does not load torch.

>>> from xattention.calibration import ThresholdProfile
>>> p = ThresholdProfile(thresholds=[[0.9, 0.5], [1.0, 0.7]], model_id="toy")
>>> p.as_tensor(1)
tensor([1.0000, 0.7000])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .calibrator import Calibrator
    from .cli import register_cli
    from .config import CalibrationConfig, default_grid, threshold_grid
    from .data import (
        RETRIEVAL_TASKS,
        CalibrationWindow,
        load_haystack,
        retrieval_windows,
        token_windows,
    )
    from .measure import CurveSums, measure_layer
    from .optimize import Allocation, solve, solve_dp, solve_lagrangian
    from .profile import PROFILE_FORMAT, PROFILE_VERSION, ThresholdProfile, load_thresholds
    from .run import calibrate

# public name -> submodule that defines it
_EXPORTS = {
    "ThresholdProfile": "profile", "PROFILE_FORMAT": "profile", "PROFILE_VERSION": "profile",
    "load_thresholds": "profile",
    "calibrate": "run", "Calibrator": "calibrator", "CalibrationConfig": "config",
    "threshold_grid": "config", "default_grid": "config",
    "token_windows": "data", "load_haystack": "data", "retrieval_windows": "data",
    "CalibrationWindow": "data", "RETRIEVAL_TASKS": "data",
    "measure_layer": "measure", "CurveSums": "measure",
    "Allocation": "optimize", "solve": "optimize", "solve_dp": "optimize",
    "solve_lagrangian": "optimize",
    "register_cli": "cli",
}

__all__ = [
    "ThresholdProfile", "PROFILE_FORMAT", "PROFILE_VERSION", "load_thresholds",
    "calibrate", "Calibrator", "CalibrationConfig", "threshold_grid", "default_grid",
    "token_windows", "load_haystack", "retrieval_windows", "CalibrationWindow", "RETRIEVAL_TASKS",
    "measure_layer", "CurveSums", "Allocation", "solve", "solve_dp", "solve_lagrangian",
    "register_cli",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
