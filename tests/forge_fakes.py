"""Stand-ins for the pieces of Forge (main @ dfdcbab6) that ScaleFusion's Forge adapters meet, without Forge.

``operations`` mirrors ``backend/operations.py``: ``get_weight_and_bias`` (``scale_weight``, then the online LoRA
patches, here a plain additive delta in ``forge_online_loras``), ``weights_manual_cast`` (cast to the input's device
and dtype) and ``main_stream_worker`` (records that it is held). ``ForgeConv2d.forward`` is
``ForgeOperations.Conv2d.forward``: the instance ``_conv_forward`` in the manual-cast branch,
``super()._conv_forward`` otherwise. ``FakeBackend`` installs them as ``backend.operations`` for one test.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import types

import torch
from torch import nn

EVENTS: list[str] = []   # what main_stream_worker and the convs did, in order


def get_weight_and_bias(layer, weight_args=None, bias_args=None, weight_fn=None, bias_fn=None):
    scale_weight = getattr(layer, "scale_weight", None)
    patches = getattr(layer, "forge_online_loras", None)
    weight = layer.weight
    if weight_args is not None:
        weight = weight.to(**weight_args)
    if scale_weight is not None:
        weight = weight * scale_weight.to(device=weight.device, dtype=weight.dtype)
    if patches is not None and "weight" in patches:
        weight = weight + patches["weight"].to(weight)
    bias = layer.bias
    if bias is not None:
        if bias_args is not None:
            bias = bias.to(**bias_args)
        if patches is not None and "bias" in patches:
            bias = bias + patches["bias"].to(bias)
    return weight, bias


def weights_manual_cast(layer, x, skip_weight_dtype=False, skip_bias_dtype=False, weight_fn=None, bias_fn=None):
    args = dict(device=x.device, dtype=x.dtype, non_blocking=True)
    weight, bias = get_weight_and_bias(layer, args, args)
    return weight, bias, "signal"


@contextlib.contextmanager
def main_stream_worker(weight, bias, signal):
    EVENTS.append(f"worker enter {signal}")
    try:
        yield
    finally:
        EVENTS.append("worker exit")


operations = types.SimpleNamespace(get_weight_and_bias=get_weight_and_bias, weights_manual_cast=weights_manual_cast,
                                   main_stream_worker=main_stream_worker)


class ForgeConv2d(nn.Conv2d):
    """``ForgeOperations.Conv2d``'s forward, over the fake operations."""

    def forward(self, x):
        if self.parameters_manual_cast:
            weight, bias, signal = weights_manual_cast(self, x)
            with main_stream_worker(weight, bias, signal):
                return self._conv_forward(x, weight, bias)
        weight, bias = get_weight_and_bias(self)
        return super()._conv_forward(x, weight, bias)


def make_forge_conv(conv: nn.Conv2d, *, manual_cast: bool = False, scale: float | None = None,
                    online_delta: bool = False, seed: int = 0) -> nn.Conv2d:
    """Turns a ``nn.Conv2d`` into a Forge conv in place (as Forge builds every UNet conv), with a ``scale_weight``
    and an online LoRA delta where asked."""
    conv.__class__ = ForgeConv2d
    conv.parameters_manual_cast = manual_cast
    conv.scale_weight = None if scale is None else nn.Parameter(torch.tensor(scale), requires_grad=False)
    if online_delta:
        gen = torch.Generator().manual_seed(seed)
        conv.forge_online_loras = {"weight": 0.1 * torch.randn(conv.weight.shape, generator=gen)}
    return conv


