"""diffusers switch: the video self-attention of Wan, HunyuanVideo, CogVideoX (and Flux)
transformers through XAttention, non-causal, with dense warm-up steps.

>>> import xattention.integrations.diffusers as xd
>>> xd.enable(pipe.transformer, threshold=0.95, warmup_steps=5)   # doctest: +SKIP
>>> frames = pipe(prompt, num_frames=81).frames[0]                 # doctest: +SKIP
>>> xd.last_stats(pipe.transformer).per_step()                     # doctest: +SKIP
{0: 1.0, ..., 4: 1.0, 5: 0.43, ...}
>>> xd.disable(pipe.transformer)                                   # doctest: +SKIP

How it plugs in: :mod:`.processor` (the stock processors, wrapped); the rule for text tokens and
padding in joint attention: :mod:`.joint` and docs/video.md; step counting: :mod:`.steps`.
"""

from .models import SUPPORTED
from .processor import XAttentionProcessor
from .stats import VideoAttentionStats
from .switch import (
    current_step,
    disable,
    enable,
    is_enabled,
    last_stats,
    reset_stats,
    reset_steps,
)

__all__ = [
    "SUPPORTED",
    "VideoAttentionStats",
    "XAttentionProcessor",
    "current_step",
    "disable",
    "enable",
    "is_enabled",
    "last_stats",
    "reset_stats",
    "reset_steps",
]
