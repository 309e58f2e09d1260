"""DemoFusion through the WebUI's own samplers: the stage loop that takes the place of ``p.sample``.

Stage 1 is the WebUI's normal sampling at Width/Height (in img2img: the encoded input image). Each
later stage upsamples the latent bicubically, makes a new ``p.rng`` of the stage's shape (the stage's
noise, and what ancestral/SDE samplers draw), a fresh sampler, calls ``process_before_every_sampling``
for every extension, and samples with ``sample_img2img`` from ``z' + sigma_0 noise``. Three instance
patches on that sampler carry the algorithm, so the ``CFGDenoiser`` still runs once per evaluation (prompt
editing, previews, ``last_latent``, ControlNet's step gating stay right):

* ``sampler.func``: the sampler function, probed with the very arguments the WebUI passes for which of
  its evaluations start a step (``lib_hires/demofusion/step_starts.py``), then run with a callback
  that checks each reported state carries the residual;
* ``CFGDenoiser.forward``: the skip residual, written into the sampler's state ``x`` in place at the
  evaluations that start a step (the sampler keeps using that tensor after the model call);
* ``inner_model.forward``: the :class:`~lib_hires.demofusion.FusedDenoiser` (local views and the
  dilated path), which sees every cond and uncond row, plus SDXL crops and ControlNet hints per call.

After each stage every image is re-standardised to its stage-1 latent's mean and std (the official
"anchor"). An interrupt or skip ends the loop with the current stage's full latent.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch

from lib_hires.demofusion.step_starts import StepStarts, UnsupportedSampler, probe, tracked_call
from lib_hires.demofusion import (DemoFusionSettings, FusedDenoiser, LaterStart, Stage, StagePlan, later_stage_start,
                                  plan_stages, repeat_rows, restandardize, row_stats, skip_residual, skip_weight,
                                  upsample_latent)
from lib_hires.settings import TITLE, ScaleFusionSettings

from . import decoding
from .controlnet_hints import StageHints, control_params
from .demofusion_refiner import RefinerHold, RefinerSwitch, refiner_of
from .instance_patch import InstancePatch
from .messages import log
from .model_info import ModelInfo
from .sdxl_conditioning import SizeConditioning
from .stage_conditioning import LaterStageConds

def engine_settings(settings: ScaleFusionSettings, info: ModelInfo) -> DemoFusionSettings:
    window = info.window
    stride = settings.stride or window // 2
    if stride > window:
        raise ValueError(f"{TITLE}: stride must be at most the model's window of {window} latent px "
                         f"(native size {info.train_size} / 8); got {stride}")
    return DemoFusionSettings(window=window, stride=stride, view_batch=1 if settings.low_vram else settings.view_batch,
                              cosine_scale_1=settings.cosine_scale_1, cosine_scale_2=settings.cosine_scale_2,
                              cosine_scale_3=settings.cosine_scale_3, sigma=settings.sigma, jitter=settings.jitter)


def stage_plan(settings: ScaleFusionSettings, info: ModelInfo, width: int, height: int) -> StagePlan:
    engine = engine_settings(settings, info)
    return plan_stages(width // 8 * 8, height // 8 * 8, settings.scale, window=engine.window, stride=engine.stride,
                       factors=settings.stage_factors)


def unsupported_reason(p) -> str | None:
    """Why DemoFusion cannot run this job, or None."""
    model = p.sd_model
    if getattr(p, "enable_hr", False):
        return f"{TITLE}: DemoFusion replaces Hires. fix (its first stage is Width/Height); turn Hires. fix off"
    if getattr(model.model, "conditioning_key", None) in {"hybrid", "concat"} or getattr(model, "is_sdxl_inpaint", False) \
            or getattr(model, "cond_stage_key", None) == "edit":
        return f"{TITLE}: DemoFusion does not support inpainting, depth or instruct-pix2pix checkpoints"
    if getattr(p, "image_mask", None) is not None:
        return f"{TITLE}: DemoFusion upscales whole images; inpainting masks are not supported"
    if getattr(model.model, "conditioning_key", None) == "crossattn-adm" and getattr(p, "init_images", None):
        return (f"{TITLE}: DemoFusion img2img does not support unCLIP checkpoints: its later stages would sample "
                "without the input image's embedding")
    return None


def refiner_reason(p, settings: ScaleFusionSettings) -> str | None:
    """The refiner takes over in the final stage (``demofusion_refiner.py``); ScaleCrafter's re-dilation of the
    global path is armed on the base UNet for the whole stage and would not follow it."""
    if _refiner_switches(p) and settings.redilation in ("global path", "both"):
        return (f"{TITLE}: DemoFusion's re-dilation of the global path ({settings.redilation}) cannot follow the "
                "refiner, which takes over in the final stage; set re-dilation to off or first stage, or turn the "
                "refiner off")
    return None


def _refiner_switches(p) -> bool:
    """As ``sd_samplers_common.apply_refiner`` decides: a switch at None switches at once, at >= 1 never."""
    info = getattr(p, "refiner_checkpoint_info", None)
    if info is None:
        return False
    switch_at = getattr(p, "refiner_switch_at", None)
    if switch_at is not None and switch_at >= 1:
        return False
    return getattr(p.sd_model, "sd_checkpoint_info", None) != info


def sampler_reason(p) -> str | None:
    """Why the job's sampler cannot carry the skip residual at every step start, or None: its step structure,
    probed on a tiny tensor with a generic schedule of the job's step count (the stage run probes again with the
    real one)."""
    from modules import sd_samplers

    func = getattr(sd_samplers.create_sampler(p.sampler_name, p.sd_model), "func", None)
    if func is None:
        return f"{TITLE}: DemoFusion cannot drive the sampler {p.sampler_name}: it has no sampling function to follow"
    steps = max(int(getattr(p, "steps", 20) or 20), 2)
    sigmas = torch.cat([torch.exp(torch.linspace(math.log(14.6), math.log(0.03), steps)), torch.zeros(1)])
    parameters = inspect.signature(func).parameters
    kwargs = {name: value for name, value in (("sigmas", sigmas), ("sigma_min", 0.03), ("sigma_max", 14.6),
                                              ("n", steps)) if name in parameters}
    try:
        probe(func, None, torch.zeros(1, 4, 8, 8), callback=None, **kwargs)
    except UnsupportedSampler as error:
        return f"{TITLE}: DemoFusion cannot put its skip residual at each step start of {p.sampler_name} ({error})"
    return None


class SkipResidualSteps:
    """The skip residual written into ``x`` at every step start of one sampler run, in both WebUIs: the sampler's
    function is probed for its step starts with the very arguments it is called with, and its CFG denoiser's
    ``forward`` applies the residual there (instance patches; ``remove()`` undoes them)."""

    def __init__(self, sampler, z_up, noise, cosine_scale_1: float, sigma_to_t=None, sampler_name: str | None = None):
        self.sampler, self.cfg = sampler, sampler.model_wrap_cfg
        self.z_up, self.noise, self.cosine_scale_1 = z_up, noise, cosine_scale_1
        if sigma_to_t is not None:
            self.sigma_to_t = sigma_to_t
        self.steps: StepStarts | None = None  # the step starts of the sampler run in progress
        self._cfg_forward, self._func = self.cfg.forward, sampler.func
        self.sampler_name = sampler_name or getattr(self._func, "__name__", "the sampler")
        self.patches = [InstancePatch(self.cfg, "forward", self._forward),
                        InstancePatch(sampler, "func", functools.wraps(self._func)(
                            lambda *args, **kwargs: self._run(*args, **kwargs)))]

    def _run(self, *args, **kwargs):
        """The sampler function itself: probed for its step starts with these very arguments, then run. It keeps
        the function's signature (``functools.wraps``): the WebUI picks the arguments it passes from it."""
        self.steps, args, kwargs = tracked_call(
            self._func, lambda pattern, x: StepStarts(pattern, x, self.sampler_name), *args, **kwargs)
        try:
            return self._func(*args, **kwargs)
        finally:
            self.steps = None

    def _forward(self, x, sigma, *args, **kwargs):
        if self.steps is not None and self.steps.is_start(x):
            c1 = skip_weight(self.sigma_to_t(sigma), self.cosine_scale_1)
            x.copy_(skip_residual(x, self.z_up, self.noise, sigma, c1))
            self.steps.applied(x)
        return self._cfg_forward(x, sigma, *args, **kwargs)

    def remove(self) -> None:
        for patch in reversed(self.patches):
            patch.remove()


