"""``calibrate()``: measure per-head curves, optimise, verify end to end, emit a profile.

Procedure (the reasoning behind each step):

1. **Data** (``data.py``). Either *prose*: the calibration text (the Paul Graham haystack by
   default, or the user's texts) cut into non-overlapping token windows of ``seq_len``, a seeded
   shuffle picking ``calib_windows`` windows to measure on and ``heldout_windows`` *other*
   windows to verify on, each scored on its last ``eval_tokens`` positions. Or *retrieval*
   (``data="retrieval"``): RULER-style needle prompts of about ``seq_len`` tokens (the same
   haystack, with needles, several keys or values, variable chains) generated with their own
   seed and followed by the reference answer; only the positions that predict the answer are
   scored. Prose is what a long-context model's attention patterns are formed on; retrieval
   prompts are where a long-range head's loss shows (next-token KL on prose hardly depends on
   them). Verification windows are always disjoint from the calibration windows, so the final
   numbers are not fitted to the data that chose the thresholds.
2. **Curves.** For every calibration window the model runs once densely while
   ``capture_attention_inputs`` records each layer's post-RoPE q/k/v. For each (layer, head) and
   each threshold of a grid (the paper lowers thresholds in x0.9 steps; the default grid is that
   ladder from 0.9 down plus 1.0 = dense and finer steps between 0.9 and 1) we measure, exactly as
   at inference, the block density, and against exact attention the recall of the true attention
   mass and the relative error of the head's output (``measure.py``; retrieval windows: on the
   answer-predicting rows only, density on the whole window). Exact attention is the truth:
   recall and output error are what the sparsity actually costs, not what the estimate
   believes it costs.
3. **Optimise.** Heads whose recall at a threshold falls below ``min_recall`` lose that option.
   Among the rest we minimise the summed density subject to a bound ``B`` on the summed output
   error (the loss proxy): a multiple-choice knapsack solved exactly up to a 2% budget slack by
   DP over heads (``optimize.py``; a Lagrangian solver is available as ``method="lagrangian"``).
   The output error is the natural per-head proxy: it is what the next layer actually receives,
   it is additive over heads to first order, and it is zero exactly when the head is computed
   densely.
4. **Verify end to end and pick B.** The proxy says which heads can afford sparsity; the budget
   says how much in total, and only the model can tell how much is too much. Each ``B`` on a
   geometric ladder gives an allocation (larger ``B`` -> lower density); we binary-search the
   ladder for the largest ``B`` whose allocation, run through the model with
   ``integrations.transformers.enable(thresholds=...)`` on the held-out windows, keeps the mean
   next-token KL(dense || sparse) below ``max_kl`` and (if given) the next-token loss increase
   below ``max_loss_increase``. With ``reference_threshold`` set (e.g. 0.9) and no explicit
   bound, ``max_kl`` is the KL a uniform threshold has on the same held-out text, i.e. "at least
   as faithful as uniform 0.9, at the lowest density we can find". KL is the primary measure:
   it is >= 0, per token, and compares whole next-token distributions; the loss increase over
   a few thousand tokens is a small difference of two noisy means (it is often negative).
5. **Profile.** Thresholds ``[layer][head]``, the budget, and what was measured (calibration and
   held-out density, recall, KL, loss, and the uniform reference) go into a versioned
   ``ThresholdProfile``.

Limits, stated plainly. The binary search assumes the held-out KL grows with ``B`` (true of the
trend, not guaranteed step by step; every probe is logged in ``metadata.search``). Output errors
of different layers are summed with equal weight: the end-to-end search fixes the total, not how
a head's error propagates through later layers. Densities depend on the context length (longer
contexts are sparser at the same threshold): calibrate at the length you serve, or expect the
held-out numbers to describe ``seq_len`` only. Sliding-window layers (Gemma 3's local layers) are
left to their own attention by the integration, so they are not calibrated (threshold 1.0 in the
profile). The budget only sees what the held-out windows ask of the model: next-token KL on prose
depends mostly on local attention, so a prose-calibrated profile may thin out the long-range
heads that retrieval needs. On SmolLM2 a prose profile (budget = uniform 0.9's KL) gave lower
density but a worse RULER-style score than uniform 0.9 (``eval/results/README.md``); retrieval
windows are the answer to that, and they have their own bias: they teach the profile the task
kinds they contain (the default leaves cwe and QA out, so the suite shows how it transfers).
Calibrate on prompts that exercise what you serve.

Costs: step 2 is one dense forward plus one exact-attention pass per calibration window (the
same FLOPs as the model's own attention, chunked per query block); step 4 is one forward per
ladder probe (about ``log2(ladder)`` of them) plus one dense reference forward per held-out window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .data import (
    RETRIEVAL_TASKS,
    CalibrationWindow,
    check_tasks,
    load_haystack,
    retrieval_windows,
    token_windows,
)
from .measure import CurveSums, density_counts, measure_layer
from .optimize import Allocation, cost_range, solve
from .profile import PROFILE_VERSION, ThresholdProfile, model_structure


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


# --------------------------------------------------------------------------------------------
# Model plumbing
def _xt():
    try:
        import xattention.integrations.transformers as xt
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError(
            "calibration needs the transformers integration (pip install "
            "'xattention[transformers]')", name=exc.name) from exc
    return xt


def attention_layer_info(model: Any) -> dict[int, dict[str, Any]]:
    """Per layer index: softmax ``scale`` and ``sliding_window`` (None for global layers)."""
    info: dict[int, dict[str, Any]] = {}
    for _, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        scale = getattr(module, "scaling", None)
        if isinstance(idx, int) and isinstance(scale, (int, float)) and idx not in info:
            info[idx] = {"scale": float(scale),
                         "sliding_window": getattr(module, "sliding_window", None) or None}
    return info


def sparse_layers(model: Any, dense_layers: Sequence[int] = ()) -> list[int]:
    """Layers the transformers integration runs with XAttention: every attention layer except
    sliding-window ones (left to their own local attention) and ``dense_layers``."""
    n_layers = model_structure(model)["num_layers"]
    info = attention_layer_info(model)
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        config = get_text()
    types = getattr(config, "layer_types", None) or []
    dense = {int(i) % n_layers for i in dense_layers}
    out = []
    for layer in range(n_layers):
        if info.get(layer, {}).get("sliding_window"):
            continue
        if layer < len(types) and types[layer] in ("sliding_attention", "chunked_attention"):
            continue
        if layer not in dense:
            out.append(layer)
    return out


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def _forward_logprobs(model: Any, ids: torch.Tensor, last: int) -> torch.Tensor:
    """Log-probabilities (float32) of the positions predicting the last ``last`` tokens."""
    ids = ids.to(_device_of(model)).view(1, -1)
    try:
        out = model(input_ids=ids, logits_to_keep=last + 1, use_cache=False)
        logits = out.logits[0, -(last + 1):-1]
    except TypeError:  # models without logits_to_keep
        out = model(input_ids=ids, use_cache=False)
        logits = out.logits[0, -(last + 1):-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def _loss(logprobs: torch.Tensor, ids: torch.Tensor) -> float:
    targets = ids.view(-1)[-logprobs.shape[0]:]
    return float(-logprobs.gather(1, targets.view(-1, 1)).mean())


def _kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(ref || other), both log-probabilities."""
    return float((ref.exp() * (ref - other)).sum(-1).mean())


