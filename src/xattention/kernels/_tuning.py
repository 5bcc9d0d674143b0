"""Forcing one autotune config, for the tests that run every config the pruners can keep.

The autotuners pick the fastest config for a shape; a config that computes a wrong answer would
only show where the tuner happens to pick it. ``force_config`` makes a kernel run exactly the given
config (whatever its pruner would keep), so a test can walk the whole kept set one by one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import triton

_forced: dict[str, triton.Config] = {}

# Shared memory one program may use on Hopper (H100/H200: 227 KiB with the opt-in). Configs over
# it fail to compile there ("out of resource: shared memory"); the tuner would skip them at a
# compile each, and the forced-config tests would fail on them, so the pruners drop them first.
HOPPER_SMEM_BYTES = 232448


def smem_limit(device=None) -> int:
    """Per-program shared memory of ``device`` (the Hopper figure when unknown)."""
    import torch

    if device is None or getattr(device, "type", "") != "cuda":
        return HOPPER_SMEM_BYTES
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", HOPPER_SMEM_BYTES))


def forced_config(kernel_name: str) -> triton.Config | None:
    """The config a test forced on ``kernel_name``, or None (the pruners call this first)."""
    return _forced.get(kernel_name)


def kernel_name(kernel) -> str:
    """The Python name of the function under a (possibly nested) autotuner."""
    fn = kernel
    while hasattr(fn, "fn"):  # autotuner -> JIT (or interpreted) function -> Python function
        fn = fn.fn
    return fn.__name__


@contextlib.contextmanager
def force_config(kernel, config: triton.Config) -> Iterator[None]:
    """Run ``kernel`` (a ``triton.autotune`` object) with ``config`` only, inside the block.

    The tuner's cache is cleared on entry and exit, so neither a config tuned before nor the
    forced one leaks into other calls.
    """
    name = kernel_name(kernel)
    _forced[name] = config
    kernel.cache.clear()
    try:
        yield
    finally:
        _forced.pop(name, None)
        kernel.cache.clear()


def any_forced() -> bool:
    """Whether a test forces a config on some kernel (cached launches stand aside then)."""
    return bool(_forced)
