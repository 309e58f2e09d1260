"""One generation with ScaleFusion on, from ``before_process`` to the end of sampling.

The Script is thin: it hands its hooks to :func:`begin`, :meth:`Job.start_pass` and :meth:`Job.finish`.
Nothing is installed until a pass starts, and everything a pass installs is removed when ``p.sample``
returns or raises (the wrapper installed here) and again, idempotently, in ``postprocess`` and at the
start of the next job, so no hook outlives the job that armed it.
"""
from __future__ import annotations

import weakref

from fastapi import HTTPException

from lib_hires.settings import SC, TITLE, ScaleFusionSettings, SettingsError
from lib_hires.summary import short_source, size_warnings

from . import model_info, xyz
from .scalecrafter_pass import ScaleCrafterPass, plan_for_latent

JOB_ATTR = "scalefusion_job"
_live_passes: "weakref.WeakSet[ScaleCrafterPass]" = weakref.WeakSet()


class RequestError(HTTPException):
    """A request the extension cannot serve; the API answers 422 with this message.

    Raised from the replaced ``p.sample``: the WebUI swallows exceptions raised in Script hooks, but
    not this one, and its API error handler uses the exception's ``status_code``.
    """

    def __init__(self, message: str):
        super().__init__(status_code=422, detail=message)

    def __str__(self) -> str:
        return str(self.detail)


def log(message: str) -> None:
    print(f"[{TITLE}] {message}")


def remove_all_hooks() -> None:
    """Removes every pass still installed (after a crash elsewhere, or on "Reload UI")."""
    for active in list(_live_passes):
        active.remove()
        _live_passes.discard(active)


def _refuse(p, message: str) -> None:
    log(message)

    def sample(*args, **kwargs):
        raise RequestError(message)

    p.sample = sample


class Job:
    def __init__(self, p, settings: ScaleFusionSettings):
        self.settings = settings
        self.info: model_info.ModelInfo | None = None
        self.active: ScaleCrafterPass | None = None
        original_sample = p.sample

        def sample(*args, **kwargs):
            self.info = self._check_model(p)  # here, not in before_process: the checkpoint may change in between
            self._check_sizes(p)
            try:
                return original_sample(*args, **kwargs)
            finally:
                self.end_pass()

        p.sample = sample

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

    def _check_sizes(self, p) -> None:
        """Sizes the engine cannot plan for are refused before any sampling starts."""
        if self.info is None or self.settings.method != SC:
            return
        sizes = [(p.width, p.height)]
        if getattr(p, "enable_hr", False):
            sizes.append((getattr(p, "hr_upscale_to_x", 0) or p.width, getattr(p, "hr_upscale_to_y", 0) or p.height))
        for width, height in sizes:
            try:
                plan_for_latent(self.info, self.settings, (height // 8, width // 8))
            except SettingsError as error:
                raise RequestError(f"{TITLE}: {error}") from None

    def write_infotext(self, p) -> None:
        p.extra_generation_params.update(self.settings.to_infotext())

    def start_pass(self, p, x) -> None:
        """``process_before_every_sampling``: arms ScaleCrafter for the latent that is about to be sampled."""
        self.end_pass()
        if self.settings.method != SC or self.info is None:
            return
        is_hires = bool(getattr(p, "is_hr_pass", False))
        if getattr(p, "enable_hr", False) and not self.settings.applies_to_pass(is_hires):
            return
        latent_hw = tuple(x.shape[-2:])
        plan = plan_for_latent(self.info, self.settings, latent_hw)
        key = "ScaleCrafter hires preset" if is_hires else "ScaleCrafter preset"
        p.extra_generation_params[key] = short_source(plan.preset.source)
        log(plan.describe())
        for warning in size_warnings(plan.width, plan.height):
            log(f"warning: {warning}")
        if plan.is_noop:
            return
        self.active = ScaleCrafterPass(plan, self.info, p.sampler.model_wrap_cfg, p.sd_model)
        _live_passes.add(self.active)

    def end_pass(self) -> None:
        if self.active is not None:
            self.active.remove()
            _live_passes.discard(self.active)
            self.active = None

    def finish(self) -> None:
        self.end_pass()


def begin(p, args, defaults: ScaleFusionSettings) -> Job | None:
    """``before_process``: parses the settings, refuses what cannot work, wraps ``p.sample``."""
    remove_all_hooks()
    setattr(p, JOB_ATTR, None)
    try:
        settings = ScaleFusionSettings.from_script_args(args, defaults)
        overrides = xyz.overrides_of(p)
        if overrides:
            settings = settings.replace(**overrides)
    except SettingsError as error:
        _refuse(p, str(error))
        return None
    if not settings.enabled:
        return None
    job = Job(p, settings)
    setattr(p, JOB_ATTR, job)
    return job


def job_of(p) -> Job | None:
    return getattr(p, JOB_ATTR, None)
