"""Per-head threshold calibration: the knapsack optimiser, the curve measurement, profiles.

The optimiser is checked against brute-force enumeration on small synthetic instances (and on
curves whose optimum is known by construction); the curve measurement against a full-matrix
float64 reference; profiles for round-trip and for clear errors on bad or mismatched input. One
end-to-end test runs ``calibrate`` on a tiny random Llama when the transformers integration is
importable.
"""

from __future__ import annotations

import itertools
import json
import math
import types

import numpy as np
import pytest
import torch
from inputs import needs_ruler, needs_smollm2

from xattention import block_density, estimate_block_scores, select_blocks
from xattention.calibration import (
    ThresholdProfile,
    load_thresholds,
    measure_layer,
    solve_dp,
    solve_lagrangian,
    threshold_grid,
    token_windows,
)
from xattention.calibration.optimize import cost_range

# ------------------------------------------------------------------------------------------
# Optimiser


def brute_force(d, c, budget, feasible):
    """Exact optimum by enumeration: (density, choice) or (inf, None)."""
    n, t = d.shape
    best, arg = math.inf, None
    for choice in itertools.product(range(t), repeat=n):
        idx = np.arange(n)
        ch = np.array(choice)
        if not feasible[idx, ch].all():
            continue
        if c[idx, ch].sum() > budget + 1e-12:
            continue
        dens = d[idx, ch].sum()
        if dens < best - 1e-15:
            best, arg = dens, ch
    return best, arg


def random_curves(rng, n, t, integer_costs=None):
    """Monotone synthetic curves: density falls and cost rises with the step, like real heads."""
    d = np.sort(rng.uniform(0.05, 1.0, size=(n, t)), axis=1)[:, ::-1].copy()
    d[:, 0] = 1.0
    if integer_costs is None:
        c = np.sort(rng.exponential(1.0, size=(n, t)), axis=1)
    else:
        c = np.sort(rng.integers(0, integer_costs, size=(n, t)), axis=1).astype(float)
    c[:, 0] = 0.0
    recall = 1.0 - np.sort(rng.uniform(0, 0.3, size=(n, t)), axis=1)
    recall[:, 0] = 1.0
    return d, c, recall


@pytest.mark.parametrize("case", range(12))
def test_dp_matches_brute_force_on_grid_costs(case):
    # Costs on the DP's budget grid: rounding is exact, so the DP must hit the true optimum.
    rng = np.random.default_rng(case)
    n, t = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    d, c_units, recall = random_curves(rng, n, t, integer_costs=12)
    feasible = recall >= 0.8
    feasible[:, 0] = True
    # Budget of k units of delta; costs are whole units, so the DP's rounding is exact.
    delta = 0.1
    k = int(rng.integers(1, int(c_units.max(axis=1).sum()) + 2))
    c = c_units * delta
    budget_real = k * delta
    best, _ = brute_force(d, c, budget_real, feasible)
    res = solve_dp(d, c, budget_real, feasible, resolution=k)
    assert res.density == pytest.approx(best, abs=1e-12)
    idx = np.arange(n)
    assert feasible[idx, res.choice].all()
    assert res.cost <= budget_real + 1e-12


def _random_problem(seed):
    """Random curves (recall floor 0.85, dense option always feasible) and a budget in range."""
    rng = np.random.default_rng(seed)
    n, t = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    d, c, recall = random_curves(rng, n, t)
    feasible = recall >= 0.85
    feasible[:, 0] = True
    lo, hi = cost_range(c, feasible, d)
    return n, d, c, feasible, float(rng.uniform(lo, hi))


@pytest.mark.parametrize("case", range(12))
def test_dp_real_costs_within_stated_slack(case):
    n, d, c, feasible, budget = _random_problem(100 + case)
    k = 50
    res = solve_dp(d, c, budget, feasible, resolution=k)
    opt, _ = brute_force(d, c, budget, feasible)
    opt_tight, _ = brute_force(d, c, budget - n * budget / k, feasible)
    assert res.cost <= budget + 1e-12  # feasible for the true costs
    assert feasible[np.arange(n), res.choice].all()
    assert opt - 1e-12 <= res.density <= opt_tight + 1e-12
    assert res.info["slack_bound"] == pytest.approx(n * budget / k)


@pytest.mark.parametrize("case", range(12))
def test_lagrangian_feasible_and_within_its_gap(case):
    n, d, c, feasible, budget = _random_problem(200 + case)
    res = solve_lagrangian(d, c, budget, feasible)
    opt, _ = brute_force(d, c, budget, feasible)
    assert res.cost <= budget * (1 + 1e-9) + 1e-12
    assert feasible[np.arange(n), res.choice].all()
    assert res.density >= opt - 1e-12
    assert res.density - opt <= res.info["gap_bound"] + 1e-9