def final_weights(conv) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel and bias the Forge conv computes with (in float32)."""
    weight, bias = get_weight_and_bias(conv, dict(dtype=torch.float32), dict(dtype=torch.float32))
    return weight, bias


class ProgressState:
    """``shared.state``'s live-preview side: ``do_set_current_image`` decodes ``current_latent`` (here: records
    its shape)."""

    def __init__(self):
        self.current_latent, self.previewed = None, []   # previewed: (latent shape, through an instance patch)

    def do_set_current_image(self):
        self.previewed.append((tuple(self.current_latent.shape), "do_set_current_image" in vars(self)))

    def end(self):
        self.ended = True


class FakeBackend:
    """``backend.operations``, ``calc_cond_uncond_batch``, ``backend.memory_management`` (64 GiB free),
    ``backend.nn.vae`` (a posterior whose sample is its mean) and ``modules.shared`` (``state``: a
    :class:`ProgressState`; ``opts``) in ``sys.modules`` for one ``with`` block."""

    NAMES = ("backend", "backend.operations", "backend.sampling", "backend.sampling.sampling_function",
             "backend.memory_management", "backend.nn", "backend.nn.vae", "modules", "modules.shared")

    def __enter__(self):
        self.saved = {name: sys.modules.get(name) for name in self.NAMES}
        backend = types.ModuleType("backend")
        module = types.ModuleType("backend.operations")
        for name in ("get_weight_and_bias", "weights_manual_cast", "main_stream_worker"):
            setattr(module, name, getattr(operations, name))
        backend.operations = module
        backend.sampling = types.ModuleType("backend.sampling")
        backend.sampling.sampling_function = types.ModuleType("backend.sampling.sampling_function")
        backend.sampling.sampling_function.calc_cond_uncond_batch = lambda *a: calc_cond_uncond_batch(*a)
        backend.memory_management = types.ModuleType("backend.memory_management")
        backend.memory_management.get_free_memory = lambda device=None: 64 * 2 ** 30
        backend.memory_management.load_model_gpu = lambda patcher: None
        backend.nn = types.ModuleType("backend.nn")
        backend.nn.vae = types.ModuleType("backend.nn.vae")
        backend.nn.vae.DiagonalGaussianDistribution = MeanPosterior
        modules = types.ModuleType("modules")
        modules.__path__ = []
        modules.shared = types.ModuleType("modules.shared")
        modules.shared.state = self.state = ProgressState()
        modules.shared.opts = self.opts = SimpleNamespace(data={})
        for name in self.NAMES:
            sys.modules[name] = eval(name, {"backend": backend, "modules": modules})
        EVENTS.clear()
        return self

    def __exit__(self, *exc):
        for name, module in self.saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# The sampling side: UnetPatcher, KModel, sampling_function_inner, the txt2img call order -------------------------

from types import SimpleNamespace  # noqa: E402

from tools.tiny_ldm import scaled_linear_alphas_cumprod  # noqa: E402


class FakePredictor:
    """``backend.modules.k_prediction.Prediction`` (eps): sigmas of the SD schedule, ``timestep(sigma)``."""

    prediction_type = "epsilon"

    def __init__(self):
        acp = scaled_linear_alphas_cumprod()
        self.sigmas = ((1 - acp) / acp) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma):
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)


class FakeKModel:
    """``backend.modules.k_model.KModel.apply_model``: the UNet is called as ``diffusion_model(xc, t, context=...)``."""

    def __init__(self, unet):
        self.diffusion_model = unet
        self.predictor = FakePredictor()

    def apply_model(self, x, sigma, c_crossattn=None, **kwargs):
        s = sigma.view(-1, 1, 1, 1)
        t = self.predictor.timestep(sigma).float()
        eps = self.diffusion_model(x / (s ** 2 + 1) ** 0.5, t, context=c_crossattn)
        return x - eps * s


class FakeUnetPatcher:
    """``UnetPatcher``: ``clone()`` shares the model and deep-copies ``model_options``, as Forge's does."""

    controlnet_linked_list = None   # no built-in ControlNet unit

    def __init__(self, model, model_options=None):
        self.model = model
        self.model_options = model_options if model_options is not None else {}
        self.clones = 0

    def memory_required(self, input_shape):
        return input_shape[0] * input_shape[2] * input_shape[3]

    def clone(self):
        self.clones += 1
        return FakeUnetPatcher(self.model, copy.deepcopy(self.model_options))

    def set_model_sampler_pre_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_pre_cfg_function"] = self.model_options.get("sampler_pre_cfg_function", []) + [fn]

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = self.model_options.get("sampler_post_cfg_function", []) + [fn]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True