class StageSampling(SkipResidualSteps):
    """The instance patches of one later stage on ``p.sampler``: the skip residual, the views on the inner
    model, the refiner's switch in the final stage; ``remove()`` undoes them."""

    def __init__(self, p, stage: Stage, settings: DemoFusionSettings, z_up, noise, jitter: torch.Generator | None,
                 size_cond: SizeConditioning | None, hints: StageHints | None, check_interrupt,
                 sampler_name: str | None = None, refiner: RefinerSwitch | None = None,
                 size_cond_for=None):
        self.inner = p.sampler.model_wrap_cfg.inner_model
        self.call = None     # the model call view_cond serves (before_call sees it first)
        self.size_cond, self.hints, self.check_interrupt = size_cond, hints, check_interrupt
        self.refiner, self.size_cond_for = refiner, size_cond_for
        self.fuse = lambda inner: FusedDenoiser.from_settings(inner.forward, settings, dilation=stage.dilation,
                                                              sigma_to_t=inner.sigma_to_t, jitter=jitter,
                                                              view_cond=self._view_cond, before_call=self._before_call)
        self.fused = self.fuse(self.inner)
        super().__init__(p.sampler, z_up, noise, settings.cosine_scale_1, sampler_name=sampler_name)
        self.patches.append(InstancePatch(self.inner, "forward", self.fused))

    def sigma_to_t(self, sigma):
        return self.inner.sigma_to_t(sigma)  # the refiner's, once the switch has happened

    def _forward(self, x, sigma, **kwargs):
        if self.refiner is not None and self.refiner(sigma):
            self._follow_the_refiner(kwargs)
        return super()._forward(x, sigma, **kwargs)

    def _follow_the_refiner(self, kwargs: dict) -> None:
        """The WebUI just switched to the refiner: this call and the rest run its inner model through the views,
        with the conds it built with the refiner."""
        kwargs["cond"] = self.sampler.sampler_extra_args["cond"]
        kwargs["uncond"] = self.sampler.sampler_extra_args["uncond"]
        self.inner = self.cfg.inner_model
        self.fused = self.fuse(self.inner)
        self.patches.append(InstancePatch(self.inner, "forward", self.fused))
        if self.size_cond_for is not None:
            self.size_cond = self.size_cond_for()

    def _before_call(self, call) -> None:
        self.call = call
        self.check_interrupt()
        if self.hints is not None:
            self.hints.set_call(call)

    def _view_cond(self, extra_args: dict, crops) -> dict:
        args = repeat_rows(extra_args, self.call.rows, len(crops))
        if self.size_cond is not None and "cond" in args:
            args["cond"] = self.size_cond.edit_cond(args["cond"], crops)
        return args


