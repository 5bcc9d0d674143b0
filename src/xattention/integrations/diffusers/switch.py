"""``enable`` / ``disable``: install and remove the XAttention processors on a video transformer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..._backend import warn_once
from ..._validation import check_backend, check_bool, check_estimate_dtype
from ...selection import DEFAULT_THRESHOLD
from .._common.layers import layer_set
from .._common.options import (
    check_min_prefill_len,
    check_non_negative_int,
    check_optional_block_params,
)
from .._common.thresholds import LayerThreshold, ThresholdTable, resolve_thresholds
from .models import ModelSpec, spec_for
from .processor import XAttentionProcessor, check_redirectable, wrapper_class
from .stats import VideoAttentionStats
from .steps import StepCounter, forward_arguments

_STATE = "_xattention_video_state"


@dataclass
class XAttentionVideoState:
    """What ``enable`` attached to one transformer (shared by its processors and its hook)."""

    spec: ModelSpec
    stride: int
    block_size: int
    backend: str
    warmup_steps: int
    thresholds: ThresholdTable
    dense_layers: frozenset[int]
    record_stats: bool
    min_prefill_len: int = 0  # video sequences shorter than this stay dense
    estimate_dtype: torch.dtype | None = None
    stats: VideoAttentionStats = field(default_factory=VideoAttentionStats)
    counter: StepCounter = field(default_factory=StepCounter)
    text_len: int | None = None  # encoder_hidden_states length seen by the forward pre-hook
    originals: list[tuple[torch.nn.Module, Any]] = field(default_factory=list)
    hook: Any = None
    enabled: bool = True

    @property
    def step(self) -> int:
        return self.counter.step

    def threshold_for(self, layer: int, device: torch.device) -> LayerThreshold:
        return self.thresholds.for_layer(layer, device)

    def record(self, layer: int, mask: torch.Tensor | None, batch: int, heads: int,
               length: int) -> None:
        """Count one call's video blocks (``mask`` None: dense, every block kept)."""
        if self.record_stats:
            self.stats.record(self.step, layer, mask, batch=batch, heads=heads, length=length,
                              block_size=self.block_size)


State = XAttentionVideoState  # its earlier name (processor.py and older imports)


class _Structure:
    """What :meth:`ThresholdProfile.check_model` reads of a model, for a video transformer
    (whose config does not use the LLM names)."""

    def __init__(self, fields: dict[str, int]) -> None:
        self.__dict__.update(fields)


