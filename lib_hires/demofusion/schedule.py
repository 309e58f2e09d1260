"""Where a later stage starts and how many steps it runs: the WebUI's own partial-schedule rule.

A later stage with strength ``d < 1`` starts part-way down a noise schedule, exactly as the WebUI's
Hires. fix pass (and img2img) start theirs (``sd_samplers_common.setup_img2img_steps`` and
``KDiffusionSampler.sample_img2img`` in WebUI v1.10.1):

* with a given step count ``n`` (the hires pass, which always passes one; img2img with the option
  "do exactly the amount of steps the slider specifies"): a schedule of ``int(n / min(d, 0.999))``
  steps of which the last ``n`` run, i.e. ``t_enc = n - 1``;
* otherwise (img2img's default): a schedule of ``n`` steps of which ``int(min(d, 0.999) n) + 1`` run.

The run is ``sigmas[schedule - t_enc - 1:]`` from ``x + sigma_0 * noise``. At ``d = 1`` and the same
``n`` the first rule gives the full ``n``-step schedule (``int(n / 0.999) = n`` for ``n < 1000``):
the official DemoFusion start. ``later_steps = d * n`` with the first rule runs exactly the last
``d * n`` steps of the ``n``-step schedule, the official trajectory cut short.

The skip residual and the cosine weights read each step's own timestep, so nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

STRENGTH_CAP = 0.999  # the WebUI's min(denoising_strength, 0.999)


def _check(steps: int, strength: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1]; got {strength!r}")


def partial_steps(steps: int, strength: float, *, fixed_steps: bool = True) -> tuple[int, int]:
    """``(schedule length, t_enc)`` as the WebUI's ``setup_img2img_steps``; ``fixed_steps`` is its first
    branch (a step count was passed, or ``img2img_fix_steps``)."""
    _check(steps, strength)
    capped = min(strength, STRENGTH_CAP)
    if fixed_steps:
        return int(steps / capped), steps - 1
    return steps, int(capped * steps)


def partial_sigmas(get_sigmas: Callable[[int], torch.Tensor], steps: int, strength: float, *,
                   fixed_steps: bool = True) -> torch.Tensor:
    """The sigmas a stage runs (ending in 0): the tail of ``get_sigmas(schedule length)``."""
    total, t_enc = partial_steps(steps, strength, fixed_steps=fixed_steps)
    return get_sigmas(total)[total - t_enc - 1:]


def steps_run(steps: int, strength: float, *, fixed_steps: bool = True) -> int:
    """Sampler steps of such a run (model evaluations for single-evaluation samplers)."""
    return partial_steps(steps, strength, fixed_steps=fixed_steps)[1] + 1


@dataclass(frozen=True)
class LaterStart:
    """How a later stage calls the WebUI's ``sample_img2img``: ``p.denoising_strength`` during the stage
    and its ``steps`` argument (None: img2img's own rule, ``img2img_fix_steps`` included)."""
    strength: float
    steps: int | None

    def steps_run(self, first_steps: int, fix_steps: bool) -> int:
        if self.strength <= 0:
            return 0
        return steps_run(self.steps or first_steps, self.strength, fixed_steps=self.steps is not None or fix_steps)


def later_stage_start(*, img2img: bool, stage_strength: float, steps: int, later_steps: int,
                      denoising_strength: float | None = None) -> LaterStart:
    """txt2img: the hires pass's rule at ``stage_strength`` with ``later_steps or steps`` steps (1 and 0:
    the official full schedule). img2img: the lower of the two strengths, so Denoising strength still
    sets the start by default (stage strength 1), and img2img's own step rule unless ``later_steps`` is set,
    which then counts exactly, as Hires steps do."""
    if img2img:
        return LaterStart(min(denoising_strength, stage_strength), later_steps or None)
    return LaterStart(stage_strength, later_steps or steps)
