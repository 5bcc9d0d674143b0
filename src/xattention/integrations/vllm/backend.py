"""The parts shared by the CPU and CUDA backends: a metadata builder that plans each batch, and an
attention implementation that runs the plan.

Per engine step, the builder splits the batch's requests (``query_start_loc``, ``seq_lens``):

* *sparse* rows: requests whose new query chunk has at least ``XATTENTION_MIN_PREFILL_LEN`` tokens
  (a prompt's prefill, or one chunk of a chunked prefill, with or without a prefix-cache hit);
* the rest (decodes, short chunks): they form a sub-batch with its own metadata, built by the
  engine's own builder, so that they run on the engine's own kernel.

Per layer, the implementation lets the engine's kernel write the KV cache (``do_kv_cache_update``
is inherited unchanged: the layout stays the one the decode kernel reads), then

* runs the sub-batch through the engine's ``forward`` and scatters its rows back;
* for each sparse row, describes the whole context ``[0, seq_len)`` in the paged cache
  (:func:`~.paged.paged_kv`: the Triton kernels read it in place through the block table;
  ``XATTENTION_KV_READ=gather`` copies it out first, :func:`~.paged.gather_kv`) and calls
  :func:`xattention.xattention` with the ``Lq`` new tokens as the last ``Lq`` positions
  (causal, ``Lq <= Lk``, docs/design.md), the layer's threshold(s)
  and the engine's softmax scale.

Dense layers (``XATTENTION_DENSE_LAYERS``), batches without a sparse row and layers the method
does not cover (sliding window, ALiBi, soft-capping, attention sinks, quantised KV cache, encoder
attention) go entirely through the engine's ``forward``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..._backend import warn_once
from ...api import xattention
from .._common.thresholds import ThresholdTable
from . import stats
from .paged import gather_kv, paged_kv
from .settings import VARIABLES, XAttentionSettings, settings_from_env


def current_settings() -> XAttentionSettings:
    """The settings in this process's environment (parsed once per distinct environment)."""
    return _settings_for(tuple(os.environ.get(name) for name in VARIABLES))


@functools.lru_cache(maxsize=8)
def _settings_for(values: tuple[str | None, ...]) -> XAttentionSettings:
    env = {k: v for k, v in zip(VARIABLES, values, strict=True) if v is not None}
    return settings_from_env(env)


@dataclass(frozen=True)
class SparseRow:
    """One request that runs through XAttention: its query tokens ``[start, end)`` in the batch,
    its row in the block table and its context length."""

    index: int
    start: int
    end: int
    seq_len: int


@dataclass
class XAttentionPlan:
    """What the builder decided for one batch (attached to the engine's metadata)."""

    sparse: list[SparseRow]
    block_table: torch.Tensor
    dense_metadata: Any | None = None       # the engine's metadata for the other requests
    dense_tokens: torch.Tensor | None = None  # their token indices in the batch


# Per-request fields of CommonAttentionMetadata that this planner does not know how to split:
# batches using them run dense.
_UNSUPPORTED_FIELDS = ("encoder_seq_lens", "dcp_local_seq_lens", "rswa_prefix_lens",
                       "mm_req_doc_ranges")


