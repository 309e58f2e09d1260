"""When a layer is dilated, and by how much, as a function of the UNet's timestep.

The official thresholds are step indices ``i`` of 50-step DDIM with ``t_i = 981 - 20 i`` (``i = 0`` is
the noisiest). Gating on the timestep the UNet actually receives, mapped to the nearest official step,
makes every sampler, step count, Karras spacing and partial schedule (hires fix, img2img) dilate at
the same noise levels as the official runs.
"""
from __future__ import annotations

import math

OFFICIAL_STEPS = 50
_T0, _DT = 981.0, 20.0


def official_step(t: float) -> int:
    """Index of the official DDIM step nearest to timestep ``t`` (0..999; ``t > 981`` counts as step 0)."""
    return max(0, math.floor((_T0 - float(t)) / _DT + 0.5))


def official_timestep(i: int) -> int:
    return int(_T0 - _DT * i)


def scheduled_factor(factor: float, step: int, tau: float, progressive: bool) -> float:
    """Factor in force at official step ``step``; 1.0 means vanilla.

    Active while ``step < tau``. Progressive decay is the official ``max(ceil(d (tau - i) / tau), 2)``,
    capped at ``d`` so a fractional or sub-2 factor never grows (identical for the official integers).
    """
    if factor <= 1.0 or step >= tau:
        return 1.0
    if not progressive:
        return factor
    return min(factor, float(max(math.ceil(factor * (tau - step) / tau - 1e-9), 2)))


def last_active_timestep(tau: float) -> int | None:
    """Smallest official timestep that is still dilated (None when tau admits no step)."""
    last = math.ceil(tau) - 1
    return official_timestep(min(last, OFFICIAL_STEPS - 1)) if last >= 0 else None