class _HeldOut:
    """Held-out windows with their dense log-probs and per-layer block scores."""

    def __init__(self, model, windows: Sequence[CalibrationWindow], layers, stride, block_size,
                 backend, layer_info, progress):
        xt = _xt()
        self.model = model
        self.windows = list(windows)
        self.dense_logprobs = []
        self.scores: list[dict[int, torch.Tensor]] = []
        self.layers = layers
        self.block_size = block_size
        self.stride = stride
        self.backend = backend
        from ..estimate import estimate_block_scores

        for w in _bar(self.windows, "held-out dense", progress):
            self.dense_logprobs.append(_forward_logprobs(model, w.ids, w.scored))
            caps = xt.capture_attention_inputs(model, w.ids.view(1, -1).to(_device_of(model)),
                                               layers=layers)
            sc = {}
            for layer in layers:
                q, k, _ = caps[layer]
                scale = layer_info.get(layer, {}).get("scale")
                sc[layer] = estimate_block_scores(q, k, stride=stride, block_size=block_size,
                                                  causal=True, scale=scale, backend=backend).cpu()
            del caps
            self.scores.append(sc)
        self.dense_loss = float(np.mean([_loss(lp, w.ids) for lp, w in
                                         zip(self.dense_logprobs, self.windows, strict=True)]))

    def density(self, thresholds: list[list[float]]) -> float:
        """Mean over (window, calibrated layer, head) of kept / candidate blocks."""
        per_head = []
        for sc, w in zip(self.scores, self.windows, strict=True):
            n = w.ids.numel()
            for li in self.layers:
                row = torch.tensor(thresholds[li], dtype=torch.float32)
                kept, total = density_counts(sc[li], row, n, n, self.block_size, True,
                                             self.backend)
                per_head.extend((kept / total).tolist())
        return float(np.mean(per_head))

    def evaluate(self, thresholds: list[list[float]], **enable_kwargs) -> dict[str, float]:
        """Run the model with these thresholds on the held-out windows: KL, loss, density.

        KL and loss are averaged over each window's scored tokens, then over windows (a window
        counts once however long its answer is).
        """
        xt = _xt()
        kls, losses = [], []
        xt.enable(self.model, threshold=0.9, stride=self.stride, block_size=self.block_size,
                  thresholds=thresholds, backend=self.backend, **enable_kwargs)
        xt.reset_stats(self.model)
        try:
            for w, ref in zip(self.windows, self.dense_logprobs, strict=True):
                lp = _forward_logprobs(self.model, w.ids, w.scored)
                kls.append(_kl(ref, lp))
                losses.append(_loss(lp, w.ids))
            stats = xt.last_stats(self.model)
            runtime = stats.overall(layers=self.layers)
        finally:
            xt.disable(self.model)
        loss = float(np.mean(losses))
        return {"kl": float(np.mean(kls)), "loss": loss,
                "loss_increase": loss - self.dense_loss, "density": self.density(thresholds),
                "runtime_density": float(runtime)}


