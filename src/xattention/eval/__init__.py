"""Evaluation of XAttention on real models: a RULER-style long-context suite and an
attention-fidelity tool.

Modules: ``models`` (offline GGUF models), ``cache`` (where generated files are kept),
``ruler`` (task generation from ``nvidia-long-context-eval`` and RULER scoring), ``runner`` (the
suite: full attention vs XAttention settings, density measured from the masks), ``fidelity``
(per-head recall / output error / density against the threshold), ``report`` (JSON + Markdown +
charts) and ``cli`` (``xattention eval ...``).

>>> from xattention.eval.models import load_model   # doctest: +SKIP
"""