def test_lagrangian_exact_at_hull_breakpoints():
    # Convex per-head curves: density 1/(s+1), cost a_h * s. At any budget equal to the cost of a
    # Lagrangian choice (Everett's theorem) the relaxation is tight, and the DP is exact too
    # because the costs are whole multiples of its unit.
    from xattention.calibration.optimize import _lagrange_pick

    a = np.array([1.0, 2.0, 4.0])
    steps = np.arange(5)
    d = np.stack([1.0 / (1 + steps) for _ in a])
    c = a[:, None] * steps[None, :]
    feasible = np.ones_like(d, dtype=bool)
    idx = np.arange(len(a))
    budgets = {float(c[idx, _lagrange_pick(d, c, feasible, lam)].sum())
               for lam in np.geomspace(1e-4, 10, 60)}
    assert len(budgets) > 3
    for budget in sorted(budgets):
        opt, _ = brute_force(d, c, budget, feasible)
        lag = solve_lagrangian(d, c, budget, feasible)
        dp = solve_dp(d, c, budget, feasible, resolution=int(max(budget, 1)))
        assert dp.density == pytest.approx(opt)
        assert lag.density == pytest.approx(opt)
        assert lag.info["gap_bound"] < 1e-6


def test_known_optimum_easy_and_hard_heads():
    """Synthetic per-head curves whose optimum is known by construction.

    Heads 0-2 are "easy": sparsity costs nothing, so they go to their sparsest option whose
    recall meets the floor. Heads 3-5 are "hard": any sparsity costs more than the budget, so they
    stay dense. A uniform threshold cannot do this; the DP must.
    """
    grid = threshold_grid(1.0, 0.9, 8)
    t = len(grid)
    n = 6
    dens = np.tile(np.array([0.9**s for s in range(t)]), (n, 1))
    cost = np.zeros((n, t))
    cost[3:, 1:] = 10.0
    recall = np.tile(1.0 - 0.02 * np.arange(t), (n, 1))  # recall >= 0.9 up to step 5
    feasible = recall >= 0.9 - 1e-12
    for solver in (solve_dp, solve_lagrangian):
        res = solver(dens, cost, 1.0, feasible)
        assert res.choice.tolist() == [5, 5, 5, 0, 0, 0]
        assert res.density == pytest.approx(3 * 0.9**5 + 3)


def test_known_optimum_budget_goes_to_cheapest_gain():
    # Two heads with equal density curves; head 1 pays twice head 0's cost per step. Budget 4:
    # the optimum (by enumeration of the 25 options, done by hand) is head 0 at step 4, head 1 at
    # step 0 -> density 0.2 + 1.0 = 1.2 vs (2 steps each) 0.6 + 0.6 = 1.2 tie -> cost 4 vs 6;
    # with strictly convex densities the unique optimum is (2, 1).
    d = np.array([[1.0, 0.6, 0.4, 0.3, 0.25], [1.0, 0.6, 0.4, 0.3, 0.25]])
    c = np.array([[0, 1, 2, 3, 4], [0, 2, 4, 6, 8]], dtype=float)
    feasible = np.ones_like(d, dtype=bool)
    opt, arg = brute_force(d, c, 4.0, feasible)
    assert arg.tolist() == [2, 1] and opt == pytest.approx(1.0)
    assert solve_dp(d, c, 4.0, feasible, resolution=8).choice.tolist() == [2, 1]
    assert solve_lagrangian(d, c, 4.0, feasible).density == pytest.approx(1.0)


def test_optimiser_errors():
    d = np.array([[1.0, 0.5]])
    c = np.array([[0.1, 1.0]])
    with pytest.raises(ValueError, match="infeasible"):
        solve_dp(d, c, 0.05)
    with pytest.raises(ValueError, match="no feasible option"):
        solve_dp(d, c, 1.0, feasible=np.array([[False, False]]))
    with pytest.raises(ValueError, match="shape"):
        solve_dp(d, c[:, :1], 1.0)
    with pytest.raises(ValueError, match="budget"):
        solve_lagrangian(d, c, float("nan"))
    with pytest.raises(ValueError, match=">= 0"):
        solve_dp(d, -c, 1.0)


def test_dp_zero_budget_keeps_zero_cost_options():
    d = np.array([[1.0, 0.5, 0.2], [1.0, 0.4, 0.3]])
    c = np.array([[0.0, 0.0, 1.0], [0.0, 2.0, 3.0]])
    res = solve_dp(d, c, 0.0)
    assert res.choice.tolist() == [1, 0]


def test_threshold_grid():
    g = threshold_grid(1.0, 0.9, 4)
    assert g == pytest.approx([1.0, 0.9, 0.81, 0.729])
    with pytest.raises(ValueError):
        threshold_grid(1.0, 1.5, 3)


# ------------------------------------------------------------------------------------------
# Curve measurement against a full-matrix reference


