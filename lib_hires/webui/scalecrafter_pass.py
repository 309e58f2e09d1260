"""ScaleCrafter on one WebUI sampling pass: conv hooks, the timestep pre-hook and noise-damped CFG.

A pass is armed in ``process_before_every_sampling`` (so the hires pass gets a plan for its own latent
size) and disarmed when sampling ends. Noise-damped CFG patches ``combine_denoised`` on the fresh
sampler's ``CFGDenoiser`` *instance*; the denoiser's inputs reach it through an ``on_cfg_denoiser``
callback that the Script registers once and that does nothing unless a pass is armed.
"""
from __future__ import annotations

from typing import Any

import torch

from lib_hires.scalecrafter import ScaleCrafterController, ScaleCrafterPlan, build_plan
from lib_hires.settings import ScaleFusionSettings

from .model_info import ModelInfo


class _Capture:
    """The armed CFG denoiser and the last ``CFGDenoiserParams`` it produced."""
    denoiser: Any = None
    params: Any = None


_capture = _Capture()


def on_cfg_denoiser(params) -> None:
    """``script_callbacks.on_cfg_denoiser`` callback: keeps the params of the armed denoiser only."""
    if _capture.denoiser is not None and params.denoiser is _capture.denoiser:
        _capture.params = params


def plan_for_latent(info: ModelInfo, settings: ScaleFusionSettings, latent_hw: tuple[int, int]) -> ScaleCrafterPlan:
    height, width = latent_hw
    return build_plan(info.family, width * 8, height * 8, settings.scalecrafter(), layout=info.layout,
                      train_size=info.train_size)


def _condition_dict(sd_model, uncond, image_cond) -> dict:
    """The cond dict ``CFGDenoiser.forward`` builds for uncond rows (``make_condition_dict`` there)."""
    if getattr(sd_model.model, "conditioning_key", None) == "crossattn-adm":
        return {"c_crossattn": [uncond], "c_adm": image_cond}
    if isinstance(uncond, dict):
        return {**uncond, "c_concat": [image_cond]}
    return {"c_crossattn": [uncond], "c_concat": [image_cond]}


class ScaleCrafterPass:
    """Hooks for one pass; ``remove()`` undoes all of them and is safe to call twice."""

    def __init__(self, plan: ScaleCrafterPlan, info: ModelInfo, cfg_denoiser, sd_model):
        self.plan = plan
        self.controller = ScaleCrafterController(info.unet, plan)
        self.cfg_denoiser = cfg_denoiser
        self.sd_model = sd_model
        self.base_evaluations = 0
        self._patched = False
        if plan.base is not None and cfg_denoiser is not None:
            self._original_combine = cfg_denoiser.combine_denoised  # another extension's patch, or the method
            self._had_own_combine = "combine_denoised" in vars(cfg_denoiser)
            cfg_denoiser.combine_denoised = self._combine
            self._patched = True
            _capture.denoiser, _capture.params = cfg_denoiser, None

    def _base_uncond(self, x_out: torch.Tensor, uncond, cond_scale: float) -> torch.Tensor | None:
        """The uncond prediction of the noise-damped base UNet, or None where plain CFG applies."""
        if cond_scale == 1.0:  # no guidance, or the WebUI skipped the uncond rows (NGMS, skip early CFG)
            return None
        call = self.controller.last_call
        params = _capture.params
        if call is None or params is None or params.denoiser is not self.cfg_denoiser:
            return None
        if self.plan.base_at(call[0]) is None:
            return None
        rows = uncond["crossattn"].shape[0] if isinstance(uncond, dict) else uncond.shape[0]
        x, sigma, image_cond = params.x[-rows:], params.sigma[-rows:], params.image_cond[-rows:]
        with self.controller.base_pass():
            base = self.cfg_denoiser.inner_model(x, sigma, cond=_condition_dict(self.sd_model, uncond, image_cond))
        self.base_evaluations += rows
        return base

    def _combine(self, x_out, conds_list, uncond, cond_scale):
        combined = self._original_combine(x_out, conds_list, uncond, cond_scale)
        base = self._base_uncond(x_out, uncond, cond_scale)
        if base is None:
            return combined
        # combine_denoised is d_uncond + sum_k w_k s (d_k - d_uncond); swapping the leading d_uncond for
        # the base prediction gives ScaleCrafter's base_uncond + w (d_cond - d_uncond), and keeps any other
        # extension's combine_denoised patch in the chain.
        return combined + (base - x_out[-base.shape[0]:])

    def remove(self) -> None:
        self.controller.remove()
        if self._patched:
            self._patched = False
            if self._had_own_combine:
                self.cfg_denoiser.combine_denoised = self._original_combine
            else:
                del self.cfg_denoiser.combine_denoised
            if _capture.denoiser is self.cfg_denoiser:
                _capture.denoiser, _capture.params = None, None
