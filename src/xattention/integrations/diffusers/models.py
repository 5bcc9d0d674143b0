"""Which diffusers transformers are supported, and where their video self-attention lives.

Each supported transformer class gets a :class:`ModelSpec`: the attention modules that attend over
the video tokens (in layer order: that order numbers the layers of ``thresholds``,
``dense_layers`` and the statistics), the stock processor classes they must carry, the name by
which that processor's code calls its attention kernel, and where the text tokens sit in the joint
sequence (see docs/video.md, "Joint attention").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# How the stock processor calls its kernel: a module-level function, or ``F.<name>``.
DISPATCH = "dispatch_attention_fn"  # diffusers.models.attention_dispatch, q/k/v [B, L, H, D]
FUNCTIONAL = "F"  # torch.nn.functional.scaled_dot_product_attention, q/k/v [B, H, L, D]


@dataclass(frozen=True)
class ModelSpec:
    """How one transformer class runs its video self-attention.

    ``text`` is where the text tokens sit in the sequence the kernel sees: ``"none"`` (pure video
    self-attention, text comes in through cross-attention), ``"first"`` or ``"last"``.
    ``text_len(bound, hook_text_len)`` returns the number of text tokens of one processor call from
    its bound arguments (or the length the transformer's forward pre-hook saw), None if unknown.
    """

    class_name: str
    module: str
    processor_classes: tuple[str, ...]
    call_site: str
    text: str
    attention_modules: Callable[[torch.nn.Module], list[torch.nn.Module]]
    text_len: Callable[[dict[str, Any], int | None], int | None]


def _encoder_len(bound: dict[str, Any], hook_text_len: int | None) -> int:
    enc = bound.get("encoder_hidden_states")
    return 0 if enc is None else int(enc.shape[1])


def _encoder_or_hook_len(bound: dict[str, Any], hook_text_len: int | None) -> int | None:
    # Flux's single-stream blocks hand the processor the already joined sequence and no
    # encoder states: the text length comes from the transformer's own inputs.
    enc = bound.get("encoder_hidden_states")
    if enc is not None:
        return int(enc.shape[1])
    return hook_text_len  # None when the block was called outside the transformer's forward


def _no_text(bound: dict[str, Any], hook_text_len: int | None) -> int:
    return 0


def _wan_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    # attn1 is the self-attention over video tokens; attn2 (text / image cross-attention) stays.
    return [block.attn1 for block in model.blocks]


def _dual_and_single(model: torch.nn.Module) -> list[torch.nn.Module]:
    return ([block.attn for block in model.transformer_blocks]
            + [block.attn for block in model.single_transformer_blocks])


def _cog_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [block.attn1 for block in model.transformer_blocks]


SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("WanTransformer3DModel", "diffusers.models.transformers.transformer_wan",
              ("WanAttnProcessor",), DISPATCH, "none", _wan_modules, _no_text),
    ModelSpec("HunyuanVideoTransformer3DModel",
              "diffusers.models.transformers.transformer_hunyuan_video",
              ("HunyuanVideoAttnProcessor2_0",), DISPATCH, "last", _dual_and_single,
              _encoder_len),
    ModelSpec("CogVideoXTransformer3DModel",
              "diffusers.models.transformers.cogvideox_transformer_3d",
              ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0"), FUNCTIONAL,
              "first", _cog_modules, _encoder_len),
    ModelSpec("FluxTransformer2DModel", "diffusers.models.transformers.transformer_flux",
              ("FluxAttnProcessor",), DISPATCH, "first", _dual_and_single, _encoder_or_hook_len),
)

SUPPORTED = tuple(spec.class_name for spec in SPECS)


def spec_for(model: object) -> ModelSpec:
    """The spec of ``model``'s class (subclasses included), or a TypeError naming what is supported.

    Example:
        >>> spec_for(pipe.transformer).class_name      # doctest: +SKIP
        'WanTransformer3DModel'
    """
    import importlib

    if not isinstance(model, torch.nn.Module):
        hint = ""
        if isinstance(getattr(model, "transformer", None), torch.nn.Module):
            hint = " (this looks like a pipeline: pass pipe.transformer)"
        raise TypeError(f"transformer must be a diffusers transformer model, got "
                        f"{type(model).__name__}{hint}; supported: {', '.join(SUPPORTED)}")
    for spec in SPECS:
        cls = getattr(importlib.import_module(spec.module), spec.class_name)
        if isinstance(model, cls):
            return spec
    raise TypeError(f"xattention.integrations.diffusers does not support {type(model).__name__}; "
                    f"supported transformer classes: {', '.join(SUPPORTED)}")
