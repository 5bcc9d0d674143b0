"""XAttention's settings for the vLLM backend, read from environment variables.

Why environment variables: vLLM builds the attention backends inside worker processes that it
spawns itself (the engine core, one worker per tensor-parallel rank), from a class path; there is
no vLLM argument through which a third-party backend receives options. Spawned processes inherit
the environment of the process that starts the engine, so ``os.environ`` (or the shell of
``vllm serve``) reaches every rank unchanged. They are validated in the process that starts the
engine, when vLLM checks its configuration (see ``plugin.py``), so a bad value fails at
``LLM(...)`` / ``vllm serve`` with a ``ValueError`` that names the variable, not later in a
worker.

======================== ======== ===============================================================
variable                 default  meaning
======================== ======== ===============================================================
XATTENTION_THRESHOLD     0.95     cumulative-score threshold, in (0, inf); >= 1 keeps every block
XATTENTION_STRIDE        8        antidiagonal stride; divides the block size
XATTENTION_BLOCK_SIZE    128      block edge of the sparsity pattern (not vLLM's KV page size)
XATTENTION_PROFILE       (none)   per-(layer, head) threshold profile (``xattention calibrate``);
                                  its stride and block size are used
XATTENTION_DENSE_LAYERS  (none)   comma-separated layer indices kept dense (negative: from end)
XATTENTION_MIN_PREFILL_LEN = block prefill chunks with fewer new tokens stay dense (the old name
                                  XATTENTION_MIN_PREFILL is read too, with a warning)
XATTENTION_STATS_DIR     (none)   folder where every rank writes its block densities (stats.py)
XATTENTION_ESTIMATE      exact    ``fp8``: the estimate on FP8 operands (``estimate_dtype`` of
                                  ``xattention()``), faster at long prompts on Hopper
XATTENTION_KV_READ       paged    ``paged``: prefill reads K/V in place through the block table
                                  (``xattention.PagedKV``; the Triton kernels); ``gather``: copies
                                  each request's K/V out of the cache first (the earlier path)
======================== ======== ===============================================================
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...selection import DEFAULT_THRESHOLD
from .._common.layers import layer_set, parse_layer_list
from .._common.thresholds import DEFAULT_BLOCK_SIZE, DEFAULT_STRIDE, check_number, load_profile

THRESHOLD = "XATTENTION_THRESHOLD"
STRIDE = "XATTENTION_STRIDE"
BLOCK_SIZE = "XATTENTION_BLOCK_SIZE"
PROFILE = "XATTENTION_PROFILE"
DENSE_LAYERS = "XATTENTION_DENSE_LAYERS"
MIN_PREFILL_LEN = "XATTENTION_MIN_PREFILL_LEN"
OLD_MIN_PREFILL = "XATTENTION_MIN_PREFILL"  # its name before 0.2, still read (with a warning)
STATS_DIR = "XATTENTION_STATS_DIR"
ESTIMATE = "XATTENTION_ESTIMATE"
KV_READ = "XATTENTION_KV_READ"
KV_READS = ("paged", "gather")
VARIABLES = (THRESHOLD, STRIDE, BLOCK_SIZE, PROFILE, DENSE_LAYERS, MIN_PREFILL_LEN, STATS_DIR,
             ESTIMATE, KV_READ, OLD_MIN_PREFILL)


@dataclass(frozen=True)
class XAttentionSettings:
    """Validated settings; ``thresholds`` is the profile's ``[layer][query head]`` table or None."""

    threshold: float = DEFAULT_THRESHOLD
    stride: int = 8
    block_size: int = 128
    thresholds: tuple[tuple[float, ...], ...] | None = None
    profile_path: str | None = None
    dense_layers: tuple[int, ...] = ()
    min_prefill_len: int = 128
    stats_dir: str | None = None
    estimate_dtype: torch.dtype | None = None  # XATTENTION_ESTIMATE=fp8: torch.float8_e4m3fn
    kv_read: str = "paged"  # XATTENTION_KV_READ

    def threshold_for(self, layer: int) -> float | tuple[float, ...]:
        """The float threshold of ``layer``, or its per-query-head tuple (all ranks' heads)."""
        if self.thresholds is None:
            return self.threshold
        return self.thresholds[layer]

    def is_dense(self, layer: int, num_layers: int) -> bool:
        return any(i % num_layers == layer for i in self.dense_layers)


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return None if value is None or value.strip() == "" else value.strip()


