"""``XAttentionGraph``: ``xattention()`` captured in CUDA graphs, one per input shape.

A sparse call is three kernel launches and some Python (validation, dispatch, launch setup); at
short and medium lengths that host work is most of the call. Replaying a captured CUDA graph skips
all of it: one ``cudaGraphLaunch`` per call. This is the plan/run split of FlashInfer in the form a
caller with repeating shapes wants (a prefill at fixed bucket lengths, a benchmark, a video model
whose sequence length never changes): the first call at a shape validates, warms up (Triton's
autotuning runs here) and captures; later calls copy the inputs into the graph's buffers (nothing
when they already are those buffers, see :meth:`XAttentionGraph.inputs`) and replay.

The call path (``xattention.api.run_call``) has no host syncs and allocates nothing whose size
depends on data, which is what capture needs; ``tests/test_gpu_kernels.py`` checks both.

The transformers integration uses it with ``xt.enable(model, cuda_graphs=True)`` (one per
layer); vLLM and diffusers call ``xattention()`` eagerly. On CPU tensors (no CUDA graphs) the
object runs the eager call, so code using it stays portable.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ._validation import (
    check_backend,
    check_block_params,
    check_bool,
    check_estimate_dtype,
    check_layout,
    check_min_sparse_len,
    check_scale,
    check_threshold_value,
    from_bhsd,
)
from .api import CallSpec, check_call, run_call
from .selection import DEFAULT_THRESHOLD


@dataclass
class _Captured:
    graph: object
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    replays: int = field(default=0)


class XAttentionGraph:
    """``xattention()`` with fixed options, captured in a CUDA graph per input shape.

    Args:
        threshold, stride, block_size, causal, scale, backend, min_sparse_len, estimate_dtype,
            layout: as for :func:`xattention.xattention` (``threshold`` a number or a tensor
            ``[Hq]``; a tensor is read at every replay, so it may be updated in place).
        warmup: eager calls before capture (the first one autotunes the kernels).
        max_graphs: captured shapes kept (least recently used ones are dropped).

    Calling it returns the output in a buffer owned by the graph, overwritten by the next call
    at the same shape; pass ``out=`` to have it copied into a tensor of yours.

    Example (CUDA)::

        graph = XAttentionGraph(threshold=0.9)
        out = graph(q, k, v)          # validates, warms up, captures, replays
        out = graph(q2, k2, v2)       # same shape: copies the inputs in and replays
    """

    def __init__(self, *, threshold: float | torch.Tensor = DEFAULT_THRESHOLD, stride: int = 8,
                 block_size: int = 128, causal: bool = True, scale: float | None = None,
                 backend: str = "auto", min_sparse_len: int | None = None,
                 estimate_dtype: torch.dtype | None = None, layout: str = "bhsd",
                 warmup: int = 2, max_graphs: int = 16) -> None:
        # What needs no input is checked here, where the object is made (its first call may be
        # far away, inside a model); a threshold tensor's length and the shapes, per shape.
        if not isinstance(threshold, torch.Tensor):
            check_threshold_value("threshold", threshold)
        check_block_params(stride, block_size)
        check_bool("causal", causal)
        if scale is not None:
            check_scale(scale, 1)
        check_backend(backend)
        check_min_sparse_len(min_sparse_len)
        check_estimate_dtype(estimate_dtype)
        check_layout(layout)
        self._options = dict(threshold=threshold, stride=stride, block_size=block_size,
                             causal=causal, scale=scale, backend=backend,
                             min_sparse_len=min_sparse_len, estimate_dtype=estimate_dtype,
                             layout=layout)
        for name, value, what in (("warmup", warmup, "an int >= 1 (the first call autotunes)"),
                                  ("max_graphs", max_graphs, "a positive int")):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be {what}, got {value!r}")
        self._warmup = warmup
        self._max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._specs: dict[tuple, CallSpec] = {}

    @staticmethod
    def _key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
        return tuple((tuple(t.shape), tuple(t.stride()), t.dtype, t.device) for t in (q, k, v))

    def __len__(self) -> int:
        return len(self._graphs)

    def inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The captured graph's input buffers for this shape (write into them to skip the copy
        on the next call), or None before capture."""
        entry = self._graphs.get(self._key(q, k, v))
        return None if entry is None else (entry.q, entry.k, entry.v)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            raise TypeError("q, k and v must be torch.Tensors")
        key = self._key(q, k, v)
        spec = self._specs.get(key)
        if spec is None:
            # Validation once per shape. A threshold tensor's range is read here only.
            _, _, _, spec = check_call(q, k, v, **self._options)
            self._specs[key] = spec
        if not q.is_cuda:  # no graphs on the CPU: the eager call
            res = self._eager(q, k, v, spec)
            return res if out is None else out.copy_(res)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(q, k, v, spec)
            self._graphs[key] = entry
            while len(self._graphs) > self._max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        for src, dst in ((q, entry.q), (k, entry.k), (v, entry.v)):
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)
        entry.graph.replay()
        entry.replays += 1
        return entry.out if out is None else out.copy_(entry.out)

    @staticmethod
    def _eager(q, k, v, spec: CallSpec) -> torch.Tensor:
        qb, kb, vb = (t.transpose(1, 2) if spec.bshd else t for t in (q, k, v))
        return from_bhsd(run_call(qb, kb, vb, spec), spec.bshd)

    def _capture(self, q, k, v, spec: CallSpec) -> _Captured:
        # Static copies in the caller's layout (the kernels read the strides).
        sq, sk, sv = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                      for t in (q, k, v))
        for src, dst in ((q, sq), (k, sk), (v, sv)):
            dst.copy_(src)
        stream = torch.cuda.Stream(device=q.device)
        stream.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(stream):  # warm up off the capturing stream, as torch advises
            for _ in range(self._warmup):
                self._eager(sq, sk, sv, spec)
        torch.cuda.current_stream(q.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._eager(sq, sk, sv, spec)
        return _Captured(graph, sq, sk, sv, static_out)

