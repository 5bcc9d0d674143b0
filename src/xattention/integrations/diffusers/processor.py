"""The wrapping processor: the model's own processor code, with its attention call redirected.

diffusers' attention backends are a closed enum, so an outside kernel cannot be registered there.
Instead each video self-attention module gets an :class:`XAttentionProcessor` that runs the
*stock* processor's ``__call__`` -- its projections, norms, rope and output projection, unchanged --
through a copy of that function whose globals map the one name it calls its kernel by
(``dispatch_attention_fn``, or ``F`` for ``F.scaled_dot_product_attention``) to
:meth:`XAttentionProcessor.kernel`. Nothing global is patched: other models, other processors and
the stock class itself keep calling the real function. Calls XAttention does not serve (warm-up
steps, dense layers, cross-attention, context parallelism, masks that are not key padding) go to
the real function with the original arguments, so they compute exactly what the stock processor
computes, with whatever attention backend the user chose.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..._backend import warn_once
from .joint import joint_attention
from .masks import key_padding
from .models import FUNCTIONAL

if TYPE_CHECKING:
    from .switch import State


class _FunctionalProxy:
    """Stands in for ``torch.nn.functional`` inside one processor: SDPA redirected, the rest
    forwarded."""

    def __init__(self, sdpa: Any) -> None:
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)


def check_redirectable(processor_cls: type, call_site: str) -> None:
    """Raise if the stock ``__call__`` does not call its kernel by the expected global name (a
    diffusers version whose processors changed)."""
    names = processor_cls.__call__.__code__.co_names
    needed = (call_site, "scaled_dot_product_attention") if call_site == FUNCTIONAL \
        else (call_site,)
    if not all(n in names for n in needed):
        called = "F.scaled_dot_product_attention" if call_site == FUNCTIONAL else call_site
        raise ValueError(f"{processor_cls.__name__}.__call__ no longer calls {called}"
                         " (a diffusers version this integration was not written for; it targets "
                         "diffusers 0.42)")


def _redirected(func: types.FunctionType, name: str, replacement: Any) -> types.FunctionType:
    """``func`` with the global ``name`` bound to ``replacement`` (its own copy of the globals)."""
    scope = dict(func.__globals__)
    scope[name] = replacement
    copy = types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__,
                              func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    return copy


class XAttentionProcessor:
    """Runs ``inner`` (a stock processor) with its video self-attention through XAttention.

    Not built directly: :func:`xattention.integrations.diffusers.enable` installs one per
    attention module, as an instance of a subclass whose ``__call__`` has the stock signature
    (diffusers' ``Attention.forward`` reads it to decide which keyword arguments to pass).
    """

    def __init__(self, inner: Any, layer: int, state: State) -> None:
        self.inner = inner
        self.layer = layer
        self.state = state
        stock = type(inner).__call__
        self._signature = inspect.signature(stock)
        self._real = stock.__globals__[state.spec.call_site]
        kernel = self._sdpa if state.spec.call_site == FUNCTIONAL else self._dispatch
        replacement = _FunctionalProxy(kernel) if state.spec.call_site == FUNCTIONAL else kernel
        self._stock_call = _redirected(stock, state.spec.call_site, replacement)
        self._text_len: int | None = 0

    # set_attention_backend / context parallelism configure the processor: forward to the stock
    # one, whose code reads them.
    @property
    def _attention_backend(self) -> Any:
        return getattr(self.inner, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.inner._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.inner, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.inner._parallel_config = value

    def _run(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind(self.inner, attn, *args, **kwargs).arguments
        self._text_len = self.state.spec.text_len(bound, self.state.text_len)
        return self._stock_call(self.inner, attn, *args, **kwargs)

    # ---- the redirected kernels -------------------------------------------------------------

    def _dispatch(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                  attention_kwargs: dict | None = None, *, backend: Any = None,
                  parallel_config: Any = None) -> torch.Tensor:
        """``dispatch_attention_fn``'s signature; q/k/v ``[B, L, H, D]``."""
        served = not attention_kwargs and parallel_config is None
        out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           attn_mask, dropout_p, is_causal, scale, served) if served else None
        if out is not None:
            return out.transpose(1, 2)
        if parallel_config is not None:
            warn_once("xattention: context-parallel attention calls run the stock dense path")
        return self._real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                          attention_kwargs=attention_kwargs, backend=backend,
                          parallel_config=parallel_config)

    def _sdpa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, **kwargs: Any
              ) -> torch.Tensor:
        """``F.scaled_dot_product_attention``'s signature; q/k/v ``[B, H, L, D]``."""
        out = self._attend(query, key, value, attn_mask, dropout_p, is_causal, scale, True)
        if out is not None:
            return out
        return self._real.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                       dropout_p=dropout_p, is_causal=is_causal,
                                                       scale=scale, **kwargs)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool,
                scale: float | None, served: bool) -> torch.Tensor | None:
        """XAttention output ``[B, H, N, D]``, or None for "run the stock kernel"."""
        state = self.state
        n = q.shape[2]
        if not state.enabled or not served or is_causal or dropout_p or k.shape[2] != n:
            return None  # not the video self-attention this integration serves
        text = self._text_len
        if text is None:
            warn_once("xattention: a joint-attention block was called outside its transformer's "
                      "forward, so its text length is unknown; it runs the stock attention")
            return None
        if state.spec.text == "first":
            video = (text, n)
        elif state.spec.text == "last":
            video = (0, n - text)
        else:
            video = (0, n)
        if video[1] <= video[0]:
            return None
        batch, heads, length = q.shape[0], q.shape[1], video[1] - video[0]
        if (state.step < state.warmup_steps or self.layer in state.dense_layers
                or length < state.min_prefill_len):
            state.record(self.layer, None, batch, heads, length)
            return None
        keys = key_padding(attn_mask, batch, n, n)
        if keys is None or (keys is not True and not bool(keys[:, video[0]:video[1]].all())):
            warn_once("xattention: an attention mask that is not padding of text keys (rows or "
                      "heads differ, a bias, or hidden video tokens) reached a video "
                      "self-attention layer; those calls run the stock dense attention")
            state.record(self.layer, None, batch, heads, length)
            return None
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        options = dict(video=video, threshold=state.threshold_for(self.layer, q.device),
                       stride=state.stride, block_size=state.block_size, scale=scale,
                       backend=state.backend, estimate_dtype=state.estimate_dtype)
        if keys is True or bool(keys.all()):
            out, mask = joint_attention(q, k, v, text_keys=None, **options)
        else:
            out = torch.empty_like(q)
            masks = []
            for b in range(batch):
                text_keys = keys[b].nonzero().squeeze(1)
                inside = (text_keys >= video[0]) & (text_keys < video[1])
                out[b:b + 1], mask_b = joint_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1],
                                                       text_keys=text_keys[~inside], **options)
                masks.append(mask_b)
            mask = torch.cat(masks)
        state.record(self.layer, mask, batch, heads, length)
        return out


@functools.cache
def wrapper_class(stock_cls: type) -> type:
    """An :class:`XAttentionProcessor` subclass with ``stock_cls.__call__``'s signature."""

    def __call__(self: XAttentionProcessor, attn: torch.nn.Module, *args: Any, **kwargs: Any
                 ) -> Any:
        return self._run(attn, *args, **kwargs)

    functools.update_wrapper(__call__, stock_cls.__call__)
    return type(f"XAttention{stock_cls.__name__}", (XAttentionProcessor,),
                {"__call__": __call__, "__module__": __name__})
