"""ScaleCrafter on one WebUI sampling pass: conv hooks, the timestep pre-hook and noise-damped CFG.

A pass is armed in ``process_before_every_sampling`` (so the hires pass gets a plan for its own latent
size) and disarmed when sampling ends. Noise-damped CFG patches ``combine_denoised`` on the fresh
sampler's ``CFGDenoiser`` *instance*; the denoiser's inputs reach it through an ``on_cfg_denoiser``
callback that the Script registers once and that does nothing unless a pass is armed. That callback also
starts recording the shared prefix (``SharedPrefix``) for the uncond rows, which the WebUI's CFG batch puts
last; the base call in ``combine_denoised`` then replays the blocks it shares with the main call.
"""
from __future__ import annotations

from typing import Any

import torch

from lib_hires.scalecrafter import ScaleCrafterController, ScaleCrafterPlan, SharedPrefix, build_plan
from lib_hires.settings import ScaleFusionSettings, SettingsError

from .lora_functional import FunctionalLoraDeltas
from .model_info import ModelInfo


class _Capture:
    """The armed CFG denoiser and the last ``CFGDenoiserParams`` it produced."""
    denoiser: Any = None
    params: Any = None
    prefix: Any = None  # the armed pass's SharedPrefix


def _uncond_rows(uncond) -> int:
    return uncond["crossattn"].shape[0] if isinstance(uncond, dict) else uncond.shape[0]


_capture = _Capture()


def on_cfg_denoiser(params) -> None:
    """``script_callbacks.on_cfg_denoiser`` callback: keeps the params of the armed denoiser only."""
    if _capture.denoiser is not None and params.denoiser is _capture.denoiser:
        _capture.params = params
        uncond = getattr(params, "text_uncond", None)
        if _capture.prefix is not None and uncond is not None:
            _capture.prefix.start_recording(_uncond_rows(uncond))


def plan_for_latent(info: ModelInfo, settings: ScaleFusionSettings, latent_hw: tuple[int, int]) -> ScaleCrafterPlan:
    """The plan for a latent of ``latent_hw`` on this model; SettingsError where it has none."""
    mismatch = info.preset_mismatch
    if mismatch:
        raise SettingsError(mismatch)
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

    def __init__(self, plan: ScaleCrafterPlan, info: ModelInfo, cfg_denoiser, sd_model, lora_networks=()):
        self.plan = plan
        self.controller = ScaleCrafterController(info.unet, plan)
        try:  # lora_functional: the networks' conv deltas go through the same re-dilated convs
            self.lora_deltas = FunctionalLoraDeltas(self.controller.handle.hooks, lora_networks)
        except BaseException:
            self.controller.remove()
            raise
        self.cfg_denoiser = cfg_denoiser
        self.sd_model = sd_model
        self.base_evaluations = 0
        self.prefix = None
        self._patched = False
        if plan.base is not None and cfg_denoiser is not None:
            try:
                self.prefix = SharedPrefix(info.unet, self.controller)
            except BaseException:
                self.lora_deltas.remove()
                self.controller.remove()
                raise
            self._original_combine = cfg_denoiser.combine_denoised  # another extension's patch, or the method
            self._had_own_combine = "combine_denoised" in vars(cfg_denoiser)
            cfg_denoiser.combine_denoised = self._combine
            self._patched = True
            _capture.denoiser, _capture.params, _capture.prefix = cfg_denoiser, None, self.prefix

    def _guided(self, x_out: torch.Tensor, conds_list, rows: int, cond_scale: float) -> bool:
        """Whether ``combine_denoised`` guides with the uncond rows; not where the WebUI skipped them.

        ``CFGDenoiser.forward`` passes ``cond_scale * cond_scale_miltiplier`` when it guides and a literal 1.0
        when it skipped the uncond rows (NGMS, skip early CFG), putting copies of cond rows there. Without a
        multiplier 1.0 is also plain "no guidance". DDIM CFG++ multiplies by 1/12.5, so its CFG scale 12.5 gives
        1.0 too: guided unless the uncond rows are those copies.
        """
        if cond_scale != 1.0:
            return True
        if getattr(self.cfg_denoiser, "cond_scale_miltiplier", 1.0) == 1.0:
            return False
        first_cond_rows = [conds[0][0] for conds in conds_list]
        return not torch.equal(x_out[-rows:], x_out[first_cond_rows])

    def _base_uncond(self, x_out: torch.Tensor, conds_list, uncond, cond_scale: float) -> torch.Tensor | None:
        """The uncond prediction of the noise-damped base UNet, or None where plain CFG applies."""
        call = self.controller.last_call
        params = _capture.params
        if call is None or params is None or params.denoiser is not self.cfg_denoiser:
            return None
        if self.plan.base_at(call[0]) is None:
            return None
        rows = _uncond_rows(uncond)
        if not self._guided(x_out, conds_list, rows, cond_scale):
            return None
        x, sigma, image_cond = params.x[-rows:], params.sigma[-rows:], params.image_cond[-rows:]
        with self.controller.base_pass(), self.prefix.replaying():
            base = self.cfg_denoiser.inner_model(x, sigma, cond=_condition_dict(self.sd_model, uncond, image_cond))
        self.base_evaluations += rows
        return base

    def _combine(self, x_out, conds_list, uncond, cond_scale):
        self.prefix.stop_recording()  # the main calls are done; another extension's calls from here are its own
        try:
            combined = self._original_combine(x_out, conds_list, uncond, cond_scale)
            base = self._base_uncond(x_out, conds_list, uncond, cond_scale)
        finally:
            self.prefix.clear()
        if base is None:
            return combined
        if getattr(self.cfg_denoiser, "need_last_noise_uncond", False):
            # DDIM CFG++ re-noises along the uncond prediction it keeps here (set just before this call);
            # under noise damping that role is the base UNet's.
            self.cfg_denoiser.last_noise_uncond = base.clone()
        # combine_denoised is d_uncond + sum_k w_k s (d_k - d_uncond); swapping the leading d_uncond for
        # the base prediction gives ScaleCrafter's base_uncond + w (d_cond - d_uncond), and keeps any other
        # extension's combine_denoised patch in the chain.
        return combined + (base - x_out[-base.shape[0]:])

    def remove(self) -> None:
        if self.prefix is not None:
            self.prefix.remove()
        self.lora_deltas.remove()
        self.controller.remove()
        if self._patched:
            self._patched = False
            if self._had_own_combine:
                self.cfg_denoiser.combine_denoised = self._original_combine
            else:
                del self.cfg_denoiser.combine_denoised
            if _capture.denoiser is self.cfg_denoiser:
                _capture.denoiser, _capture.params, _capture.prefix = None, None, None
