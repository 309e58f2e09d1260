"""One generation with ScaleFusion on, from ``before_process`` to the end of sampling.

The Script is thin: it hands its hooks to :func:`begin`, :meth:`Job.start_pass` and :meth:`Job.finish`.
Nothing is installed until a pass starts, and everything a pass installs is removed when ``p.sample``
returns or raises (the wrapper installed here) and again, idempotently, in ``postprocess`` and at the
start of the next job, so no hook outlives the job that armed it.

The decode/encode guard of ``p.sample`` follows model objects, not call sites: it is on every model that
can sample inside ``p.sample`` — the one it starts with, every model the WebUI keeps loaded (a switch to one
of those fires no callback), and every model loaded while it runs (:func:`on_model_loaded`: a Hires
checkpoint, the refiner) — so an encode or decode that comes before any pass hook (the Hires. fix encode
after a pixel upscaler) is guarded all the same.
"""
from __future__ import annotations

import weakref
from typing import Callable

from lib_hires.settings import DF, TITLE, ScaleFusionSettings, SettingsError
from lib_hires.summary import short_source, size_warnings

from . import decoding, model_info, xyz
from .demofusion_sampler import (DemoFusionRun, FinalSizeConditioning, refiner_reason, sampler_reason, stage_plan,
                                 unsupported_reason)
from .lora_functional import functional_networks
from .messages import RequestError, log
from .scalecrafter_pass import ScaleCrafterPass, plan_for_latent
from .scalecrafter_pass import on_cfg_denoiser as capture_cfg_params

JOB_ATTR = "scalefusion_job"
MAX_SIDE = 8192
_live_hooks: "weakref.WeakSet" = weakref.WeakSet()   # anything with remove() that a pass installed


class _Current:
    job: "Job | None" = None   # the job inside its p.sample, for the on_cfg_denoiser callback


_current = _Current()


def on_cfg_denoiser(params) -> None:
    """``script_callbacks.on_cfg_denoiser`` (registered once by the Script): inert unless a job is sampling."""
    job = _current.job
    if job is not None:
        job.follow_sampler(params)  # first: a refiner switch re-arms the pass before its params are kept
    capture_cfg_params(params)


def on_model_loaded(sd_model) -> None:
    """``script_callbacks.on_model_loaded`` (registered once by the Script): a model object loaded, or loaded
    into, while a job samples gets that job's guard at once; outside a job it is left alone."""
    job = _current.job
    if job is not None:
        job.follow_load(sd_model)


def _loaded_models() -> list:
    """The model objects the WebUI keeps loaded (``sd_checkpoints_limit``): switching to one loads nothing."""
    try:
        from modules import sd_models
    except ImportError:
        return []
    return list(getattr(getattr(sd_models, "model_data", None), "loaded_sd_models", None) or [])


def remove_all_hooks() -> None:
    """Removes every hook still installed (after a crash elsewhere, or on "Reload UI")."""
    for hook in list(_live_hooks):
        hook.remove()
        _live_hooks.discard(hook)


