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
