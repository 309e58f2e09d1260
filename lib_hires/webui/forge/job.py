"""One generation with ScaleFusion on in Forge, from ``before_process`` to the end of sampling.

The same lifecycle and messages as :class:`lib_hires.webui.job.Job`: the settings are parsed in
``before_process`` (by :func:`lib_hires.webui.job.begin`, which builds this job for a Forge model), the model and
the request are checked when ``p.sample`` starts (the checkpoint is loaded only after ``before_process`` in Forge),
and a pass is armed in ``process_before_every_sampling``. Forge calls that hook after it has reset
``forge_objects`` for the pass, and twice for the hires pass (before and after a second reset): every call first
removes what the previous one armed, so the last one, on the objects that sample, is what counts. Everything a pass
installs comes off when ``p.sample`` returns or raises (an interrupt returns), and again, idempotently, in
``postprocess``. Forge's refiner switch loads the refiner inside a denoiser call; the ``on_cfg_denoiser`` callback
that follows it moves the armed pass to the refiner's UnetPatcher (:meth:`ForgeJob.follow_sampler`).

DemoFusion in Forge is ``lib_hires.webui.forge.demofusion.ForgeDemoFusionRun(p, job, original_sample)``: called in place
of ``p.sample`` (it refuses what it cannot run there, before sampling) and told of every pass by
``run.start_pass(p, x)``.
"""
from __future__ import annotations

from lib_hires.settings import DF, ScaleFusionSettings, SettingsError
from lib_hires.summary import short_source, size_warnings
from lib_hires.webui.job import _current, _live_hooks, check_scalecrafter_sizes
from lib_hires.webui.messages import RequestError, log
from lib_hires.webui.model_info import ModelInfo, UnsupportedModelError
from lib_hires.webui.scalecrafter_pass import plan_for_latent

from . import decoding
from . import model as forge_model
from .demofusion import ForgeDemoFusionRun
from .scalecrafter import ForgeScaleCrafterPass


