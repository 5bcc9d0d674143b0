"""Per-head threshold calibration ("minimum threshold prediction", DESIGN.md §2).

One global threshold wastes work: some heads keep their attention mass with a few blocks, others
need many. ``calibrate`` measures, per (layer, head), how block density, recall of the true
attention mass and output error move with the threshold on calibration data (by default
RULER-style needle prompts with their answers, scored where the answer is predicted; or prose),
chooses per-head thresholds that minimise the total density under an accuracy budget (a
multiple-choice knapsack solved by DP over heads), verifies the choice end to end on held-out
prompts and returns a versioned ``ThresholdProfile`` that
``integrations.transformers.enable(model, thresholds=...)`` accepts.

Modules: ``profile`` (the JSON profile), ``data`` (prose windows, or retrieval prompts with
their answers), ``measure`` (curves from q/k/v), ``optimize`` (the knapsack solvers), ``run``
(the procedure, documented step by step) and ``cli`` (``xattention calibrate``).

>>> from xattention.calibration import ThresholdProfile
>>> p = ThresholdProfile(thresholds=[[0.9, 0.5], [1.0, 0.7]], model_id="toy")
>>> p.as_tensor(1)
tensor([1.0000, 0.7000])
"""

from __future__ import annotations

from .cli import register_cli
from .data import RETRIEVAL_TASKS, CalibrationWindow, retrieval_windows
from .measure import CurveSums, measure_layer
from .optimize import Allocation, solve, solve_dp, solve_lagrangian
from .profile import PROFILE_FORMAT, PROFILE_VERSION, ThresholdProfile, load_thresholds
from .run import (
    Calibrator,
    calibrate,
    default_grid,
    load_haystack,
    threshold_grid,
    token_windows,
)

__all__ = [
    "ThresholdProfile",
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
    "load_thresholds",
    "calibrate",
    "threshold_grid",
    "default_grid",
    "Calibrator",
    "token_windows",
    "load_haystack",
    "retrieval_windows",
    "CalibrationWindow",
    "RETRIEVAL_TASKS",
    "measure_layer",
    "CurveSums",
    "Allocation",
    "solve",
    "solve_dp",
    "solve_lagrangian",
    "register_cli",
]
