"""vLLM V1 attention backend: XAttention prefill inside vLLM's serving engine.

Install from a clone with ``pip install -e ".[vllm]"``; the ``vllm.general_plugins`` entry point
(:func:`plugin.register`) makes the backend vLLM's ``CUSTOM`` attention backend, selected the way
vLLM backends are selected::

    XATTENTION_THRESHOLD=0.9 vllm serve MODEL --attention-backend CUSTOM
    llm = LLM(MODEL, attention_backend="CUSTOM")        # offline; settings from os.environ

Settings are ``XATTENTION_*`` environment variables (``settings.py`` says why and lists them);
statistics are per worker process (``stats.py``: ``XATTENTION_STATS_DIR`` and
:func:`read_stats`). What runs where (``backend.py``): prefill chunks of at least
``XATTENTION_MIN_PREFILL_LEN`` new tokens attend with :func:`xattention.xattention` to their whole
context, read from the paged KV cache through the block table (:func:`paged.paged_kv`: in place on
CUDA; the CPU engine's PyTorch path reads a gathered copy, :func:`paged.gather_kv`); decode
and short chunks run on the engine's own kernel, which also writes the KV cache.

Tensor parallelism: vLLM splits the query and KV heads across ranks, and each rank's backend
sees only its heads, so XAttention runs per rank on that rank's heads, with that rank's slice
of a per-head profile; the statistics are per rank. TP > 1 has not been run (CI has one CPU
socket and no CUDA build of vLLM).

Importing this package does not import vLLM (``paged``, ``settings`` and ``stats`` work without
it); ``plugin``, ``backend``, ``cpu`` and ``cuda`` need it.
"""

from .paged import gather_kv, paged_kv
from .settings import XAttentionSettings, settings_from_env
from .stats import read_stats, worker_stats

__all__ = ["gather_kv", "paged_kv", "read_stats", "settings_from_env", "worker_stats",
           "XAttentionSettings"]