def _bar(iterable, desc, progress, total=None):
    if not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


# --------------------------------------------------------------------------------------------
def measure_curves(
    model: Any,
    windows: Sequence[torch.Tensor | CalibrationWindow],
    grid: Sequence[float],
    *,
    layers: Sequence[int] | None = None,
    stride: int = 8,
    block_size: int = 128,
    backend: str = "auto",
    progress: bool = True,
) -> dict[int, CurveSums]:
    """Per-layer ``CurveSums`` (density / recall / output error for every grid threshold),
    accumulated over ``windows`` (1-D token tensors: every row measured, or
    ``CalibrationWindow``: the rows it focuses on)."""
    xt = _xt()
    n_layers = model_structure(model)["num_layers"]
    layers = list(range(n_layers)) if layers is None else list(layers)
    info = attention_layer_info(model)
    sums: dict[int, CurveSums] = {}
    device = _device_of(model)
    bar = _bar(None, "calibration curves", progress, total=len(windows) * len(layers))
    for w in windows:
        ids, rows = (w.ids, w.rows) if isinstance(w, CalibrationWindow) else (w, None)
        caps = xt.capture_attention_inputs(model, ids.view(1, -1).to(device), layers=layers)
        for layer in layers:
            q, k, v = caps[layer]
            s = measure_layer(q, k, v, grid, stride=stride, block_size=block_size, causal=True,
                              scale=info.get(layer, {}).get("scale"), backend=backend, rows=rows)
            if layer in sums:
                sums[layer].add(s)
            else:
                sums[layer] = s
            if bar is not None:
                bar.update(1)
        del caps
    if bar is not None:
        bar.close()
    return sums


