"""The ``vllm.general_plugins`` entry point: registers the backend as vLLM's ``CUSTOM`` backend.

vLLM calls :func:`register` in every process it starts (the user's, the engine core, each worker)
before it builds a model. It

1. registers ``AttentionBackendEnum.CUSTOM`` -> this package's backend for the platform (CPU:
   ``cpu.XAttentionCPUBackend``; CUDA: ``cuda.XAttentionCUDABackend``). Users then select it as
   any vLLM backend: ``LLM(..., attention_backend="CUSTOM")`` or
   ``vllm serve ... --attention-backend CUSTOM``. Without that choice nothing changes;
2. on the CPU platform, which ignores a selected backend and always returns its own, lets the
   ``CUSTOM`` choice through (``CudaPlatform`` honours it already);
3. wraps the platform's ``check_and_update_config``, which runs in the user's process whenever an
   engine configuration is created, to validate the ``XATTENTION_*`` settings (and a profile
   against the model) and the engine arguments against the capabilities the backend class
   declares (``XAttentionBackendMixin``) when this backend is selected: a bad value raises
   there, before any worker exists, naming the variable or argument.
"""

from __future__ import annotations

from typing import Any

_CPU_PATH = "xattention.integrations.vllm.cpu.XAttentionCPUBackend"
_CUDA_PATH = "xattention.integrations.vllm.cuda.XAttentionCUDABackend"
_MARK = "_xattention_wrapped"


def backend_path() -> str:
    """Class path of the backend for the current platform."""
    from vllm.platforms import current_platform

    return _CPU_PATH if current_platform.is_cpu() else _CUDA_PATH


def register() -> None:
    """Entry point of ``vllm.general_plugins`` (safe to call more than once)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, backend_path())
    platform = type(current_platform)
    if current_platform.is_cpu():
        _let_cpu_honour_custom(platform)
    _validate_on_config_check(platform)


def backend_class() -> type:
    """The backend class for the current platform (imports vLLM's attention backends)."""
    import importlib

    module, _, name = backend_path().rpartition(".")
    return getattr(importlib.import_module(module), name)


def _is_ours() -> bool:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum.CUSTOM.is_overridden() and \
        AttentionBackendEnum.CUSTOM.get_path() in (_CPU_PATH, _CUDA_PATH)


def selected(vllm_config: Any) -> bool:
    """Whether this engine configuration selects the XAttention backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    attention = vllm_config.attention_config
    chosen = [attention.backend, *(getattr(attention, "backend_per_kind", None) or {}).values()]
    return _is_ours() and any(b == AttentionBackendEnum.CUSTOM or b == "CUSTOM" for b in chosen)


def _let_cpu_honour_custom(platform: type) -> None:
    original = platform.get_attn_backend_cls
    if getattr(original, _MARK, False):
        return
    from vllm.logger import init_logger
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    logger = init_logger("vllm.xattention")  # under "vllm": vLLM's log handler prints it

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend == AttentionBackendEnum.CUSTOM and _is_ours() and \
                not attn_selector_config.use_mla and not attn_selector_config.use_sparse:
            # What CudaPlatform does for a selected backend: its declared capabilities decide.
            reasons = backend_class().validate_configuration(
                device_capability=cls.get_device_capability(), **attn_selector_config._asdict())
            if reasons:
                raise ValueError(f"attention_backend='CUSTOM' (XAttention) is not valid for "
                                 f"this layer: {reasons}")
            logger.info_once("Using the XAttention backend (CUSTOM): %s", _CPU_PATH)
            return AttentionBackendEnum.CUSTOM.get_path()
        return original.__func__(cls, selected_backend, attn_selector_config, num_heads)

    setattr(get_attn_backend_cls, _MARK, True)
    platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _validate_on_config_check(platform: type) -> None:
    original = platform.check_and_update_config
    if getattr(original, _MARK, False):
        return

    def check_and_update_config(cls, vllm_config):
        original.__func__(cls, vllm_config)
        if selected(vllm_config):
            from .backend import check_engine_config
            from .settings import check_against_model, settings_from_env

            settings = settings_from_env()
            if vllm_config.model_config is not None:
                check_against_model(settings, vllm_config.model_config.hf_text_config)
            check_engine_config(backend_class(), vllm_config)

    setattr(check_and_update_config, _MARK, True)
    platform.check_and_update_config = classmethod(check_and_update_config)