class XAttentionBuilderMixin:
    """Mixed into the engine's metadata builder: attaches an :class:`XAttentionPlan`."""

    def build(self, common_prefix_len: int, common_attn_metadata: Any,
              fast_build: bool = False) -> Any:
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        metadata.xattention = self._plan(common_attn_metadata, fast_build)
        return metadata

    def _plan(self, common: Any, fast_build: bool) -> XAttentionPlan | None:
        settings = current_settings()
        if isinstance(common.causal, torch.Tensor) or not common.causal:
            return None
        if not type(self).__module__.startswith("xattention."):
            # A vLLM layer subclassed this builder to reshape the batch before it (chunked
            # local attention's virtual batches, static sinks' extra pages): those layers are
            # local or carry keys the host lengths do not count, so they stay dense.
            warn_once(f"xattention: layers whose metadata builder vLLM wraps "
                      f"({type(self).__name__}) run dense attention")
            return None
        starts = common.query_start_loc_cpu[: common.num_reqs + 1].tolist()
        q_lens = [b - a for a, b in itertools.pairwise(starts)]
        sparse_ids = [i for i, n in enumerate(q_lens) if n >= settings.min_prefill_len]
        if not sparse_ids:
            return None
        busy = [name for name in _UNSUPPORTED_FIELDS if getattr(common, name, None) is not None]
        if busy:
            warn_once(f"xattention: batches with {busy} run dense (not supported by the planner)")
            return None
        # The engine's host copy where it has one: exact for prefill rows (the sparse ones), an
        # upper bound for decodes (max_seq_len of the dense sub-batch only). Reading seq_lens
        # from the device instead would wait for the GPU once per step.
        host = getattr(common, "seq_lens_cpu_upper_bound", None)
        if host is None:
            host = common.seq_lens.to("cpu")  # older engines: one device read per step
        if host.shape[0] < common.num_reqs:
            warn_once(f"xattention: a batch of {common.num_reqs} requests came with "
                      f"{host.shape[0]} host sequence lengths; such batches run dense")
            return None
        seq_lens = host[: common.num_reqs].tolist()
        rows = [SparseRow(i, starts[i], starts[i + 1], int(seq_lens[i])) for i in sparse_ids]
        plan = XAttentionPlan(sparse=rows, block_table=common.block_table_tensor)
        dense_ids = [i for i in range(common.num_reqs) if q_lens[i] < settings.min_prefill_len]
        if dense_ids:
            sub, tokens = _sub_batch(common, dense_ids, starts, q_lens, seq_lens)
            plan.dense_metadata = super().build(0, sub, fast_build)
            plan.dense_tokens = tokens
        return plan


def _sub_batch(common: Any, ids: list[int], starts: list[int], q_lens: list[int],
               seq_lens: list[int]) -> tuple[Any, torch.Tensor]:
    """``CommonAttentionMetadata`` of the requests ``ids`` alone (their tokens made contiguous)."""
    device = common.query_start_loc.device
    tokens_cpu = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in ids])
    tokens = tokens_cpu.to(device)
    index = torch.tensor(ids, device=device)
    sub_starts = torch.tensor([0, *itertools.accumulate(q_lens[i] for i in ids)],
                              dtype=common.query_start_loc_cpu.dtype)
    changes: dict[str, Any] = dict(
        query_start_loc=sub_starts.to(device),
        query_start_loc_cpu=sub_starts,
        seq_lens=common.seq_lens[index],
        num_reqs=len(ids),
        num_actual_tokens=int(tokens_cpu.numel()),
        max_query_len=max(q_lens[i] for i in ids),
        max_seq_len=max(seq_lens[i] for i in ids),
        block_table_tensor=common.block_table_tensor[index],
        slot_mapping=common.slot_mapping[tokens],
    )
    fields = {f.name for f in dataclasses.fields(common)}
    # The logits fields differ between vLLM versions (0.25 has no max_logits_per_req):
    # only the ones this version has are reset.
    for name in ("logits_indices_padded", "num_logits_indices", "max_logits_per_req"):
        if name in fields:
            changes[name] = None
    # Per-request host copies, sliced to the sub-batch where set (vLLM 0.25's deprecated
    # _seq_lens_cpu / _num_computed_tokens_cpu caches would otherwise describe the whole batch).
    # Indexed where each one lives: is_prefilling is a host tensor in vLLM 0.25's V1 runner,
    # and a host tensor indexed by device indices raises.
    for name, per in (("seq_lens_cpu_upper_bound", "req"), ("is_prefilling", "req"),
                      ("positions", "token"), ("req_idx", "req"),
                      ("replayssm_decode_base_cpu", "req"), ("_seq_lens_cpu", "req"),
                      ("_num_computed_tokens_cpu", "req")):
        value = getattr(common, name, None)
        if name not in fields or value is None:
            continue
        if not isinstance(value, torch.Tensor):  # numpy (req_idx)
            changes[name] = value[ids]
        elif per == "token":
            changes[name] = value[tokens if value.device == device else tokens_cpu]
        else:
            changes[name] = value[index if value.device == device else torch.tensor(ids)]
    for cache in ("_num_computed_tokens_cache", "_token_to_req_indices_cache"):
        if cache in fields:
            changes[cache] = None
    return dataclasses.replace(common, **changes), tokens