def _reference_curves(q, k, v, grid, stride, block_size, scale, rows=None):
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    g = hq // k.shape[1]
    kk = k.repeat_interleave(g, 1).double()
    vv = v.repeat_interleave(g, 1).double()
    logits = q.double() @ kk.transpose(-1, -2) * scale
    pos = torch.arange(lq)[:, None] + (lk - lq)
    col = torch.arange(lk)[None, :]
    logits = logits.masked_fill(col > pos, float("-inf"))
    p = torch.softmax(logits, -1)
    dense = p @ vv
    sel = slice(None) if rows is None else slice(*rows)
    scores = estimate_block_scores(q, k, stride=stride, block_size=block_size, scale=scale,
                                   backend="torch")
    rows = []
    for t in grid:
        mask = select_blocks(scores, t, lq, lk, block_size, True, backend="torch")
        tok = mask.repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)
        tok = tok[:, :, :lq, :lk]
        recall = (p * tok).sum(-1)[:, :, sel]  # [B,H,rows]
        masked = logits.masked_fill(~tok, float("-inf"))
        sparse = (torch.softmax(masked, -1) @ vv)[:, :, sel]
        ref = dense[:, :, sel]
        err = (sparse - ref).pow(2).sum((0, 2, 3)) / ref.pow(2).sum((0, 2, 3))
        dens = block_density(mask, lq, lk, block_size, True)["per_head"]
        rows.append((dens.double(), recall.mean((0, 2)), err))
    return [torch.stack(x, 1).numpy() for x in zip(*rows, strict=True)]


@pytest.mark.parametrize("shape", [(1, 4, 2, 300, 300, 16), (2, 2, 1, 200, 330, 8)])
def test_measure_layer_matches_full_reference(shape):
    b, hq, hkv, lq, lk, d = shape
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(b, hq, lq, d, generator=gen)
    k = torch.randn(b, hkv, lk, d, generator=gen)
    v = torch.randn(b, hkv, lk, d, generator=gen)
    # A few sharp directions so that selection has something to choose.
    q[..., :2] *= 3
    k[..., :2] *= 3
    grid = [1.0, 0.9, 0.6, 0.3]
    scale = 0.3
    sums = measure_layer(q, k, v, grid, stride=4, block_size=32, scale=scale, backend="torch")
    ref_d, ref_r, ref_e = _reference_curves(q, k, v, grid, 4, 32, scale)
    np.testing.assert_allclose(sums.density, ref_d, atol=1e-9)
    np.testing.assert_allclose(sums.recall, ref_r, atol=1e-5)
    np.testing.assert_allclose(sums.rel_error, ref_e, atol=1e-5, rtol=1e-3)
    # Dense column: everything kept, nothing lost.
    assert np.allclose(sums.density[:, 0], 1) and np.allclose(sums.recall[:, 0], 1, atol=1e-6)
    # Lower thresholds never keep more.
    assert (np.diff(sums.density, axis=1) <= 1e-12).all()
    # Accumulating two measurements averages them.
    both = measure_layer(q, k, v, grid, stride=4, block_size=32, scale=scale, backend="torch")
    both.add(sums)
    np.testing.assert_allclose(both.density, sums.density)
    np.testing.assert_allclose(both.recall, sums.recall)


@pytest.mark.parametrize("rows", [(290, 299), (100, 180), (0, 1)])
def test_measure_layer_rows_restricts_recall_and_error(rows):
    """Only the chosen query rows are scored (retrieval calibration scores the answer rows);
    density still counts the whole layer. Rows cut across block boundaries on purpose."""
    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, lq, lk, d = 1, 4, 2, 299, 330, 16
    q = torch.randn(b, hq, lq, d, generator=gen)
    k = torch.randn(b, hkv, lk, d, generator=gen)
    v = torch.randn(b, hkv, lk, d, generator=gen)
    k[:, :, 37] *= 6  # a heavy key: the sharp head must keep its block
    q[..., :2] *= 3
    grid = [1.0, 0.9, 0.5, 0.2]
    sums = measure_layer(q, k, v, grid, stride=4, block_size=32, scale=0.3, backend="torch",
                         rows=rows)
    ref_d, ref_r, ref_e = _reference_curves(q, k, v, grid, 4, 32, 0.3, rows=rows)
    np.testing.assert_allclose(sums.density, ref_d, atol=1e-9)
    np.testing.assert_allclose(sums.recall, ref_r, atol=1e-5)
    np.testing.assert_allclose(sums.rel_error, ref_e, atol=1e-5, rtol=1e-3)
    assert sums.rows[0] == rows[1] - rows[0]
    whole = measure_layer(q, k, v, grid, stride=4, block_size=32, scale=0.3, backend="torch")
    assert not np.allclose(whole.recall[:, 1:], sums.recall[:, 1:])
    for bad in [(5, 5), (-1, 3), (0, lq + 1)]:
        with pytest.raises(ValueError, match="rows"):
            measure_layer(q, k, v, grid, stride=4, block_size=32, backend="torch", rows=bad)


# ------------------------------------------------------------------------------------------
# Profiles