def calc_cond_uncond_batch(model, cond, uncond, x, sigma, model_options):
    """``backend.sampling.sampling_function.calc_cond_uncond_batch`` for whole-latent conds: one batched call."""
    entries = [(c, 0) for c in cond] + [(c, 1) for c in (uncond or [])]
    out = [torch.zeros_like(x), torch.zeros_like(x)]
    if not entries:
        return tuple(out)
    context = torch.cat([c["model_conds"]["c_crossattn"] for c, _ in entries])
    xs = torch.cat([x] * len(entries))
    sigmas = torch.cat([sigma] * len(entries))
    if "model_function_wrapper" in model_options:
        pred = model_options["model_function_wrapper"](model.apply_model, {
            "input": xs, "timestep": sigmas, "c": {"c_crossattn": context}, "cond_or_uncond": [k for _, k in entries]})
    else:
        pred = model.apply_model(xs, sigmas, c_crossattn=context)
    for chunk, (_, kind) in zip(pred.chunk(len(entries)), entries):
        out[kind] = out[kind] + chunk
    return tuple(out)


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options):
    """``sampling_function_inner`` (one cond, no areas): pre-CFG functions, the batch, CFG, post-CFG functions."""
    uncond_ = None if cond_scale == 1.0 and not model_options.get("disable_cfg1_optimization") else uncond
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if "sampler_cfg_function" in model_options:
        cfg_result = x - model_options["sampler_cfg_function"](dict(cond=x - cond_pred, uncond=x - uncond_pred,
                                                                    cond_scale=cond_scale))
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        cfg_result = fn({"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model,
                         "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                         "model_options": model_options, "input": x})
    return cfg_result, cond_pred, uncond_pred


def conds(tensor):
    return [{"model_conds": {"c_crossattn": tensor}}]


class MeanPosterior:
    """``backend.nn.vae.DiagonalGaussianDistribution`` with the sample of a deterministic test: the mean."""

    def __init__(self, moments):
        self.mean = moments.chunk(2, dim=1)[0]

    def sample(self):
        return self.mean


class FakeVaePatcher:
    def __init__(self):
        self.model_options = {}

    def clone(self):
        other = FakeVaePatcher()
        other.model_options = copy.deepcopy(self.model_options)
        return other


class FakeForgeVae:
    """backend.patcher.vae.VAE's decode/encode plumbing: the wrappers in the patcher's model_options get the inner
    functions; decode_inner returns B, H, W, 3 in [0, 1]; encode_inner takes that layout. The first-stage model
    is IntegratedAutoencoderKL-shaped (decoder, encoder, post_quant_conv, quant_conv; the factories keep their
    1x1 convs inside the halves, so those two are None here). ``inner_calls`` (shared by clones): what reached
    Forge's own whole-image decode and encode."""

    DECODE, ENCODE = "model_vae_decode_wrapper", "model_vae_encode_wrapper"

    def __init__(self, model=None, patcher=None):
        self.first_stage_model = model
        self.vae_dtype, self.device, self.output_device = torch.float32, torch.device("cpu"), torch.device("cpu")
        self.patcher = patcher or FakeVaePatcher()
        self.inner_calls = []

    def clone(self):
        other = FakeForgeVae(self.first_stage_model, self.patcher.clone())
        other.inner_calls = self.inner_calls
        return other

    def decode_inner(self, samples):
        self.inner_calls.append(("decode", tuple(samples.shape[-2:])))
        x = self.first_stage_model.decoder(samples)
        return torch.clamp((x + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1)

    def decode(self, samples):
        wrapper = self.patcher.model_options.get(self.DECODE)
        return self.decode_inner(samples) if wrapper is None else wrapper(self.decode_inner, samples)

    def encode_inner(self, pixels):
        self.inner_calls.append(("encode", tuple(pixels.shape[1:3])))
        return MeanPosterior(self.first_stage_model.encoder(2.0 * pixels.movedim(-1, 1) - 1.0)).sample()

    def encode(self, pixels):
        wrapper = self.patcher.model_options.get(self.ENCODE)
        return self.encode_inner(pixels) if wrapper is None else wrapper(self.encode_inner, pixels)


def tiny_first_stage():
    """A random-weight VAE with the real decoder/encoder layout, an eighth of its width."""
    from tools.vae_factory import build_decoder, build_encoder

    model = torch.nn.Module()
    model.decoder, model.encoder = build_decoder(0.125, seed=8), build_encoder(0.125, seed=9)
    model.post_quant_conv = model.quant_conv = None
    return model


class ForgeObjects:
    def __init__(self, unet, vae=None):
        self.unet, self.vae = unet, vae if vae is not None else FakeForgeVae()

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.vae)


class FakeForgeModel:
    """A ``ForgeDiffusionEngine`` (SD1): ``forge_objects`` and the two copies Forge resets them from."""

    def __init__(self, unet, name="tiny-forge", *, family="sd1", legacy=True, vae=None):
        patcher = FakeUnetPatcher(FakeKModel(unet))
        self.forge_objects = ForgeObjects(patcher, vae)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3 = family == "sd1", family == "sd2", family == "sdxl", False
        self._legacy = legacy
        self.sd_checkpoint_info = SimpleNamespace(name_for_extra=name)

    def is_webui_legacy_model(self):
        return self._legacy


class FakeForgeTxt2Img:
    """``StableDiffusionProcessingTxt2Img.sample`` / ``sample_hr_pass`` as Forge orders them: ``forge_objects`` reset
    before ``process_before_every_sampling``; for the hires pass that hook, a second reset, the hook again. Each
    step runs ``sampling_function_inner`` with ``sd_model.forge_objects.unet`` as it is when sampling starts."""

    def __init__(self, model: FakeForgeModel, *, width=128, height=128, steps=2, enable_hr=False, hr_scale=2,
                 cfg_scale=7.0, seed=3, scripts=(), fail_at_step=None, hr_upscaler="latent", init_image=None):
        self.sd_model = model
        self.width, self.height, self.steps, self.cfg_scale = width, height, steps, cfg_scale
        self.enable_hr, self.is_hr_pass = enable_hr, False
        self.hr_upscale_to_x, self.hr_upscale_to_y = width * hr_scale, height * hr_scale
        self.extra_generation_params: dict = {}
        self.refiner_checkpoint_info, self.refiner_switch_at = None, None
        self.refiner_model, self.refined_with = None, []   # the model the refiner switch loads; its UnetPatcher
        self.scripts = list(scripts)   # other extensions' process_before_every_sampling(p), run after ours
        self.fail_at_step = fail_at_step
        self.hr_upscaler, self.init_image = hr_upscaler, init_image  # "latent" or "image"; B, H, W, 3 in [0, 1]
        self.init_latent = self.decoded = None
        gen = torch.Generator().manual_seed(seed)
        self.cond, self.uncond = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 7, 32, generator=gen)
        self.noise = torch.randn(1, 4, height // 8, width // 8, generator=gen)
        self.hr_noise = torch.randn(1, 4, self.hr_upscale_to_y // 8, self.hr_upscale_to_x // 8, generator=gen)
        self.job = None
        self.sampled_with: list = []   # the UnetPatcher of each pass

    def process_before_every_sampling(self, x):
        if self.job is not None:
            self.job.start_pass(self, x)
        for script in self.scripts:
            script(self)

    def init(self, *args):
        """``p.init``: img2img's encodes its init images here (``images_tensor_to_samples`` on the objects of the
        moment), before the batch loop resets ``forge_objects``."""
        if self.init_image is not None:
            self.init_latent = self.sd_model.forge_objects.vae.encode(self.init_image)

    def _preview(self, x):
        """The sampler's ``store_latent`` and the progress thread's preview of it."""
        state = sys.modules["modules.shared"].state
        state.current_latent = x
        state.do_set_current_image()
        assert state.current_latent is x  # the sampler's latent is its own again after the preview

    def _apply_refiner(self, step: int, total_steps: int | None = None) -> bool:
        """``sd_samplers_common.apply_refiner`` at the start of a denoiser call: from ``refiner_switch_at`` of the
        pass's steps on, ``refiner_model`` (a fresh load, its own ``forge_objects``) becomes ``p.sd_model``, once."""
        info, switch_at = self.refiner_checkpoint_info, self.refiner_switch_at
        if switch_at is not None and step / (total_steps or self.steps) < switch_at:
            return False
        if info is None or self.sd_model.sd_checkpoint_info is info:
            return False
        self.extra_generation_params["Refiner"] = info.short_title
        self.extra_generation_params["Refiner switch at"] = switch_at
        self.sd_model = self.refiner_model
        self.refined_with.append(self.sd_model.forge_objects.unet)
        return True

    def _sample(self, x):
        from lib_hires.webui import job

        patcher = self.sd_model.forge_objects.unet
        self.sampled_with.append(patcher)
        sigmas = patcher.model.predictor.sigmas[[980, 600, 200, 20][-self.steps - 1:]]
        x = x * sigmas[0]
        for i, (sigma, following) in enumerate(zip(sigmas, sigmas[1:])):
            if self.fail_at_step == i:
                raise RuntimeError("the sampler failed")
            s = sigma.view(1)
            # CFGDenoiser.forward: the refiner switch, the on_cfg_denoiser callbacks (the Script registers
            # job.on_cfg_denoiser), then sampling_function on forge_objects.unet as it is now
            self._apply_refiner(i)
            job.on_cfg_denoiser(SimpleNamespace(denoiser=SimpleNamespace(p=self), x=x, sigma=s))
            patcher = self.sd_model.forge_objects.unet
            denoised, _, _ = sampling_function_inner(patcher.model, x, s, conds(self.uncond), conds(self.cond),
                                                     self.cfg_scale, patcher.model_options)
            x = denoised + (x - denoised) * (following / sigma)  # Euler
            self._preview(x)
        return x

    def sample(self, *args, **kwargs):
        model = self.sd_model
        model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
        self.process_before_every_sampling(self.noise)
        samples = self._sample(self.noise)
        if not self.enable_hr:
            return samples
        self.is_hr_pass = True
        if self.hr_upscaler == "latent":
            upscaled = torch.nn.functional.interpolate(samples, size=self.hr_noise.shape[-2:], mode="nearest")
        else:  # decode_latent_batch, the upscaler, images_tensor_to_samples: before the hires pass's resets
            with torch.no_grad():
                images = model.forge_objects.vae.decode(samples).movedim(-1, 1)
                images = torch.nn.functional.interpolate(images, size=(self.hr_upscale_to_y, self.hr_upscale_to_x))
                upscaled = model.forge_objects.vae.encode(images.movedim(1, -1))
        self.process_before_every_sampling(upscaled)
        model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
        self.process_before_every_sampling(upscaled)
        samples = self._sample(0.3 * upscaled + self.hr_noise)
        if self.hr_upscaler != "latent":  # sample_hr_pass decodes its result itself
            with torch.no_grad():
                self.decoded = model.forge_objects.vae.decode(samples)
        self.is_hr_pass = False
        return samples


def run_forge_job(p: FakeForgeTxt2Img, settings):
    """``process_images`` for one batch with the job Forge gets: before_process, process, p.sample, postprocess."""
    from lib_hires.webui.forge.job import ForgeJob
    from lib_hires.webui import job

    active = job.begin(p, [settings.to_dict()], lambda: type(settings)(), ForgeJob)
    p.job = active
    if active is not None:
        active.write_infotext(p)
    try:
        p.init()
        return p.sample()
    finally:
        if active is not None:
            active.finish()


# DemoFusion's later stages: Forge's k-diffusion sampler, CFG denoiser and the modules a stage reaches -----------

class FakeForgeCFGDenoiser:
    """``sd_samplers_cfg_denoiser.CFGDenoiser.forward`` as Forge runs it: ``sampling_function`` on
    ``p.sd_model.forge_objects.unet`` as it is at each evaluation (``calls`` counts them)."""

    def __init__(self, p, sampler):
        self.p, self.sampler, self.calls = p, sampler, 0
        self.step, self.total_steps = 0, None

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        from lib_hires.webui import job

        self.calls += 1
        if apply_refiner(self, x):
            cond, uncond = self.sampler.sampler_extra_args["cond"], self.sampler.sampler_extra_args["uncond"]
        job.on_cfg_denoiser(SimpleNamespace(denoiser=self, x=x, sigma=sigma))
        self.step += 1
        patcher = self.p.sd_model.forge_objects.unet
        denoised, _, _ = sampling_function_inner(patcher.model, x, sigma, conds(uncond), conds(cond), cond_scale,
                                                 patcher.model_options)
        return denoised

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class FakeForgeKDiffusionSampler:
    """``KDiffusionSampler``: ``sample_img2img`` starts at ``x + sigma noise`` of the img2img schedule
    (``t_enc = int(min(strength, 0.999) * steps)``) and calls ``self.func(model_wrap_cfg, x, sigmas, extra_args=...,
    callback=...)``; the sigmas are the fake txt2img's (``FakeForgeTxt2Img.schedule``)."""

    def __init__(self, func, p):
        self.func, self.p = func, p
        self.model_wrap_cfg = FakeForgeCFGDenoiser(p, self)
        self.sampler_extra_args = None

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps = steps or p.steps
        sigmas = p.schedule(steps)
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        sigmas = sigmas[steps - t_enc - 1:]
        self.model_wrap_cfg.total_steps = len(sigmas) - 1
        self.sampler_extra_args = {"cond": conditioning, "image_cond": image_conditioning,
                                   "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale, "s_min_uncond": 0.0}
        return self.func(self.model_wrap_cfg, x + noise * sigmas[0], sigmas, extra_args=self.sampler_extra_args,
                         disable=True, callback=None)


def apply_refiner(cfg_denoiser, x) -> bool:
    """``sd_samplers_common.apply_refiner(cfg_denoiser, x)``: the switch (``FakeForgeTxt2Img._apply_refiner``), then
    ``p.setup_conds()`` and ``update_inner_model()``: the conds rebuilt with the refiner (``p.refiner_conds``) in the
    sampler's extra args."""
    p = cfg_denoiser.p
    if not p._apply_refiner(cfg_denoiser.step, cfg_denoiser.total_steps):
        return False
    p.refiner_switches.append((cfg_denoiser.step, tuple(x.shape)))
    cfg_denoiser.sampler.sampler_extra_args["cond"], cfg_denoiser.sampler.sampler_extra_args["uncond"] = \
        p.refiner_conds
    return True


class FakeImageRNG:
    """``modules.rng.ImageRNG``: one seeded draw of ``shape`` per image."""

    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0):
        self.shape, self.seeds = tuple(shape), seeds

    def next(self):
        return torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(1000 + s))
                            for s in self.seeds])


