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

Re-dilation inside DemoFusion is the job's own ScaleCrafter pass: stage 1's for its whole latent, a later stage's
for its dilated samples' size only (the local views run vanilla), as in A1111. The refiner waits for the final
stage and takes over there at Switch at (:class:`FinalStageRefiner`), as in A1111.

After each stage every image is re-standardised to its stage-1 latent's mean and std. SDXL: the final size in
``y`` for every stage (stage 1 through a conditioning modifier), each view's crop.
"""
from __future__ import annotations

import functools

import torch

from lib_hires.demofusion import (DemoFusionSettings, FusedDenoiser, Stage, StagePlan, dilated_size, local_views,
                                  plan_calls)
from lib_hires.settings import TITLE, ScaleFusionSettings
from lib_hires.webui.demofusion_refiner import RefinerHold, refiner_of
from lib_hires.webui.demofusion_sampler import SkipResidualSteps, StagedRun, sampler_reason, stage_plan
from lib_hires.webui.demofusion_sampler import refiner_reason as a1111_refiner_reason
from lib_hires.webui.instance_patch import InstancePatch
from lib_hires.webui.messages import RequestError, log

from . import decoding, installed
from .demofusion_views import ControlViews, ViewFunction, ViewsUnsupported
from .sdxl_size import FinalSizeModifier, ForgeSizeConditioning

# Forge's built-in scripts whose patches tile the whole latent (their titles, as their title() says). What the
# others install is read from the patcher that samples, at each step (StageGuard).
WHOLE_LATENT_SCRIPTS = {
    "MultiDiffusion Integrated": "it tiles the latent itself and takes the same model-function wrapper slot",
}
RESIZED = (f"{TITLE}: DemoFusion cannot run with a patch that resizes the UNet's features ({{what}}; Kohya HRFix "
           "Integrated shrinks them so): every UNet call DemoFusion makes (stage 1, the local views, the dilated "
           "samples) is at the model's native size already, which such a patch is made to restore from a larger "
           "latent, so it would shrink them below it; turn Kohya HRFix (or that patch) off")


def resized_refusal(what: str) -> str:
    return RESIZED.format(what=what)


def whole_latent_attention_refusal(name: str) -> str:
    return (f"{TITLE}: DemoFusion cannot run with {name}: it blurs the latent with the attention map it records "
            "inside the UNet call of the whole latent, and DemoFusion's later stages make calls of views (windows "
            "and dilated samples) instead; turn one of them off")


class StageGuard:
    """A pre-CFG function on every stage's UnetPatcher: what the step's ``model_options`` hold (every script's
    patches, whichever ran first) that DemoFusion cannot run with is refused at the stage's first step, before any
    UNet call (:mod:`lib_hires.webui.forge.installed`). Clones share it (``__deepcopy__``); inert once removed."""

    def __init__(self):
        self.active = True

    def __deepcopy__(self, memo):
        return self

    def __call__(self, model, cond, uncond, x, timestep, model_options):
        if self.active:
            name = installed.whole_latent_attention(model_options)
            if name:
                raise RequestError(whole_latent_attention_refusal(name))
            model_options = installed.resize_guarded(model_options, resized_refusal)
        return model, cond, uncond, x, timestep, model_options

    def remove(self) -> None:
        self.active = False


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


def refiner_reason(p, settings: ScaleFusionSettings) -> str | None:
    """The refiner takes over at Switch at of the final stage (:class:`FinalStageRefiner`), as in A1111, which
    refuses the same combination: the global path's re-dilation is planned on the base UNet for the whole stage."""
    return a1111_refiner_reason(p, settings)


def redilation_reason(settings: ScaleFusionSettings, job) -> str | None:
    """Re-dilation inside DemoFusion is the job's own ScaleCrafter pass (``arm_scalecrafter``): stage 1's for the
    whole latent, each later stage's for its dilated samples' size only (``ForgeDemoFusionRun.start_pass``)."""
    if settings.redilation != "off" and not callable(getattr(job, "arm_scalecrafter", None)):
        return (f"{TITLE}: ScaleCrafter inside DemoFusion (re-dilation {settings.redilation}) is not available "
                "here; set it to off")
    return None


def request_reason(p, settings: ScaleFusionSettings, job=None) -> str | None:
    """Everything DemoFusion refuses in Forge before sampling starts, in A1111's order."""
    return (unsupported_reason(p) or timestep_sampler_reason(p) or sampler_reason(p)
            or refiner_reason(p, settings) or redilation_reason(settings, job))


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


