"""DemoFusion through Forge's own k-diffusion samplers: the stage loop that takes the place of ``p.sample``.

The same algorithm and engine as A1111 (``lib_hires/webui/demofusion_sampler.py``); what differs is where Forge
lets it in. Stage 1 is Forge's own ``sample`` at Width/Height (img2img: the encoded input). Each later stage
upsamples the latent bicubically, makes the stage's ``p.rng``, a fresh sampler, resets ``forge_objects`` to the
LoRA'd objects and calls ``process_before_every_sampling`` for every script, as Forge's own passes do; then,
after every script has patched its clone of the UNet:

* the views (``demofusion_views.ViewFunction``) take the UnetPatcher's one ``model_function_wrapper`` slot on a
  clone, chaining a wrapper a script put there (MultiDiffusion Integrated is refused: it tiles the same latent a
  second way), with the built-in ControlNet evaluated per call of views and the memory estimate sized to the
  largest call of views instead of the whole latent;
* two instance patches on the stage's sampler carry the skip residual exactly as in A1111: ``sampler.func``,
  probed with the arguments Forge passes for which evaluations start a step (``step_starts.py``), and the CFG
  denoiser's ``forward``, which writes the residual into the state at those evaluations (Forge's CFG runs in
  ``sampling_function`` inside it, so prompt editing, previews and the step counter stay Forge's).

After each stage every image is re-standardised to its stage-1 latent's mean and std. SDXL: the final size in
``y`` for every stage (stage 1 through a conditioning modifier), each view's crop.
"""
from __future__ import annotations

import functools

import torch

from lib_hires.demofusion import (DemoFusionSettings, FusedDenoiser, Stage, StagePlan, dilated_size, local_views,
                                  plan_calls)
from lib_hires.settings import TITLE, ScaleFusionSettings
from lib_hires.webui.demofusion_sampler import (SkipResidualSteps, StagedRun, _refiner_switches, sampler_reason,
                                                stage_plan)
from lib_hires.webui.instance_patch import InstancePatch
from lib_hires.webui.messages import RequestError, log

from . import decoding
from .demofusion_views import ControlViews, ViewFunction, ViewsUnsupported
from .sdxl_size import FinalSizeModifier, ForgeSizeConditioning

# Forge's built-in scripts whose patches read or tile the whole latent (their titles, as their title() says).
WHOLE_LATENT_SCRIPTS = {
    "MultiDiffusion Integrated": "it tiles the latent itself and takes the same model-function wrapper slot",
    "SelfAttentionGuidance Integrated (SD 1.x, SD 2.x, SDXL)":
        "it blurs with the attention map of one UNet call over the whole latent, which the views replace",
}


def _enabled_scripts(p) -> list[str]:
    """Titles of the always-on scripts of ``p`` whose first argument (their Enabled box) is on."""
    runner = getattr(p, "scripts", None)
    args = getattr(p, "script_args", None) or ()
    out = []
    for script in getattr(runner, "alwayson_scripts", []) or []:
        try:
            title = script.title()
        except Exception:  # noqa: BLE001 - another extension's title() is not ours to trust
            continue
        own = args[script.args_from:script.args_to] if getattr(script, "args_from", None) is not None else ()
        if title in WHOLE_LATENT_SCRIPTS and own and bool(own[0]):  # as the scripts' own `if not enabled`
            out.append(title)
    return out