class FakeForgeStages:
    """``modules.rng``, ``sd_samplers`` (every name is ``sampler_func``), ``sd_samplers_timesteps``,
    ``sd_samplers_common`` and ``sd_models`` in ``sys.modules``, and the progress side of ``shared``, for DemoFusion's
    later stages; inside a :class:`FakeBackend` block."""

    NAMES = ("modules.rng", "modules.sd_samplers", "modules.sd_samplers_timesteps", "modules.sd_samplers_common",
             "modules.sd_models")

    def __init__(self, sampler_func):
        self.sampler_func = sampler_func

    def __enter__(self):
        self.saved = {name: sys.modules.get(name) for name in self.NAMES}
        made = {name: types.ModuleType(name) for name in self.NAMES}
        made["modules.rng"].ImageRNG = FakeImageRNG
        made["modules.sd_samplers"].create_sampler = lambda name, model: FakeForgeKDiffusionSampler(
            self.sampler_func, model.p)
        made["modules.sd_samplers"].find_sampler_config = lambda name: name
        made["modules.sd_samplers_timesteps"].samplers_data_timesteps = []
        made["modules.sd_samplers_common"].InterruptedException = type("InterruptedException", (BaseException,), {})
        made["modules.sd_samplers_common"].apply_refiner = apply_refiner
        made["modules.sd_models"].apply_token_merging = lambda model, ratio: None
        sys.modules.update(made)
        shared = sys.modules["modules.shared"]
        state = shared.state
        state.interrupted = state.skipped = state.processing_has_refined_job_count = False
        state.job_count, state.textinfo = -1, None
        state.nextjob = lambda: None
        shared.total_tqdm = SimpleNamespace(updateTotal=lambda total: None)
        shared.opts.img2img_fix_steps = False
        return self

    def __exit__(self, *exc):
        for name, module in self.saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class ScriptRunner:
    """``p.scripts``: ``process_before_every_sampling`` as the script runner calls it (ScaleFusion's job first,
    then the other extensions' callables)."""

    def __init__(self, p, others=()):
        self.p, self.others, self.alwayson_scripts = p, list(others), []

    def process_before_every_sampling(self, p, x, **kwargs):
        if p.job is not None:
            p.job.start_pass(p, x)
        for script in self.others:
            script(p)


