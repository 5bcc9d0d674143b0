"""Input checks shared by the public functions.

Every public entry point validates once, up front, and raises ``TypeError`` / ``ValueError`` that
name the offending argument; the backends behind it assume valid input.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: both modules import this one
    from .paged import PagedKV
    from .plan import SparsePlan

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch")
LAYOUTS = ("bhsd", "bshd")


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    device: torch.device = torch.device("cpu")

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads


def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have rank 4 [batch, heads, length, head_dim], got shape "
                         f"{tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def _layout_hint(q: torch.Tensor, k: torch.Tensor, layout: str = "bhsd") -> str:
    """Advice leading a shape error when the inputs look like the other layout.

    Only in errors and warnings: a short valid input (decode, a few tokens) can have fewer rows
    than heads too, so this is never a reason to reject on its own.
    """
    if q.shape[2] < q.shape[1] or k.shape[2] < k.shape[1]:
        if layout == "bshd":
            return (f"layout='bshd' reads [B, L, H, D], but q {list(q.transpose(1, 2).shape)}, "
                    f"k {list(k.transpose(1, 2).shape)} look like [B, H, L, D]: pass "
                    "layout='bhsd'. ")
        return (f"q {list(q.shape)}, k {list(k.shape)} look like [B, L, H, D] (FlashAttention's "
                "layout): pass layout='bshd' (the default 'bhsd' reads [B, H, L, D]). ")
    return ""


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout  # type: ignore[return-value]


def as_bhsd(layout: object, *tensors: object) -> tuple:
    """``tensors`` as ``[B, H, L, D]`` views (no copy) and whether they came as ``"bshd"``.

    Non-tensors pass through untouched, for ``check_qkv`` to reject by name.
    """
    bshd = check_layout(layout) == "bshd"
    if not bshd:
        return (*tensors, False)
    views = tuple(t.transpose(1, 2) if isinstance(t, torch.Tensor) and t.dim() == 4 else t
                  for t in tensors)
    return (*views, True)


def from_bhsd(result: torch.Tensor | tuple, bshd: bool) -> torch.Tensor | tuple:
    """A result (tensor, or tuple of tensors with the head axis at 1) back in the caller's
    layout; masks and plans (block grids) stay as they are."""
    if not bshd:
        return result
    if isinstance(result, tuple):
        return tuple(from_bhsd(r, True) if i < 2 and isinstance(r, torch.Tensor) and
                     r.dtype != torch.bool else r for i, r in enumerate(result))
    return result.transpose(1, 2)


def check_qkv(q: object, k: object, v: object | None = None, layout: str = "bhsd",
              need_v: bool = False) -> AttentionShape:
    """Validate q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] (already ``[B, H, L, D]`` views; ``layout`` is
    what the caller passed, for the hints) against docs/design.md §2.1 and return the sizes.
    ``need_v``: the caller attends, so ``v`` must be given (None only goes with a PagedKV ``k``,
    which :func:`check_paged_qkv` validates)."""
    q = _check_tensor("q", q)
    k = _check_tensor("k", k)
    if need_v and v is None:
        raise TypeError("v must be a torch.Tensor [B, Hkv, Lk, D], got None (v=None goes only "
                        "with k a PagedKV, which holds both)")
    named = [("q", q), ("k", k)]
    if v is not None:
        v = _check_tensor("v", v)
        named.append(("v", v))
    for name, x in named[1:]:
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; they must match")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; they must match")
    b, hq, lq, d = q.shape
    _, hkv, lk, dk = k.shape
    hint = _layout_hint(q, k, layout)
    if k.shape[0] != b:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {b}")
    if dk != d:
        raise ValueError(f"k has head_dim {dk} but q has {d}; they must match")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if hq == 0 or hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{hint}q heads ({hq}) must be a multiple of k/v heads ({hkv}) for GQA")
    if lq == 0 or lk == 0 or d == 0:
        raise ValueError(f"q and k need non-empty lengths and head_dim, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if lq > lk:
        raise ValueError(f"{hint}q length ({lq}) must not exceed k length ({lk}): queries are the "
                         "last q_len positions of the context")
    if k.shape[2] < k.shape[1] and q.shape[2] < q.shape[1]:
        # [1, 4096, 8, 64] read as 4096 heads of 8 tokens is valid, and silently wrong. Both q
        # and k: decode (one query row, many keys) is a legitimate short q.
        warnings.warn(f"xattention: {hint or ''}k has a length axis ({lk}) shorter than its head "
                      f"axis ({hkv}) under layout={layout!r}; check the layout", UserWarning,
                      stacklevel=3)
    return AttentionShape(b, hq, hkv, lq, lk, d, q.device)


def check_paged_qkv(q: object, kv: PagedKV, v: object) -> AttentionShape:
    """Validate q ``[B,Hq,Lq,D]`` against a :class:`~xattention.paged.PagedKV` passed as ``k``
    (which checked itself when built) and return the sizes."""
    q = _check_tensor("q", q)
    if v is not None:
        raise TypeError("v must be None when k is a PagedKV (it holds both K and V), got "
                        f"{type(v).__name__}")
    b, hq, lq, d = q.shape
    kb, hkv, lk, dk = kv.shape
    if kv.dtype != q.dtype:
        raise TypeError(f"the PagedKV has dtype {kv.dtype} but q has {q.dtype}; they must match")
    if kv.device != q.device:
        raise ValueError(f"the PagedKV is on {kv.device} but q is on {q.device}; they must match")
    if kb != b:
        raise ValueError(f"the PagedKV's block_table has {kb} rows but q has batch size {b}")
    if dk != d:
        raise ValueError(f"the PagedKV has head_dim {dk} but q has {d}; they must match")
    if hq == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of the PagedKV's kv heads ({hkv})")
    if lq == 0 or d == 0:
        raise ValueError(f"q needs a non-empty length and head_dim, got {tuple(q.shape)}")
    if lq > lk:
        raise ValueError(f"q length ({lq}) must not exceed the PagedKV's seq_len ({lk}): queries "
                         "are the last q_len positions of the context")
    return AttentionShape(b, hq, hkv, lq, lk, d, q.device)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_block_params(stride: object, block_size: object) -> tuple[int, int]:
    stride = _check_positive_int("stride", stride)
    block_size = _check_positive_int("block_size", block_size)
    if block_size % stride != 0:
        raise ValueError(f"stride ({stride}) must divide block_size ({block_size})")
    return stride, block_size


def check_block_size(block_size: object) -> int:
    return _check_positive_int("block_size", block_size)


def check_lengths(q_len: object, k_len: object) -> tuple[int, int]:
    q_len = _check_positive_int("q_len", q_len)
    k_len = _check_positive_int("k_len", k_len)
    if q_len > k_len:
        raise ValueError(f"q_len ({q_len}) must not exceed k_len ({k_len})")
    return q_len, k_len


def check_bool(name: str, value: object) -> bool:
    """A real ``bool``: ``causal="False"`` or ``return_mask="no"`` would act by truthiness."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _check_threshold_tensor(threshold: torch.Tensor, device: torch.device | None) -> None:
    if threshold.dtype == torch.bool or threshold.is_complex():
        raise TypeError(f"threshold tensor must hold real numbers, got {threshold.dtype}")
    # A 0-dim tensor is read as a number, so the CPU is fine for it (torch's scalar convention).
    on_cpu_scalar = threshold.dim() == 0 and threshold.device.type == "cpu"
    if device is not None and threshold.device != device and not on_cpu_scalar:
        raise ValueError(f"threshold tensor is on {threshold.device} but the inputs are on "
                         f"{device}; they must match")


