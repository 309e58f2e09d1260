"""ScaleCrafter on one Forge sampling pass: re-dilated convs on the UNet that samples, noise-damped CFG.

Forge resets ``sd_model.forge_objects`` before every pass and samples with ``forge_objects.unet`` (a
``UnetPatcher``) as it is when sampling starts; extensions clone it in ``process_before_every_sampling`` and set
``model_options`` hooks on the clone. A pass does the same: the clone gets a pre-CFG function (which checks, at
every step and with the options that really sample, that nothing tiles the latent past the plan) and, where the
plan has a base set, a post-CFG function for noise-damped CFG; the UNet module the clone shares with every other
clone (``patcher.model.diffusion_model``) gets the conv hooks and the timestep pre-hook of
:class:`~lib_hires.scalecrafter.ScaleCrafterController`.

``ForgeOperations.Conv2d.forward`` computes its kernel (offline LoRA is merged into the Parameter, online LoRA and
``scale_weight`` are applied in ``get_weight_and_bias``, manual casts in ``weights_manual_cast``) and reaches the
instance ``_conv_forward`` only in its manual-cast branch, so the convs' ``forward`` is hooked, with
:func:`forge_conv_weights` computing the kernel as that ``forward`` does.

``model_options`` are deep-copied by ``clone()``: the functions set there are closures (copied by reference),
inert once the pass is removed.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from lib_hires.scalecrafter import ScaleCrafterController, ScaleCrafterPlan
from lib_hires.settings import TITLE
from lib_hires.webui.messages import RequestError
from lib_hires.webui.model_info import ModelInfo

from . import installed


@contextmanager
def forge_conv_weights(conv, x: torch.Tensor):
    """The kernel and bias of a ``ForgeOperations.Conv2d`` for input ``x``, exactly as its ``forward`` computes
    them, with the copy stream's event held around the conv in the manual-cast branch as there."""
    from backend import operations

    if getattr(conv, "parameters_manual_cast", False):
        weight, bias, signal = operations.weights_manual_cast(conv, x)
        with operations.main_stream_worker(weight, bias, signal):
            yield weight, bias
    else:
        yield operations.get_weight_and_bias(conv)


def _calc_cond_uncond_batch():
    from backend.sampling.sampling_function import calc_cond_uncond_batch
    return calc_cond_uncond_batch


MULTIDIFFUSION = (f"{TITLE}: ScaleCrafter cannot run with MultiDiffusion Integrated: it samples the latent in tiles "
                  "through the UNet function wrapper, and ScaleCrafter's dilation is planned for the whole latent "
                  "(the tiles would run without it); turn one of them off")
CUSTOM_CFG = (f"{TITLE}: noise-damped CFG cannot be combined with another extension's CFG function "
              "(model_options['sampler_cfg_function'], e.g. Dynamic Thresholding or Latent Modifier): it does not "
              "compute uncond + scale x (cond - uncond), whose uncond the base UNet replaces; set Noise-damped CFG "
              "to off or turn that extension off")
RESIZED = (f"{TITLE}: ScaleCrafter cannot run with a patch that resizes the UNet's features ({{what}}; Kohya HRFix "
           "Integrated shrinks them so): its re-dilation is planned for the features of the whole latent at each "
           "level, and would dilate the resized ones by the wrong factor (both are ways to sample above the native "
           "size); turn Kohya HRFix (or that patch) off, or ScaleCrafter")


def resized_refusal(what: str) -> str:
    return RESIZED.format(what=what)


class ForgeScaleCrafterPass:
    """Hooks for one pass on ``patcher`` (a clone this pass owns) and its UNet; ``remove()`` is idempotent.

    ``calc_cond_uncond_batch`` and ``weights`` are Forge's (injected for tests without Forge). Without
    ``noise_damping`` the plan's base set is never used (DemoFusion's global path: CFG there runs over the whole
    latent through the views, so a base call of the uncond rows would be a call of views too; A1111 arms that
    pass without a CFG denoiser for the same reason).
    """

    def __init__(self, plan: ScaleCrafterPlan, info: ModelInfo, patcher, *, weights=forge_conv_weights,
                 calc_cond_uncond_batch=None, noise_damping: bool = True):
        if patcher.model.diffusion_model is not info.unet:
            raise ValueError("the UnetPatcher does not sample with the UNet the plan was made for")
        self.plan = plan
        self.unet = info.unet
        self.controller = ScaleCrafterController(info.unet, plan, weights=weights)
        self.removed = False
        self.guided = False          # whether this step's CFG computed uncond rows (not at CFG scale 1)
        self.base_evaluations = 0
        self._calc = calc_cond_uncond_batch
        self._post = None            # the noise-damped CFG post-CFG function, where the pass has one
        this = self

        def pre_cfg(model, cond, uncond, x, timestep, model_options):
            if not this.removed:
                this.guided = uncond is not None
                this._check_step(model, model_options)
                model_options = this._step_options(model_options)
            return model, cond, uncond, x, timestep, model_options

        patcher.set_model_sampler_pre_cfg_function(pre_cfg)
        if plan.base is not None and noise_damping:
            self._post = lambda args: this._noise_damped(args)
            patcher.set_model_sampler_post_cfg_function(self._post)

    def _check_step(self, model, model_options) -> None:
        """What the step's ``model_options`` (those of the patcher that samples, with every other extension's
        patches) hold that the pass cannot run with: refused before the step's first UNet call."""
        if model_options.get("tiled_diffusion"):
            raise RequestError(MULTIDIFFUSION)
        if getattr(model, "diffusion_model", None) is not self.unet:
            raise RequestError(f"{TITLE}: Forge samples with another UNet than the one ScaleCrafter was armed on "
                               "(the model was reloaded during sampling); nothing was re-dilated on it")
        if self._post is not None and self.guided and "sampler_cfg_function" in model_options:
            raise RequestError(CUSTOM_CFG)

    def _step_options(self, model_options: dict) -> dict:
        """The options this step runs with: a block patch that resizes the features is refused where it does
        (:func:`installed.resize_guarded`), and noise damping runs after every other post-CFG function. SAG and PAG
        add guidance terms computed from the step's predictions of the re-dilated UNet (SAG from its uncond
        prediction and the attention map recorded in that call, both of which the base call would replace); the
        base prediction then takes the uncond's place in the sum only."""
        model_options = installed.resize_guarded(model_options, resized_refusal)
        if self._post is not None:
            model_options = installed.running_last(model_options, self._post)
        return model_options

    def _noise_damped(self, args) -> torch.Tensor:
        """``sampler_post_cfg_function``: ``x0 = base_uncond + w (cond - uncond)``, as ``denoised + (base - uncond)``.

        The base prediction takes the uncond rows' place also in the uncond prediction this step returns (Forge's
        DDIM CFG++ re-noises along it, as the official noise damping does along the base's).
        """
        denoised = args["denoised"]
        call = self.controller.last_call
        if self.removed or not self.guided or call is None or self.plan.base_at(call[0]) is None:
            return denoised
        if "sampler_cfg_function" in args["model_options"]:
            raise RequestError(CUSTOM_CFG)
        calc = self._calc or _calc_cond_uncond_batch()
        x = args["input"]
        with self.controller.base_pass():
            _, base = calc(args["model"], [], args["uncond"], x, args["sigma"], args["model_options"])
        self.base_evaluations += x.shape[0]
        uncond = args["uncond_denoised"]
        out = denoised + (base - uncond)
        uncond.copy_(base)
        return out

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        self.controller.remove()
