"""Counting denoising steps from the timesteps the pipeline feeds the transformer.

A forward pre-hook on the transformer reads its ``timestep`` argument. Why the timestep and not a
pipeline callback: it needs no code in the user's generation call (``callback_on_step_end`` is the
user's own slot, and it runs only *after* a step), it works with any pipeline of the supported
transformers, and it is robust to classifier-free guidance: Wan and HunyuanVideo call the
transformer twice per step (conditional, unconditional) with the same timestep, CogVideoX doubles
the batch instead; either way the timestep is unchanged, so the step is too.

The rule: the first call is step 0; a call with the same timestep stays in the step; a smaller
timestep is the next step; a *larger* one starts a new generation (denoising schedules only go
down), which resets the count and the statistics. A per-token timestep (Wan 2.2 TI2V) counts by
its largest entry. Schedulers that evaluate the model more than once per step at different
timesteps (Heun, DPM-2) count model evaluations; :func:`reset_steps` restarts the count by hand.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ..._backend import warn_once


@dataclass
class StepCounter:
    """Denoising step of the current generation, from successive timesteps."""

    step: int = 0
    last: float | None = None

    def reset(self) -> None:
        self.step, self.last = 0, None

    def observe(self, timestep: Any) -> bool:
        """Advance on a new timestep; True when a new generation started."""
        value = _timestep_value(timestep)
        if value is None:
            warn_once("xattention: the transformer was called without a timestep; every call "
                      "counts as a new denoising step")
            self.step = 0 if self.last is None else self.step + 1
            self.last = float("nan")
            return False
        if self.last is None or value > self.last:
            self.step, self.last = 0, value
            return True
        if value < self.last:
            self.step += 1
            self.last = value
        return False


def _timestep_value(timestep: Any) -> float | None:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().max()) if timestep.numel() else None
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        return float(timestep)
    return None


def forward_arguments(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The transformer's forward arguments by name (positional or keyword)."""
    signature = inspect.signature(type(model).forward)
    try:
        return signature.bind_partial(model, *args, **kwargs).arguments
    except TypeError:  # let forward itself report a bad call
        return dict(kwargs)