class XAttentionBackendMixin:
    """Mixed into the backend class (before the engine's own): what XAttention serves, declared
    where vLLM's selector reads it, so a configuration it cannot serve is refused when the engine
    starts rather than run dense layer by layer. Per-layer features the engine's kernel serves
    densely (sliding windows, ALiBi, soft-capping, sinks) stay accepted: those layers run dense
    with a warning (``_unsupported_reason``)."""

    # XAttention reads K/V straight from the cache: an unquantised one.
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]
    max_head_size: ClassVar[int | None] = None  # the kernels' limit, where there is one

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        sizes = super().get_supported_head_sizes()  # type: ignore[misc]
        return [s for s in sizes if cls.max_head_size is None or s <= cls.max_head_size]

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        within = cls.max_head_size is None or head_size <= cls.max_head_size
        return within and super().supports_head_size(head_size)  # type: ignore[misc]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        from vllm.v1.attention.backend import AttentionType

        return attn_type == AttentionType.DECODER  # causal prefill is what XAttention sparsifies


def check_engine_config(backend: type, vllm_config: Any) -> None:
    """Raise ``ValueError`` naming each engine argument ``backend`` cannot serve (the user's
    process, at engine start: the selector's own check runs later, inside the workers)."""
    problems = []
    cache_dtype = vllm_config.cache_config.cache_dtype
    if not backend.supports_kv_cache_dtype(cache_dtype):
        problems.append(f"kv_cache_dtype={cache_dtype!r} (XAttention reads an unquantised cache; "
                        f"supported: {backend.supported_kv_cache_dtypes})")
    model = vllm_config.model_config
    if model is not None:
        if not backend.supports_dtype(model.dtype):
            problems.append(f"dtype={model.dtype} (supported: {backend.supported_dtypes})")
        head_size = model.get_head_size()
        if not backend.supports_head_size(head_size):
            problems.append(f"the model's head size {head_size} (supported: "
                            f"{backend.get_supported_head_sizes() or 'any'})")
    if problems:
        raise ValueError("attention_backend='CUSTOM' (XAttention) cannot serve "
                         + "; ".join(problems))


