"""Integrations of XAttention with model libraries.

Each integration is a submodule imported explicitly, so that ``import xattention`` never pulls in
a heavy optional dependency:

>>> import xattention.integrations.transformers as xt  # doctest: +SKIP
>>> xt.enable(model, threshold=0.9, stride=8)           # doctest: +SKIP

What the integrations decide alike (thresholds and profiles, layer sets, option checks, the
statistics) lives once in :mod:`._common`, which imports no framework.
"""