def _pre_hook(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    state: XAttentionVideoState | None = getattr(model, _STATE, None)
    if state is None or not state.enabled:
        return
    bound = forward_arguments(model, args, kwargs)
    encoder = bound.get("encoder_hidden_states")
    state.text_len = int(encoder.shape[1]) if isinstance(encoder, torch.Tensor) else None
    if state.counter.observe(bound.get("timestep")):
        state.stats.reset()  # a new generation: last_stats describes the latest one


def enable(
    transformer: torch.nn.Module,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    thresholds: Any = None,
    stride: int | None = None,
    block_size: int | None = None,
    dense_layers: Iterable[int] = (),
    min_prefill_len: int | None = None,
    backend: str = "auto",
    estimate_dtype: torch.dtype | None = None,
    record_stats: bool = True,
    warmup_steps: int = 5,
) -> torch.nn.Module:
    """Run the video self-attention of a diffusers video transformer through XAttention.

    Args:
        transformer: ``pipe.transformer`` of a Wan 2.x, HunyuanVideo, CogVideoX (or Flux)
            pipeline: a ``WanTransformer3DModel``, ``HunyuanVideoTransformer3DModel``,
            ``CogVideoXTransformer3DModel`` or ``FluxTransformer2DModel``.
        threshold: cumulative-score threshold in (0, inf) (any real type) of every layer and head
            without an entry in ``thresholds``; ``>= 1`` keeps every block (dense result through the
            sparse path).
        thresholds: a :class:`xattention.profile.ThresholdProfile` or the path of its JSON file,
            per layer ``[num_layers]``, per layer and head ``[num_layers][heads]`` (list or
            tensor), or ``{layer: float or [heads]}`` (the same forms as the transformers switch).
        stride: antidiagonal stride of the estimate (divides ``block_size``); None: the
            profile's, else 8. An explicit value that contradicts a profile is a ValueError.
        block_size: block edge of the sparsity pattern; None: the profile's, else 128.
        warmup_steps: the first denoising steps of each generation that stay dense (the paper
            uses 5). Steps are counted from the transformer's ``timestep`` argument (see
            docs/video.md).
        dense_layers: layer indices kept dense (negative ones count from the end).
        min_prefill_len: video sequences (tokens per frame times frames) shorter than this stay
            dense; None: ``block_size``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`xattention.xattention`).
        record_stats: count kept blocks per step and layer (see :func:`last_stats`).
        estimate_dtype: ``torch.float8_e4m3fn``: the estimate on FP8 operands (see
            :func:`xattention.xattention`), faster at video lengths on Hopper; None: exact.

    Layers are the video self-attention modules in model order: Wan ``blocks[i].attn1``;
    HunyuanVideo and Flux ``transformer_blocks`` then ``single_transformer_blocks``; CogVideoX
    ``transformer_blocks[i].attn1``. Cross-attention and the text refiner stay as they are.

    Returns:
        ``transformer`` (changed in place). Calling ``enable`` again replaces the settings.

    Example:
        >>> import xattention.integrations.diffusers as xd
        >>> xd.enable(pipe.transformer, threshold=0.9, warmup_steps=5)    # doctest: +SKIP
        >>> video = pipe(prompt, num_frames=81).frames[0]                  # doctest: +SKIP
        >>> xd.last_stats(pipe.transformer).per_step()                     # doctest: +SKIP
        {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 0.41, ...}
    """
    spec = spec_for(transformer)
    stride, block_size = check_optional_block_params(stride, block_size)
    warmup_steps = check_non_negative_int("warmup_steps", warmup_steps)
    backend = check_backend(backend)
    estimate_dtype = check_estimate_dtype(estimate_dtype)
    check_bool("record_stats", record_stats)
    if is_enabled(transformer):
        disable(transformer)
    modules = spec.attention_modules(transformer)
    if not modules:
        raise ValueError(f"{type(transformer).__name__} has no video self-attention layers")
    heads = {int(m.heads) for m in modules}
    if len(heads) != 1:
        raise ValueError(f"layers with different head counts {sorted(heads)} are not supported")
    processors = []
    for i, module in enumerate(modules):
        proc = module.processor
        if type(proc).__name__ not in spec.processor_classes:
            raise ValueError(f"layer {i} of {spec.class_name} has processor "
                             f"{type(proc).__name__}; XAttention wraps only the stock "
                             f"{' / '.join(spec.processor_classes)} (custom or adapter processors "
                             "are not supported)")
        check_redirectable(type(proc), spec.call_site)
        processors.append(proc)
    num_layers = len(modules)
    # A profile records the structure it was calibrated on: layer count and head count.
    structure = {"num_hidden_layers": num_layers, "num_attention_heads": next(iter(heads))}
    table, stride, block_size = resolve_thresholds(
        threshold, thresholds, stride=stride, block_size=block_size, num_layers=num_layers,
        num_heads=heads.pop(), model=_Structure(structure))
    dense = layer_set(dense_layers, num_layers, "dense_layers", unit="transformer")
    if len(dense) == num_layers:
        warn_once("xattention: dense_layers lists every attention layer of this transformer; "
                  "nothing will be sparsified")
    state = XAttentionVideoState(spec=spec, stride=stride, block_size=block_size, backend=backend,
                  warmup_steps=warmup_steps, thresholds=ThresholdTable(table),
                  dense_layers=dense,
                  record_stats=record_stats, estimate_dtype=estimate_dtype,
                  min_prefill_len=check_min_prefill_len(min_prefill_len, block_size))
    for i, (module, proc) in enumerate(zip(modules, processors, strict=True)):
        state.originals.append((module, proc))
        module.set_processor(wrapper_class(type(proc))(proc, i, state))
    state.hook = transformer.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    setattr(transformer, _STATE, state)
    return transformer


def disable(transformer: torch.nn.Module) -> torch.nn.Module:
    """Put back the processors ``transformer`` had before :func:`enable` (the same objects).

    A transformer that is not enabled is returned unchanged; :func:`last_stats` stays readable.
    """
    state: XAttentionVideoState | None = getattr(transformer, _STATE, None)
    if state is None or not state.enabled:
        return transformer
    for module, proc in state.originals:
        if isinstance(module.processor, XAttentionProcessor):
            module.set_processor(proc)
    state.hook.remove()
    state.enabled = False
    state.originals = []
    return transformer


def is_enabled(transformer: torch.nn.Module) -> bool:
    """Whether :func:`enable` is in effect on ``transformer``."""
    state = getattr(transformer, _STATE, None)
    return bool(state is not None and state.enabled)


def _state(transformer: torch.nn.Module) -> XAttentionVideoState:
    state = getattr(transformer, _STATE, None)
    if state is None:
        raise ValueError("xattention is not enabled on this transformer: call enable() first")
    return state


def last_stats(transformer: torch.nn.Module) -> VideoAttentionStats:
    """Densities per step and layer of the latest generation (or since :func:`reset_stats`).

    Example:
        >>> stats = xd.last_stats(pipe.transformer)              # doctest: +SKIP
        >>> stats.dense_steps(), round(stats.overall(stats.sparse_steps()), 2)   # doctest: +SKIP
        ([0, 1, 2, 3, 4], 0.38)
    """
    return _state(transformer).stats


def reset_stats(transformer: torch.nn.Module) -> None:
    """Clear the statistics returned by :func:`last_stats`."""
    _state(transformer).stats.reset()


def reset_steps(transformer: torch.nn.Module) -> None:
    """Start counting denoising steps from 0 at the next call (the warm-up runs again)."""
    _state(transformer).counter.reset()


def current_step(transformer: torch.nn.Module) -> int:
    """The denoising step the last transformer call was counted in."""
    return _state(transformer).step
