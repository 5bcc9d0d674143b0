"""Seeded synthetic Q/K/V whose attention has the structure real LLM heads show.

One generator serves the demo, the tests and the benchmarks. The logit ``q . k / sqrt(D)`` of a
query at absolute position ``p`` and a key at position ``c`` is the sum of

* a **local window**: ``local * K(p - c)``, ``K`` a Laplacian-like bump of the head's width built
  from random Fourier features (so it also has the faint long-range ripples RoPE models show);
* a **slash line** (some heads): the same bump centred at ``p - c = slash_offset``;
* **sinks**: the first 4 tokens get ``sink`` from most queries;
* **heavy keys** ("verticals"): runs of 1-6 keys, about one per 512 tokens, get ``vertical``
  from most queries;
* **retrieved passages**: the text is cut into segments of 64-512 tokens, each on one of a few
  topics; a query gets ``topic`` towards every key of its own topic, however far back;
* **noise** of standard deviation ``noise``, from dimensions of its own.

Every feature lives in its own coordinates; a random rotation per KV head then mixes them, so the
tensors look unstructured while every dot product stays as designed. Queries are the last ``Lq``
of ``Lk`` positions (``Lq < Lk`` is chunked prefill), any length works, and query heads of one
GQA group share their KV head's rotation but follow different, jittered head profiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["HeadProfile", "StructuredQKV", "head_profiles", "structured_qkv"]

MIN_HEAD_DIM = 8


@dataclass(frozen=True)
class HeadProfile:
    """How strongly one query head follows each pattern (all in logit units)."""

    kind: str
    local: float  # peak logit of the local window
    window: float  # local window width, tokens
    sink: float  # logit boost towards the sink tokens
    vertical: float  # logit boost towards the heavy keys
    topic: float  # logit boost towards earlier keys of the same topic segment
    slash: float = 0.0  # peak logit of a diagonal line at distance `slash_offset`
    slash_offset: int = 0


class StructuredQKV(NamedTuple):
    """``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]`` and the profile of every query head."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    profiles: list[HeadProfile]


def head_profiles(n_heads: int, seq_len: int, gen: torch.Generator) -> list[HeadProfile]:
    """Cycle through four archetypes, each jittered, so heads (even within a GQA group) differ."""

    def jitter(x: float) -> float:
        return x * (0.85 + 0.3 * torch.rand((), generator=gen, device=gen.device).item())

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
            u = torch.rand((), generator=gen, device=gen.device).item()
            offset = int(seq_len * (0.1 + 0.2 * u))
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