def img2img_noise(p, noise):
    """img2img's own ``sample`` scales its noise by ``initial_noise_multiplier`` and records it: every later stage
    does the same (the start state and the skip residual's ``z' + sigma noise`` use the scaled noise)."""
    multiplier = getattr(p, "initial_noise_multiplier", None)
    if multiplier is None or multiplier == 1.0:
        return noise
    p.extra_generation_params["Noise multiplier"] = multiplier
    return noise * multiplier


class FinalSizeConditioning:
    """Stage 1's inner-model patch on SDXL: the final size in the ``vector`` rows (crop stays 0, 0)."""

    def __init__(self, inner, size_cond: SizeConditioning):
        self.size_cond = size_cond
        self._forward = inner.forward
        self.patch = InstancePatch(inner, "forward", self)

    def __call__(self, x, sigma, cond=None, **kwargs):
        return self._forward(x, sigma, cond=self.size_cond.edit_cond(cond), **kwargs)

    def remove(self) -> None:
        self.patch.remove()


JITTER_SEED = 0x5CA1E  # views are shared by all images of a batch, so their jitter cannot follow each image's seed


class _FirstStageConds:
    """Stage 1's conditioning, kept for the later stages where a WebUI adapter does not rebuild it."""

    def __init__(self, c, uc):
        self.c, self.uc = c, uc

    def install(self) -> None:
        pass

    def remove(self) -> None:
        pass


