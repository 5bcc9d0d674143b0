"""Attention fidelity: how much of the true attention XAttention keeps, per head and threshold.

From a real prompt, the q/k/v that chosen layers receive are captured
(:func:`xattention.integrations.transformers.capture_attention_inputs`); then, for every
threshold of a grid and every query head:

* **recall**: the share of the true (dense softmax) attention mass that falls in the kept
  blocks, averaged over query rows. 1.0 means nothing the head attends to was dropped.
* **output error**: ``||O_xattn - O_dense||_F / ||O_dense||_F`` over the head's rows.
* **density**: kept blocks over causal candidate blocks (:func:`xattention.block_density`).

>>> from xattention.eval.fidelity import attention_fidelity
>>> import torch
>>> q, k, v = (torch.randn(1, 4, 512, 64) for _ in range(3))
>>> res = attention_fidelity(q, k, v, [0.5, 1.0], stride=8, block_size=64, backend="torch")
>>> res["recall"][-1]   # threshold 1.0 keeps everything
[1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..api import xattention
from ..stats import block_density

__all__ = ["DEFAULT_THRESHOLDS", "attention_fidelity", "haystack_ids", "run_fidelity",
           "plot_fidelity"]

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)


def _block_mass(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of one head: (mass per key block ``[Lq, nKB]``, probabilities ``[Lq, Lk]``).

    ``q [Lq, D]``, ``k [Lk, D]``, float32.
    """
    lq, lk = q.shape[0], k.shape[0]
    logits = (q @ k.T) * scale
    if causal:
        rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        logits.masked_fill_(torch.arange(lk, device=q.device)[None, :] > rows, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    nkb = -(-lk // block_size)
    pad = nkb * block_size - lk
    mass = torch.nn.functional.pad(p, (0, pad)).view(lq, nkb, block_size).sum(-1)
    return mass, p


@torch.no_grad()
def attention_fidelity(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    stride: int = 8,
    block_size: int = 128,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """Per-head recall, output error and density of XAttention for every threshold.

    Args:
        q: ``[1, Hq, Lq, D]``; k, v: ``[1, Hkv, Lk, D]`` (one sequence).

    Returns:
        ``{"thresholds": [...], "recall": [[per head] per threshold], "output_error": ...,
        "density": ...}`` (plain lists, JSON-ready).
    """
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"q must be [1, Hq, Lq, D] (one sequence), got {tuple(q.shape)}")
    hq, lq, d = q.shape[1], q.shape[2], q.shape[3]
    hkv, lk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    group = hq // hkv
    scale = d ** -0.5 if scale is None else float(scale)
    qf, kf, vf = q[0].float(), k[0].float(), v[0].float()

    masses, dense_out = [], []
    for h in range(hq):
        mass, p = _block_mass(qf[h], kf[h // group], scale, block_size, causal)
        masses.append(mass)
        dense_out.append(p @ vf[h // group])
        del p
    rows_block = torch.arange(lq, device=q.device) // block_size

    result: dict[str, Any] = {"thresholds": [float(t) for t in thresholds], "recall": [],
                              "output_error": [], "density": []}
    for t in thresholds:
        out, mask = xattention(q, k, v, threshold=float(t), stride=stride, block_size=block_size,
                               causal=causal, scale=scale, backend=backend, return_mask=True)
        recall, err = [], []
        for h in range(hq):
            kept = mask[0, h][rows_block].to(masses[h].dtype)  # [Lq, nKB]
            recall.append(float((masses[h] * kept).sum(-1).mean()))
            ref = dense_out[h]
            err.append(float((out[0, h].float() - ref).norm() / ref.norm().clamp_min(1e-30)))
        dens = block_density(mask, lq, lk, block_size=block_size, causal=causal)["per_head"]
        result["recall"].append([round(x, 6) for x in recall])
        result["output_error"].append([round(x, 7) for x in err])
        result["density"].append([round(float(x), 6) for x in dens])
    return result


def haystack_ids(tokenizer: Any, length: int, seed: int = 0) -> torch.Tensor:
    """``[1, length]`` token ids of real prose: Paul Graham essays (RULER's haystack) from a
    seeded random starting point."""
    from .ruler import load_haystack

    text = load_haystack()
    rng = random.Random(seed)
    # ~4 characters a token: start early enough that `length` tokens remain.
    start = rng.randrange(0, max(1, len(text) - length * 6))
    ids = tokenizer(text[start:start + length * 8], add_special_tokens=False).input_ids[:length]
    if len(ids) < length:
        raise ValueError(f"the haystack is shorter than {length} tokens from offset {start}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", True):
        ids = [bos, *ids[:-1]]
    return torch.tensor([ids])


def run_fidelity(
    model_name: str,
    *,
    length: int = 4096,
    layers: Sequence[int] | None = None,
    thresholds: Sequence[float] | None = None,
    stride: int = 8,
    block_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    out: str | Path,
    loaded: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Capture q/k/v on a real prompt, measure fidelity per layer, write ``out.json``/``out.png``.

    Example:
        >>> run_fidelity("smollm2", length=2048, layers=[0, 15, 29],
        ...              out="eval/results/fidelity-smollm2")   # doctest: +SKIP
    """
    from ..integrations import transformers as xt
    from .models import load_model
    from .records import machine_info

    torch.manual_seed(seed)
    model, tok = loaded if loaded is not None else load_model(model_name, device=device,
                                                              dtype=dtype)
    thresholds = list(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    all_layers = xt.attention_layers(model)
    if layers is None:
        sliding = xt.sliding_layers(model, length)
        full = [i for i in sorted(all_layers) if i not in sliding]
        picks = sorted({full[round(j * (len(full) - 1) / 3)] for j in range(4)}) \
            if len(full) > 4 else full
        layers = picks
    layers = [int(i) for i in layers]
    ids = haystack_ids(tok, length, seed).to(device)
    caps = xt.capture_attention_inputs(model, ids, layers=layers)
    scales = {i: float(getattr(all_layers[i][0], "scaling", caps[i][0].shape[-1] ** -0.5))
              for i in layers}
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    per_layer = {}
    for i in tqdm(layers, desc=f"{model_name} fidelity"):
        q, k, v = caps[i]
        per_layer[str(i)] = attention_fidelity(q, k, v, thresholds, stride=stride,
                                               block_size=block_size, scale=scales[i],
                                               backend=backend)
    result = {"model": model_name, "length": length, "stride": stride, "block_size": block_size,
              "seed": seed, "prompt": "Paul Graham essays (RULER haystack)",
              "layers": per_layer, "machine": machine_info(device)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1))
    plot_fidelity(result, out.with_name(out.name + ".png"))
    return result


def plot_fidelity(result: dict[str, Any], path: str | Path) -> None:
    """Recall, density and output error against the threshold: one colour per layer, thin
    lines per head, thick lines the head mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    metrics = [("recall", "recall of attention mass"), ("density", "block density"),
               ("output_error", "relative output error")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (layer, res) in enumerate(result["layers"].items()):
        ts = res["thresholds"]
        color = colors[n % len(colors)]
        for ax, (key, _) in zip(axes, metrics, strict=True):
            values = torch.tensor(res[key])  # [thresholds, heads]
            for h in range(values.shape[1]):
                ax.plot(ts, values[:, h], color=color, alpha=0.25, linewidth=0.8)
            ax.plot(ts, values.mean(1), color=color, linewidth=2.2, marker="o", markersize=3,
                    label=f"layer {layer}")
    for ax, (key, title) in zip(axes, metrics, strict=True):
        ax.set_xlabel("threshold")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key == "output_error":
            ax.set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"XAttention fidelity: {result['model']}, {result['length']} tokens, "
                 f"stride {result['stride']}, block {result['block_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