def _profile(**kw):
    base = dict(thresholds=[[0.9, 0.8, 1.0], [0.5, 0.7, 0.95]], stride=8, block_size=128,
                model_id="toy", budget={"min_recall": 0.9, "max_kl": 0.01},
                measured={"heldout_density": 0.3, "heldout_kl": 0.004},
                model_config={"num_layers": 2, "num_q_heads": 3, "num_kv_heads": 1,
                              "head_dim": 16})
    base.update(kw)
    return ThresholdProfile(**base)


def test_profile_round_trip(tmp_path):
    p = _profile()
    path = tmp_path / "sub" / "profile.json"
    p.save(path)
    q = ThresholdProfile.load(path)
    assert q == p
    data = json.loads(path.read_text())
    assert data["format"] == "xattention-threshold-profile" and data["version"] == 1
    assert q.as_tensor(1).dtype == torch.float32
    assert torch.allclose(q.as_tensor(1), torch.tensor([0.5, 0.7, 0.95]))
    assert q.num_layers == 2 and q.num_heads == 3
    assert load_thresholds(str(path)) == p
    assert load_thresholds(p.thresholds).thresholds == p.thresholds


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(format="something-else"), "format"),
        (lambda d: d.update(version=99), "newer"),
        (lambda d: d.pop("thresholds"), "missing 'thresholds'"),
        (lambda d: d.update(thresholds=[[0.9, 0.8], [0.9]]), "same number of heads"),
        (lambda d: d.update(thresholds=[[0.9, -0.1, 1.0], [0.9, 0.9, 0.9]]),
         r"thresholds\[0\]\[1\]"),
        (lambda d: d.update(thresholds=[[0.9, "x", 1.0], [0.9, 0.9, 0.9]]), "must be a number"),
        (lambda d: d.update(thresholds=[]), "non-empty"),
        (lambda d: d.update(stride=12), "divide"),
        (lambda d: d.update(block_size=0), "block_size"),
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d["model_config"].update(num_layers=5), "num_layers"),
        (lambda d: d.update(budget=[1, 2]), "budget"),
    ],
)
def test_profile_validation(tmp_path, mutate, match):
    data = _profile().to_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        ThresholdProfile.load(path)


