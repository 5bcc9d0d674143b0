"""``xattention.eval``: RULER task generation and scoring, the suite runner, the report, the
fidelity tool and the CLI. Generation needs ``nvidia-long-context-eval`` and the SmolLM2 GGUF
tokenizer; those tests are skipped without them. The end-to-end run uses a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch
from inputs import needs_ruler, needs_smollm2, tiny_llama

pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------
# Scoring and task table
# ------------------------------------------------------------------------------------------


@needs_ruler
def test_scoring_matches_ruler_metrics():
    from xattention.eval import ruler

    root = ruler.package_dir()
    metrics = ruler._load_module(root / "eval" / "synthetic" / "constants.py")
    preds = ["The numbers are 1234 and 99.", "nothing", "PARIS is the capital", ""]
    refs = [["1234", "5678"], ["x"], ["paris", "lyon"], ["a"]]
    all_ref = metrics.string_match_all_per_sample(preds, refs)
    part_ref = metrics.string_match_part_per_sample(preds, refs)
    assert [ruler.score_sample("all", p, r) for p, r in zip(preds, refs, strict=True)] == all_ref
    assert [ruler.score_sample("part", p, r) for p, r in zip(preds, refs, strict=True)] == part_ref
    assert ruler.postprocess("  a\tb\x00c \n") == "a\nb\nc"
    with pytest.raises(ValueError):
        ruler.score_sample("exact", "a", ["a"])


@needs_ruler
def test_task_table():
    from xattention.eval import ruler

    cfgs = ruler.load_task_configs()
    assert set(ruler.ALL_TASKS) <= set(cfgs)
    assert cfgs["niah_single_1"].kind == "niah" and cfgs["niah_single_1"].metric == "all"
    assert cfgs["qa_1"].metric == "part" and cfgs["qa_1"].tokens_to_generate == 32
    assert cfgs["niah_multivalue"].args["num_needle_v"] == 4
    assert set(ruler.CPU_TASKS) <= set(ruler.DEFAULT_TASKS)


@needs_ruler
@needs_smollm2
def test_generate_samples(tokenizer, cache_dir):
    from xattention.eval import ruler

    for task in ("niah_single_1", "cwe"):
        samples = ruler.generate_samples(task, 1024, 2, tokenizer, seed=3, chat=True,
                                         cache_dir=cache_dir)
        assert len(samples) == 2
        for s in samples:
            prompt = ruler.build_prompt(s, tokenizer, chat=True)
            assert "@@XATTN" not in prompt
            n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
            budget = ruler.load_task_configs()[task].tokens_to_generate
            assert n + budget <= 1024 + 8
            assert prompt.rstrip().endswith(s.answer_prefix.strip())
            if task == "niah_single_1":
                assert s.outputs[0] in s.user and len(s.outputs) == 1
            else:
                assert len(s.outputs) == 10
    again = ruler.generate_samples("niah_single_1", 1024, 2, tokenizer, seed=3, chat=True,
                                   cache_dir=cache_dir)
    assert [s.user for s in again] == [s.user for s in
                                       ruler.generate_samples("niah_single_1", 1024, 2, tokenizer,
                                                              seed=3, chat=True,
                                                              cache_dir=cache_dir)]


@needs_ruler
@needs_smollm2
def test_prepare_command_fills_the_cache(tmp_path, monkeypatch):
    """`xattention eval prepare` leaves the samples where `eval ruler` looks for them."""
    from xattention.cli import main
    from xattention.eval import ruler
    from xattention.eval.models import load_tokenizer

    monkeypatch.setenv("XATTENTION_CACHE", str(tmp_path))
    assert main(["eval", "prepare", "--model", "smollm2", "--lengths", "1024", "--samples", "1",
                 "--tasks", "niah_single_1", "--seed", "5"]) == 0
    assert (tmp_path / "tokenizers" / "smollm2-gguf" / "tokenizer.json").exists()
    monkeypatch.setattr(ruler, "_run_generator", lambda *a, **k: pytest.fail("generated again"))
    samples = ruler.generate_samples("niah_single_1", 1024, 1, load_tokenizer("smollm2"), seed=5,
                                     chat=True)
    assert len(samples) == 1 and samples[0].outputs[0] in samples[0].user


@needs_smollm2
def test_tokenizer_is_checked_and_saved(tmp_path, monkeypatch):
    from xattention.eval import models

    monkeypatch.setenv("XATTENTION_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_gguf_vocab_size", lambda path: 12345)
    with pytest.raises(RuntimeError, match="converted the smollm2 GGUF tokenizer wrongly"):
        models.load_tokenizer("smollm2")
    assert not (tmp_path / "tokenizers").exists()

    monkeypatch.undo()
    monkeypatch.setenv("XATTENTION_CACHE", str(tmp_path))
    fresh = models.load_tokenizer("smollm2")  # from the GGUF, checked, then saved
    assert (tmp_path / "tokenizers" / "smollm2-gguf" / "tokenizer.json").exists()
    monkeypatch.setattr(models, "gguf_path", lambda name: pytest.fail("GGUF read again"))
    saved = models.load_tokenizer("smollm2")
    chat = [{"role": "user", "content": "Find the magic number: 42. What is it?"}]
    for tok in (fresh, saved):
        assert len(tok) == 49152
    text = fresh.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert saved.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
    assert saved(text).input_ids == fresh(text).input_ids


def test_length_guard_warns_once():
    from xattention import _backend
    from xattention.eval import runner

    _backend._warned.clear()
    ok = [{"prompt_tokens": 900}]
    runner._check_lengths(ok, 1024, 64, "m")  # fits: silent
    with pytest.warns(RuntimeWarning, match="not the one that generated"):
        runner._check_lengths([{"prompt_tokens": 1500}], 1024, 64, "m")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner._check_lengths([{"prompt_tokens": 1500}], 1024, 64, "m")  # already warned


@needs_ruler
@needs_smollm2
def test_generator_timeout_names_the_task(tokenizer, tmp_path, monkeypatch):
    from xattention.eval import ruler

    monkeypatch.setenv("XATTENTION_GENERATOR_TIMEOUT", "0.01")
    with pytest.raises(RuntimeError, match="qa_2 at .* did not finish"):
        ruler.generate_samples("qa_2", 1024, 1, tokenizer, cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------
# Runner + report, end to end on a tiny random model
# ------------------------------------------------------------------------------------------


@needs_ruler
@needs_smollm2
def test_run_suite_and_report(tokenizer, cache_dir, tmp_path, monkeypatch):
    from xattention.eval import report, runner

    monkeypatch.setenv("XATTENTION_CACHE", str(cache_dir))
    model = tiny_llama(len(tokenizer))
    methods = [runner.Method.full(), runner.Method(threshold=0.5, stride=8, block_size=64)]
    out = tmp_path / "res.jsonl"
    # seed=3: the samples test_generate_samples made are in the cache already.
    recs = runner.run_suite("smollm2", [1024], ["niah_single_1"], methods, num_samples=2,
                            out=out, backend="torch", max_new_tokens=3, progress=False,
                            loaded=(model, tokenizer), seed=3)
    assert len(recs) == 4 and {r["method"] for r in recs} == {"full", "xattn-t0.5-s8-b64"}
    sparse = [r for r in recs if r["method"] != "full"]
    assert all(0 < r["density"] < 1 for r in sparse)
    assert all(set(r["layer_density"]) == {"0", "1"} for r in sparse)
    assert all(r["new_tokens"] <= 3 for r in recs)
    # Resume: nothing left to do.
    assert runner.run_suite("smollm2", [1024], ["niah_single_1"], methods, num_samples=2,
                            out=out, backend="torch", max_new_tokens=3, progress=False,
                            loaded=(model, tokenizer), seed=3) == []
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert len(meta["runs"]) == 2 and "cpu_count" in meta["runs"][0]["machine"]

    summary = report.write_report([out], tmp_path / "rep")
    entry = summary["smollm2"]["1024"]
    assert entry["full"]["density"] == 1.0 and entry["full"]["n"] == 2
    assert entry["xattn-t0.5-s8-b64"]["density"] < 1
    md = (tmp_path / "rep" / "results.md").read_text()
    assert "xattn-t0.5-s8-b64" in md and "| 1024 | full |" in md
    assert (tmp_path / "rep" / "ruler.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "layer_density.png").stat().st_size > 1000


@needs_smollm2
@pytest.mark.parametrize("sparse", [False, True])
def test_batched_answers_match_one_by_one(tokenizer, sparse):
    """Left-padded batches give every prompt the answer it gets alone (dense and XAttention)."""
    from xattention.eval import runner
    from xattention.integrations import transformers as xt

    model = tiny_llama(len(tokenizer))
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rng = torch.Generator().manual_seed(1)
    prompts = [" ".join(words[int(i)] for i in torch.randint(0, 10, (n,), generator=rng))
               for n in (300, 170, 240)]
    if sparse:
        # block 64: the prompts span 3-5 blocks, so the padded rows shift the block grid.
        xt.enable(model, threshold=0.5, stride=8, block_size=64, backend="torch")
    try:
        alone = [runner._answer(model, tokenizer, [p], 6)[0] for p in prompts]
        if sparse:
            xt.reset_stats(model)
        batched = runner._answer(model, tokenizer, prompts, 6)
        if sparse:
            assert 0 < xt.last_stats(model).overall() < 1  # the sparse path really ran
    finally:
        xt.disable(model)
    lengths = [a[1] for a in alone]
    assert len(set(lengths)) == 3  # different lengths: the batch is padded
    assert batched == alone


@needs_ruler
@needs_smollm2
def test_run_suite_batches_and_profiles(tokenizer, cache_dir, tmp_path, monkeypatch):
    from xattention.calibration import ThresholdProfile
    from xattention.eval import runner

    monkeypatch.setenv("XATTENTION_CACHE", str(cache_dir))
    model = tiny_llama(len(tokenizer))
    profile = tmp_path / "tiny.json"
    ThresholdProfile(thresholds=[[0.5, 0.6, 0.7, 1.0], [0.8] * 4], stride=8, block_size=64,
                     model_id="tiny").save(profile)
    method = runner.Method.from_profile(profile, label="calibrated")
    assert (method.name, method.block_size, method.is_full) == ("calibrated", 64, False)
    assert runner.Method.from_profile(profile).name == "profile-tiny"
    methods = [runner.Method.full(), method]
    kwargs = dict(num_samples=2, backend="torch", max_new_tokens=3, progress=False,
                  loaded=(model, tokenizer), seed=3)
    one = runner.run_suite("smollm2", [1024], ["niah_single_1"], methods,
                           out=tmp_path / "one.jsonl", **kwargs)
    two = runner.run_suite("smollm2", [1024], ["niah_single_1"], methods,
                           out=tmp_path / "two.jsonl", batch_size=2, **kwargs)
    key = lambda r: (r["method"], r["index"])  # noqa: E731
    one, two = sorted(one, key=key), sorted(two, key=key)
    assert [key(r) for r in one] == [key(r) for r in two] and len(one) == 4
    assert [r["pred"] for r in one] == [r["pred"] for r in two]
    assert {r["density_scope"] for r in two if r["method"] == "calibrated"} == {"batch"}
    # A batch's pooled density is the mean over its sequences: equal to the one-by-one mean.
    for a, b in zip(one, two, strict=True):
        if a["method"] == "calibrated":
            assert 0 < b["density"] < 1
    mean_one = sum(r["density"] for r in one if r["method"] == "calibrated") / 2
    assert two[0]["density"] == pytest.approx(mean_one)
    with pytest.raises(ValueError, match="batch_size"):
        runner.run_suite("smollm2", [1024], ["niah_single_1"], methods,
                         out=tmp_path / "bad.jsonl", batch_size=0, **kwargs)


def test_summary_is_paired():
    from xattention.eval.report import markdown_table, summarize

    recs = [
        dict(model="m", length=2048, task="a", index=0, method="full", score=100.0, density=1.0),
        dict(model="m", length=2048, task="a", index=1, method="full", score=0.0, density=1.0),
        dict(model="m", length=2048, task="a", index=0, method="xattn-t0.9-s8", score=50.0,
             density=0.4, layer_density={"0": 0.3, "1": 0.5}),
        dict(model="m", length=2048, task="b", index=0, method="full", score=80.0, density=1.0),
        dict(model="m", length=2048, task="b", index=0, method="xattn-t0.9-s8", score=80.0,
             density=0.2, layer_density={"0": 0.1, "1": 0.3}),
    ]
    recs.append(dict(model="m", length=2048, task="b", index=1, method="xattn-t0.8-s8",
                     score=0.0, density=0.1))  # no full counterpart: not counted anywhere
    s = summarize(recs)["m"]["2048"]
    # Sample a#1 has no sparse counterpart: left out of the full row.
    assert s["full"]["tasks"] == {"a": 100.0, "b": 80.0} and s["full"]["n"] == 2
    assert s["xattn-t0.9-s8"]["average"] == pytest.approx(65.0)
    assert s["xattn-t0.9-s8"]["full_same"] == pytest.approx(90.0)
    assert s["xattn-t0.9-s8"]["delta_vs_full"] == pytest.approx(-25.0)
    assert "xattn-t0.8-s8" not in s
    assert s["xattn-t0.9-s8"]["density"] == pytest.approx(0.3)
    assert s["xattn-t0.9-s8"]["layer_density"] == {"0": pytest.approx(0.2),
                                                   "1": pytest.approx(0.4)}
    row = "| 2048 | xattn-t0.9-s8 | 50.0 | 80.0 | **65.0** | 90.0 | -25.0 ± 25.0 | 0.300 | 2 | 1 |"
    assert row in markdown_table({"m": {"2048": s}})


def test_methods():
    from xattention.eval.runner import Method, parse_methods

    ms = parse_methods([0.8, 0.9], [8, 16])
    assert [m.name for m in ms] == ["full", "xattn-t0.8-s8", "xattn-t0.9-s8", "xattn-t0.8-s16",
                                    "xattn-t0.9-s16"]
    assert Method(0.95, 8, 64).name == "xattn-t0.95-s8-b64"
    assert parse_methods([0.9], [8], include_full=False)[0].threshold == 0.9


# ------------------------------------------------------------------------------------------
# Fidelity
# ------------------------------------------------------------------------------------------


def test_attention_fidelity_measures():
    from xattention.eval.fidelity import attention_fidelity, plot_fidelity

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 300, 32, generator=g) * 2
    k = torch.randn(1, 2, 300, 32, generator=g) * 2
    v = torch.randn(1, 2, 300, 32, generator=g)
    ts = [0.3, 0.6, 0.9, 1.0]
    res = attention_fidelity(q, k, v, ts, stride=8, block_size=32, backend="torch")
    recall, err, dens = (torch.tensor(res[k]) for k in ("recall", "output_error", "density"))
    assert recall.shape == (4, 4)
    assert torch.allclose(recall[-1], torch.ones(4)) and (err[-1] < 1e-5).all()
    assert torch.allclose(dens[-1], torch.ones(4))
    assert (recall[1:] >= recall[:-1] - 1e-6).all() and (dens[1:] >= dens[:-1] - 1e-6).all()
    assert (recall[0] < 1).all() and (err[0] > 0).all()

    # Recall by brute force for threshold 0.6, head 3 (KV head 1).
    from xattention import xattention

    _, mask = xattention(q, k, v, threshold=0.6, stride=8, block_size=32, backend="torch",
                         return_mask=True)
    p = torch.softmax((q[0, 3] @ k[0, 1].T) / 32 ** 0.5 +
                      torch.full((300, 300), float("-inf")).triu(1), -1)
    rows, cols = torch.arange(300)[:, None] // 32, torch.arange(300)[None, :] // 32
    kept = mask[0, 3][rows, cols]
    assert recall[1, 3].item() == pytest.approx(float((p * kept).sum(-1).mean()), abs=1e-5)

    plot = {"model": "toy", "length": 300, "stride": 8, "block_size": 32, "layers": {"0": res}}
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        plot_fidelity(plot, Path(d) / "f.png")
        assert (Path(d) / "f.png").stat().st_size > 1000


def test_cli_registers_eval():
    from xattention.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["eval", "ruler", "--out", "x.jsonl", "--lengths", "2048",
                              "--thresholds", "0.9", "--strides", "8"])
    assert args.func is not None and args.length == [2048] and args.model == "smollm2"
    args = parser.parse_args(["eval", "fidelity", "--out", "f", "--layers", "0", "5"])
    assert args.layers == [0, 5]
    args = parser.parse_args(["eval", "report", "a.jsonl", "--out", "d"])
    assert args.results == ["a.jsonl"]


def test_summary_orders_methods_by_their_spec():
    """Labels say nothing about the setting: the order comes from each record's method_spec
    (full, then fixed thresholds by stride and threshold, then profiles)."""
    from dataclasses import asdict

    from xattention.eval.report import markdown_table, summarize
    from xattention.eval.runner import Method

    methods = {"calibrated": Method(threshold=None, profile="p.json", label="calibrated"),
               "zz-t0.9": Method(threshold=0.9, stride=8, label="zz-t0.9"),
               "aa-t0.8-s16": Method(threshold=0.8, stride=16, label="aa-t0.8-s16"),
               "mm-t0.5": Method(threshold=0.5, stride=8, label="mm-t0.5"),
               "full": Method.full()}
    recs = [dict(model="m", length=1024, task="a", index=0, method=name, score=50.0,
                 density=1.0, method_spec=asdict(m)) for name, m in methods.items()]
    s = summarize(recs)["m"]["1024"]
    assert list(s) == ["full", "mm-t0.5", "zz-t0.9", "aa-t0.8-s16", "calibrated"]
    assert s["zz-t0.9"]["spec"]["threshold"] == 0.9
    rows = [line.split(" | ")[1] for line in markdown_table({"m": {"1024": s}}).splitlines()
            if line.startswith("| 1024")]
    assert rows == list(s)