def _check(batch: int, heads: int, kv_heads: int, q_len: int, k_len: int, head_dim: int) -> None:
    for name, value in (("batch", batch), ("heads", heads), ("kv_heads", kv_heads),
                        ("q_len", q_len), ("k_len", k_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if q_len > k_len:
        raise ValueError(f"q_len ({q_len}) must not exceed k_len ({k_len})")
    if head_dim < MIN_HEAD_DIM:
        raise ValueError(f"head_dim must be >= {MIN_HEAD_DIM} for structured inputs, got "
                         f"{head_dim}")


def structured_qkv(
    batch: int = 1,
    heads: int = 8,
    kv_heads: int = 2,
    q_len: int = 4096,
    k_len: int | None = None,
    head_dim: int = 64,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    noise: float = 1.0,
    sink_scale: float = 1.0,
    local_scale: float = 1.0,
) -> StructuredQKV:
    """Structured attention inputs (see the module docstring for the patterns).

    Args:
        batch, heads, kv_heads, q_len, head_dim: the shapes; ``k_len`` defaults to ``q_len``.
        seed: seeds a fresh generator on ``device``; ignored when ``generator`` is given.
        generator: draw from this generator instead (its device is used), e.g. a test's.
        dtype: dtype of the returned tensors.
        device: where to build them (default CPU, or the generator's device).
        noise: standard deviation of the logit noise.
        sink_scale, local_scale: multiply the sink and the local window / slash logits.

    Returns:
        a ``StructuredQKV`` named tuple ``(q, k, v, profiles)``.

    Example:
        >>> from xattention.synthetic import structured_qkv
        >>> q, k, v, profiles = structured_qkv(1, 4, 2, q_len=100, k_len=300, head_dim=32)
        >>> tuple(q.shape), tuple(k.shape), profiles[0].kind
        ((1, 4, 100, 32), (1, 2, 300, 32), 'slash')
    """
    k_len = q_len if k_len is None else k_len
    _check(batch, heads, kv_heads, q_len, k_len, head_dim)
    if generator is None:
        generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    gen, dev = generator, generator.device
    work = torch.float64 if dev.type == "cpu" else torch.float32

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=work, device=dev)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=work, device=dev)

    n_freq, n_topics, n_noise = _layout(head_dim)
    group = heads // kv_heads
    profiles = head_profiles(heads, k_len, gen)
    key_pos = torch.arange(k_len, dtype=work, device=dev)
    q_pos = key_pos[k_len - q_len :]

    # Where each feature sits before the rotation.
    f_sl = slice(0, 2 * n_freq)
    d_sink, d_vert = 2 * n_freq, 2 * n_freq + 1
    t_sl = slice(d_vert + 1, d_vert + 1 + n_topics)
    n_sl = slice(t_sl.stop, head_dim)

    # Topic segments, sinks and heavy keys describe the text: shared by all heads.
    seg_topic = torch.empty(k_len, dtype=torch.long, device=dev)
    start = 0
    while start < k_len:
        length = int(64 + 448 * rand(()).item())
        seg_topic[start : start + length] = int(torch.randint(n_topics, (), generator=gen,
                                                              device=dev))
        start += length
    topic_onehot = F.one_hot(seg_topic, n_topics).to(work)
    sink_w = torch.zeros(k_len, dtype=work, device=dev)
    sink_w[: min(4, k_len)] = torch.tensor([1.0, 0.6, 0.45, 0.35], dtype=work,
                                           device=dev)[: min(4, k_len)]
    vert_w = torch.zeros(k_len, dtype=work, device=dev)
    starts = 4 + torch.randperm(max(1, k_len - 4), generator=gen, device=dev)
    for s in starts[: max(2, k_len // 512)].tolist():
        run = int(torch.randint(1, 7, (), generator=gen, device=dev))
        vert_w[s : s + run] = 0.6 + 0.4 * rand(()).item()

    q = torch.zeros(batch, heads, q_len, head_dim, dtype=work, device=dev)
    k = torch.zeros(batch, kv_heads, k_len, head_dim, dtype=work, device=dev)
    noise_std = noise**0.5 / max(n_noise, 1) ** 0.25
    for g in range(kv_heads):
        # Stratified log-uniform frequencies, from the whole sequence down to ~3 tokens.
        lo, hi = math.log(2 * math.pi / max(k_len, 8)), math.log(2 * math.pi / 3)
        omega = torch.exp(lo + (hi - lo) * (torch.arange(n_freq, device=dev) + rand(n_freq))
                          / n_freq)
        k_ang = key_pos[:, None] * omega[None, :]
        q_ang = q_pos[:, None] * omega[None, :]
        k[:, g, :, f_sl] = torch.cat([torch.cos(k_ang), torch.sin(k_ang)], dim=-1)
        k[:, g, :, d_sink] = sink_w
        k[:, g, :, d_vert] = vert_w
        k[:, g, :, t_sl] = topic_onehot
        k[:, g, :, n_sl] = randn(batch, k_len, n_noise) * noise_std
        for h in range(g * group, (g + 1) * group):
            p = profiles[h]
            # Spectral weights of a Laplacian kernel exp(-|d|/w), for log-spaced samples.
            amp = omega * p.window / (1 + (omega * p.window) ** 2)
            amp = (amp / amp.sum()).repeat(2) * local_scale
            q_feat = p.local * torch.cat([torch.cos(q_ang), torch.sin(q_ang)], dim=-1) * amp
            if p.slash:
                shifted = q_ang - p.slash_offset * omega[None, :]
                q_feat += p.slash * torch.cat([torch.cos(shifted), torch.sin(shifted)], -1) * amp
            q[:, h, :, f_sl] = q_feat
            # Most queries look at the sinks and the heavy keys, with varying strength.
            looks = (rand(batch, q_len) < 0.85) * (0.7 + 0.6 * rand(batch, q_len))
            q[:, h, :, d_sink] = p.sink * sink_scale * looks
            q[:, h, :, d_vert] = p.vertical * (0.5 + rand(batch, q_len)) / 0.8
            q[:, h, :, t_sl] = p.topic * topic_onehot[k_len - q_len :]
            q[:, h, :, n_sl] = randn(batch, q_len, n_noise) * noise_std
        # Mix the coordinates: the same rotation for the KV head and its query heads.
        rot, _ = torch.linalg.qr(randn(head_dim, head_dim))
        k[:, g] = k[:, g] @ rot
        q[:, g * group : (g + 1) * group] = q[:, g * group : (g + 1) * group] @ rot
    v = randn(batch, kv_heads, k_len, head_dim)
    s = head_dim**0.25  # q . k * D**-0.5 must equal the logits designed above
    return StructuredQKV((q * s).to(dtype), (k * s).to(dtype), v.to(dtype), profiles)