def unsupported_reason(p) -> str | None:
    """Why DemoFusion cannot run this Forge job, or None (A1111's reasons and messages, where they apply)."""
    model = p.sd_model
    if getattr(p, "enable_hr", False):
        return f"{TITLE}: DemoFusion replaces Hires. fix (its first stage is Width/Height); turn Hires. fix off"
    if getattr(model, "is_inpaint", False):
        return f"{TITLE}: DemoFusion does not support inpainting, depth or instruct-pix2pix checkpoints"
    if getattr(p, "image_mask", None) is not None:
        return f"{TITLE}: DemoFusion upscales whole images; inpainting masks are not supported"
    predictor = getattr(getattr(getattr(getattr(model, "forge_objects", None), "unet", None), "model", None),
                        "predictor", None)
    if getattr(predictor, "prediction_type", None) not in (None, "epsilon", "v_prediction"):
        return (f"{TITLE}: DemoFusion's skip residual (z' + sigma noise) needs an epsilon or v-prediction model; "
                f"this one predicts {predictor.prediction_type}")
    for title in _enabled_scripts(p):
        return f"{TITLE}: DemoFusion cannot run with {title} ({WHOLE_LATENT_SCRIPTS[title]}); turn one of them off"
    return None


def timestep_sampler_reason(p) -> str | None:
    from modules import sd_samplers, sd_samplers_timesteps
    if sd_samplers.find_sampler_config(p.sampler_name) in sd_samplers_timesteps.samplers_data_timesteps:
        return (f"{TITLE}: DemoFusion needs a k-diffusion sampler (Euler, Euler a, DPM++ 2M, DPM++ SDE, ...); "
                f"{p.sampler_name} is a timestep sampler (DDIM, PLMS, UniPC are not supported)")
    return None


def refiner_reason(p) -> str | None:
    """Forge's refiner switch (``apply_refiner``) reloads the model in the middle of a sampler run and rebuilds the
    inner model from it: the stage's views, installed on the base model's UNet, would silently stop."""
    if _refiner_switches(p):
        return (f"{TITLE}: DemoFusion in Forge does not follow the refiner (the switch reloads the model in the "
                "middle of a stage and the views stay on the base model's UNet); turn the refiner off")
    return None


def redilation_reason(settings: ScaleFusionSettings, job) -> str | None:
    """Stage 1 is Forge's own pass: the job re-dilates it as any ScaleCrafter pass. The global path would need
    the re-dilation on the dilated samples' UNet calls only, while the local views of the same calls stay vanilla;
    Forge's ScaleCrafter pass re-dilates every call of the UNet it is armed on."""
    if settings.redilation in ("global path", "both"):
        return (f"{TITLE}: ScaleCrafter on DemoFusion's global path (re-dilation {settings.redilation}) is not "
                "available in Forge yet; set re-dilation to off or first stage")
    if settings.redilation == "first stage" and not callable(getattr(job, "arm_scalecrafter", None)):
        return f"{TITLE}: ScaleCrafter inside DemoFusion (re-dilation first stage) is not available here; set it to off"
    return None


def request_reason(p, settings: ScaleFusionSettings, job=None) -> str | None:
    """Everything DemoFusion refuses in Forge before sampling starts, in A1111's order."""
    return (unsupported_reason(p) or timestep_sampler_reason(p) or sampler_reason(p) or refiner_reason(p)
            or redilation_reason(settings, job))


def check_request(p, settings: ScaleFusionSettings, info, job=None) -> None:
    """Raises the 422 A1111's job raises for the same request: an unsupported configuration, a bad plan, a final
    size past the limit."""
    from lib_hires.webui.job import MAX_SIDE

    reason = request_reason(p, settings, job)
    if reason:
        raise RequestError(reason)
    try:
        plan = stage_plan(settings, info, p.width, p.height)
    except ValueError as error:
        raise RequestError(str(error) if str(error).startswith(TITLE) else f"{TITLE}: {error}") from None
    if max(plan.final.width, plan.final.height) > MAX_SIDE:
        raise RequestError(f"{TITLE}: DemoFusion's final size {plan.final.width}x{plan.final.height} exceeds "
                           f"{MAX_SIDE} px per side; lower scale ({settings.scale:g}) or Width/Height")


def largest_call(height: int, width: int, engine: DemoFusionSettings, dilation: int) -> tuple[int, tuple[int, int]]:
    """(views, (h, w)) of the UNet call of a stage with the most latent pixels: what its memory must hold."""
    views = local_views(height, width, engine.window, engine.stride)
    sizes = [v.size for v in views] + [dilated_size(height, width, dilation)] * (dilation * dilation)
    members = max(plan_calls(sizes, engine.view_batch), key=lambda m: len(m) * sizes[m[0]][0] * sizes[m[0]][1])
    return len(members), sizes[members[0]]