class FakeForgeDemoFusionTxt2Img(FakeForgeTxt2Img):
    """A txt2img ``p`` with what DemoFusion's Forge run reads besides the fake txt2img: seeds, the sampler, a script
    runner, token merging, image conditioning, the img2img schedule of later stages."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        model.p = self  # create_sampler finds p through the model (Forge's sampler reads shared.sd_model)
        others, self.scripts = self.scripts, None
        self.scripts = ScriptRunner(self, others)
        self.sampler_name, self.sampler = "Euler", None
        self.seeds, self.subseeds, self.subseed_strength = [3], [3], 0.0
        self.seed_resize_from_h = self.seed_resize_from_w = 0
        self.denoising_strength, self.n_iter, self.batch_size, self.iteration = 0.75, 1, 1, 0
        self.do_not_save_samples, self.image_mask, self.modified_noise = True, None, None
        self.all_prompts, self.all_seeds, self.all_subseeds = [""], [3], [3]
        gen = torch.Generator().manual_seed(11)
        self.refiner_conds = (torch.randn(1, 7, 32, generator=gen), torch.randn(1, 7, 32, generator=gen))
        self.refiner_switches = []   # (denoiser step, latent shape) of each switch

    def process_before_every_sampling(self, x):
        self.scripts.process_before_every_sampling(self, x)

    def schedule(self, steps):
        """Sigmas of the SD schedule at t 900 down to 500, then 0 (within the ScaleCrafter presets' t >= 401)."""
        predictor = self.sd_model.forge_objects.unet.model.predictor
        picks = torch.linspace(900, 500, steps).round().long()
        return torch.cat([predictor.sigmas[picks], torch.zeros(1)])

    def txt2img_image_conditioning(self, x, width=None, height=None):
        return x.new_zeros(x.shape[0], 5, 1, 1)

    def get_token_merging_ratio(self, for_hr=False):
        return 0.0