def test_profile_rejects_non_json_and_nan(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ThresholdProfile.load(path)
    with pytest.raises(ValueError, match="finite"):
        _profile(thresholds=[[float("nan"), 0.5, 0.5], [0.5, 0.5, 0.5]])


def _config(**kw):
    base = dict(num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                _name_or_path="toy")
    base.update(kw)
    return types.SimpleNamespace(config=types.SimpleNamespace(**base))


def test_profile_check_model():
    p = _profile()
    p.check_model(_config())
    with pytest.raises(ValueError, match="layer count: profile has 2, model has 4"):
        p.check_model(_config(num_hidden_layers=4))
    with pytest.raises(ValueError, match="query-head count"):
        p.check_model(_config(num_attention_heads=6))
    with pytest.raises(ValueError, match="KV-head count"):
        p.check_model(_config(num_key_value_heads=3))
    with pytest.raises(ValueError, match="block_size"):
        p.check_model(_config(), block_size=64)
    p.check_model(_config(_name_or_path="/models/other"))  # names are not compared
    with pytest.raises(ValueError, match="layer count"):
        load_thresholds(p, model=_config(num_hidden_layers=3))
    with pytest.raises(ValueError, match="layer"):
        p.as_tensor(2)


# ------------------------------------------------------------------------------------------
# Text windows and the CLI


class CharTokenizer:
    """A tiny stand-in for a Hugging Face tokenizer: one token per byte, BOS = 256."""

    bos_token_id = 256

    def __call__(self, text, add_special_tokens=True):
        ids = list(text.encode("utf-8"))
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def _text(n_words=4000, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "needle", "haystack", "essay"]
    return " ".join(rng.choice(words, size=n_words).tolist())


def test_token_windows_disjoint_and_seeded():
    tok = CharTokenizer()
    text = _text()
    a = token_windows(tok, text, 256, 2, seed=1)
    b = token_windows(tok, text, 256, 2, seed=1, skip=2)
    again = token_windows(tok, text, 256, 2, seed=1)
    assert all(w.numel() == 256 and w[0] == 256 for w in a + b)
    assert all(torch.equal(x, y) for x, y in zip(a, again, strict=True))
    assert not any(torch.equal(x, y) for x in a for y in b)
    with pytest.raises(ValueError, match="too short"):
        token_windows(tok, "short text", 256, 1)


def test_cli_registers_calibrate():
    from xattention.cli import build_parser

    args = build_parser().parse_args(
        ["calibrate", "--model", "smollm2", "--out", "p.json", "--min-recall", "0.8",
         "--max-kl", "0.01"])
    assert args.command == "calibrate" and args.min_recall == 0.8 and args.max_kl == 0.01
    assert callable(args.func)


# ------------------------------------------------------------------------------------------
# End to end on a tiny random model (needs transformers and the integration)


def _tiny_llama(vocab_size=257, bos_token_id=256):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("xattention.integrations.transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=bos_token_id, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    return model


def test_calibrate_tiny_model_end_to_end(tmp_path):
    from xattention.calibration import calibrate

    model = _tiny_llama()
    tok = CharTokenizer()
    profile = calibrate(
        model, tok, _text(6000), stride=8, block_size=32, seq_len=256, calib_windows=1,
        heldout_windows=1, eval_tokens=128, min_recall=0.8, reference_threshold=0.9,
        grid=threshold_grid(1.0, 0.8, 6), ladder=6, backend="torch", progress=False,
        log=None, model_id="tiny-llama")
    assert profile.num_layers == 2 and profile.num_heads == 4
    profile.check_model(model)
    m = profile.measured
    ref = m["uniform_reference"]
    assert m["meets_budget"]
    assert m["heldout_kl"] <= profile.budget["max_kl"] + 1e-12
    assert m["calib_min_head_recall"] >= 0.8 or m["calib_density"] == 1.0
    assert 0 < m["heldout_density"] <= 1 and 0 < ref["density"] <= 1
    assert {t for row in profile.thresholds for t in row} <= set(threshold_grid(1.0, 0.8, 6))
    path = tmp_path / "tiny.json"
    profile.save(path)
    loaded = ThresholdProfile.load(path)
    assert loaded == profile

    # The integration takes the profile; a profile of another shape is refused by name.
    import xattention.integrations.transformers as xt

    ids = torch.randint(0, 256, (1, 200))
    xt.enable(model, thresholds=str(path), backend="torch")  # a path loads the profile
    xt.disable(model)
    with pytest.raises(FileNotFoundError):
        xt.enable(model, thresholds=tmp_path / "missing.json")
    assert not xt.is_enabled(model)
    xt.enable(model, thresholds=loaded, backend="torch")
    try:
        with torch.no_grad():
            model(ids)
        assert xt.last_stats(model).overall() <= 1.0
    finally:
        xt.disable(model)
    wrong = ThresholdProfile(thresholds=loaded.thresholds + [[0.9] * 4], model_id="tiny-llama")
    with pytest.raises(ValueError, match="layer count"):
        xt.enable(model, thresholds=wrong)
    assert not xt.is_enabled(model)


# ------------------------------------------------------------------------------------------
# Retrieval windows (RULER prompts + answers; need the generators and SmolLM2's tokenizer)


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory):
    """This test session's evaluation cache (checked tokenizers, RULER samples): test_eval uses
    the same folder, so a tokenizer is converted and a sample set generated once per run."""
    path = tmp_path_factory.getbasetemp() / "xattention-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizer(eval_cache):
    pytest.importorskip("transformers")
    from xattention.eval.models import load_tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XATTENTION_CACHE", str(eval_cache))
        return load_tokenizer("smollm2")


@needs_ruler
@needs_smollm2
def test_retrieval_windows_end_with_the_answer(smollm2_tokenizer, eval_cache):
    from xattention.calibration import retrieval_windows

    tok = smollm2_tokenizer
    windows = retrieval_windows(tok, 1024, 2, tasks=("niah_single_2", "vt"), seed=5, chat=True,
                                cache_dir=str(eval_cache))
    # Round-robin over tasks, so any prefix covers every task.
    assert [w.source.split("#")[0] for w in windows] == ["niah_single_2", "vt"] * 2
    for w in windows:
        n = w.ids.numel()
        assert n <= 1024 and w.focus and w.rows == (n - w.scored - 1, n - 1)
        assert (w.ids[:2] == tok.bos_token_id).sum() <= 1  # the chat template's BOS, once
        prompt = tok.decode(w.ids[:-w.scored])
        answer = tok.decode(w.ids[-w.scored:])
        assert prompt.rstrip().endswith(("text is", "they are:"))
        values = [v.strip() for v in answer.replace(",", " ").split()]
        assert values and all(v in prompt for v in values)  # the needles are in the haystack
    again = retrieval_windows(tok, 1024, 2, tasks=("niah_single_2", "vt"), seed=5, chat=True,
                              cache_dir=str(eval_cache))
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(windows, again, strict=True))
    with pytest.raises(ValueError, match="per_task"):
        retrieval_windows(tok, 1024, 0)


def test_calibration_window_validation():
    from xattention.calibration import CalibrationWindow

    w = CalibrationWindow(torch.arange(10), scored=3, focus=True)
    assert w.rows == (6, 9)
    assert CalibrationWindow(torch.arange(10), scored=3).rows is None
    with pytest.raises(ValueError, match="scored"):
        CalibrationWindow(torch.arange(10), scored=10)
    with pytest.raises(ValueError, match="ids"):
        CalibrationWindow(torch.zeros(2, 5, dtype=torch.long), scored=1)


