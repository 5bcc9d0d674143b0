"""The cached launcher (kernels/_launch.py): what it keys on, what it replays, when it stands aside.

The real kernels through it are checked on the GPU (tests/test_gpu_kernels.py); here a recording
stand-in for a Triton kernel shows the replay hands the compiled kernel every parameter in
order, that any change a compile could depend on misses the cache, and that the interpreter,
a forced config and a launch hook all take Triton's own path.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from xattention.kernels import _launch, _tuning  # noqa: E402


class _Compiled:
    function = "fn-handle"
    packed_metadata = "meta"

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


class _Config:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _Kernel:
    """Stands in for ``triton.autotune(triton.jit(f))``: ``kernel[grid](*args, **kw)`` compiles
    (a new compiled kernel per call) and records the grid it was given."""

    arg_names = ["x", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self):
        self.compiles = []
        self.best_config = _Config(BLOCK=64)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = _Compiled()
            self.compiles.append((grid, args, kwargs, compiled))
            return compiled

        return launch


@pytest.fixture
def fast(monkeypatch):
    """The launcher's guards as on a GPU with no hooks (the interpreter runs these tests)."""
    monkeypatch.setattr(_launch, "_enabled", True)  # off by default (DEFAULT_ENABLED)
    monkeypatch.setattr(_launch, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(_launch, "_hooks_set", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_launch, "_current_stream", lambda device: 1234)


def _grid(n):
    def grid(meta):
        return (meta["n"] // meta["BLOCK"], n)
    return grid


def test_replay_passes_every_parameter_in_order(fast):
    kernel = _Kernel()
    launcher = _launch.CachedLauncher(kernel)
    x = torch.zeros(64)
    first = launcher[_grid(3)](x, 256, 0.5, FLAG=True)
    assert len(kernel.compiles) == 1 and first.calls == []
    y = torch.ones(64)  # same dtype and alignment: a hit
    again = launcher[_grid(3)](y, 256, 0.25, FLAG=True)
    assert again is first and len(kernel.compiles) == 1
    (call,) = first.calls
    grid3, stream, handles, rest = call[:3], call[3], call[4:9], call[9:]
    assert grid3 == (4, 3, 1)  # 256 // BLOCK=64 from the tuner's config, then the closure's 3
    assert stream == 1234
    assert handles == ("fn-handle", "meta", None, None, None)
    assert rest[0] is y and rest[1:] == (256, 0.25, 64, True)  # BLOCK from the config, FLAG


@pytest.mark.parametrize("change", ["int", "dtype", "alignment", "constexpr", "grid", "bool"])
def test_anything_a_compile_depends_on_misses(fast, change):
    kernel = _Kernel()
    launcher = _launch.CachedLauncher(kernel)
    base = torch.zeros(64)
    launcher[_grid(3)](base, 256, 0.5, FLAG=True)
    x, n, grid, flag = base, 256, _grid(3), True
    if change == "int":
        n = 17
    elif change == "dtype":
        x = base.double()
    elif change == "alignment":
        x = base[1:]  # 4 bytes past a 16-byte boundary
    elif change == "grid":
        grid = _grid(5)  # same code, another captured value
    elif change == "bool":
        flag = 1  # bool and int are different Triton types
    kwargs = {"FLAG": flag} if change != "constexpr" else {"FLAG": False}
    launcher[grid](x, n, 0.5, **kwargs)
    assert len(kernel.compiles) == 2


@pytest.mark.parametrize("guard", ["interpreter", "forced", "hook", "disabled", "unkeyable",
                                   "unhashable"])
def test_guards_take_tritons_path(fast, monkeypatch, guard):
    kernel = _Kernel()
    launcher = _launch.CachedLauncher(kernel)
    x = torch.zeros(64)
    if guard == "interpreter":
        monkeypatch.setattr(_launch, "interpreter_enabled", lambda: True)
    elif guard == "forced":
        monkeypatch.setitem(_tuning._forced, "some_kernel", object())
    elif guard == "hook":
        monkeypatch.setattr(_launch, "_hooks_set", lambda: True)
    extra = object() if guard == "unkeyable" else None
    grid = _grid(3)
    if guard == "unhashable":
        grid = _grid([3])  # a list captured by the grid function: the key cannot be hashed
    for _ in range(2):
        if guard == "disabled":
            with _launch.launch_cache(False):
                launcher[grid](x, 256, extra, FLAG=True)
        else:
            launcher[grid](x, 256, extra, FLAG=True)
    assert len(kernel.compiles) == 2 and not launcher.cache


class _Chain:
    """Triton 3.5+'s HookChain: an object that is never None, empty until a hook is added."""

    def __init__(self, calls):
        self.calls = calls


@pytest.mark.parametrize("enter, exit_, debug, expected", [
    (None, None, False, False),                  # triton before 3.5, no hooks
    (_Chain([]), _Chain([]), False, False),      # triton 3.5+, no hooks: the cache may serve
    (_Chain([print]), _Chain([]), False, True),  # a profiler added an enter hook
    (_Chain([]), _Chain([print]), False, True),
    (print, None, False, True),                  # a plain function (before 3.5)
    (None, None, True, True),                    # Triton's debug mode
])
def test_launch_hooks_read_as_set_only_when_a_hook_is_there(monkeypatch, enter, exit_, debug,
                                                             expected):
    import triton

    runtime = type("Runtime", (), {"launch_enter_hook": enter, "launch_exit_hook": exit_,
                                   "debug": debug})()
    monkeypatch.setattr(triton, "knobs", type("Knobs", (), {"runtime": runtime})(), raising=False)
    assert _launch._hooks_set() is expected


def test_installed_tritons_default_hooks_do_not_block_the_cache():
    import triton

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        pytest.skip("this Triton has no knobs (the cache always stands aside there)")
    if getattr(runtime, "debug", False):
        pytest.skip("Triton's debug mode is on in this environment")
    assert not _launch._hooks_set()


def test_cache_is_bounded(fast, monkeypatch):
    monkeypatch.setattr(_launch, "MAX_ENTRIES", 4)
    kernel = _Kernel()
    launcher = _launch.CachedLauncher(kernel)
    x = torch.zeros(64)
    for n in range(10):
        launcher[_grid(3)](x, 64 * (n + 1), 0.5, FLAG=True)
    assert len(launcher.cache) == 4
    _launch.clear_launch_caches()
    assert not launcher.cache


def test_stage_launchers_wrap_their_kernels():
    from xattention.kernels import estimate, selection, sparse_attention

    pairs = [(estimate._estimate_launcher, estimate._antidiagonal_estimate_fwd),
             (selection._select_launcher, selection._select_plan_kernel),
             (sparse_attention._sparse_launcher, sparse_attention._block_sparse_attention_fwd)]
    for launcher, kernel in pairs:
        assert launcher.kernel is kernel
        assert list(launcher._jit.arg_names)  # the parameter list the replay fills in


def test_off_by_default_until_a_card_has_run_its_test(fast, monkeypatch):
    """``DEFAULT_ENABLED`` is False until tests/test_gpu_kernels.py's cached-launch test passes
    on a card: with the cache at that default a plain call takes Triton's path, and
    ``launch_cache(True)`` opts in."""
    assert _launch.DEFAULT_ENABLED is False
    monkeypatch.setattr(_launch, "_enabled", _launch.DEFAULT_ENABLED)  # the process default
    kernel = _Kernel()
    launcher = _launch.CachedLauncher(kernel)
    x = torch.zeros(64)
    for _ in range(2):
        launcher[_grid(3)](x, 256, 0.5, FLAG=True)
    assert len(kernel.compiles) == 2 and not launcher.cache
    with _launch.launch_cache(True):
        for _ in range(2):
            launcher[_grid(3)](x, 256, 0.5, FLAG=True)
    assert len(kernel.compiles) == 3 and len(launcher.cache) == 1