class ForgeJob:
    def __init__(self, p, settings: ScaleFusionSettings):
        self.settings = settings
        self.p = p
        self.info: ModelInfo | None = None
        self.model = None          # the model object self.info was made for
        self.hooks: list = []      # this pass's hooks
        self.armed: tuple | None = None  # (latent size, infotext key) of this pass's ScaleCrafter, for the refiner
        # from p.sample until postprocess: the final decode in post_sample runs while the progress thread still
        # previews current_latent (issue 19 §3, as the A1111 job)
        self.previews: decoding.SmallPreviews | None = None
        original_sample = p.sample
        self.run = ForgeDemoFusionRun(p, self, original_sample) if settings.method == DF else None

        def sample(*args, **kwargs):
            try:
                self.model = p.sd_model
                self.info = self._check_model(p)
                self._check_request(p)
                if self.previews is None or not self.previews.patches:
                    self.previews = decoding.SmallPreviews(decoding.progress_state())
                    _live_hooks.add(self.previews)
                _current.job = self  # the on_cfg_denoiser callback follows a refiner switch (follow_sampler)
                if self.run is not None:
                    return self.run(*args, **kwargs)
                return original_sample(*args, **kwargs)
            except BaseException:
                self._remove_previews()  # no post_sample or postprocess follows
                raise
            finally:
                if _current.job is self:
                    _current.job = None
                self.end_pass()

        p.sample = sample
        original_init = p.init

        def init(*args, **kwargs):
            # img2img encodes its init images here, before p.sample and before any pass is armed: big ones in
            # tiles too (on the objects that encode now; Forge resets them before the first pass)
            tiling = decoding.TiledVae(p.sd_model) if self._encodes_here(p) else None
            try:
                return original_init(*args, **kwargs)
            finally:
                if tiling is not None:
                    tiling.remove()

        p.init = init

    def _encodes_here(self, p) -> bool:
        """Whether p.init's encode is one this job tiles: a model the job can run on (any other is refused when
        p.sample starts, so its encode is left to Forge)."""
        try:
            forge_model.describe(p.sd_model, self.settings.native_size)
        except UnsupportedModelError:
            return False
        return True

    def _check_model(self, p) -> ModelInfo:
        try:
            return forge_model.describe(p.sd_model, self.settings.native_size)
        except UnsupportedModelError as error:
            log(str(error))
            raise RequestError(str(error)) from None

    def _check_request(self, p) -> None:
        """What cannot run is refused before any sampling starts."""
        if self.settings.method == DF:
            return  # the run checks its own request when called
        check_scalecrafter_sizes(p, self.info, self.settings)

    def write_infotext(self, p) -> None:
        p.extra_generation_params.update(self.settings.to_infotext())

    def start_pass(self, p, x) -> None:
        """``process_before_every_sampling``: arms what this pass needs on the objects Forge samples with now."""
        self.end_pass()
        if self.model is None:  # before p.sample (not reached in Forge), or the job was refused
            return
        # This pass's decodes and encodes of big latents in tiles: those Forge makes inside p.sample (the hires
        # pass encodes the first pass's images before its resets, so under this hook, and decodes its own).
        self._add(decoding.TiledVae(p.sd_model))
        if self.run is not None:
            self.run.start_pass(p, x)
            return
        is_hires = bool(getattr(p, "is_hr_pass", False))
        if getattr(p, "enable_hr", False) and not self.settings.applies_to_pass(is_hires):
            return
        key = "ScaleCrafter hires preset" if is_hires else "ScaleCrafter preset"
        if not self._follow_model(p, key):
            return
        self.armed = (tuple(x.shape[-2:]), key)
        self.arm_scalecrafter(p, *self.armed)

    def _follow_model(self, p, infotext_key: str) -> bool:
        """Describes the model that samples now where it is another object than the one described last (a hires
        pass on another checkpoint, the refiner, the next batch's reload); False where ScaleCrafter cannot run
        on it (said in the infotext: raised here, Forge would swallow it; that model runs vanilla)."""
        if p.sd_model is self.model:
            return self.info is not None
        self.model = p.sd_model
        try:
            self.info = forge_model.describe(p.sd_model, self.settings.native_size)
        except UnsupportedModelError as error:
            self.info = None
            self._say_vanilla(p, infotext_key, str(error))
            return False
        return True

    def follow_sampler(self, params) -> None:
        """``on_cfg_denoiser``, before the UNet runs. Forge's refiner switch (``apply_refiner``) has just reloaded
        the model at the start of this denoiser call: ``sampling_function`` is about to read the refiner's fresh
        ``forge_objects.unet``, so the pass moves there: the base's hooks come off and the pass is armed again on a
        clone of the refiner's UnetPatcher, with the refiner's own plan, or the refiner runs vanilla where no
        preset fits it (said in the infotext; no base calls either)."""
        p = self.p
        if self.armed is None or getattr(params.denoiser, "p", p) is not p or p.sd_model is self.model:
            return
        for hook in [h for h in self.hooks if isinstance(h, ForgeScaleCrafterPass)]:
            self.hooks.remove(hook)
            hook.remove()
            _live_hooks.discard(hook)
        latent_hw, key = self.armed
        refiner_key = key.replace(" preset", " refiner preset")
        if self._follow_model(p, refiner_key):
            self.arm_scalecrafter(p, latent_hw, refiner_key)

    def follow_load(self, sd_model) -> None:
        """``on_model_loaded`` inside ``p.sample``: Forge's decodes and previews follow ``p.sd_model`` where they
        run, and the refiner's UNet is followed in :meth:`follow_sampler`; nothing to do here."""

    def arm_scalecrafter(self, p, latent_hw, infotext_key: str, *,
                         noise_damping: bool = True) -> ForgeScaleCrafterPass | None:
        """Re-dilation for latents of ``latent_hw`` on a clone of the UnetPatcher that samples next, which
        becomes ``forge_objects.unet``; None where the plan does nothing (said in the infotext either way). UNet
        calls of another size run vanilla (the controller keys on each call's latent size)."""
        try:
            plan = plan_for_latent(self.info, self.settings, latent_hw)
        except SettingsError as error:
            # The job's first model was checked before sampling; this is a model switched to since.
            self._say_vanilla(p, infotext_key, str(error))
            return None
        p.extra_generation_params[infotext_key] = short_source(plan.preset.source)
        log(plan.describe())
        for warning in size_warnings(plan.width, plan.height):
            log(f"warning: {warning}")
        if plan.is_noop:
            return None
        patcher = forge_model.unet_patcher(p.sd_model).clone()
        active = ForgeScaleCrafterPass(plan, self.info, patcher, noise_damping=noise_damping)
        self._add(active)
        p.sd_model.forge_objects.unet = patcher
        return active

    def post_sample(self, p, ps) -> None:
        """``Script.post_sample``: the decode of a big latent goes to ``lib_hires.webui.forge.decoding`` (tiles with
        whole-image GroupNorm statistics); Forge's own decode runs for the rest."""
        decoding.post_sample(p, ps)

    @staticmethod
    def _say_vanilla(p, infotext_key: str, reason: str) -> None:
        name = getattr(getattr(p.sd_model, "sd_checkpoint_info", None), "name_for_extra", None) or "this model"
        log(f"warning: {name} runs without ScaleCrafter ({reason})")
        p.extra_generation_params[infotext_key] = f"none ({name}: {reason})"

    def _add(self, hook) -> None:
        self.hooks.append(hook)
        _live_hooks.add(hook)

    @property
    def active(self) -> ForgeScaleCrafterPass | None:
        return next((h for h in self.hooks if isinstance(h, ForgeScaleCrafterPass)), None)

    def end_pass(self) -> None:
        self.armed = None
        while self.hooks:
            hook = self.hooks.pop()
            hook.remove()
            _live_hooks.discard(hook)

    def _remove_previews(self) -> None:
        if self.previews is not None:
            self.previews.remove()
            _live_hooks.discard(self.previews)
            self.previews = None

    def finish(self) -> None:
        self.end_pass()
        self._remove_previews()
