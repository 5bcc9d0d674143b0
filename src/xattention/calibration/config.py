"""What a calibration run is asked to do: ``CalibrationConfig`` and the threshold grids.

Every option of :func:`~xattention.calibration.calibrate` and
:class:`~xattention.calibration.Calibrator` is a field here, checked once when the config is made
(``ValueError`` / ``TypeError`` naming the field). The procedure itself is described in
``docs/calibration.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = ["CalibrationConfig", "default_grid", "threshold_grid"]

PROXIES = ("output_error", "lost_mass")
METHODS = ("dp", "lagrangian")
DATA_KINDS = ("prose", "retrieval")


def threshold_grid(start: float = 1.0, ratio: float = 0.95, steps: int = 25) -> list[float]:
    """Geometric threshold grid ``start * ratio**s`` for ``s = 0..steps-1`` (descending).

    ``start >= 1`` puts the dense option (threshold 1) first; the paper's grid is
    ``threshold_grid(0.9, 0.9, n)``.
    """
    if not (0 < ratio < 1):
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (start > 0 and math.isfinite(start)):
        raise ValueError(f"start must be a finite number > 0, got {start}")
    return [round(start * ratio**s, 6) for s in range(steps)]


def default_grid() -> list[float]:
    """The default candidate thresholds (descending, 21 values).

    The paper's ladder ``0.9 * 0.9**s`` (s = 0..11, down to 0.28) plus 1.0 (dense) and finer steps
    between 0.9 and 1 (0.995 ... 0.92): on real models density moves fastest there (SmolLM2 at
    4k tokens: ~100% at 1.0, ~31% at 0.9, ~23% at 0.81), so a head that needs a little more than
    0.9 should not have to jump to dense.
    """
    top = [1.0, 0.995, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.92]
    return top + threshold_grid(0.9, 0.9, 12)


def _positive_int(name: str, value: Any, least: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def _optional_bound(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")


def _choice(name: str, value: Any, choices: Sequence[str], optional: bool = False) -> None:
    if optional and value is None:
        return
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Options of a calibration run (``docs/calibration.md`` explains each step).

    Attributes:
        data: ``"retrieval"`` (RULER-style needle prompts with their answers, scored on the
            answer tokens) or ``"prose"`` (windows of running text, scored on their last
            ``eval_tokens`` positions). None: prose when texts are given, retrieval otherwise.
        tasks: RULER tasks of the retrieval windows (default ``RETRIEVAL_TASKS``).
        chat: format retrieval prompts with the chat template (None: when the tokenizer has one).
        stride, block_size: XAttention parameters the profile is made for.
        seq_len: tokens per window (retrieval: the prompt length the tasks are generated for).
        calib_windows, heldout_windows: windows to calibrate on / verify on (None: 2 / 1 of
            prose, 16 / 16 retrieval prompts).
        eval_tokens: prose: held-out KL and loss are averaged over the last this-many positions.
        min_recall: per-head floor on the mean recall of true attention mass.
        max_kl: bound on the held-out mean KL(dense || sparse) per token (nats).
        max_loss_increase: bound on the held-out next-token loss increase (nats).
        reference_threshold: without ``max_kl`` / ``max_loss_increase``, ``max_kl`` is what this
            uniform threshold achieves on the held-out windows (None: no reference run).
        proxy: per-head cost, ``"output_error"`` or ``"lost_mass"``.
        proxy_budget: fix the summed proxy budget instead of searching it on held-out windows.
        grid: thresholds to consider (None: ``default_grid()``).
        method: knapsack solver, ``"dp"`` (exact up to 2% budget slack) or ``"lagrangian"``.
        ladder: budgets on the geometric ladder that the held-out search bisects.
        refine: extra bisection probes between the last accepted and first rejected budget.
        layers: layers to calibrate (others stay dense); None: every layer the integration runs
            sparse (sliding-window layers and ``enable_kwargs["dense_layers"]`` left out).
        model_id: recorded in the profile (None: the model's name or path).
        seed: seeds the window choice, or the retrieval generators (keep it different from the
            evaluation's seed); everything else is deterministic.
        backend: XAttention backend for the estimates and the verification runs.
        progress: show tqdm progress bars.
        verify: run the held-out verification (needed unless ``proxy_budget`` is given).
        enable_kwargs: extra keyword arguments for ``integrations.transformers.enable``.
    """

    data: str | None = None
    tasks: Sequence[str] | None = None
    chat: bool | None = None
    stride: int = 8
    block_size: int = 128
    seq_len: int = 4096
    calib_windows: int | None = None
    heldout_windows: int | None = None
    eval_tokens: int = 1024
    min_recall: float = 0.8
    max_kl: float | None = None
    max_loss_increase: float | None = None
    reference_threshold: float | None = 0.9
    proxy: str = "output_error"
    proxy_budget: float | None = None
    grid: Sequence[float] | None = None
    method: str = "dp"
    ladder: int = 24
    refine: int = 2
    layers: Sequence[int] | None = None
    model_id: str | None = None
    seed: int = 0
    backend: str = "auto"
    progress: bool = True
    verify: bool = True
    enable_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _choice("data", self.data, DATA_KINDS, optional=True)
        _choice("proxy", self.proxy, PROXIES)
        _choice("method", self.method, METHODS)
        for name in ("stride", "block_size", "seq_len", "eval_tokens", "ladder"):
            _positive_int(name, getattr(self, name))
        _positive_int("refine", self.refine, least=0)
        _positive_int("calib_windows", self.calib_windows, optional=True)
        _positive_int("heldout_windows", self.heldout_windows, least=0, optional=True)
        if isinstance(self.min_recall, bool) or not isinstance(self.min_recall, (int, float)) \
                or not 0 <= self.min_recall <= 1:
            raise ValueError(f"min_recall must be in [0, 1], got {self.min_recall!r}")
        for name in ("max_kl", "max_loss_increase", "proxy_budget"):
            _optional_bound(name, getattr(self, name))
        if self.reference_threshold is not None and not (
                isinstance(self.reference_threshold, (int, float))
                and not isinstance(self.reference_threshold, bool)
                and 0 < self.reference_threshold and math.isfinite(self.reference_threshold)):
            raise ValueError("reference_threshold must be a finite number > 0 or None, got "
                             f"{self.reference_threshold!r}")
        if self.grid is not None:
            if isinstance(self.grid, str) or not all(
                    isinstance(t, (int, float)) and not isinstance(t, bool) for t in self.grid):
                raise TypeError(f"grid must be a sequence of thresholds, got {self.grid!r}")
            if not self.grid or any(not (t > 0 and math.isfinite(t)) for t in self.grid):
                raise ValueError(f"grid must be non-empty thresholds > 0, got {list(self.grid)}")
        if not isinstance(self.enable_kwargs, Mapping):
            raise TypeError("enable_kwargs must be a mapping of enable() keyword arguments, got "
                            f"{type(self.enable_kwargs).__name__}")
        if self.proxy_budget is None and not self.verify:
            raise ValueError("without verification (verify=False) a proxy_budget must be given")
        if self.proxy_budget is None and self.max_kl is None and self.max_loss_increase is None \
                and self.reference_threshold is None:
            raise ValueError("give max_kl, max_loss_increase, reference_threshold or proxy_budget")

    @property
    def thresholds(self) -> list[float]:
        """The candidate thresholds, descending and without repeats."""
        return sorted({float(t) for t in (default_grid() if self.grid is None else self.grid)},
                      reverse=True)

    @classmethod
    def build(cls, config: CalibrationConfig | None = None, **options: Any) -> CalibrationConfig:
        """``config`` (default: the defaults) with ``options`` replacing its fields; an unknown
        option is a ``TypeError`` naming it."""
        if config is not None and not isinstance(config, CalibrationConfig):
            raise TypeError(f"config must be a CalibrationConfig, got {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown calibration option(s) {unknown}; the options are the "
                            f"fields of CalibrationConfig: {sorted(known)}")
        if options.get("enable_kwargs", ...) is None:
            options["enable_kwargs"] = {}
        return replace(config, **options) if config is not None else cls(**options)
