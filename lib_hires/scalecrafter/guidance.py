"""Classifier-free guidance with ScaleCrafter's noise damping.

Noise-damped CFG takes the unconditional *base* prediction from a less-dilated UNet and the guidance
direction from the re-dilated one: ``x0 = x0_base_uncond + w * (x0_cond - x0_uncond)``. All three
share ``x`` and ``sigma``, so the x0 form is exactly the official eps form. Rows follow the WebUI's
CFG batch: the cond rows of every image (one per AND-subprompt) first, the ``batch`` uncond rows last;
``conds_list[i]`` lists ``(cond row, weight)`` for image ``i``.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import torch

CondsList = Sequence[Sequence[tuple[int, float]]]


def guided_combine(x_out: torch.Tensor, conds_list: CondsList, cond_scale: float,
                   base_uncond: torch.Tensor | None = None) -> torch.Tensor:
    """``base + sum_k w_k * cond_scale * (x_out[cond_k] - uncond)`` per image.

    ``base_uncond`` defaults to the uncond rows of ``x_out`` (plain CFG, as the WebUI's
    ``combine_denoised``); pass the base pass's prediction for noise-damped CFG.
    """
    batch = len(conds_list)
    uncond = x_out[-batch:]
    base = uncond if base_uncond is None else base_uncond
    if base.shape != uncond.shape:
        raise ValueError(f"base_uncond has shape {tuple(base.shape)}, expected {tuple(uncond.shape)}")
    rows = [row for conds in conds_list for row, _ in conds]
    targets = [i for i, conds in enumerate(conds_list) for _ in conds]
    weights = [w * cond_scale for conds in conds_list for _, w in conds]
    if not rows:
        return base.clone()
    targets_t = torch.tensor(targets, device=x_out.device)
    weights_t = torch.tensor(weights, device=x_out.device, dtype=x_out.dtype).view(-1, *([1] * (x_out.ndim - 1)))
    delta = (x_out[torch.tensor(rows, device=x_out.device)] - uncond[targets_t]) * weights_t
    return base.index_add(0, targets_t, delta)


def _cat(a, b):
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b])


def _take(cond, rows: torch.Tensor):
    if isinstance(cond, dict):
        return {k: _take(v, rows) for k, v in cond.items()}
    return cond[rows]


class NoiseDampedCFG:
    """A k-diffusion model ``(x, sigma, cond=..., uncond=..., cond_scale=...) -> x0`` with guidance.

    ``denoiser(x, sigma, cond=c)`` returns x0 (e.g. ``k_diffusion.external.CompVisDenoiser``).
    ``cond``/``uncond`` are tensors (or dicts of tensors, as SDXL's crossattn + vector) with one row per
    subprompt / image. While ``controller.plan`` has a base set at the current timestep, one extra
    uncond-only evaluation runs in the controller's base mode; otherwise this is plain CFG.
    ``evaluations`` counts UNet samples, to check that cost. ``prefix`` (a :class:`SharedPrefix` on the
    controller's UNet) lets that evaluation reuse the blocks it shares with the main call's uncond rows;
    without one it runs in full.
    """

    def __init__(self, denoiser: Callable, controller=None, *, sigma_to_t: Callable[[torch.Tensor], torch.Tensor],
                 prefix=None):
        self.denoiser = denoiser
        self.controller = controller
        self.sigma_to_t = sigma_to_t
        self.prefix = prefix
        self.evaluations = 0

    def __call__(self, x, sigma, *, cond, uncond, cond_scale: float, conds_list: CondsList | None = None):
        batch = x.shape[0]
        conds_list = conds_list or [[(i, 1.0)] for i in range(batch)]
        image_of_row = torch.tensor([i for i, conds in enumerate(conds_list) for _ in conds] + list(range(batch)),
                                    device=x.device)
        damped = False
        if self.controller is not None and cond_scale != 1.0:
            damped = self.controller.plan.base_at(float(self.sigma_to_t(sigma.max()))) is not None
        prefix = self.prefix if damped else None
        try:
            # the uncond rows come last in the CFG batch: those are the rows the base call shares
            with prefix.recording(batch) if prefix is not None else nullcontext():
                x_out = self.denoiser(x[image_of_row], sigma[image_of_row], cond=_cat(cond, uncond))
            self.evaluations += len(image_of_row)
            base = None
            if damped:
                with self.controller.base_pass(), prefix.replaying() if prefix is not None else nullcontext():
                    base = self.denoiser(x, sigma, cond=uncond)
                self.evaluations += batch
        finally:
            if prefix is not None:
                prefix.clear()
        return guided_combine(x_out, conds_list, cond_scale, base)
