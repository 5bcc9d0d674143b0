"""Which implementation serves a call: the Triton kernels or the chunked PyTorch reference.

``auto`` picks Triton for CUDA tensors (and for CPU tensors under ``TRITON_INTERPRET=1``, which is
how CI exercises the kernels) when the kernels support the inputs; otherwise the PyTorch path. A
fast path that cannot serve says why once, then the reference path runs: never a silent fallback.
For the sparse stage, ``auto`` on CUDA prefers FlashAttention-4 where it is installed and can serve
(``kernels/fa4.py``), then the Triton kernel.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch


@functools.cache
def triton_import_error() -> str | None:
    """None when the Triton kernels can be imported, else the reason they cannot."""
    try:
        import triton  # noqa: F401

        from . import kernels  # noqa: F401
    except Exception as exc:  # ImportError, or triton failing on an odd platform
        return f"{type(exc).__name__}: {exc}"
    return _interpreter_version_error()


def _interpreter_version_error() -> str | None:
    """Triton 3.6's interpreter converts loop bounds with int(array), which NumPy 2.4 refuses:
    every kernel with a data-dependent loop fails (fixed in Triton 3.7; GPUs are unaffected)."""
    if not interpreter_enabled():
        return None
    import numpy
    import triton

    def major_minor(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())

    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        return (f"the interpreter of triton {triton.__version__} cannot run with numpy "
                f"{numpy.__version__} (TRITON_INTERPRET=1 needs triton>=3.7, or numpy<2.4)")
    return None


def new_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device
               ) -> torch.Tensor:
    """Uninitialised kernel output; NaN-filled when ``XATTENTION_POISON_OUTPUTS=1`` (tests), so that
    an element a kernel forgot to write cannot pass as a plausible value."""
    if os.environ.get("XATTENTION_POISON_OUTPUTS", "0") not in ("", "0"):
        poison = float("nan") if dtype.is_floating_point else -1  # -1: 0xFF, not a valid bool
        return torch.full(shape, poison, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def quick_tuning() -> bool:
    """``XATTENTION_AUTOTUNE=quick`` narrows the kernels' autotuning to a couple of configs: a fast
    first call (tests, short jobs) at some cost in speed. Read when the kernels are imported."""
    return os.environ.get("XATTENTION_AUTOTUNE", "full") == "quick"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_timer() -> Callable[..., list[float]] | None:
    """``do_bench`` for ``triton.autotune``: None (Triton's timer) on the GPU; under the interpreter
    a timer that runs nothing. Timing interpreted kernels means nothing, and Triton before 3.8
    benchmarks even a single pruned config through the GPU driver, which the interpreter lacks
    ("0 active drivers"). The interpreter's prune keeps one config, so nothing is lost."""
    if not interpreter_enabled():
        return None
    return lambda kernel_call, quantiles: [0.0] * len(quantiles)


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device, unsupported: str | None, op: str) -> str:
    """Return "triton" or "torch" for ``op``.

    ``unsupported`` is None when the Triton kernel accepts these inputs, else the reason it does not
    (e.g. a head_dim it was not built for). An explicit ``backend="triton"`` that cannot serve
    raises; ``auto`` warns once and uses the reference path.
    """
    if backend == "torch":
        return "torch"
    reason = unsupported
    if device.type != "cuda" and not interpreter_enabled():
        if backend == "auto":
            return "torch"
        reason = f"tensors are on {device.type} (Triton needs CUDA, or TRITON_INTERPRET=1)"
    if reason is None:
        reason = triton_import_error()
    if reason is None:
        return "triton"
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run {op}: {reason}")
    warn_once(f"xattention: the Triton {op} kernel cannot serve this call ({reason}); "
              "using the PyTorch reference path")
    return "torch"


# -- implementation choices owned here: the sparse stage's FA4 route, the dense switch ----------

# Dense FLOPs below which dense attention beat the whole xattention() call on the H200 (t=0.9,
# benchmarks/results/xattention_crossover.md, measured with the six-launch pipeline before the
# plan): at 32 heads, D=128 the sparse call lost at 4k (1.4e11) and won at 8k (5.5e11, 1.2-2.4x);
# at 8 heads it lost at 8k and won at 16k: the same FLOP counts. On other GPUs this is a lead;
# min_sparse_len overrides it per call. To be re-set from benchmarks/device_plan.sh's crossover.
DENSE_FLOP_CROSSOVER = 4e11


def dense_flops(q: torch.Tensor, k: torch.Tensor, causal: bool) -> float:
    """FLOPs of dense attention: 2 products x 2 FLOPs per multiply-add x visible pairs x D."""
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    pairs = lq * lk - (lq * (lq - 1) // 2 if causal else 0)
    return 4.0 * b * hq * pairs * d


def runs_dense(q: torch.Tensor, k: torch.Tensor, causal: bool, backend: str,
               min_sparse_len: int | None) -> bool:
    """Whether ``xattention()`` should skip the sparse pipeline for these inputs.

    ``min_sparse_len`` None: automatic, only for ``backend="auto"`` on CUDA, by the FLOP
    crossover; an int: dense when the key length is below it (0: always sparse).
    """
    if min_sparse_len is not None:
        return k.shape[2] < min_sparse_len
    if backend != "auto" or not q.is_cuda:
        return False
    return dense_flops(q, k, causal) < DENSE_FLOP_CROSSOVER


def uses_fa4(q: torch.Tensor, k: torch.Tensor, block_size: int, backend: str) -> bool:
    """Whether the sparse stage goes to FlashAttention-4: ``backend="auto"`` on CUDA where FA4 is
    installed and can serve (faster than the Triton kernel on Hopper and Blackwell)."""
    if backend != "auto" or not q.is_cuda:
        return False
    from .kernels.fa4 import fa4_unsupported_reason

    return fa4_unsupported_reason(q, k, block_size) is None
