"""Run the demo: build the inputs, time dense attention and XAttention, measure, tabulate."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..api import xattention
from ..block_layout import candidate_blocks, num_blocks
from ..stats import block_attention_mass, block_density
from ..synthetic import HeadProfile, structured_qkv
from .cli import DEFAULT_OUT

INSTALL_HINT = ('matplotlib is not installed; the PNG needs it: from the clone, '
                'pip install -e ".[demo]"')


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense causal attention with torch SDPA; K/V repeated for GQA."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[object, float]:
    """Run ``fn`` ``repeats`` times; return the last result and the median time in ms."""
    times, result = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return result, times[len(times) // 2]


@contextmanager
def cpu_threads(threads: int | None):
    """torch's intra-op thread count set to ``threads`` for the block (None: leave it)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class DemoRow:
    method: str
    threshold: float | None
    density: float
    rel_error: float
    recall: float
    time_ms: float
    mask: torch.Tensor | None = field(default=None, repr=False)  # [B, Hq, nQB, nKB], on CPU


@dataclass
class DemoResult:
    rows: list[DemoRow]
    mass: torch.Tensor  # true block mass, float32 [B, Hq, nQB, nKB], on CPU
    profiles: list[HeadProfile]
    config: dict
    png: Path | None = None
    png_skipped_reason: str | None = None

    def table(self) -> str:
        """The results as a fixed-width text table."""
        lines = [f"{'method':<14}{'threshold':>10}{'density':>9}{'rel_error':>11}"
                 f"{'recall':>8}{'time_ms':>10}"]
        for r in self.rows:
            thr = "-" if r.threshold is None else f"{r.threshold:g}"
            lines.append(f"{r.method:<14}{thr:>10}{r.density:>9.3f}{r.rel_error:>11.2e}"
                         f"{r.recall:>8.4f}{r.time_ms:>10.1f}")
        return "\n".join(lines)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def run_demo(
    seq_len: int = 4096,
    heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 64,
    thresholds: Sequence[float] = (0.9, 0.95),
    stride: int = 8,
    block_size: int = 128,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    backend: str = "auto",
    repeats: int | None = None,
    threads: int | None = None,
    out: str | Path | None = DEFAULT_OUT,
    plot_head: int = 0,
    progress: bool | None = None,
) -> DemoResult:
    """Build the structured inputs, run dense attention and XAttention, measure, and plot.

    Args:
        seq_len, heads, kv_heads, head_dim: the problem (batch 1, ``Lq == Lk``, causal).
        thresholds: XAttention thresholds to run, one table row each.
        stride, block_size: XAttention's antidiagonal stride and block edge.
        seed: seeds the inputs.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"float32"``, ``"float16"``,
            ``"bfloat16"``.
        backend: passed to ``xattention``.
        repeats: timed runs per method (median reported); default 3 on CPU, 10 on CUDA. Each
            method also runs once untimed first (on CPU on a short prefix, to keep the demo quick).
        threads: torch's CPU thread count during the run (restored after); None leaves it.
        out: PNG path, or None for no picture.
        plot_head: the query head the picture shows.
        progress: show a tqdm bar; None shows it when stderr is a terminal.

    Returns:
        a ``DemoResult``; ``rel_error`` is against a float32 dense reference and ``recall`` is
        the share of the true attention mass that falls in the kept blocks (mean over heads and
        query blocks).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 0 <= plot_head < heads:
        raise ValueError(f"plot_head must be in [0, {heads}), got {plot_head}")
    if not thresholds:
        raise ValueError("thresholds must name at least one threshold")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    repeats = repeats if repeats is not None else (10 if dev.type == "cuda" else 3)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with cpu_threads(threads):
        rows, mass, profiles = _measure(seq_len, heads, kv_heads, head_dim, thresholds, stride,
                                        block_size, seed, dev, dt, backend, repeats, progress)
        used_threads = torch.get_num_threads()
    config = dict(seq_len=seq_len, batch=1, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                  stride=stride, block_size=block_size, seed=seed, device=str(dev),
                  dtype=str(dt).removeprefix("torch."), backend=backend, repeats=repeats,
                  threads=used_threads)
    result = DemoResult(rows, mass, profiles, config)
    if out is not None:
        try:
            from .plot import plot_demo

            result.png = plot_demo(result, out, plot_head)
        except ImportError:
            result.png_skipped_reason = INSTALL_HINT
    return result


def _measure(seq_len, heads, kv_heads, head_dim, thresholds, stride, block_size, seed, dev, dt,
             backend, repeats, progress):
    nqb = num_blocks(seq_len, block_size)
    bar = tqdm(total=2 + len(thresholds) + seq_len, desc="inputs", unit="step", leave=False,
               file=sys.stderr, disable=None if progress is None else not progress)

    q32, k32, v32, profiles = structured_qkv(1, heads, kv_heads, seq_len, seq_len, head_dim,
                                             seed=seed)
    q32, k32, v32 = q32.to(dev), k32.to(dev), v32.to(dev)
    q, k, v = q32.to(dt), k32.to(dt), v32.to(dt)
    bar.update(1)

    def warm(fn_small: Callable[[], object], fn_full: Callable[[], object]) -> None:
        (fn_full if dev.type == "cuda" else fn_small)()
        _sync(dev)

    short = min(seq_len, 2 * block_size)
    qs, ks, vs = q[:, :, :short], k[:, :, :short], v[:, :, :short]

    bar.set_description("dense (SDPA)")
    # K/V repeated for GQA once, outside the timing: the dense row times SDPA alone.
    group = heads // kv_heads
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

    def sdpa(qq=q, kk=kr, vv=vr):
        return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)

    warm(lambda: sdpa(qs, ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)), sdpa)
    ref, dense_ms = time_ms(sdpa, dev, repeats)
    ref32 = ref.float() if dt == torch.float32 else dense_attention(q32, k32, v32)
    ref_norm = ref32.norm().item()

    def rel_error(o: torch.Tensor) -> float:
        return (o.float() - ref32).norm().item() / max(ref_norm, 1e-30)

    bar.update(1)

    results = []
    for thr in thresholds:
        bar.set_description(f"xattention {thr:g}")

        def run(qq=q, kk=k, vv=v, thr=thr):
            return xattention(qq, kk, vv, threshold=thr, stride=stride, block_size=block_size,
                              causal=True, backend=backend, return_mask=True)

        warm(lambda run=run: run(qs, ks, vs), run)
        (o, mask), ms = time_ms(run, dev, repeats)
        results.append((thr, rel_error(o), mask, ms))
        bar.update(1)

    bar.set_description("true block mass")
    mass = block_attention_mass(q32, k32, block_size, progress=bar.update).cpu()
    bar.close()

    cand = candidate_blocks(seq_len, seq_len, block_size, True)
    rows = [DemoRow("dense (SDPA)", None, 1.0, rel_error(ref), 1.0, dense_ms,
                    cand.expand(1, heads, nqb, nqb).clone())]
    for thr, err, mask, ms in results:
        mask = mask.cpu()
        density = block_density(mask, seq_len, seq_len, block_size)["overall"]
        recall = (mass * mask).sum(-1).mean().item()
        rows.append(DemoRow("xattention", thr, density, err, recall, ms, mask))
    return rows, mass, profiles