@needs_ruler
@needs_smollm2
def test_calibrate_on_retrieval_windows(smollm2_tokenizer, eval_cache, monkeypatch):
    """A tiny random Llama speaking SmolLM2's vocabulary, calibrated on needle prompts: the held-out
    KL is measured on the answer tokens and the profile records which prompts it used."""
    from xattention.calibration import calibrate

    # niah_single_2's samples (seed 5, 2 of them) are the ones the test above generated.
    monkeypatch.setenv("XATTENTION_CACHE", str(eval_cache))
    tok = smollm2_tokenizer
    model = _tiny_llama(vocab_size=len(tok), bos_token_id=tok.bos_token_id)
    profile = calibrate(
        model, tok, data="retrieval", tasks=["niah_single_2", "niah_multikey_1"], chat=True,
        seq_len=1024, calib_windows=2, heldout_windows=2, stride=8, block_size=64,
        grid=threshold_grid(1.0, 0.8, 5), ladder=4, refine=1, backend="torch",
        progress=False, log=None, seed=5)
    md, m = profile.metadata, profile.measured
    assert md["data"] == "retrieval" and md["texts"].startswith("ruler-retrieval(seed=5")
    assert md["windows"] == {"calibration": ["niah_single_2#0", "niah_multikey_1#0"],
                             "heldout": ["niah_single_2#1", "niah_multikey_1#1"]}
    assert m["meets_budget"] and m["heldout_kl"] <= m["uniform_reference"]["kl"] + 1e-12
    assert 0 < m["heldout_density"] <= 1
    with pytest.raises(ValueError, match="prose"):
        calibrate(model, tok, "some text", data="retrieval", log=None, progress=False)
    with pytest.raises(ValueError, match="data must be"):
        calibrate(model, tok, data="needles", log=None, progress=False)
    with pytest.raises(ValueError, match="tasks are for"):
        calibrate(model, tok, data="prose", tasks=["vt"], log=None, progress=False)


def test_calibration_windows_defaults_follow_the_data():
    """Own text means prose (2 + 1 windows scored on their last eval_tokens); counts are checked."""
    from xattention.calibration.data import calibration_windows

    tok = CharTokenizer()
    kw = dict(tasks=None, chat=None, seq_len=256, calib_windows=None, heldout_windows=None,
              eval_tokens=100, seed=0)
    calib, held, data, source = calibration_windows(tok, None, _text(), None, **kw)
    assert (data, source, len(calib), len(held)) == ("prose", "user", 2, 1)
    assert all(w.scored == 100 and w.rows is None for w in calib + held)
    with pytest.raises(ValueError, match="calib_windows must be an int >= 1"):
        calibration_windows(tok, "prose", _text(), None, **{**kw, "calib_windows": 0})
    with pytest.raises(ValueError, match="heldout_windows must be an int >= 0"):
        calibration_windows(tok, "prose", _text(), None, **{**kw, "heldout_windows": -1})


class BosTokenizer:
    """Characters as tokens; the literal "<s>" at the start is the BOS token (id 1), as a chat
    template's BOS is for a real tokenizer."""

    bos_token, bos_token_id, chat_template = "<s>", 1, None

    def __call__(self, text, add_special_tokens=True):
        ids = [1] if add_special_tokens else []
        if text.startswith("<s>"):
            ids.append(1)
            text = text[3:]
        return {"input_ids": ids + [ord(c) + 2 for c in text]}


def _fake_ruler(monkeypatch, calls=None):
    """Replace the RULER generators by a deterministic fake (no optional packages needed)."""
    from xattention.eval import ruler

    def generate_samples(task, length, num_samples, tokenizer, *, seed=42, chat=False,
                         cache_dir=None, log=None):
        if calls is not None:
            calls.append((task, length, num_samples, seed, chat))
        return [ruler.Sample(task=task, index=i, user=f"filler {task} key {seed}-{i} filler.",
                             answer_prefix=" The value is", outputs=[f"{i}{seed}", "77"],
                             length=length) for i in range(num_samples)]

    def build_prompt(sample, tokenizer, chat):
        return ("<s>[user] " if chat else "") + sample.user + sample.answer_prefix

    monkeypatch.setattr(ruler, "generate_samples", generate_samples)
    monkeypatch.setattr(ruler, "build_prompt", build_prompt)


@pytest.mark.parametrize("chat", [True, False])
def test_retrieval_windows_answer_span_and_single_bos(monkeypatch, chat):
    from xattention.calibration import retrieval_windows

    _fake_ruler(monkeypatch)
    tok = BosTokenizer()
    windows = retrieval_windows(tok, 512, 2, tasks=("a", "b", "c"), seed=9, chat=chat)
    assert [w.source for w in windows] == ["a#0", "b#0", "c#0", "a#1", "b#1", "c#1"]
    for w in windows:
        ids = w.ids.tolist()
        assert ids[0] == 1 and ids[1] != 1  # exactly one BOS, chat template or not
        answer = "".join(chr(t - 2) for t in ids[-w.scored:])
        assert answer == f" {w.source[-1]}9, 77"
        assert w.rows == (len(ids) - w.scored - 1, len(ids) - 1)
    with pytest.raises(TypeError, match="tasks"):
        retrieval_windows(tok, 512, 2, tasks="vt")
    with pytest.raises(ValueError, match="length"):
        retrieval_windows(tok, 0, 2)
    with pytest.raises(TypeError, match="chat"):
        retrieval_windows(tok, 512, 2, chat="yes")