class ViewBatchMemory:
    """``memory_peak_estimation_modifier``: Forge sizes what it keeps free for ``[2B, C, H, W]``, the whole latent
    with cond and uncond; the UNet sees at most the largest call of views, ``2B x views`` rows of its size."""

    def __init__(self, base, engine: DemoFusionSettings, dilation: int):
        self.base, self.engine, self.dilation = base, engine, dilation

    def __deepcopy__(self, memo):
        return self

    def shape(self, input_shape) -> list[int]:
        rows, channels, height, width = input_shape
        views, (h, w) = largest_call(height, width, self.engine, self.dilation)
        return [rows * views, channels, h, w]

    def __call__(self, input_shape):
        return self.base(self.shape(input_shape))


class StageViews:
    """The stage's clone of ``forge_objects.unet`` with the views, made after every script patched its own."""

    def __init__(self, p, stage: Stage, engine: DemoFusionSettings, jitter, size_cond, check_interrupt):
        self.p = p
        self.unet = p.sd_model.forge_objects.unet
        options = self.unet.model_options
        if options.get("tiled_diffusion"):
            raise RequestError(f"{TITLE}: DemoFusion cannot run with MultiDiffusion Integrated "
                               f"({WHOLE_LATENT_SCRIPTS['MultiDiffusion Integrated']}); turn one of them off")
        self.clone = self.unet.clone()
        self.patches: list[InstancePatch] = []
        head = self.clone.controlnet_linked_list
        try:
            self.controls = ControlViews(head) if head is not None else None
        except ViewsUnsupported as error:
            raise RequestError(str(error)) from None
        if self.controls is not None:
            self.patches.append(InstancePatch(head, "get_control", self.controls.gate))
        predictor = self.clone.model.predictor
        make_fused = functools.partial(FusedDenoiser.from_settings, settings=engine, dilation=stage.dilation,
                                       sigma_to_t=predictor.timestep, jitter=jitter)
        self.views = ViewFunction(make_fused, previous=options.get("model_function_wrapper"), size_cond=size_cond,
                                  controls=self.controls, check_interrupt=check_interrupt,
                                  latent_hw=stage.latent_size)
        self.clone.model_options["model_function_wrapper"] = self.views
        base = options.get("memory_peak_estimation_modifier", self.unet.memory_required)
        self.clone.model_options["memory_peak_estimation_modifier"] = ViewBatchMemory(base, engine, stage.dilation)
        p.sd_model.forge_objects.unet = self.clone

    @property
    def fused(self) -> FusedDenoiser:
        return self.views.fused

    def remove(self) -> None:
        self.views.remove()
        for patch in reversed(self.patches):
            patch.remove()
        if self.controls is not None:
            self.controls.restore()
        objects = self.p.sd_model.forge_objects
        if objects.unet is self.clone:
            objects.unet = self.unet