def check_scalecrafter_sizes(p, info: model_info.ModelInfo, settings: ScaleFusionSettings) -> None:
    """Refuses a request whose first or hires pass size has no ScaleCrafter plan on this model."""
    sizes = [(p.width, p.height)]
    if getattr(p, "enable_hr", False):
        sizes.append((getattr(p, "hr_upscale_to_x", 0) or p.width, getattr(p, "hr_upscale_to_y", 0) or p.height))
    for width, height in sizes:
        try:
            plan_for_latent(info, settings, (height // 8, width // 8))
        except SettingsError as error:
            raise RequestError(f"{TITLE}: {error}") from None


def _refuse(p, message: str) -> None:
    log(message)

    def sample(*args, **kwargs):
        raise RequestError(message)

    p.sample = sample


class Job:
    def __init__(self, p, settings: ScaleFusionSettings):
        self.settings = settings
        self.p = p
        self.info: model_info.ModelInfo | None = None
        self.model = None          # the model object self.info and the armed hooks were made for
        self.unsupported: str | None = None  # why ScaleCrafter cannot run on self.model, where it cannot
        self.hooks: list = []      # this pass's hooks
        self.armed: tuple | None = None  # (latent size, CFG denoiser, infotext key) of this pass's ScaleCrafter
        self.guard: decoding.LargeOutputGuard | None = None  # for all of p.sample: previews and decodes
        original_sample = p.sample
        self.run = DemoFusionRun(p, self, original_sample) if settings.method == DF else None

        def sample(*args, **kwargs):
            self.model = p.sd_model
            self.info = self._check_model(p)  # here, not in before_process: the checkpoint may change in between
            if self.info is not None:
                self._check_request(p)
            try:
                if self.info is not None:
                    from modules import shared
                    self.guard = decoding.LargeOutputGuard(p.sd_model, shared.state)
                    _live_hooks.add(self.guard)
                    for loaded in _loaded_models():
                        self.guard.attach(loaded)
                    _current.job = self
                if self.run is not None and self.info is not None:
                    return self.run(*args, **kwargs)
                return original_sample(*args, **kwargs)
            finally:
                self.end_pass()
                self._remove_guard()

        p.sample = sample
        original_init = p.init

        def init(*args, **kwargs):
            # img2img encodes its init images here, before p.sample and its guard: big ones in tiles too
            tiling = decoding.VaeTiling(p.sd_model)
            try:
                return original_init(*args, **kwargs)
            finally:
                tiling.remove()

        p.init = init

    def _check_model(self, p) -> model_info.ModelInfo | None:
        try:
            info = model_info.describe(p.sd_model, self.settings.native_size)
        except model_info.UnsupportedModelError as error:
            log(str(error))
            raise RequestError(str(error)) from None
        replacement = model_info.replacement_unet_active()
        if replacement:
            log(f"warning: the UNet is replaced by {replacement}, which bypasses the modules "
                f"{self.settings.method} hooks; {TITLE} does nothing for this generation (set 'SD Unet' to None "
                "to use it)")
            return None
        return info

    def _check_request(self, p) -> None:
        """What the engines cannot do is refused before any sampling starts."""
        if self.settings.method == DF:
            reason = (unsupported_reason(p) or self._timestep_sampler_reason(p) or sampler_reason(p)
                      or refiner_reason(p, self.settings))
            if reason:
                raise RequestError(reason)
            try:
                plan = stage_plan(self.settings, self.info, p.width, p.height)
            except ValueError as error:
                raise RequestError(str(error) if str(error).startswith(TITLE) else f"{TITLE}: {error}") from None
            if max(plan.final.width, plan.final.height) > MAX_SIDE:
                raise RequestError(f"{TITLE}: DemoFusion's final size {plan.final.width}x{plan.final.height} exceeds "
                                   f"{MAX_SIDE} px per side; lower scale ({self.settings.scale:g}) or Width/Height")
            return
        check_scalecrafter_sizes(p, self.info, self.settings)

    @staticmethod
    def _timestep_sampler_reason(p) -> str | None:
        from modules import sd_samplers, sd_samplers_timesteps
        if sd_samplers.find_sampler_config(p.sampler_name) in sd_samplers_timesteps.samplers_data_timesteps:
            return (f"{TITLE}: DemoFusion needs a k-diffusion sampler (Euler, Euler a, DPM++ 2M, DPM++ SDE, ...); "
                    f"{p.sampler_name} is a timestep sampler (DDIM, PLMS, UniPC are not supported)")
        return None

    def write_infotext(self, p) -> None:
        p.extra_generation_params.update(self.settings.to_infotext())

    def start_pass(self, p, x) -> None:
        """``process_before_every_sampling``: arms what this pass needs for the latent about to be sampled."""
        self.end_pass()
        if self.guard is None:  # the job does nothing (an sd_unet replacement was active at the start)
            return
        self.guard.attach(p.sd_model)  # a hires pass on another checkpoint decodes on that model
        cfg_denoiser = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
        if cfg_denoiser is not None:
            self._add(decoding.StepPreviews(cfg_denoiser, self.guard))
            self._watch_step_previews()
        if self.run is not None:
            self._start_demofusion_pass(p, x)
            return
        is_hires = bool(getattr(p, "is_hr_pass", False))
        key = "ScaleCrafter hires preset" if is_hires else "ScaleCrafter preset"
        switched = p.sd_model is not self.model
        runnable = self._follow_model(p)
        if getattr(p, "enable_hr", False) and not self.settings.applies_to_pass(is_hires):
            return
        if not runnable:
            if switched:
                self._say_vanilla(p, key, self.unsupported)
            return
        self.armed = (tuple(x.shape[-2:]), cfg_denoiser, key)
        self._arm_scalecrafter(p, *self.armed)

    def _follow_model(self, p) -> bool:
        """Describes the model that samples now where it is another object than the one described last
        (a hires pass on another checkpoint, a refiner); False where ScaleCrafter cannot run on it at all."""
        if p.sd_model is self.model:
            return self.info is not None
        self.model, self.unsupported = p.sd_model, None
        try:
            self.info = self._check_model(p)
        except RequestError as error:  # raised here, the WebUI would swallow it: this model runs vanilla, said so
            self.info, self.unsupported = None, str(error)
        if self.info is None and self.unsupported is None:
            self.unsupported = "an sd_unet replacement bypasses the UNet's modules"
        return self.info is not None

    def follow_sampler(self, params) -> None:
        """``on_cfg_denoiser``, before the UNet runs: the refiner switch (``apply_refiner``) has just reloaded
        the model at the start of this denoiser call. Hooks built for the previous model object come off; the
        pass is armed again on the model that samples now, or runs vanilla where no preset fits it."""
        p = self.p
        if self.armed is None or params.denoiser is not self.armed[1] or p.sd_model is self.model:
            return
        if self.guard is not None:
            self.guard.attach(p.sd_model)
            self._watch_step_previews()  # TAESD and Approx NN have a decoder per model kind
        latent_hw, cfg_denoiser, key = self.armed
        for hook in [h for h in self.hooks if isinstance(h, ScaleCrafterPass)]:
            self._discard(hook)
        refiner_key = key.replace(" preset", " refiner preset")
        if not self._follow_model(p):
            self._say_vanilla(p, refiner_key, self.unsupported)
            return
        self._arm_scalecrafter(p, latent_hw, cfg_denoiser, refiner_key)

    def follow_load(self, sd_model) -> None:
        """A model object was loaded (or loaded into) inside this job's ``p.sample``: its decodes and encodes are
        guarded from now on, and, inside a pass, the in-step preview decoder of its kind is shrunk too."""
        if self.guard is None:
            return
        self.guard.attach(sd_model)
        if any(isinstance(hook, decoding.StepPreviews) for hook in self.hooks):
            self._watch_step_previews()  # TAESD and Approx NN have a decoder per model kind

    def _start_demofusion_pass(self, p, x) -> None:
        stage, redilation = self.run.stage, self.settings.redilation
        if stage is None:
            return
        if stage.index == 1:
            if self.run.size_cond is not None:
                self._add(FinalSizeConditioning(p.sampler.model_wrap_cfg.inner_model, self.run.size_cond))
            if redilation in ("first stage", "both"):
                self._arm_scalecrafter(p, tuple(x.shape[-2:]), p.sampler.model_wrap_cfg, "DemoFusion stage 1 preset")
        elif redilation in ("global path", "both"):
            # Only UNet calls at the dilated samples' size match this plan; local views stay vanilla.
            self._arm_scalecrafter(p, stage.sample_size, None, f"DemoFusion stage {stage.index} global preset")

    def _arm_scalecrafter(self, p, latent_hw, cfg_denoiser, infotext_key: str) -> None:
        try:
            plan = plan_for_latent(self.info, self.settings, latent_hw)
        except SettingsError as error:
            # The job's first model was checked before sampling; this is a model switched to since.
            self._say_vanilla(p, infotext_key, str(error))
            return
        p.extra_generation_params[infotext_key] = short_source(plan.preset.source)
        log(plan.describe())
        for warning in size_warnings(plan.width, plan.height):
            log(f"warning: {warning}")
        if not plan.is_noop:
            self._add(ScaleCrafterPass(plan, self.info, cfg_denoiser, p.sd_model, functional_networks()))

    @staticmethod
    def _say_vanilla(p, infotext_key: str, reason: str) -> None:
        name = getattr(getattr(p.sd_model, "sd_checkpoint_info", None), "name_for_extra", None) or "this model"
        log(f"warning: {name} runs without ScaleCrafter ({reason})")
        p.extra_generation_params[infotext_key] = f"none ({name}: {reason})"

    def _watch_step_previews(self) -> None:
        from modules import lowvram, sd_vae_approx, sd_vae_taesd, shared
        try:
            decoder = decoding.step_preview_decoder(shared.opts, shared, lowvram, sd_vae_taesd, sd_vae_approx)
        except Exception as error:  # noqa: BLE001 - the WebUI's own preview reports it again in the step
            log(f"warning: the preview decoder did not load ({error}); in-step previews are not shrunk")
            return
        if decoder is not None and not any(getattr(h, "decoder", None) is decoder for h in self.hooks):
            self._add(decoding.SmallPreviewDecoder(decoder, self.guard))

    def _add(self, hook) -> None:
        self.hooks.append(hook)
        _live_hooks.add(hook)

    @property
    def active(self) -> ScaleCrafterPass | None:
        return next((h for h in self.hooks if isinstance(h, ScaleCrafterPass)), None)

    def _discard(self, hook) -> None:
        hook.remove()
        _live_hooks.discard(hook)
        self.hooks.remove(hook)

    def end_pass(self) -> None:
        self.armed = None
        while self.hooks:
            hook = self.hooks.pop()
            hook.remove()
            _live_hooks.discard(hook)

    def _remove_guard(self) -> None:
        if _current.job is self:
            _current.job = None
        if self.guard is not None:
            self.guard.remove()
            _live_hooks.discard(self.guard)
            self.guard = None

    def finish(self) -> None:
        self.end_pass()
        self._remove_guard()


OWN_INFOTEXT_PREFIXES = (TITLE, "ScaleCrafter ", "DemoFusion ")  # every key the extension writes starts so


def _own_infotext_key(key: str) -> bool:
    return key == TITLE or key.startswith(OWN_INFOTEXT_PREFIXES)


def fresh_infotext(p) -> None:
    """Gives ``p`` its own ``extra_generation_params`` without the extension's keys: X/Y/Z plot cells are
    shallow copies (``copy(p)``) sharing one dict, so what one cell wrote would describe the next."""
    p.extra_generation_params = {k: v for k, v in (p.extra_generation_params or {}).items()
                                 if not _own_infotext_key(k)}


def begin(p, args, defaults: Callable[[], ScaleFusionSettings], job_class=None) -> Job | None:
    """``before_process``: parses the settings, refuses what cannot work, wraps ``p.sample``.

    ``defaults()`` gives the user's saved defaults with this request's ``override_settings`` applied (the
    WebUI applies those to the options only after ``before_process``). ``job_class`` (default :class:`Job`)
    is the job for this kind of model (Forge's: ``lib_hires.webui.forge.job.ForgeJob``).
    """
    remove_all_hooks()
    setattr(p, JOB_ATTR, None)
    fresh_infotext(p)
    try:
        settings = ScaleFusionSettings.from_script_args(args, defaults())
        overrides = xyz.overrides_of(p)
        if overrides:
            settings = settings.replace(**overrides)
    except SettingsError as error:
        _refuse(p, str(error))
        return None
    if not settings.enabled:
        return None
    job = (job_class or Job)(p, settings)
    setattr(p, JOB_ATTR, job)
    return job


def job_of(p) -> Job | None:
    return getattr(p, JOB_ATTR, None)