class FinalStageRefiner:
    """The refiner at Switch at of the final stage, as in A1111 (``lib_hires/webui/demofusion_refiner.py``).

    Forge switches inside its CFG denoiser's ``forward`` (``apply_refiner(cfg, x)``: it loads the refiner as a new
    model object with fresh ``forge_objects``, rebuilds the conds and ``sampling_function`` then reads the
    refiner's UnetPatcher), which would leave the views on the base model's patcher. So the same function is asked
    first, with the same arguments, just before the denoiser's call of each evaluation (an instance patch outside
    the skip residual's, so the residual already uses the refiner's schedule): on the switch the stage's views
    move to a clone of the refiner's UnetPatcher (SDXL: its final size where it has the base's size embeddings),
    and this call takes the conds Forge just built with the refiner. Forge's own call then finds the refiner
    loaded and does nothing.
    """

    def __init__(self, run: "ForgeDemoFusionRun", stage: Stage, engine: DemoFusionSettings, jitter, views):
        self.run, self.stage, self.engine, self.jitter, self.views = run, stage, engine, jitter, views
        self.sampler = run.p.sampler
        self.cfg = self.sampler.model_wrap_cfg
        self.done = False
        self._forward = self.cfg.forward
        self.patch = InstancePatch(self.cfg, "forward", self._call)

    def _call(self, x, sigma, **kwargs):
        if not self.done:
            from modules import sd_samplers_common
            self.done = bool(sd_samplers_common.apply_refiner(self.cfg, x))
            if self.done:
                self._follow(kwargs)
        return self._forward(x, sigma, **kwargs)

    def _follow(self, kwargs: dict) -> None:
        run, p = self.run, self.run.p
        kwargs["cond"] = self.sampler.sampler_extra_args["cond"]
        kwargs["uncond"] = self.sampler.sampler_extra_args["uncond"]
        self.views.remove()
        self.views = StageViews(p, self.stage, self.engine, self.jitter, run._refiner_size_conditioning(),
                                run._check_interrupt)
        run.fused.append(self.views.fused)
        log(f"DemoFusion stage {self.stage.index}: the refiner takes over; its views run on the refiner's UNet")

    def remove(self) -> None:
        self.patch.remove()


class ForgeDemoFusionRun(StagedRun):
    """Takes the place of ``p.sample`` for one Forge job; the job calls :meth:`start_pass` from
    ``process_before_every_sampling``."""

    def __init__(self, p, job, original_sample):
        self.p, self.job, self.original_sample = p, job, original_sample
        self.plan: StagePlan | None = None
        self.stage: Stage | None = None          # the stage being sampled
        self.size_cond: ForgeSizeConditioning | None = None
        self.hooks: list = []                    # each stage's guard, stage 1's conditioning modifier
        self.fused: list[FusedDenoiser] = []     # each later stage's (and the refiner's), for its counters
        self.refiner_hold: RefinerHold | None = None

    def start_pass(self, p, x) -> None:
        """``process_before_every_sampling`` of a stage. Every stage: a :class:`StageGuard` (what other scripts
        install is refused at the stage's first step where DemoFusion cannot run with it). Stage 1 (Forge's own
        sampling): on SDXL, the final size
        in ``y``; its re-dilation (first stage / both) is the job's own ScaleCrafter pass. A later stage (global
        path / both): the job's pass planned for the dilated samples' size, without noise damping, as in A1111;
        the controller re-dilates only UNet calls of that size, so the local views (one window each) run
        vanilla. The views themselves go on once every script has run (``StageViews``)."""
        stage, redilation = self.stage, self.job.settings.redilation
        if stage is None:
            return
        guard = StageGuard()
        guarded = p.sd_model.forge_objects.unet.clone()
        guarded.set_model_sampler_pre_cfg_function(guard)
        p.sd_model.forge_objects.unet = guarded
        self.hooks.append(guard)
        if stage.index != 1:
            if redilation in ("global path", "both"):
                self.job.arm_scalecrafter(p, stage.sample_size, f"DemoFusion stage {stage.index} global preset",
                                          noise_damping=False)
            return
        if redilation in ("first stage", "both"):
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
        # The refiner waits for the final stage (stage 1 is Forge's own sampling, which would switch in it)
        self.refiner_hold = RefinerHold(self.p) if refiner_of(self.p) is not None else None
        try:
            return self._stages(conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts)
        finally:
            if self.refiner_hold is not None:
                self.refiner_hold.remove()
            self._remove_hooks()
            self.stage = None

    def _size_conditioning(self) -> ForgeSizeConditioning | None:
        size_cond = ForgeSizeConditioning(self.p.sd_model, self.plan.final.width, self.plan.final.height)
        if size_cond.available:
            return size_cond
        log("warning: this SDXL model has no size embedder; views keep Forge's size conditioning")
        return None

    def _refiner_size_conditioning(self) -> ForgeSizeConditioning | None:
        """The final size in the refiner's ``y`` where it has the base SDXL's six size embeddings: Forge's
        SDXL refiner engine puts an aesthetic score in their place (nothing to edit there, as in A1111)."""
        model = self.p.sd_model
        if not getattr(model, "is_sdxl", False) or "Refiner" in type(model).__name__:
            return None
        size_cond = ForgeSizeConditioning(model, self.plan.final.width, self.plan.final.height)
        return size_cond if size_cond.available else None

    def _sigma_to_t(self, sigma):
        """The timestep of the UnetPatcher sampling now (the refiner's, once it has taken over)."""
        return self.p.sd_model.forge_objects.unet.model.predictor.timestep(sigma)

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
        views = sampling = refiner = None
        strength, start = p.denoising_strength, self.later_start()
        try:
            views = StageViews(p, stage, engine, jitter, self.size_cond, self._check_interrupt)
            self.fused.append(views.fused)
            sampling = SkipResidualSteps(p.sampler, z_up, noise, engine.cosine_scale_1, self._sigma_to_t,
                                         p.sampler_name)
            if self.refiner_hold is not None and stage is self.plan.stages[-1] \
                    and self.refiner_hold.release() is not None:
                refiner = FinalStageRefiner(self, stage, engine, jitter, views)
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
            if refiner is not None:
                refiner.remove()
                views = refiner.views
            if sampling is not None:
                sampling.remove()
            if views is not None:
                views.remove()
            self.job.end_pass()
