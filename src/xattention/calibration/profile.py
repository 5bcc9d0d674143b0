"""The threshold profile format, kept importable here for older code.

The format lives in the core, :mod:`xattention.profile` (calibration writes it, the integrations
read it, and the core must not depend on either).
"""

from ..profile import (
    PROFILE_FORMAT,
    PROFILE_VERSION,
    ThresholdProfile,
    load_thresholds,
    model_structure,
)

__all__ = ["PROFILE_FORMAT", "PROFILE_VERSION", "ThresholdProfile", "load_thresholds",
           "model_structure"]