class StagedRun:
    """What a DemoFusion run over ``p`` keeps track of the same way in the WebUI and in Forge: whether stage 1
    comes from an init image, the later stages' start, the progress bar, and interrupts between UNet calls."""

    p = None
    job = None
    plan: StagePlan | None = None

    @property
    def is_img2img(self) -> bool:
        return getattr(self.p, "init_latent", None) is not None

    def later_start(self) -> LaterStart:
        """Strength and steps of every later stage (``schedule.later_stage_start``)."""
        settings = self.job.settings
        return later_stage_start(img2img=self.is_img2img, stage_strength=settings.stage_strength, steps=self.p.steps,
                                 later_steps=settings.later_steps, denoising_strength=self.p.denoising_strength)

    def _progress_text(self, stage: Stage) -> str:
        return f"DemoFusion stage {stage.index}/{len(self.plan.stages)}: {stage.width}x{stage.height}"

    def _check_interrupt(self) -> None:
        """Between the UNet calls of a step: ends the stage the way the WebUI's (and Forge's) own denoiser does."""
        if self._stopped():
            from modules import sd_samplers_common
            raise sd_samplers_common.InterruptedException

    @staticmethod
    def _stopped() -> bool:
        from modules import shared
        return bool(shared.state.interrupted or shared.state.skipped)

    def _refine_job_count(self) -> None:
        """Each image is sampled once per stage; the progress bar counts every step of all of them (stage 1
        is not sampled in img2img; later stages run the steps of :meth:`later_start`)."""
        from modules import shared
        state = shared.state
        if state.processing_has_refined_job_count:
            return
        if state.job_count == -1:
            state.job_count = self.p.n_iter
        later = self.later_start().steps_run(self.p.steps, bool(shared.opts.img2img_fix_steps))
        first = 0 if self.is_img2img else self.p.steps
        shared.total_tqdm.updateTotal(state.job_count * (first + (len(self.plan.stages) - 1) * later))
        state.job_count *= len(self.plan.stages)
        state.processing_has_refined_job_count = True

    # The stage loop, the same in both WebUIs; each run says where it hooks: ----------------------------------
    # _size_conditioning (SDXL's final size), _end_first_stage, _begin_later_stages / _end_later_stages,
    # _save_stage and _sample_stage (one later stage through the WebUI's sampler).

    def _stages(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        from modules import shared

        p, settings, info = self.p, self.job.settings, self.job.info
        engine = engine_settings(settings, info)
        self.plan = stage_plan(settings, info, p.width, p.height)
        p.extra_generation_params["DemoFusion final size"] = f"{self.plan.final.width}x{self.plan.final.height}"
        self._refine_job_count()
        self.size_cond = self._size_conditioning() if getattr(p.sd_model, "is_sdxl", False) else None
        log(self.plan.describe(engine.view_batch))

        # Made with stage 1's, where the WebUI makes its own (with a lowvram model the text encoder is at hand)
        later = self._later_stage_conds(conditioning, unconditional_conditioning)
        self.stage = self.plan.stages[0]
        shared.state.textinfo = self._progress_text(self.stage)
        if self.is_img2img:
            z = p.init_latent
        else:
            z = self.original_sample(conditioning=conditioning, unconditional_conditioning=unconditional_conditioning,
                                     seeds=seeds, subseeds=subseeds, subseed_strength=subseed_strength,
                                     prompts=prompts)
        self._end_first_stage()
        anchor = row_stats(z)
        self._begin_later_stages()
        jitter = torch.Generator().manual_seed(JITTER_SEED)
        later.install()
        try:
            for stage in self.plan.stages[1:]:
                if self._stopped():
                    break
                if settings.save_stages and not p.do_not_save_samples and not (self.is_img2img and self.stage.index == 1):
                    self._save_stage(z, self.stage.index)
                shared.state.nextjob()
                self.stage = stage
                shared.state.textinfo = self._progress_text(stage)
                z = self._sample_stage(stage, z, later.c, later.uc, engine, jitter)
                if not self._stopped():
                    z = restandardize(z, *anchor)
        finally:
            later.remove()
            self._end_later_stages()
        return z

    def _size_conditioning(self):
        """SDXL: what puts the final size in the size conditioning of the stages' calls; None where it cannot."""
        raise NotImplementedError

    def _end_first_stage(self) -> None:
        self.job.end_pass()

    def _later_stage_conds(self, c, uc):
        """The later stages' ``c``/``uc`` (``.c``, ``.uc``, ``install()``, ``remove()``): stage 1's here."""
        return _FirstStageConds(c, uc)

    def _begin_later_stages(self) -> None:
        pass

    def _end_later_stages(self) -> None:
        pass

    def _save_stage(self, z, index: int) -> None:
        raise NotImplementedError

    def _sample_stage(self, stage: Stage, z, c, uc, engine: DemoFusionSettings, jitter: torch.Generator):
        raise NotImplementedError

    def _stage_start(self, stage: Stage, z):
        """A later stage's inputs, made alike in both WebUIs: ``z`` upsampled, its noise (the job's seeds at the
        stage's size, scaled as img2img scales it), a fresh sampler on ``p``, the image conditioning."""
        from modules import rng, sd_samplers

        p = self.p
        z_up = upsample_latent(z, stage.latent_size)
        p.rng = rng.ImageRNG(z_up.shape[1:], p.seeds, subseeds=p.subseeds, subseed_strength=p.subseed_strength,
                             seed_resize_from_h=p.seed_resize_from_h, seed_resize_from_w=p.seed_resize_from_w)
        noise = img2img_noise(p, p.rng.next()) if self.is_img2img else p.rng.next()
        p.sampler = sd_samplers.create_sampler(p.sampler_name, p.sd_model)
        image_conditioning = p.txt2img_image_conditioning(z_up, stage.width, stage.height)
        return z_up, noise, image_conditioning


class DemoFusionRun(StagedRun):
    """Takes the place of ``p.sample`` for one job (installed in ``before_process``, so ControlNet wraps it)."""

    def __init__(self, p, job, original_sample):
        self.p, self.job, self.original_sample = p, job, original_sample
        self.plan: StagePlan | None = None
        self.stage: Stage | None = None          # the stage being sampled; Job.start_pass reads it
        self.size_cond: SizeConditioning | None = None
        self.refiner_hold: RefinerHold | None = None  # the refiner waits for the final stage
        self.hints: StageHints | None = None     # the ControlNet hints of the later stages

    def __call__(self, *args, **kwargs):
        self.refiner_hold = RefinerHold(self.p) if refiner_of(self.p) is not None else None
        try:
            return self._stages(*args, **kwargs)
        finally:
            if self.refiner_hold is not None:
                self.refiner_hold.remove()

    def _size_conditioning(self) -> SizeConditioning | None:
        size_cond = SizeConditioning(self.p.sd_model, self.plan.final.width, self.plan.final.height)
        if size_cond.available:
            return size_cond
        log("warning: this SDXL model's vector conditioning has no size embeddings at its end; "
            "views keep the WebUI's size conditioning")
        return None

    def _later_stage_conds(self, c, uc):
        """Rebuilt for the later stages' own step count, as the hires pass rebuilds its conds."""
        return LaterStageConds(self.p, (c, uc), self.later_start().steps or self.p.steps)

    def _begin_later_stages(self) -> None:
        params = control_params(self.p)
        self.hints = StageHints(params) if params else None

    def _end_later_stages(self) -> None:
        if self.hints is not None:
            self.hints.restore()

    def _save_stage(self, z, index: int) -> None:
        decoding.save_stage(self.p, z, index)

    def _refiner_size_cond(self) -> SizeConditioning | None:
        """The final size in the vector rows of the refiner, when its conditioner has the size embeddings."""
        from modules import shared
        if not getattr(shared.sd_model, "is_sdxl", False):
            return None
        size_cond = SizeConditioning(shared.sd_model, self.plan.final.width, self.plan.final.height)
        return size_cond if size_cond.available else None

    def _sample_stage(self, stage, z, c, uc, engine, jitter):
        p, hints = self.p, self.hints
        z_up, noise, image_conditioning = self._stage_start(stage, z)
        if hints is not None:
            hints.set_stage(stage.latent_size)
        if p.scripts is not None:
            p.scripts.process_before_every_sampling(p=p, x=z_up, noise=noise, c=c, uc=uc)
        refiner = None
        if self.refiner_hold is not None and stage is self.plan.stages[-1] and self.refiner_hold.release() is not None:
            refiner = RefinerSwitch(p.sampler.model_wrap_cfg)
        patches = StageSampling(p, stage, engine, z_up, noise, jitter, self.size_cond, hints, self._check_interrupt,
                                sampler_name=p.sampler_name, refiner=refiner, size_cond_for=self._refiner_size_cond)
        strength, start = p.denoising_strength, self.later_start()
        try:
            # The WebUI's own partial start, as the hires pass (txt2img) or img2img: at stage strength 1 and
            # the same steps, the official full schedule from z' + sigma_max * noise.
            p.denoising_strength = start.strength
            return p.sampler.sample_img2img(p, z_up, noise, c, uc, steps=start.steps,
                                            image_conditioning=image_conditioning)
        finally:
            p.denoising_strength = strength
            patches.remove()
            self.job.end_pass()
