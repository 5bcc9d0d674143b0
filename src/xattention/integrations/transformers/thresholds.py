"""Thresholds of the transformers switch: the shared resolver
(:mod:`xattention.integrations._common.thresholds`), re-exported for older imports."""

from .._common.thresholds import LayerThreshold, ThresholdTable, resolve_thresholds, threshold_table

__all__ = ["LayerThreshold", "ThresholdTable", "resolve_thresholds", "threshold_table"]