def stack_curves(sums: dict[int, CurveSums], n_layers: int, proxy: str = "output_error"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Flatten per-layer sums to ``density, recall, cost`` arrays ``[N, T]`` over (layer, head).

    ``proxy`` is ``"output_error"`` (relative squared error of the head output) or
    ``"lost_mass"`` (``1 - recall``). Returns the head order as ``(layer, head)`` pairs.
    """
    if proxy not in ("output_error", "lost_mass"):
        raise ValueError(f"proxy must be 'output_error' or 'lost_mass', got {proxy!r}")
    d, r, c, keys = [], [], [], []
    for layer in range(n_layers):
        if layer not in sums:
            continue
        s = sums[layer]
        d.append(s.density)
        r.append(s.recall)
        c.append(s.rel_error if proxy == "output_error" else np.clip(1 - s.recall, 0, None))
        keys.extend((layer, h) for h in range(s.density.shape[0]))
    return np.concatenate(d), np.concatenate(r), np.concatenate(c), keys


def uniform_thresholds(threshold: float, n_layers: int, n_heads: int,
                       layers: Sequence[int] | None = None) -> list[list[float]]:
    """``[layer][head]`` table with ``threshold`` on ``layers`` (all when None), 1.0 elsewhere."""
    keep = set(range(n_layers)) if layers is None else set(layers)
    return [[float(threshold) if li in keep else 1.0] * n_heads for li in range(n_layers)]


def _to_nested(choice, grid, keys, n_layers, n_heads, fill=1.0) -> list[list[float]]:
    th = [[fill] * n_heads for _ in range(n_layers)]
    for (layer, head), o in zip(keys, choice, strict=True):
        th[layer][head] = float(grid[int(o)])
    return th


# Default (calibration, held-out) window counts per kind of data.
WINDOWS = {"prose": (2, 1), "retrieval": (16, 16)}


def calibration_windows(
    tokenizer: Any,
    data: str | None,
    texts: str | Sequence[str] | None,
    heldout_texts: str | Sequence[str] | None,
    *,
    tasks: Sequence[str] | None,
    chat: bool | None,
    seq_len: int,
    calib_windows: int | None,
    heldout_windows: int | None,
    eval_tokens: int,
    seed: int,
    progress: bool = False,
) -> tuple[list[CalibrationWindow], list[CalibrationWindow], str, str]:
    """Step 1: the calibration and held-out windows, the kind of data (``"prose"`` or
    ``"retrieval"``) and a name for where they come from.

    ``data="prose"``: windows of ``texts`` (the haystack when None), scored on their last
    ``eval_tokens`` positions. ``data="retrieval"``: RULER-style prompts with answers
    (``retrieval_windows``), round-robin over ``tasks``; the first ``calib_windows`` calibrate
    and the next ``heldout_windows`` verify. The two share no prompt, and each covers the tasks
    as evenly as its count allows (every task when the count is a multiple of their number).
    ``data=None``: prose when texts are given, retrieval otherwise.
    """
    if data is None:
        data = "prose" if texts is not None or heldout_texts is not None else "retrieval"
    if data not in WINDOWS:
        raise ValueError(f"data must be 'prose' or 'retrieval', got {data!r}")
    # Answers are a few tokens each, prose windows are scored on ``eval_tokens``: retrieval
    # needs many more windows for the same statistical weight.
    default = WINDOWS[data]
    calib_windows = default[0] if calib_windows is None else calib_windows
    heldout_windows = default[1] if heldout_windows is None else heldout_windows
    for name, value, least in (("calib_windows", calib_windows, 1),
                               ("heldout_windows", heldout_windows, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if data == "retrieval":
        if texts is not None or heldout_texts is not None:
            raise ValueError("texts / heldout_texts are for data='prose'; retrieval windows are "
                             "generated from the RULER tasks")
        tasks = check_tasks(RETRIEVAL_TASKS if tasks is None else tasks)
        total = calib_windows + heldout_windows
        per_task = -(-total // max(len(tasks), 1))
        windows = retrieval_windows(tokenizer, seq_len, per_task, tasks=tasks, seed=seed,
                                    chat=chat, progress=progress)
        if len(windows) < total:
            raise ValueError(f"only {len(windows)} retrieval windows for {total} requested")
        source = f"ruler-retrieval(seed={seed}; {','.join(tasks)})"
        return windows[:calib_windows], windows[calib_windows:total], "retrieval", source
    if tasks is not None:
        raise ValueError("tasks are for data='retrieval'")
    source = "paul-graham-haystack" if texts is None else "user"
    if texts is None:
        texts = load_haystack()

    def wrap(ids: list[torch.Tensor], name: str, first: int = 0) -> list[CalibrationWindow]:
        # Sources number the windows in their shuffled order: "text#0" is the first one drawn.
        return [CalibrationWindow(x, scored=min(eval_tokens, x.numel() - 1),
                                  source=f"{name}#{first + i}") for i, x in enumerate(ids)]

    calib = wrap(token_windows(tokenizer, texts, seq_len, calib_windows, seed=seed), "text")
    if heldout_windows <= 0:
        held: list[CalibrationWindow] = []
    elif heldout_texts is not None:
        held = wrap(token_windows(tokenizer, heldout_texts, seq_len, heldout_windows,
                                  seed=seed + 1), "heldout-text")
    else:
        held = wrap(token_windows(tokenizer, texts, seq_len, heldout_windows, seed=seed,
                                  skip=calib_windows), "text", first=calib_windows)
    return calib, held, "prose", source


class Calibrator:
    """The calibration procedure, step by step, for callers that want more than one profile.

    ``calibrate()`` is ``Calibrator(...).run(...)``. Keeping the object lets a caller measure the
    curves once and then trace the whole density / fidelity frontier (``allocate`` at several
    budgets, ``evaluate`` each on the held-out text), or compare with uniform thresholds
    measured on exactly the same held-out windows (``evaluate(uniform(t))``).

    Args: as for :func:`calibrate`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        texts: str | Sequence[str] | None = None,
        *,
        heldout_texts: str | Sequence[str] | None = None,
        data: str | None = None,
        tasks: Sequence[str] | None = None,
        chat: bool | None = None,
        stride: int = 8,
        block_size: int = 128,
        seq_len: int = 4096,
        calib_windows: int | None = None,
        heldout_windows: int | None = None,
        eval_tokens: int = 1024,
        grid: Sequence[float] | None = None,
        proxy: str = "output_error",
        layers: Sequence[int] | None = None,
        seed: int = 0,
        backend: str = "auto",
        progress: bool = True,
        enable_kwargs: dict[str, Any] | None = None,
        log: Callable[[str], None] | None = print,
    ) -> None:
        self.say = log or (lambda _msg: None)
        self.t_start = time.time()
        torch.manual_seed(seed)
        grid = sorted({float(t) for t in (default_grid() if grid is None else grid)},
                      reverse=True)
        if not grid or any(not (t > 0 and math.isfinite(t)) for t in grid):
            raise ValueError(f"grid must be non-empty thresholds > 0, got {grid}")
        if proxy not in ("output_error", "lost_mass"):
            raise ValueError(f"proxy must be 'output_error' or 'lost_mass', got {proxy!r}")
        for name, value in (("seq_len", seq_len), ("eval_tokens", eval_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.model, self.tokenizer = model, tokenizer
        self.struct = model_structure(model)
        self.n_layers, self.n_heads = self.struct["num_layers"], self.struct["num_q_heads"]
        self.enable_kwargs = dict(enable_kwargs or {})
        if layers is None:
            layers = sparse_layers(model, self.enable_kwargs.get("dense_layers", ()))
        self.layers = sorted({int(x) for x in layers})
        if not self.layers or any(not 0 <= x < self.n_layers for x in self.layers):
            raise ValueError(f"layers must be a non-empty list in [0, {self.n_layers}), got "
                             f"{list(layers)}")
        self.stride, self.block_size, self.seq_len = stride, block_size, seq_len
        self.grid, self.proxy, self.seed, self.backend = grid, proxy, seed, backend
        self.progress, self.eval_tokens = progress, eval_tokens
        model.eval()
        self.calib, self.held, self.data, self.text_source = calibration_windows(
            tokenizer, data, texts, heldout_texts, tasks=tasks, chat=chat, seq_len=seq_len,
            calib_windows=calib_windows, heldout_windows=heldout_windows,
            eval_tokens=eval_tokens, seed=seed, progress=progress)
        self._heldout: _HeldOut | None = None
        self.curves_seconds = 0.0
        self.say(f"calibrate: layers {self.layers} x {self.n_heads} heads, {len(self.calib)} "
                 f"{self.data} windows of ~{seq_len} tokens, grid of {len(grid)} thresholds")
        t0 = time.time()
        self.sums = measure_curves(model, self.calib, grid, layers=self.layers, stride=stride,
                                   block_size=block_size, backend=backend, progress=progress)
        self.curves_seconds = time.time() - t0
        self.density, self.recall, cost, self.keys = stack_curves(self.sums, self.n_layers, proxy)
        grid_arr = np.asarray(grid)
        # Dense options cost nothing (their measured error is float rounding noise).
        self.cost = np.where((grid_arr >= 1)[None, :] | (cost < 1e-9), 0.0, cost)
        self.say(f"calibrate: curves measured in {self.curves_seconds:.1f}s")

    # ----------------------------------------------------------------------------------------
    def feasible(self, min_recall: float) -> np.ndarray:
        """Options ``[N, T]`` meeting the recall floor (the dense option always does)."""
        if not (0 <= min_recall <= 1):
            raise ValueError(f"min_recall must be in [0, 1], got {min_recall}")
        f = self.recall >= min_recall
        f |= (np.asarray(self.grid) >= 1)[None, :]
        if not f.any(axis=1).all():
            bad = [self.keys[i] for i in np.flatnonzero(~f.any(axis=1))][:5]
            raise ValueError(f"no threshold in the grid reaches min_recall={min_recall} for "
                             f"heads {bad} (layer, head); add 1.0 to the grid")
        return f

    def budget_range(self, min_recall: float) -> tuple[float, float]:
        """Proxy budgets from "nothing lost" to "every head at its sparsest allowed option"."""
        return cost_range(self.cost, self.feasible(min_recall), self.density)

    def allocate(self, budget: float, min_recall: float, method: str = "dp") -> Allocation:
        """Per-head options minimising the summed density under the proxy ``budget``."""
        return solve(self.density, self.cost, budget, self.feasible(min_recall), method=method)

    def thresholds(self, alloc: Allocation) -> list[list[float]]:
        """``[layer][head]`` thresholds of an allocation (1.0 on uncalibrated layers)."""
        return _to_nested(alloc.choice, self.grid, self.keys, self.n_layers, self.n_heads)

    def uniform(self, threshold: float) -> list[list[float]]:
        """``threshold`` on every calibrated layer, 1.0 elsewhere."""
        return uniform_thresholds(threshold, self.n_layers, self.n_heads, self.layers)

    def calib_stats(self, alloc: Allocation) -> dict[str, float]:
        """Mean density / recall and the proxy cost of an allocation on the calibration text."""
        idx = np.arange(len(self.keys))
        return {"calib_density": float(self.density[idx, alloc.choice].mean()),
                "calib_mean_recall": float(self.recall[idx, alloc.choice].mean()),
                "calib_min_head_recall": float(self.recall[idx, alloc.choice].min()),
                "proxy_cost": float(alloc.cost)}

    @property
    def heldout(self) -> _HeldOut:
        """Held-out windows with their dense reference (computed on first use)."""
        if self._heldout is None:
            if not self.held:
                raise ValueError("no held-out windows (heldout_windows=0)")
            self._heldout = _HeldOut(self.model, self.held, self.layers, self.stride,
                                     self.block_size, self.backend,
                                     attention_layer_info(self.model), self.progress)
        return self._heldout

    def evaluate(self, thresholds: list[list[float]]) -> dict[str, float]:
        """Held-out KL(dense || sparse), loss, loss increase and density of a threshold table."""
        return self.heldout.evaluate(thresholds, **self.enable_kwargs)

    # ----------------------------------------------------------------------------------------
    def search(
        self,
        min_recall: float,
        max_kl: float | None,
        max_loss_increase: float | None,
        method: str = "dp",
        ladder: int = 24,
        refine: int = 2,
    ) -> tuple[Allocation, float, dict[str, float], list[dict[str, Any]]]:
        """Step 4: binary search of the budget ladder for the sparsest acceptable allocation,
        then ``refine`` bisection steps between the last accepted and first rejected budget.

        Returns ``(allocation, budget, held-out metrics, search log)``.
        """
        if max_kl is None and max_loss_increase is None:
            raise ValueError("search needs max_kl or max_loss_increase")

        def acceptable(m: dict[str, float]) -> bool:
            ok = max_kl is None or m["kl"] <= max_kl
            if max_loss_increase is not None:
                ok = ok and m["loss_increase"] <= max_loss_increase + 1e-9
            return bool(ok)

        lo_b, hi_b = self.budget_range(min_recall)
        floor = max(lo_b, hi_b * 1e-4)
        budgets = [lo_b] + [float(b) for b in np.geomspace(floor, hi_b, max(ladder, 2))]
        allocs = [self.allocate(b, min_recall, method) for b in budgets]
        n = len(self.keys)
        lo_i, hi_i = 0, len(budgets)  # lo_i: acceptable (assumed for the cheapest allocation)
        evals: dict[int, dict[str, float]] = {}
        log: list[dict[str, Any]] = []

        def probe(i: int) -> dict[str, float]:
            m = self.evaluate(self.thresholds(allocs[i]))
            evals[i] = m
            log.append({"budget": budgets[i], "calib_density": allocs[i].density / n, **m,
                        "accepted": acceptable(m)})
            self.say(f"calibrate: budget {budgets[i]:.4g}: calib density "
                     f"{allocs[i].density / n:.4f}, held-out density {m['density']:.4f} "
                     f"KL {m['kl']:.5f} loss {m['loss_increase']:+.5f} -> "
                     f"{'ok' if acceptable(m) else 'too lossy'}")
            return m

        while hi_i - lo_i > 1:
            mid = (lo_i + hi_i) // 2
            if acceptable(probe(mid)):
                lo_i = mid
            else:
                hi_i = mid
        # Refine between the last acceptable and the first rejected rung (geometric midpoints).
        if hi_i < len(budgets):
            for _ in range(refine):
                b = math.sqrt(max(budgets[lo_i], 1e-30) * budgets[hi_i])
                budgets.append(b)
                allocs.append(self.allocate(b, min_recall, method))
                if acceptable(probe(len(budgets) - 1)):
                    lo_i = len(budgets) - 1
                else:
                    hi_i = len(budgets) - 1
        chosen_eval = evals.get(lo_i) or probe(lo_i)
        return allocs[lo_i], budgets[lo_i], chosen_eval, log

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
            s = self.sums[layer]
            cols = [self.grid.index(t) for t in thresholds[layer]]
            per_layer[str(layer)] = {
                "density": [round(float(s.density[h, c]), 5) for h, c in enumerate(cols)],
                "recall": [round(float(s.recall[h, c]), 5) for h, c in enumerate(cols)],
            }
        measured["per_layer_calib"] = per_layer
        name = model_id or str(getattr(getattr(self.model, "config", None), "_name_or_path", "")
                               or "")
        return ThresholdProfile(
            thresholds=thresholds, stride=self.stride, block_size=self.block_size,
            model_id=name, budget=budget, measured=measured, version=PROFILE_VERSION,
            model_config=dict(self.struct),
            metadata={
                "grid": self.grid, "seq_len": self.seq_len, "calib_windows": len(self.calib),
                "heldout_windows": len(self.held),
                "eval_tokens": self.eval_tokens if self.data == "prose" else None,
                "seed": self.seed, "layers": self.layers, "proxy": self.proxy,
                "search": search_log or [], "seconds": round(time.time() - self.t_start, 1),
                "curves_seconds": round(self.curves_seconds, 1), "texts": self.text_source,
                "data": self.data,
                "windows": {"calibration": [w.source for w in self.calib if w.source],
                            "heldout": [w.source for w in self.held if w.source]},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "xattention_version": _version(),
            },
        )


def calibrate(
    model: Any,
    tokenizer: Any,
    texts: str | Sequence[str] | None = None,
    *,
    heldout_texts: str | Sequence[str] | None = None,
    data: str | None = None,
    tasks: Sequence[str] | None = None,
    chat: bool | None = None,
    stride: int = 8,
    block_size: int = 128,
    seq_len: int = 4096,
    calib_windows: int | None = None,
    heldout_windows: int | None = None,
    eval_tokens: int = 1024,
    min_recall: float = 0.8,
    max_kl: float | None = None,
    max_loss_increase: float | None = None,
    reference_threshold: float | None = 0.9,
    proxy: str = "output_error",
    proxy_budget: float | None = None,
    grid: Sequence[float] | None = None,
    method: str = "dp",
    ladder: int = 24,
    refine: int = 2,
    layers: Sequence[int] | None = None,
    model_id: str | None = None,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
    verify: bool = True,
    enable_kwargs: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
) -> ThresholdProfile:
    """Calibrate per-(layer, head) XAttention thresholds for ``model`` (see the module docs).

    Args:
        model: a Hugging Face causal LM that ``xattention.integrations.transformers`` supports.
        tokenizer: its tokenizer.
        texts: calibration text(s) for ``data="prose"``; the Paul Graham haystack when None.
        heldout_texts: verification text(s); disjoint windows of ``texts`` when None.
        data: ``"retrieval"`` (RULER-style needle prompts with their answers, scored on the
            answer tokens: see ``calibration.data``) or ``"prose"`` (windows of running text,
            scored on their last ``eval_tokens`` positions). Default: prose when ``texts`` are
            given, retrieval otherwise (on the suite, retrieval profiles held their score where
            prose ones lost 3-4 points: ``eval/results/README.md``).
        tasks: RULER tasks of the retrieval windows (default ``RETRIEVAL_TASKS``).
        chat: format retrieval prompts with the chat template (default: when the tokenizer has
            one).
        stride, block_size: XAttention parameters the profile is made for.
        seq_len: tokens per window (retrieval: the prompt length the tasks are generated for).
        calib_windows, heldout_windows: windows to calibrate on / verify on (default: 2 / 1 of
            prose, 16 / 16 retrieval prompts).
        eval_tokens: prose: held-out KL and loss are averaged over the last this-many positions.
        min_recall: per-head floor on the mean recall of true attention mass.
        max_kl: bound on held-out mean KL(dense || sparse) per token (nats).
        max_loss_increase: bound on the held-out next-token loss increase (nats).
        reference_threshold: when neither bound is given, ``max_kl`` is set to what this uniform
            threshold achieves on the held-out text (None: no reference run). The reference's
            loss increase is recorded but not used as a bound: on a few thousand tokens it is a
            noisy difference of two means.
        proxy: per-head cost, ``"output_error"`` or ``"lost_mass"``.
        proxy_budget: fix the proxy budget ``B`` instead of searching it on held-out text.
        grid: thresholds to consider (default ``default_grid()``: 1.0, fine steps down to 0.92,
            then the paper's 0.9 * 0.9**s ladder to 0.28).
        method: ``"dp"`` (exact up to 2% budget slack) or ``"lagrangian"``.
        ladder: number of budgets on the geometric ladder searched in step 4.
        refine: extra bisection probes between the last accepted and first rejected budget.
        layers: layers to calibrate (others stay dense, threshold 1.0); all when None.
        model_id: recorded in the profile (default: the model's name or path).
        seed: seeds the window choice, or the retrieval generators (keep it different from the
            evaluation's seed); everything else is deterministic.
        backend: XAttention backend for estimates and the verification runs.
        progress: show tqdm progress bars.
        verify: run the held-out verification (needed unless ``proxy_budget`` is given).
        enable_kwargs: extra keyword arguments for ``enable`` (e.g. ``dense_layers``).
        log: where progress lines go (None: silent).

    Returns:
        the ``ThresholdProfile``; ``measured`` holds calibration and held-out numbers.
    """
    if max_kl is None and max_loss_increase is None and reference_threshold is None \
            and proxy_budget is None:
        raise ValueError("give max_kl, max_loss_increase, reference_threshold or proxy_budget")
    if proxy_budget is None and not verify:
        raise ValueError("without verification a proxy_budget must be given")
    if not (0 <= min_recall <= 1):
        raise ValueError(f"min_recall must be in [0, 1], got {min_recall}")
    was_training = getattr(model, "training", False)
    try:
        cal = Calibrator(
            model, tokenizer, texts, heldout_texts=heldout_texts, data=data, tasks=tasks,
            chat=chat, stride=stride,
            block_size=block_size, seq_len=seq_len, calib_windows=calib_windows,
            heldout_windows=heldout_windows if verify else 0, eval_tokens=eval_tokens, grid=grid,
            proxy=proxy, layers=layers, seed=seed, backend=backend, progress=progress,
            enable_kwargs=enable_kwargs, log=log)
        extra: dict[str, Any] = {}
        if reference_threshold is not None and verify:
            ref = cal.evaluate(cal.uniform(float(reference_threshold)))
            extra["uniform_reference"] = {"threshold": float(reference_threshold), **ref}
            cal.say(f"calibrate: uniform {reference_threshold}: held-out density "
                    f"{ref['density']:.4f} KL {ref['kl']:.5f} loss {ref['loss_increase']:+.5f}")
            if max_kl is None and max_loss_increase is None:
                # KL only: the loss increase of one reference run is a noisy difference of two
                # means (it can even be negative), a poor bound to hold other runs to.
                max_kl = ref["kl"]
        budget = {"min_recall": min_recall, "max_kl": max_kl,
                  "max_loss_increase": max_loss_increase,
                  "reference_threshold": reference_threshold, "proxy": proxy, "method": method}
        search_log: list[dict[str, Any]] = []
        if proxy_budget is not None:
            alloc = cal.allocate(float(proxy_budget), min_recall, method)
            chosen_budget = float(proxy_budget)
            metrics = cal.evaluate(cal.thresholds(alloc)) if verify else None
        else:
            alloc, chosen_budget, metrics, search_log = cal.search(
                min_recall, max_kl, max_loss_increase, method, ladder, refine)
        lo_b, hi_b = cal.budget_range(min_recall)
        extra.update({"proxy_budget": chosen_budget, "proxy_budget_range": [lo_b, hi_b]})
        if metrics is not None:
            ok = (max_kl is None or metrics["kl"] <= max_kl) and (
                max_loss_increase is None
                or metrics["loss_increase"] <= max_loss_increase + 1e-9)
            extra["meets_budget"] = bool(ok)
        profile = cal.make_profile(alloc, budget, metrics, extra, model_id, search_log)
    finally:
        if was_training:
            model.train()
    m = profile.measured
    cal.say(f"calibrate: done in {time.time() - cal.t_start:.0f}s, calib density "
            f"{m['calib_density']:.4f}"
            + (f", held-out density {m['heldout_density']:.4f}, KL {m['heldout_kl']:.5f}, "
               f"loss {m['heldout_loss_increase']:+.5f}" if "heldout_density" in m else ""))
    return profile


def _version() -> str:
    try:
        from .. import __version__
    except ImportError:  # pragma: no cover
        return "unknown"
    return __version__