class ForgeDemoFusionRun(StagedRun):
    """Takes the place of ``p.sample`` for one Forge job; the job calls :meth:`start_pass` from
    ``process_before_every_sampling``."""

    def __init__(self, p, job, original_sample):
        self.p, self.job, self.original_sample = p, job, original_sample
        self.plan: StagePlan | None = None
        self.stage: Stage | None = None          # the stage being sampled
        self.size_cond: ForgeSizeConditioning | None = None
        self.hooks: list = []                    # stage 1's conditioning modifier
        self.fused: list[FusedDenoiser] = []     # each later stage's, for its counters

    def start_pass(self, p, x) -> None:
        """Stage 1 (Forge's own sampling): on SDXL, the final size in ``y``; re-dilation where it is asked for
        (the job's own ScaleCrafter pass). Later stages install their views themselves once every script has run
        (``StageViews``), so this does nothing for them."""
        if self.stage is None or self.stage.index != 1:
            return
        if self.job.settings.redilation == "first stage":
            self.job.arm_scalecrafter(p, tuple(x.shape[-2:]), "DemoFusion stage 1 preset")
        if self.size_cond is None:
            return
        unet = p.sd_model.forge_objects.unet.clone()
        modifier = FinalSizeModifier(self.size_cond)
        unet.add_conditioning_modifier(modifier)
        p.sd_model.forge_objects.unet = unet
        self.hooks.append(modifier)

    def _remove_hooks(self) -> None:
        while self.hooks:
            self.hooks.pop().remove()

    def __call__(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        check_request(self.p, self.job.settings, self.job.info, self.job)
        try:
            return self._stages(conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts)
        finally:
            self._remove_hooks()
            self.stage = None

    def _size_conditioning(self) -> ForgeSizeConditioning | None:
        size_cond = ForgeSizeConditioning(self.p.sd_model, self.plan.final.width, self.plan.final.height)
        if size_cond.available:
            return size_cond
        log("warning: this SDXL model has no size embedder; views keep Forge's size conditioning")
        return None

    def _end_first_stage(self) -> None:
        self._remove_hooks()
        self.job.end_pass()

    def _save_stage(self, z, index: int) -> None:
        """An intermediate stage's images beside the final ones ("-stage1", ...), decoded by Forge."""
        import numpy as np
        from PIL import Image
        from modules import devices, images, processing, shared

        p = self.p
        tiling = decoding.TiledVae(p.sd_model)  # a big stage in tiles, as the final decode (post_sample)
        try:
            decoded = processing.decode_latent_batch(p.sd_model, z, target_device=devices.cpu, check_for_nans=True)
        finally:
            tiling.remove()
        for i, image in enumerate(decoded):
            array = (torch.clamp((image.float() + 1) / 2, 0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
            position = p.iteration * p.batch_size + i
            info = processing.create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, iteration=p.iteration,
                                              position_in_batch=i)
            images.save_image(Image.fromarray(np.ascontiguousarray(array.numpy())), p.outpath_samples, "",
                              p.all_seeds[position], p.all_prompts[position], shared.opts.samples_format, info=info,
                              p=p, suffix=f"-stage{index}")

    def _sample_stage(self, stage: Stage, z, c, uc, engine: DemoFusionSettings, jitter):
        from modules import sd_models

        p = self.p
        z_up, noise, image_conditioning = self._stage_start(stage, z)
        # As Forge's own passes: every pass patches fresh clones of the LoRA'd objects.
        p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
        sd_models.apply_token_merging(p.sd_model, p.get_token_merging_ratio())
        if p.scripts is not None:
            p.scripts.process_before_every_sampling(p=p, x=z_up, noise=noise, c=c, uc=uc)
        if getattr(p, "modified_noise", None) is not None:
            noise, p.modified_noise = p.modified_noise, None
        views = sampling = None
        strength, start = p.denoising_strength, self.later_start()
        try:
            views = StageViews(p, stage, engine, jitter, self.size_cond, self._check_interrupt)
            self.fused.append(views.fused)
            sampling = SkipResidualSteps(p.sampler, z_up, noise, engine.cosine_scale_1,
                                         p.sd_model.forge_objects.unet.model.predictor.timestep, p.sampler_name)
            # Forge's own partial start, as its hires pass and img2img: at stage strength 1 and the same steps,
            # the official full schedule from z' + sigma_max * noise.
            p.denoising_strength = start.strength
            try:
                return p.sampler.sample_img2img(p, z_up, noise, c, uc, steps=start.steps,
                                                image_conditioning=image_conditioning)
            except ViewsUnsupported as error:
                raise RequestError(str(error)) from None
        finally:
            p.denoising_strength = strength
            if sampling is not None:
                sampling.remove()
            if views is not None:
                views.remove()
            self.job.end_pass()