def test_calibration_windows_retrieval_split(monkeypatch):
    """No text means retrieval: samples per task = ceil(total / tasks), the calibration and
    held-out windows share no prompt, and too few samples is an error naming the counts."""
    from xattention.calibration.data import calibration_windows

    calls = []
    _fake_ruler(monkeypatch, calls)
    tok = BosTokenizer()
    kw = dict(tasks=["a", "b", "c"], chat=False, seq_len=512, eval_tokens=100, seed=4)
    calib, held, data, source = calibration_windows(tok, None, None, None, calib_windows=4,
                                                    heldout_windows=3, **kw)
    assert data == "retrieval" and source.startswith("ruler-retrieval(seed=4")
    assert {c[2] for c in calls} == {3} and [c[0] for c in calls] == ["a", "b", "c"]
    assert [w.source for w in calib] == ["a#0", "b#0", "c#0", "a#1"]
    assert [w.source for w in held] == ["b#1", "c#1", "a#2"]
    assert all(w.focus for w in calib + held)
    calls.clear()
    calib, held, _, _ = calibration_windows(tok, "retrieval", None, None, calib_windows=None,
                                            heldout_windows=None, **kw)
    assert (len(calib), len(held)) == (16, 16) and calls[0][2] == 11
    with pytest.raises(ValueError, match="prose"):
        calibration_windows(tok, "retrieval", "text", None, calib_windows=1, heldout_windows=0,
                            **kw)
    with pytest.raises(ValueError, match="data must be"):
        calibration_windows(tok, "needles", None, None, calib_windows=0, heldout_windows=0, **kw)


def test_window_and_rows_types():
    from xattention.calibration import CalibrationWindow

    with pytest.raises(TypeError, match="ids"):
        CalibrationWindow([1, 2, 3], scored=1)
    with pytest.raises(TypeError, match="ids"):
        CalibrationWindow(torch.rand(5), scored=1)
    with pytest.raises(TypeError, match="scored"):
        CalibrationWindow(torch.arange(5), scored=True)
    q = torch.randn(1, 2, 40, 8)
    k = v = torch.randn(1, 2, 40, 8)
    for bad in [(1.5, 30), (1, 2, 3), 5]:
        with pytest.raises(TypeError, match="rows"):
            measure_layer(q, k, v, [1.0, 0.5], stride=4, block_size=16, backend="torch", rows=bad)


# ------------------------------------------------------------------------------------------
# Config, a cheap constructor, the budget search and degenerate calibrations


def test_config_checks_each_field_by_name():
    from xattention.calibration import CalibrationConfig

    for bad, match in [(dict(min_recall=1.5), "min_recall"), (dict(seq_len=0), "seq_len"),
                       (dict(proxy="kl"), "proxy"), (dict(method="greedy"), "method"),
                       (dict(max_kl=-1.0), "max_kl"), (dict(grid=[0.9, -0.1]), "grid"),
                       (dict(calib_windows=0), "calib_windows"), (dict(data="text"), "data"),
                       (dict(verify=False), "proxy_budget"),
                       (dict(reference_threshold=None), "reference_threshold or proxy_budget")]:
        with pytest.raises(ValueError, match=match):
            CalibrationConfig(**bad)
    with pytest.raises(TypeError, match="grid"):
        CalibrationConfig(grid="0.9,0.8")
    with pytest.raises(TypeError, match=r"unknown calibration option\(s\) \['seqlen'\]"):
        CalibrationConfig.build(seqlen=10)
    base = CalibrationConfig(seq_len=512)
    assert CalibrationConfig.build(base, stride=16) == CalibrationConfig(seq_len=512, stride=16)
    assert CalibrationConfig(grid=[0.5, 1.0, 0.5]).thresholds == [1.0, 0.5]


def test_calibrator_constructor_is_cheap():
    """Making a Calibrator neither measures nor touches torch's global random state."""
    from xattention.calibration import Calibrator

    model = _tiny_llama()
    state = torch.get_rng_state()
    cal = Calibrator(model, CharTokenizer(), _text(), log=None, seq_len=256, block_size=32)
    assert torch.equal(state, torch.get_rng_state())
    assert cal.layers == [0, 1] and cal.calib == []
    with pytest.raises(RuntimeError, match="measure"):
        cal.curves  # noqa: B018


def test_dp_tiny_budget_is_clean():
    # A budget far below every sparse option's cost: before the fix the unit count overflowed
    # int64 ("invalid value encountered in cast"); the zero-cost options must come back quietly.
    d = np.array([[1.0, 0.5, 0.2], [1.0, 0.4, 0.3]])
    c = np.array([[0.0, 0.3, 1.0], [0.0, 2.0, 3.0]])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = solve_dp(d, c, 3e-17)
    assert res.choice.tolist() == [0, 0] and res.cost == 0.0


