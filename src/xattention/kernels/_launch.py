"""Repeat launches of a Triton kernel without Triton's per-call argument binding.

A Triton launch spends most of its host time before the kernel runs: the autotuner rebuilds its
key from every argument, the JIT function binds and specialises every argument (is each int 1 or
a multiple of 16, is each pointer 16-byte aligned) and hashes the result to find the compiled
kernel. A short ``xattention()`` call is three launches, and this work was about a third of its
eager host cost on an H100 (benchmarks/results/short_calls_plan.md).

:class:`CachedLauncher` wraps a kernel (``launcher[grid](*args, **constexprs)``, as the kernel
itself is called). The first call with a given *launch key* goes through Triton as usual; it
returns the compiled kernel, which is kept with the config the autotuner chose and the grid it
gave. Later calls with the same key hand the arguments straight to the compiled kernel's
launcher. The key holds everything Triton's choice depends on, and more: every int argument by
value, every tensor's dtype and base-pointer alignment (mod 16), the constexprs, the grid
function's code and captured values, and the current device. Equal keys therefore mean the same
specialisation, the same autotune key and the same grid.

Triton's own path is taken whenever this one cannot vouch for the result: under the
interpreter, while a test forces a config (``_tuning.force_config``), with a launch hook set
(profilers), with Triton's debug mode, and for argument types the key does not cover.
:func:`launch_cache` turns the cache on or off for a block (benchmarks and tests compare both
paths); ``XATTENTION_LAUNCH_CACHE=1``/``0`` for a whole process. It is off by default until a
card has run its GPU test (``DEFAULT_ENABLED``).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator

import torch
import triton

from .._backend import interpreter_enabled
from . import _tuning

# Distinct shapes a process sees are few (a model's layers share theirs); the bound keeps a run
# over many prompt lengths from growing without limit.
MAX_ENTRIES = 512

# Off by default until a card has passed tests/test_gpu_kernels.py::
# test_cached_launches_equal_tritons_path (its replay of a compiled kernel is Triton-version
# specific and has been checked only against a recording stand-in). ``launch_cache(True)`` turns
# it on for a block; XATTENTION_LAUNCH_CACHE=1 (or 0) for a whole process.
DEFAULT_ENABLED = False
_enabled = os.environ.get("XATTENTION_LAUNCH_CACHE", "1" if DEFAULT_ENABLED else "0") != "0"
_launchers: weakref.WeakSet = weakref.WeakSet()


@contextlib.contextmanager
def launch_cache(enabled: bool) -> Iterator[None]:
    """Turn the compiled-kernel cache of every :class:`CachedLauncher` on or off in the block."""
    global _enabled
    before, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = before


def clear_launch_caches() -> None:
    """Forget every cached launch (a forced config, or a kernel recompiled by a test)."""
    for launcher in list(_launchers):
        launcher.cache.clear()


class _Unkeyable(Exception):
    pass


def _key_of(arg):
    # int first: the common case (sizes, strides). bool is an int subclass but Triton gives it
    # another type (i1), hence the exact type test.
    kind = type(arg)
    if kind is int:
        return arg
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16)
    if kind is float:
        return float  # passed as fp32, never specialised on its value
    if kind is bool or arg is None:
        return (kind, arg)
    raise _Unkeyable(kind.__name__)


def _grid_key(grid):
    if not callable(grid):
        return tuple(grid)
    cells = tuple(c.cell_contents for c in grid.__closure__ or ())
    return (grid.__code__, cells, grid.__defaults__)


class CachedLauncher:
    """``launcher[grid](*args, **kwargs)``: launch ``kernel`` (a ``triton.jit`` function, or a
    ``triton.autotune`` over one), reusing the compiled kernel of an earlier call with the same
    launch key (module docstring)."""

    def __init__(self, kernel):
        self.kernel = kernel
        jit = kernel
        while hasattr(jit, "fn") and not hasattr(jit, "arg_names"):
            jit = jit.fn
        self._jit = jit
        self.cache: dict = {}
        _launchers.add(self)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self._launch(grid, args, kwargs)

        return launch

    def _launch(self, grid, args, kwargs):
        if not _enabled or interpreter_enabled() or _tuning.any_forced() or _hooks_set():
            return self.kernel[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        try:
            key = (device, tuple(map(_key_of, args)),
                   tuple((k, type(v), v) for k, v in kwargs.items()), _grid_key(grid))
            hit = self.cache.get(key)  # hashing is where an unhashable grid value shows
        except (_Unkeyable, TypeError):
            return self.kernel[grid](*args, **kwargs)
        if hit is not None:
            compiled, grid3, tail = hit
            stream = _current_stream(device)
            compiled.run(grid3[0], grid3[1], grid3[2], stream, compiled.function,
                         compiled.packed_metadata, None, None, None, *args, *tail)
            return compiled
        compiled = self.kernel[grid](*args, **kwargs)
        entry = self._entry(compiled, grid, args, kwargs)
        if entry is not None:
            if len(self.cache) >= MAX_ENTRIES:
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = entry
        return compiled

    def _entry(self, compiled, grid, args, kwargs):
        """(compiled kernel, 3-d grid, the values of the parameters after ``args``, in order)."""
        if compiled is None or not hasattr(compiled, "run"):
            return None
        config = getattr(self.kernel, "best_config", None)
        named = dict(kwargs)
        if config is not None:
            named.update(config.kwargs)
        names = list(self._jit.arg_names)
        if len(args) > len(names) or any(n not in named for n in names[len(args):]):
            return None  # a default left to Triton: not worth restating here
        tail = tuple(named[n] for n in names[len(args):])
        if callable(grid):
            grid = grid({**dict(zip(names[:len(args)], args, strict=True)), **named})
        grid = tuple(grid) + (1,) * (3 - len(grid))
        return compiled, grid, tail


def _current_stream(device: int) -> int:
    return triton.runtime.driver.active.get_current_stream(device)


def _hooks_set() -> bool:
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    if runtime is None:  # no knobs (before triton 3.4): nothing to check, but also no fast path
        return True
    return (_hook_active(runtime.launch_enter_hook) or _hook_active(runtime.launch_exit_hook)
            or bool(getattr(runtime, "debug", False)))


def _hook_active(hook) -> bool:
    # Triton 3.5+ holds launch hooks in a HookChain that is never None (an empty chain calls
    # nothing); earlier releases hold a plain function or None.
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or bool(calls)