def check_threshold(
    threshold: object, num_heads: int, device: torch.device | None = None
) -> float | torch.Tensor:
    """A float in (0, inf) or a tensor of ``num_heads`` such values (per query head).

    A threshold tensor must be real (not bool or complex) and on ``device`` (the inputs' device).
    """
    if isinstance(threshold, torch.Tensor):
        _check_threshold_tensor(threshold, device)
        if threshold.dim() == 0:
            threshold = float(threshold)
        else:
            if threshold.shape != (num_heads,):
                raise ValueError(f"threshold tensor must have shape [{num_heads}] (one per query "
                                 f"head), got {tuple(threshold.shape)}")
            if not threshold.is_floating_point():
                threshold = threshold.double()
            t = threshold.detach()
            if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
                raise ValueError(f"threshold values must lie in (0, inf), got {t.tolist()}")
            return threshold
    return check_threshold_value("threshold", threshold)


def check_threshold_value(name: str, value: object) -> float:
    """One threshold: a finite number > 0 (``>= 1`` keeps every candidate block).

    The one wording for a bad threshold, wherever it comes from (``xattention``, a profile file,
    ``integrations.transformers.enable``); ``name`` says which argument or field it was.
    """
    if not is_real_number(value):
        raise TypeError(f"{name} must be a number in (0, inf), got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number in (0, inf), got {value}")
    return value