class XAttentionImplMixin:
    """Mixed into the engine's attention implementation (before it in the bases)."""

    kv_layout: str  # "cpu", "split" or "stacked", see paged.py

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        base_init = next(c.__init__ for c in type(self).__mro__[1:]
                         if "__init__" in c.__dict__ and not issubclass(c, XAttentionImplMixin))
        bound = inspect.signature(base_init).bind(self, *args, **kwargs)
        bound.apply_defaults()
        named = bound.arguments
        self._xa_settings = current_settings()
        self._xa_reason = _unsupported_reason(named)
        if self._xa_reason is not None:
            warn_once(f"xattention: layers with {self._xa_reason} run dense attention")
        self._xa_layer: int | None = None
        self._xa_thresholds: ThresholdTable | None = None
        self._xa_num_layers = _num_layers()

    # -- per-layer facts, resolved on the first call (the layer name is known only then) --------
    def _xa_setup(self, layer: Any) -> None:
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )
        from vllm.model_executor.models.utils import extract_layer_index

        self._xa_layer = extract_layer_index(layer.layer_name)
        self._xa_rank = get_tensor_model_parallel_rank()
        threshold = self._xa_settings.threshold_for(self._xa_layer)
        if isinstance(threshold, tuple):
            # The profile has every query head; this rank holds a contiguous slice of them.
            world = get_tensor_model_parallel_world_size()
            if len(threshold) != self.num_heads * world:
                raise ValueError(f"XATTENTION_PROFILE has {len(threshold)} heads for layer "
                                 f"{self._xa_layer}, the model has {self.num_heads * world}")
            lo = self._xa_rank * self.num_heads
            threshold = torch.tensor(threshold[lo:lo + self.num_heads], dtype=torch.float32)
        self._xa_thresholds = ThresholdTable({self._xa_layer: threshold})
        self._xa_dense = self._xa_reason is not None or \
            self._xa_settings.is_dense(self._xa_layer, self._xa_num_layers)
        self._xa_layers_per_step = _layers_per_step()

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Any, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        plan: XAttentionPlan | None = getattr(attn_metadata, "xattention", None)
        if plan is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if self._xa_layer is None:
            self._xa_setup(layer)
        quantised_out = output_scale is not None or output_block_scale is not None
        if quantised_out:
            warn_once("xattention: attention with a quantised output (output_scale: vLLM's "
                      "fused attention + FP8 quantisation) runs dense; XAttention writes an "
                      "unquantised output")
        if self._xa_dense or quantised_out:
            out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                  output_scale, output_block_scale)
            if self._xa_reason is None and not quantised_out:  # a dense_layers entry: counted
                for row in plan.sparse:
                    stats.record(self._xa_layer, None, row.end - row.start, row.seq_len,
                                 self.num_heads, self._xa_settings.block_size)
            self._xa_after_layer()
            return out
        if plan.dense_metadata is not None:
            tokens = plan.dense_tokens
            part = output.new_empty((tokens.numel(), *output.shape[1:]))
            sub_k, sub_v = (None if x is None else x.index_select(0, tokens) for x in (key, value))
            super().forward(layer, query.index_select(0, tokens), sub_k, sub_v, kv_cache,
                            plan.dense_metadata, part)
            output.index_copy_(0, tokens, part)
        for row in plan.sparse:
            self._xa_sparse_row(row, plan.block_table, query, kv_cache, output)
        self._xa_after_layer()
        return output

    def _xa_sparse_row(self, row: SparseRow, block_table: torch.Tensor, query: torch.Tensor,
                       kv_cache: torch.Tensor, output: torch.Tensor) -> None:
        settings = self._xa_settings
        page = kv_cache.shape[2]  # page_size in every layout (paged.py)
        if -(-row.seq_len // page) > block_table.shape[1]:
            # vLLM's V2 compile warm-up plans dummy requests longer than a block-table row
            # (seq_len == q_len up to max_num_batched_tokens); a real request always fits.
            # Their output is never read: skip, rather than fail the engine's start.
            warn_once(f"xattention: skipped a {row.seq_len}-token row longer than its block "
                      f"table ({block_table.shape[1]} pages of {page}): an engine warm-up run")
            output[row.start:row.end] = 0
            return
        q = query[row.start:row.end].transpose(0, 1).unsqueeze(0).contiguous()
        if settings.kv_read == "paged" and kv_cache.dtype == q.dtype:
            # In place: the kernels read the pages (xattention gathers where they cannot).
            k, v = paged_kv(kv_cache, block_table[row.index], row.seq_len, self.kv_layout,
                            head_dim=self.head_size), None
        else:
            k, v = gather_kv(kv_cache, block_table[row.index], row.seq_len, self.kv_layout,
                             head_dim=self.head_size)
            k, v = k.to(q.dtype), v.to(q.dtype)
        threshold = self._xa_thresholds.for_layer(self._xa_layer, q.device)
        out, mask = xattention(q, k, v, threshold=threshold,
                               stride=settings.stride, block_size=settings.block_size,
                               causal=True, scale=self.scale, return_mask=True,
                               estimate_dtype=settings.estimate_dtype)
        output[row.start:row.end] = out[0].transpose(0, 1).to(output.dtype)
        stats.record(self._xa_layer, mask, row.end - row.start, row.seq_len, self.num_heads,
                     settings.block_size)

    def _xa_after_layer(self) -> None:
        stats.layer_done(self._xa_settings.stats_dir, self._xa_rank, self._xa_layers_per_step)


def _unsupported_reason(named: dict[str, Any]) -> str | None:
    """Why a layer built with these constructor arguments must stay dense, or None."""
    from vllm.v1.attention.backend import AttentionType

    window = named.get("sliding_window")
    if named.get("attn_type", AttentionType.DECODER) != AttentionType.DECODER:
        return f"attn_type={named['attn_type']}"
    if window not in (None, -1, (-1, -1)):
        return "a sliding window"
    if named.get("alibi_slopes") is not None:
        return "ALiBi"
    if named.get("logits_soft_cap") not in (None, 0, 0.0):
        return "logit soft-capping"
    if named.get("sinks") is not None:
        return "attention sinks"
    if named.get("kv_cache_dtype", "auto") not in XAttentionBackendMixin.supported_kv_cache_dtypes:
        return f"kv_cache_dtype={named['kv_cache_dtype']!r} (XAttention reads an unquantised cache)"
    return None


def _layers_per_step() -> int:
    """How many XAttention layers a step runs in this process: the step's statistics are
    published after the last of them. Counted from the engine's own layer registry, so that a
    pipeline stage, a hybrid model or a dense-only layer set counts what this worker runs."""
    from vllm.forward_context import get_forward_context

    layers = get_forward_context().no_compile_layers.values()
    return max(1, sum(isinstance(getattr(x, "impl", None), XAttentionImplMixin) for x in layers))


def _num_layers() -> int:
    from vllm.config import get_current_vllm_config

    config = get_current_vllm_config().model_config
    return int(config.hf_text_config.num_hidden_layers)
