"""Registering attention functions with transformers and switching a model's language layers to
them.

A custom attention name must be registered twice: in ``AttentionInterface`` (the function) and
in ``AttentionMaskInterface`` (how masks are built for it). A model hands a name that the mask
table does not know *no mask at all*, silently (docs/design.md, "transformers integration").

Only the language model is switched: on a multimodal model (Qwen2-VL, Qwen2.5-VL) the vision
tower's sub-config keeps its own implementation, so its attention runs exactly as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from .model_info import text_config, vision_config_key

__all__ = ["ATTENTION_NAME", "CAPTURE_NAME", "implementation", "register", "set_implementation",
           "xattention_mask"]

ATTENTION_NAME = "xattention"
CAPTURE_NAME = "xattention_capture"

_registered: set[str] = set()
_lock = threading.Lock()


def xattention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0,
                    kv_offset: int = 0, mask_function: Any = None,
                    attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                    allow_is_causal_skip: bool = True, **kwargs: Any) -> torch.Tensor | None:
    """``sdpa_mask``, except that plain causal attention without padding yields None, and that
    None always means lower-right causal.

    ``sdpa_mask`` itself only skips the mask when ``Lq == Lk`` (torch's ``is_causal`` is
    upper-left aligned); the XAttention function reads None as lower-right causal, so it can skip
    it for chunked prefill too and never materialise an ``Lq x Lk`` mask it does not need.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    if (allow_is_causal_skip and local_size is None and mask_function is causal_mask_function
            and kv_offset == 0 and not isinstance(q_offset, torch.Tensor)
            and int(q_offset) + q_length == kv_length):
        if attention_mask is None:
            return None
        padding = attention_mask
        if padding.dim() == 2 and padding.shape[-1] >= kv_length:
            padding = padding[:, padding.shape[-1] - kv_length:]
            if bool(padding.all()):
                return None
    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                local_size=local_size, **kwargs)
    mask = sdpa_mask(allow_is_causal_skip=allow_is_causal_skip, **args)
    if mask is None and 1 < q_length != kv_length:
        # sdpa_mask also skips the mask of a prefill into an empty static cache (keys = the
        # whole cache, its unwritten tail included), relying on torch's upper-left is_causal.
        # We read None as lower-right causal, which would let the prompt see the unwritten
        # slots: spell the mask out; the padding path then runs the written span only.
        mask = sdpa_mask(allow_is_causal_skip=False, **args)
    return mask


def register(name: str, forward: Callable[..., Any], mask: Callable[..., Any] | None = None
             ) -> None:
    """Register ``forward`` under ``name`` in both tables (``mask`` None: ``sdpa_mask``); once."""
    with _lock:
        if name in _registered:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(name, forward)
        AttentionMaskInterface.register(name, mask if mask is not None else sdpa_mask)
        _registered.add(name)


def implementation(model: Any, *, vision: bool = False) -> Any:
    """The attention implementation the language layers (or the vision encoder) use now."""
    if vision:
        key = vision_config_key(model)
        return None if key is None else getattr(model.config, key)._attn_implementation
    return text_config(model)._attn_implementation


def _text_config_key(model: Any) -> str | None:
    """Key of the language sub-config in ``model.config`` (None: the config is the text config)."""
    config = model.config
    text = text_config(model)
    if text is config:
        return None
    for key in getattr(config, "sub_configs", {}) or {}:
        if getattr(config, key, None) is text:
            return key
    return None


def set_implementation(model: Any, name: Any, *, vision: Any = None) -> None:
    """Switch the language layers of ``model`` to the attention implementation ``name`` (and,
    with ``vision``, the vision encoder to that one); everything else keeps its own."""
    setter = getattr(model, "set_attn_implementation", None)
    key = _text_config_key(model)
    request: Any = name if key is None else {key: name}
    vision_key = vision_config_key(model) if vision is not None else None
    if vision_key is not None:
        request = {**(request if isinstance(request, dict) else {"": request}),
                   vision_key: vision}
    if callable(setter):
        setter(request)
    else:  # older transformers: the config attribute is what the layers read
        text_config(model)._attn_implementation = name
        if vision_key is not None:
            getattr(model.config, vision_key)._attn_implementation = vision
    for wanted, current in ((name, implementation(model)),
                            (vision, implementation(model, vision=True))):
        if isinstance(wanted, str) and current != wanted:
            raise RuntimeError(f"could not switch the model's attention to {wanted!r} "
                               f"(config still says {current!r})")