def is_real_number(value: object) -> bool:
    """Any real number type (int, float, NumPy scalars such as ``np.float32(0.9)``), not bool."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # NumPy's bool too
        return False
    return isinstance(value, numbers.Real)


def check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not is_real_number(scale):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return scale


def check_min_sparse_len(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"min_sparse_len must be None or an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"min_sparse_len must be >= 0, got {value}")
    return value


def check_estimate_dtype(value: object) -> torch.dtype | None:
    """None (the input dtype) or ``torch.float8_e4m3fn`` (``xattention.fp8``)."""
    if value is None:
        return None
    if not isinstance(value, torch.dtype):
        raise TypeError(f"estimate_dtype must be None or torch.float8_e4m3fn, got "
                        f"{type(value).__name__} {value!r}")
    if value != torch.float8_e4m3fn:
        raise ValueError(f"estimate_dtype must be None (the input dtype) or torch.float8_e4m3fn, "
                         f"got {value}")
    return value


def check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def check_mask_tensor(name: str, mask: object) -> torch.Tensor:
    """A bool tensor of rank 4 (a block mask), named ``name`` in the error."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor [B, Hq, nQB, nKB], got "
                        f"{type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    if mask.dim() != 4:
        raise ValueError(f"{name} must have rank 4 [B, Hq, nQB, nKB], got shape "
                         f"{list(mask.shape)}")
    return mask


def check_block_mask(mask: object, shape: AttentionShape, block_size: int) -> torch.Tensor:
    """A bool mask [B|1, Hq|1, ceil(Lq/Bs), ceil(Lk/Bs)]; returned expanded to [B, Hq, ...]."""
    mask = check_mask_tensor("mask", mask)
    if mask.device != shape.device:
        raise ValueError(f"mask is on {mask.device} but q is on {shape.device}; they must match")
    nqb = -(-shape.q_len // block_size)
    nkb = -(-shape.k_len // block_size)
    expected = (shape.batch, shape.q_heads, nqb, nkb)
    ok = (
        mask.shape[0] in (1, shape.batch)
        and mask.shape[1] in (1, shape.q_heads)
        and tuple(mask.shape[2:]) == (nqb, nkb)
    )
    if not ok:
        raise ValueError(f"mask must have shape {list(expected)} (batch and head dims may be 1), "
                         f"got {list(mask.shape)}")
    return mask.expand(*expected)


def check_plan(plan: SparsePlan, shape: AttentionShape, block_size: object = None,
               causal: object = None) -> SparsePlan:
    """A :class:`~xattention.plan.SparsePlan` for these inputs, returned ``[B, Hq, ...]``.

    ``block_size`` and ``causal``, when given, must match the plan's.
    """
    lay = plan.layout
    if block_size is not None and check_block_size(block_size) != lay.block_size:
        raise ValueError(f"block_size ({block_size}) differs from the plan's "
                         f"({lay.block_size}); leave it out with a plan")
    if causal is not None and check_bool("causal", causal) != lay.causal:
        raise ValueError(f"causal ({causal}) differs from the plan's ({lay.causal}); leave it "
                         "out with a plan")
    if (lay.q_len, lay.k_len) != (shape.q_len, shape.k_len):
        raise ValueError(f"the plan is for q_len={lay.q_len}, k_len={lay.k_len}, the inputs "
                         f"have {shape.q_len}, {shape.k_len}")
    if plan.device != shape.device:
        raise ValueError(f"the plan is on {plan.device} but q is on {shape.device}; they must "
                         "match")
    if plan.device.type == "cpu":  # reading the lists costs no sync here (plan.check_contents)
        plan.check_contents()
    if plan.batch not in (1, shape.batch) or shape.q_heads % plan.heads:
        raise ValueError(f"a plan for batch {plan.batch}, {plan.heads} heads cannot serve "
                         f"batch {shape.batch}, {shape.q_heads} query heads")
    return plan.expand(shape.batch, shape.q_heads)


def check_block_grid(name: str, x: torch.Tensor, q_len: int, k_len: int, block_size: int) -> None:
    """``x`` must be ``[B, Hq, ceil(q_len/block_size), ceil(k_len/block_size)]``."""
    expected = (-(-q_len // block_size), -(-k_len // block_size))
    if tuple(x.shape[2:]) != expected:
        raise ValueError(f"{name} must have shape [B, Hq, {expected[0]}, {expected[1]}] for "
                         f"q_len={q_len}, k_len={k_len}, block_size={block_size}, got "
                         f"{list(x.shape)}")


def check_scores(scores: object) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if scores.dim() != 4:
        raise ValueError(f"scores must have rank 4 [batch, q_heads, q_blocks, k_blocks], got "
                         f"shape {tuple(scores.shape)}")
    return scores
