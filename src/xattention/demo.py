"""``xattention demo``: XAttention against dense attention on synthetic, LLM-like attention.

The demo builds seeded Q/K/V whose attention has the structure real LLM heads show (attention
sinks, local windows, a few heavy "vertical" keys, diagonal "slash" lines, topic segments that
queries retrieve from far back, and noise), then runs dense causal attention (``torch`` SDPA) and
XAttention at a few thresholds, and reports per method: block density, relative output error,
recall of the true attention mass by the kept blocks, and time. With matplotlib (the ``[demo]``
extra) it also draws, for one head, the true attention mass per block next to the selected masks.

Memory stays bounded: the true per-block mass is computed for a chunk of query blocks at a time,
never as the full ``L x L`` matrix for all heads.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .api import xattention
from .block_layout import candidate_blocks, num_blocks
from .stats import block_density

DEFAULT_OUT = "xattention_demo.png"
# Bytes of float32 logits held at once while computing the true block mass (~64 MiB).
_MASS_CHUNK_BYTES = 64 << 20


# --------------------------------------------------------------------------------------------
# Synthetic inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadProfile:
    """How strongly one query head follows each pattern (all in logit units)."""

    kind: str
    local: float  # peak logit of the local window
    window: float  # local window width, tokens
    sink: float  # logit boost towards the sink tokens
    vertical: float  # logit boost towards the heavy "vertical" keys
    topic: float  # logit boost towards earlier keys of the same topic segment
    slash: float = 0.0  # peak logit of a diagonal line at distance `slash_offset`
    slash_offset: int = 0


def head_profiles(n_heads: int, seq_len: int, gen: torch.Generator) -> list[HeadProfile]:
    """Cycle through four archetypes, each jittered, so heads (even within a GQA group) differ."""

    def jitter(x: float) -> float:
        return x * (0.85 + 0.3 * torch.rand((), generator=gen).item())

    profiles = []
    for h in range(n_heads):
        kind = ("slash", "local", "vertical", "mixed")[h % 4]
        if kind == "mixed":
            p = HeadProfile(kind, jitter(6.4), jitter(48), jitter(10.4), jitter(3.6), jitter(4.5))
        elif kind == "local":
            p = HeadProfile(kind, jitter(9.6), jitter(24), jitter(11.0), jitter(1.2), jitter(1.5))
        elif kind == "vertical":
            p = HeadProfile(kind, jitter(5.6), jitter(96), jitter(9.1), jitter(5.2), jitter(3.0))
        else:
            offset = int(seq_len * (0.1 + 0.2 * torch.rand((), generator=gen).item()))
            p = HeadProfile(kind, jitter(6.4), jitter(32), jitter(9.75), jitter(2.0), jitter(2.25),
                            slash=jitter(7.0), slash_offset=max(1, offset))
        profiles.append(p)
    return profiles


def _layout(head_dim: int) -> tuple[int, int, int]:
    """(frequencies, topics, noise dims) of the feature layout; 2 more dims hold sink/vertical."""
    n_topics = max(1, head_dim // 10)
    n_noise = max(2, head_dim // 8)
    n_freq = min(32, (head_dim - 2 - n_topics - n_noise) // 2)
    return n_freq, n_topics, head_dim - 2 - n_topics - 2 * n_freq


def make_structured_qkv(
    seq_len: int = 4096,
    heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 64,
    seed: int = 0,
    batch: int = 1,
    noise: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[HeadProfile]]:
    """Seeded float32 CPU tensors ``q [B, heads, L, D]``, ``k, v [B, kv_heads, L, D]`` + profiles.

    The logit ``q . k / sqrt(D)`` of query position ``p`` and key position ``c`` is the sum of

    * a local window: ``local * K(p - c)``, ``K`` a Laplacian-like bump of the head's width made
      from random Fourier features (so it also has the faint long-range ripples RoPE models show);
    * a slash line (some heads): the same bump centred at ``p - c = slash_offset``;
    * sinks: the first 4 tokens get ``sink`` from most queries;
    * verticals: runs of 1-6 keys, one per ~512 tokens, get ``vertical`` from most queries;
    * topics: the text is cut into segments of 64-512 tokens, each on one of a few topics; a query
      gets ``topic`` towards every key of its own topic (retrieval from far back);
    * noise: logit noise of standard deviation ``noise``, from dimensions of their own.

    Every feature lives in its own coordinates; a random rotation per KV head then mixes them, so
    the tensors look unstructured while every dot product stays exact.
    """
    if head_dim < 16:
        raise ValueError(f"head_dim must be >= 16 for the demo's inputs, got {head_dim}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    n_freq, n_topics, n_noise = _layout(head_dim)
    group = heads // kv_heads
    profiles = head_profiles(heads, seq_len, gen)
    pos = torch.arange(seq_len, dtype=torch.float64)

    # Where each feature sits before the rotation.
    f_sl = slice(0, 2 * n_freq)
    d_sink, d_vert = 2 * n_freq, 2 * n_freq + 1
    t_sl = slice(d_vert + 1, d_vert + 1 + n_topics)
    n_sl = slice(t_sl.stop, head_dim)

    # Topic segments (shared by all heads: they describe the text).
    seg_topic = torch.empty(seq_len, dtype=torch.long)
    start = 0
    while start < seq_len:
        length = int(64 + 448 * rand(()).item())
        seg_topic[start : start + length] = int(torch.randint(n_topics, (), generator=gen))
        start += length
    topic_onehot = F.one_hot(seg_topic, n_topics).to(torch.float64)

    # Sinks and vertical keys (shared too: they are properties of the tokens).
    sink_w = torch.zeros(seq_len, dtype=torch.float64)
    sink_w[:4] = torch.tensor([1.0, 0.6, 0.45, 0.35], dtype=torch.float64)[: min(4, seq_len)]
    # Vertical keys come in short runs (a few tokens, like a key phrase or a separator).
    vert_w = torch.zeros(seq_len, dtype=torch.float64)
    for start in (4 + torch.randperm(max(1, seq_len - 4), generator=gen)[: max(2, seq_len // 512)]):
        run = int(torch.randint(1, 7, (), generator=gen))
        vert_w[start : start + run] = 0.6 + 0.4 * rand(()).item()

    q = torch.zeros(batch, heads, seq_len, head_dim, dtype=torch.float64)
    k = torch.zeros(batch, kv_heads, seq_len, head_dim, dtype=torch.float64)
    for g in range(kv_heads):
        # Stratified log-uniform frequencies, from the whole sequence down to ~3 tokens.
        lo, hi = math.log(2 * math.pi / max(seq_len, 8)), math.log(2 * math.pi / 3)
        omega = torch.exp(lo + (hi - lo) * (torch.arange(n_freq) + rand(n_freq)) / n_freq)
        ang = pos[:, None] * omega[None, :]
        k[:, g, :, f_sl] = torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)
        k[:, g, :, d_sink] = sink_w
        k[:, g, :, d_vert] = vert_w
        k[:, g, :, t_sl] = topic_onehot
        k[:, g, :, n_sl] = randn(batch, seq_len, n_noise) * noise**0.5 / n_noise**0.25
        for h in range(g * group, (g + 1) * group):
            p = profiles[h]
            # Spectral weights of a Laplacian kernel exp(-|d|/w), for log-spaced samples.
            amp = omega * p.window / (1 + (omega * p.window) ** 2)
            amp = amp / amp.sum()
            q_pos = p.local * torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1) * amp.repeat(2)
            if p.slash:
                shifted = (pos[:, None] - p.slash_offset) * omega[None, :]
                q_pos += p.slash * torch.cat([torch.cos(shifted), torch.sin(shifted)], dim=-1) * (
                    amp.repeat(2)
                )
            q[:, h, :, f_sl] = q_pos
            # Most queries look at the sinks and the verticals, with varying strength.
            q[:, h, :, d_sink] = p.sink * (rand(batch, seq_len) < 0.85) * (0.7 + 0.6 * rand(
                batch, seq_len))
            q[:, h, :, d_vert] = p.vertical * (0.5 + rand(batch, seq_len)) / 0.8
            q[:, h, :, t_sl] = p.topic * topic_onehot
            q[:, h, :, n_sl] = randn(batch, seq_len, n_noise) * noise**0.5 / n_noise**0.25
        # Mix the coordinates: the same rotation for the KV head and its query heads.
        rot, _ = torch.linalg.qr(randn(head_dim, head_dim))
        k[:, g] = k[:, g] @ rot
        q[:, g * group : (g + 1) * group] = q[:, g * group : (g + 1) * group] @ rot
    v = randn(batch, kv_heads, seq_len, head_dim)
    # q . k * D**-0.5 must equal the logits designed above.
    s = head_dim**0.25
    return (q * s).float(), (k * s).float(), v.float(), profiles


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense causal attention with torch SDPA; K/V repeated for GQA."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def true_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Exact causal attention mass per block, float32 ``[B, Hq, nQB, nKB]``.

    Entry ``(i, j)`` is the attention probability that the rows of query block ``i`` put on key
    block ``j``, averaged over those rows (so every block row sums to 1). Works on a chunk of query
    blocks at a time: at most ~64 MiB of logits, whatever the length. ``progress(n)`` is called
    after each chunk with the number of query blocks done.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    nqb, nkb = num_blocks(lq, block_size), num_blocks(lk, block_size)
    scale = d**-0.5
    kf = F.pad(k.float(), (0, 0, 0, nkb * block_size - lk)).unsqueeze(2)  # [B, Hkv, 1, Lk', D]
    key_pos = torch.arange(nkb * block_size, device=q.device)
    mass = torch.empty(b, hq, nqb, nkb, dtype=torch.float32, device=q.device)
    bytes_per_block = 4 * b * hq * block_size * nkb * block_size
    step = max(1, _MASS_CHUNK_BYTES // bytes_per_block)
    for i0 in range(0, nqb, step):
        i1 = min(nqb, i0 + step)
        r0, r1 = i0 * block_size, min(lq, i1 * block_size)
        qc = q[:, :, r0:r1].float().unflatten(1, (hkv, group))
        logits = torch.matmul(qc, kf.transpose(-1, -2)) * scale  # [B, Hkv, G, rows, Lk']
        rows = torch.arange(r0, r1, device=q.device) + (lk - lq)
        logits.masked_fill_(key_pos[None, :] > rows[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).flatten(1, 2)  # [B, Hq, rows, Lk']
        per_key_block = probs.unflatten(-1, (nkb, block_size)).sum(-1)  # [B, Hq, rows, nKB]
        pad = (i1 - i0) * block_size - (r1 - r0)
        per_key_block = F.pad(per_key_block, (0, 0, 0, pad))
        summed = per_key_block.unflatten(-2, (i1 - i0, block_size)).sum(-2)
        first_rows = torch.arange(i0, i1, device=q.device) * block_size
        counts = torch.clamp(r1 - first_rows, max=block_size).to(summed.dtype)
        mass[:, :, i0:i1] = summed / counts[:, None]
        if progress is not None:
            progress(i1 - i0)
    return mass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[object, float]:
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
        repeats: timed runs per method (median reported); default 1 on CPU, 10 on CUDA. Each
            method also runs once untimed first (on CPU on a short prefix, to keep the demo quick).
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
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    repeats = repeats if repeats is not None else (10 if dev.type == "cuda" else 1)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    nqb, nkb = num_blocks(seq_len, block_size), num_blocks(seq_len, block_size)

    total = 2 + len(thresholds) + nqb
    bar = tqdm(total=total, desc="inputs", unit="step", leave=False, file=sys.stderr,
               disable=None if progress is None else not progress)

    q32, k32, v32, profiles = make_structured_qkv(seq_len, heads, kv_heads, head_dim, seed)
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
    ref, dense_ms = _time_ms(sdpa, dev, repeats)
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
        (o, mask), ms = _time_ms(run, dev, repeats)
        results.append((thr, rel_error(o), mask, ms))
        bar.update(1)

    bar.set_description("true block mass")
    mass = true_block_mass(q32, k32, block_size, progress=bar.update).cpu()
    bar.close()

    cand = candidate_blocks(seq_len, seq_len, block_size, True)
    rows = [DemoRow("dense (SDPA)", None, 1.0, rel_error(ref), 1.0, dense_ms,
                    cand.expand(1, heads, nqb, nkb).clone())]
    for thr, err, mask, ms in results:
        mask = mask.cpu()
        density = block_density(mask, seq_len, seq_len, block_size)["overall"]
        recall = (mass * mask).sum(-1).mean().item()
        rows.append(DemoRow("xattention", thr, density, err, recall, ms, mask))

    config = dict(seq_len=seq_len, batch=1, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                  stride=stride, block_size=block_size, seed=seed, device=str(dev),
                  dtype=str(dt).removeprefix("torch."), backend=backend, repeats=repeats)
    result = DemoResult(rows, mass, profiles, config)
    if out is not None:
        try:
            result.png = plot_demo(result, out, plot_head)
        except ImportError:
            result.png_skipped_reason = (
                'matplotlib is not installed; the PNG needs `pip install "xattention[demo]"`'
            )
    return result


# --------------------------------------------------------------------------------------------
# Picture
# --------------------------------------------------------------------------------------------


def plot_demo(result: DemoResult, out: str | Path, head: int = 0) -> Path:
    """Save the true block mass of ``head`` next to the kept blocks of each threshold as PNG.

    Raises ImportError when matplotlib is missing.
    """
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm, to_rgba
    from matplotlib.figure import Figure

    cfg = result.config
    seq_len, bs = cfg["seq_len"], cfg["block_size"]
    cand = candidate_blocks(seq_len, seq_len, bs, True).numpy()
    mass = result.mass[0, head].double().numpy()
    sparse_rows = [r for r in result.rows if r.threshold is not None]

    panels = 1 + len(sparse_rows)
    fig = Figure(figsize=(3.9 * panels + 0.6, 4.4), dpi=110)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    extent = (-0.5, mass.shape[1] - 0.5, mass.shape[0] - 0.5, -0.5)

    shown = np.where(cand, np.maximum(mass, 1e-6), np.nan)
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#f2f2f2")
    im = axes[0].imshow(shown, cmap=cmap, norm=LogNorm(vmin=1e-4, vmax=1.0),
                        interpolation="nearest", extent=extent)
    axes[0].set_title(f"true attention mass per block\nhead {head} ({result.profiles[head].kind})",
                      fontsize=10)
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.03)

    kept_rgba = np.array(to_rgba("#1f6fb4"))
    dropped_rgba = np.array(to_rgba("#ffffff"))
    outside_rgba = np.array(to_rgba("#f2f2f2"))
    for ax, row in zip(axes[1:], sparse_rows, strict=True):
        mask = row.mask[0, head].numpy()
        img = np.where(mask[..., None], kept_rgba, dropped_rgba)
        img = np.where(cand[..., None], img, outside_rgba)
        ax.imshow(img, interpolation="nearest", extent=extent)
        head_density = mask[cand].mean()
        head_recall = (mass * mask).sum(-1).mean()
        ax.set_title(f"XAttention blocks kept, threshold {row.threshold:g}\n"
                     f"head density {head_density:.2f}, mass recall {head_recall:.3f}",
                     fontsize=10)
    for ax in axes:
        ax.set_xlabel(f"key block ({bs} tokens)")
        ax.set_ylabel("query block")
    fig.suptitle(f"XAttention demo: L={seq_len}, stride {cfg['stride']}, block {bs}; "
                 "grey = causally masked", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _threshold(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"thresholds must be finite and > 0, got {text}")
    return value


def register_cli(subparsers) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser(
        "demo",
        help="compare XAttention with dense attention on synthetic LLM-like attention",
        description="Run dense causal attention and XAttention on seeded, LLM-like Q/K/V "
        "(sinks, local windows, vertical keys, slash lines, topic retrieval, noise); print "
        "density, output error, attention-mass recall and time, and draw the block masks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seq-len", type=_positive_int, default=4096, help="tokens (Lq = Lk)")
    p.add_argument("--heads", type=_positive_int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=_positive_int, default=2, help="key/value heads (GQA)")
    p.add_argument("--head-dim", type=_positive_int, default=64)
    p.add_argument("--thresholds", type=_threshold, nargs="+", default=[0.9, 0.95],
                   metavar="T", help="XAttention thresholds, one table row each")
    p.add_argument("--stride", type=_positive_int, default=8, help="antidiagonal stride")
    p.add_argument("--block-size", type=_positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                   default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="XAttention implementation")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed runs per method, median reported (default: 1 on CPU, 10 on CUDA)")
    p.add_argument("--out", default=DEFAULT_OUT, help="PNG to write ('' for none)")
    p.add_argument("--plot-head", type=int, default=0, help="query head shown in the PNG")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        result = run_demo(
            seq_len=args.seq_len, heads=args.heads, kv_heads=args.kv_heads,
            head_dim=args.head_dim, thresholds=args.thresholds, stride=args.stride,
            block_size=args.block_size, seed=args.seed, device=args.device, dtype=args.dtype,
            backend=args.backend, repeats=args.repeats, out=args.out or None,
            plot_head=args.plot_head, progress=False if args.no_progress else None,
        )
    except (ValueError, TypeError) as exc:
        print(f"xattention demo: error: {exc}", file=sys.stderr)
        return 2
    cfg = result.config
    print(f"XAttention demo: B=1, L={cfg['seq_len']}, {cfg['heads']} query / {cfg['kv_heads']} "
          f"KV heads, head_dim {cfg['head_dim']}, causal; stride {cfg['stride']}, block "
          f"{cfg['block_size']}; {cfg['device']}, {cfg['dtype']}, seed {cfg['seed']}")
    print()
    print(result.table())
    print()
    print("density: kept / causally visible blocks. rel_error: ||out - ref|| / ||ref|| against "
          "float32 dense attention.\nrecall: share of the true attention mass inside the kept "
          f"blocks. time_ms: median of {cfg['repeats']} run(s).")
    if cfg["device"] == "cpu":
        print("On CPU XAttention runs its PyTorch reference path, which masks blocks rather than "
              "skipping them:\nit is not faster than dense there. The speed comes from the "
              "Triton kernels on a GPU.")
    if result.png is not None:
        print(f"wrote {result.png}")
    elif result.png_skipped_reason:
        print(result.png_skipped_reason)
    return 0