def test_budget_ladder_stays_where_allocations_change():
    from xattention.calibration.search import budget_ladder

    rng = np.random.default_rng(5)
    d, c, recall = random_curves(rng, 6, 5)
    feasible = recall >= 0.8
    feasible[:, 0] = True
    ladder = budget_ladder(c, feasible, d, 8)
    cheapest_move = c[feasible & (c > 0)].min()
    lo, hi = cost_range(c, feasible, d)
    assert ladder[0] == lo and ladder[-1] == pytest.approx(hi)
    assert all(b >= cheapest_move * (1 - 1e-12) for b in ladder[1:])
    assert ladder == sorted(ladder)
    # Nothing to trade (every sparse option infeasible): the ladder is one rung.
    only_dense = np.zeros_like(feasible)
    only_dense[:, 0] = True
    assert budget_ladder(c, only_dense, d, 8) == [cost_range(c, only_dense, d)[0]]


def test_search_budget_finds_the_largest_acceptable_rung():
    """With a loss that grows with the proxy cost, the search returns the sparsest allocation
    of the ladder within the bound, probing each distinct allocation at most once."""
    from xattention.calibration.search import budget_ladder, search_budget

    rng = np.random.default_rng(11)
    d, c, recall = random_curves(rng, 5, 6)
    feasible = np.ones_like(d, dtype=bool)
    ladder = budget_ladder(c, feasible, d, 12)

    def allocate(b):
        return solve_dp(d, c, b, feasible, resolution=500)

    def evaluate(a):
        return {"kl": a.cost, "density": a.density / 5, "loss_increase": 0.0}

    bound = 0.5 * ladder[-1]
    probed = []
    res = search_budget(ladder, allocate, evaluate,
                        lambda m: probed.append(m["kl"]) or m["kl"] <= bound, refine=0, heads=5)
    allowed = [allocate(b) for b in ladder if allocate(b).cost <= bound]
    assert res.allocation.density == pytest.approx(min(a.density for a in allowed))
    assert res.metrics["kl"] <= bound and len(probed) == len(set(probed))
    assert 1 < res.distinct <= len(ladder) and all(p["budget"] in ladder for p in res.log)


def test_degeneracy_reasons():
    from xattention.calibration.search import degeneracy

    fine = {"calib_density": 0.3, "heldout_density": 0.32, "meets_budget": True,
            "uniform_reference": {"threshold": 0.9, "density": 0.35, "kl": 0.01}}
    assert degeneracy(fine, sparse_share=0.9, distinct=10, min_recall=0.8,
                      max_kl=0.01) == ([], [])
    dense = {**fine, "heldout_density": 0.995, "meets_budget": False}
    hard, soft = degeneracy(dense, sparse_share=0.1, distinct=1, min_recall=0.8, max_kl=0.01)
    assert len(hard) == 3 and "effectively dense (held-out density 0.995)" in hard[0]
    assert "10% of the heads" in hard[1] and "nothing to trade" in hard[2]
    assert len(soft) == 2 and "uniform threshold 0.9 is sparser (density 0.350)" in soft[0]
    # Denser than uniform but sparse: not degenerate, a caveat only.
    worse = {**fine, "heldout_density": 0.5}
    assert degeneracy(worse, sparse_share=0.9, distinct=5, min_recall=0.8, max_kl=0.01)[0] == []


def _sharp_tiny_llama():
    # Random weights attend almost uniformly; scaled-up q/k give peaked, sparse attention.
    model = _tiny_llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(20.0)
    return model


def test_degenerate_calibration_says_so():
    """A recall floor no sparse option meets gives a dense profile: a RuntimeWarning and the
    reasons in ``measured``; a floor that leaves options gives a sparse, quiet profile."""
    import warnings

    from xattention.calibration import calibrate

    model = _sharp_tiny_llama()
    kw = dict(stride=8, block_size=16, seq_len=512, calib_windows=1, heldout_windows=1,
              eval_tokens=128, grid=threshold_grid(1.0, 0.8, 6), ladder=6, refine=2,
              backend="torch", progress=False, log=None)
    with pytest.warns(RuntimeWarning, match="calibration is degenerate: the profile is "
                                            "effectively dense"):
        dense = calibrate(model, CharTokenizer(), _text(6000), min_recall=0.8, **kw)
    m = dense.measured
    assert m["degenerate"] and m["heldout_density"] >= 0.98
    assert any("uniform threshold 0.9 is sparser" in r for r in m["warnings"])
    assert m["uniform_reference"]["density"] < 0.9
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = calibrate(model, CharTokenizer(), _text(6000), min_recall=0.3, **kw)
    assert not any("calibration" in str(w.message) for w in caught)
    m = sparse.measured
    assert not m["degenerate"] and m["warnings"] == [] and m["meets_budget"]
    assert m["heldout_density"] < m["uniform_reference"]["density"]
    assert all(p["budget"] == 0 or p["budget"] >= 1e-9 for p in sparse.metadata["search"])