def _positive_int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _threshold(env: Mapping[str, str]) -> float:
    raw = _get(env, THRESHOLD)
    if raw is None:
        return DEFAULT_THRESHOLD
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{THRESHOLD} must be a number in (0, inf), got {raw!r}") from None
    return check_number(THRESHOLD, value)


def _dense_layers(env: Mapping[str, str]) -> tuple[int, ...]:
    raw = _get(env, DENSE_LAYERS)
    return () if raw is None else parse_layer_list(raw, DENSE_LAYERS)


def _min_prefill_len(env: Mapping[str, str], block_size: int) -> int:
    name = MIN_PREFILL_LEN
    if _get(env, MIN_PREFILL_LEN) is None and _get(env, OLD_MIN_PREFILL) is not None:
        warnings.warn(f"{OLD_MIN_PREFILL} is now called {MIN_PREFILL_LEN}; the old name will be "
                      "removed", DeprecationWarning, stacklevel=3)
        name = OLD_MIN_PREFILL
    elif _get(env, MIN_PREFILL_LEN) is not None and _get(env, OLD_MIN_PREFILL) is not None:
        raise ValueError(f"set {MIN_PREFILL_LEN} only ({OLD_MIN_PREFILL} is its old name)")
    return _positive_int(env, name, block_size, minimum=2)


def settings_from_env(env: Mapping[str, str] | None = None) -> XAttentionSettings:
    """Read and validate the ``XATTENTION_*`` variables (``ValueError`` naming the variable).

    Example:
        >>> settings_from_env({"XATTENTION_THRESHOLD": "0.95"}).threshold
        0.95
        >>> settings_from_env({"XATTENTION_STRIDE": "5"})
        Traceback (most recent call last):
        ...
        ValueError: XATTENTION_STRIDE (5) must divide XATTENTION_BLOCK_SIZE (128)
    """
    env = os.environ if env is None else env
    threshold = _threshold(env)
    stride = _positive_int(env, STRIDE, DEFAULT_STRIDE)
    block_size = _positive_int(env, BLOCK_SIZE, DEFAULT_BLOCK_SIZE)
    thresholds = None
    profile_path = _get(env, PROFILE)
    if profile_path is not None:
        profile = _load_profile(profile_path)
        for name, mine, theirs in ((STRIDE, stride, profile.stride),
                                   (BLOCK_SIZE, block_size, profile.block_size)):
            if _get(env, name) is not None and mine != theirs:
                raise ValueError(f"{name}={mine} contradicts {PROFILE}={profile_path}, which was "
                                 f"calibrated with {theirs}; unset {name}")
        stride, block_size = profile.stride, profile.block_size
        thresholds = tuple(tuple(row) for row in profile.thresholds)
    if block_size % stride:
        raise ValueError(f"{STRIDE} ({stride}) must divide {BLOCK_SIZE} ({block_size})")
    return XAttentionSettings(threshold=threshold, stride=stride, block_size=block_size,
                              thresholds=thresholds, profile_path=profile_path,
                              dense_layers=_dense_layers(env),
                              min_prefill_len=_min_prefill_len(env, block_size),
                              stats_dir=_get(env, STATS_DIR), estimate_dtype=_estimate_dtype(env),
                              kv_read=_kv_read(env))


def _kv_read(env: Mapping[str, str]) -> str:
    raw = _get(env, KV_READ)
    if raw is None:
        return "paged"
    if raw.lower() not in KV_READS:
        raise ValueError(f"{KV_READ} must be one of {KV_READS}, got {raw!r}")
    return raw.lower()


def _estimate_dtype(env: Mapping[str, str]) -> torch.dtype | None:
    raw = _get(env, ESTIMATE)
    if raw is None or raw.lower() == "exact":
        return None
    if raw.lower() == "fp8":
        return torch.float8_e4m3fn
    raise ValueError(f"{ESTIMATE} must be 'exact' or 'fp8', got {raw!r}")


def _load_profile(path: str) -> Any:
    return load_profile(path, PROFILE)  # one loader for every integration, naming the variable


def check_against_model(settings: XAttentionSettings, hf_text_config: Any) -> None:
    """Raise ``ValueError`` when the profile or the dense layers do not fit the model."""
    num_layers = getattr(hf_text_config, "num_hidden_layers", None)
    if settings.profile_path is not None:
        try:
            _load_profile(settings.profile_path).check_model(hf_text_config)
        except ValueError as exc:
            raise ValueError(f"{PROFILE}={settings.profile_path!r}: {exc}") from None
    if isinstance(num_layers, int):
        layer_set(settings.dense_layers, num_layers, DENSE_LAYERS)
