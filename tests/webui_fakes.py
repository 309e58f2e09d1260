"""Stand-ins for the WebUI v1.10.1 pieces a ScaleFusion job meets, in the WebUI's call order.

``FakeWebUI`` installs a ``modules`` package (``shared``, ``devices``, ``sd_unet``, the preview decoders) into
``sys.modules`` for one test. ``FakeTxt2Img.sample`` follows ``StableDiffusionProcessingTxt2Img.sample`` and
``sample_hr_pass`` (``modules/processing.py``): a sampler per pass, ``process_before_every_sampling`` before each,
``reload_model_weights(hr_checkpoint_info)`` between the passes, the hires result decoded inside ``p.sample`` on
the model of the hires pass. ``FakeCFGDenoiser.forward`` follows ``CFGDenoiser.forward``
(``modules/sd_samplers_cfg_denoiser.py``): ``apply_refiner`` first (a model reload, ``update_inner_model``
dropping the inner model wrapper), the ``on_cfg_denoiser`` callback, one batched cond+uncond call,
``last_noise_uncond``, ``combine_denoised`` with ``cond_scale * cond_scale_miltiplier``, then ``store_latent``'s
in-step preview (decoded there when ``parallel_processing_allowed`` is False, as under --medvram/--lowvram).
A model switch either swaps in another model object (``sd_checkpoints_limit >= 2`` or another config) or loads the
other checkpoint's weights into the same object (``sd_checkpoints_limit == 1``, same config); both fire
``script_callbacks.on_model_loaded`` (``sd_models.load_model`` / ``reload_model_weights``), while a switch to a model
already kept loaded (``model_data.loaded_sd_models``, ``reuse_model_from_already_loaded``) fires none.
A Hires. fix pass with a pixel upscaler decodes the first pass on its model, then, after the switch and before
``process_before_every_sampling``, encodes the upscaled images on the hires model (``images_tensor_to_samples``);
with a latent upscaler and ``inpainting_mask_weight < 1`` it decodes the upscaled latent there instead.
"""
from __future__ import annotations

import copy
import sys
import types
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tools.tiny_ldm import TinyLatentDiffusion


class FakeModel:
    """An ``sd_model``: ``model.diffusion_model`` is a tiny UNet; flags as ``sd_models.set_model_type`` sets them."""

    def __init__(self, unet, name: str, *, family: str = "sd1"):
        self.ldm = TinyLatentDiffusion(unet)
        self.model = SimpleNamespace(diffusion_model=unet, conditioning_key="crossattn")
        self.alphas_cumprod = self.ldm.alphas_cumprod
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3 = family == "sd1", family == "sd2", family == "sdxl", False
        self.parameterization = "eps"
        self.sd_checkpoint_info = SimpleNamespace(name_for_extra=name)
        self.first_stage_model = SimpleNamespace(dtype=torch.float32, decoder=FakeDecoder(), encoder=FakeEncoder())

    @property
    def decoded(self) -> list[tuple[int, int]]:
        """The latent sizes the VAE decoder saw (tiles, where the job tiles the decode)."""
        return self.first_stage_model.decoder.seen

    @property
    def encoded(self) -> list[tuple[int, int]]:
        """The image sizes the VAE encoder saw (tiles, where the job tiles the encode)."""
        return self.first_stage_model.encoder.seen

    def encode_first_stage(self, x):
        return self.first_stage_model.encoder(x)

    @staticmethod
    def get_first_stage_encoding(moments):
        return moments

    def apply_model(self, x, t, cond):
        return self.ldm.apply_model(x, t, cond["c_crossattn"][0])

    def decode_first_stage(self, z):
        return self.first_stage_model.decoder(z)


class FakeDecoder(torch.nn.Module):
    """The VAE decoder module that ``decode_first_stage`` runs (the job tiles at this module's ``forward``)."""

    def __init__(self):
        super().__init__()
        self.conv_in = SimpleNamespace(out_channels=32)
        self.seen: list[tuple[int, int]] = []

    def forward(self, z):
        self.seen.append(tuple(z.shape[-2:]))
        return F.interpolate(z[:, :3], scale_factor=8, mode="nearest")


class FakeEncoder(torch.nn.Module):
    """The VAE encoder module that ``encode_first_stage`` runs: 8x8 means of the image, 4 channels."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        pooled = F.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)


def perturbed(model: FakeModel, name: str, *, family: str = "sd1", seed: int = 1) -> FakeModel:
    """Another checkpoint of the same architecture: the same UNet with every weight perturbed."""
    unet = copy.deepcopy(model.model.diffusion_model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.2 * p.std().nan_to_num() * torch.randn(p.shape, generator=gen))
    return FakeModel(unet, name, family=family)


class State:
    def __init__(self):
        self.current_latent = None
        self.previews = 0

    def do_set_current_image(self):
        self.previews += 1


class TinyTAESD(torch.nn.Module):
    """``sd_vae_taesd.decoder_model()``: records the latent sizes it decodes."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def forward(self, z):
        self.seen.append(tuple(z.shape[-2:]))
        return torch.zeros(z.shape[0], 3, 8 * z.shape[-2], 8 * z.shape[-1])


MODULES = ("shared", "devices", "sd_unet", "sd_vae_taesd", "sd_vae_approx", "lowvram", "sd_models")


class FakeWebUI:
    """The ``modules`` package for one test, and the model switches the WebUI makes."""

    def __init__(self, model: FakeModel):
        self.shared = types.ModuleType("modules.shared")
        self.shared.sd_model = model
        self.shared.state = State()
        self.shared.opts = SimpleNamespace(data={}, lora_functional=False, live_previews_enable=True,
                                           show_progress_every_n_steps=1, show_progress_type="Full",
                                           live_preview_allow_lowvram_full=False)
        self.shared.parallel_processing_allowed = True
        self.devices = types.ModuleType("modules.devices")
        self.devices.device = "cpu"
        self.sd_unet = types.ModuleType("modules.sd_unet")
        self.sd_unet.current_unet, self.sd_unet.current_unet_option = None, None
        self.taesd = TinyTAESD()
        self.sd_vae_taesd = types.ModuleType("modules.sd_vae_taesd")
        self.sd_vae_taesd.decoder_model = lambda: self.taesd
        self.approx_nn = TinyTAESD()
        self.sd_vae_approx = types.ModuleType("modules.sd_vae_approx")
        self.sd_vae_approx.model = lambda: self.approx_nn
        self.lowvram = types.ModuleType("modules.lowvram")
        self.lowvram.enabled = False
        self.lowvram.is_enabled = lambda sd_model: self.lowvram.enabled
        self.sd_models = types.ModuleType("modules.sd_models")
        self.sd_models.model_data = SimpleNamespace(loaded_sd_models=[model])
        self.package = types.ModuleType("modules")
        self.package.__path__ = []
        for name in MODULES:
            setattr(self.package, name, getattr(self, name))
        self.refiner: tuple[int, FakeModel, bool] | None = None  # (switch at step, checkpoint, same object)

    def install(self, monkeypatch) -> "FakeWebUI":
        from lib_hires.webui import model_info
        monkeypatch.setitem(sys.modules, "modules", self.package)
        for name in MODULES:
            monkeypatch.setitem(sys.modules, f"modules.{name}", getattr(self, name))
        model_info._sd_unet_module.cache_clear()
        monkeypatch.setattr(model_info, "_sd_unet_module", lambda: self.sd_unet)
        return self

    @property
    def sd_model(self) -> FakeModel:
        return self.shared.sd_model

    @property
    def loaded(self) -> list:
        return self.sd_models.model_data.loaded_sd_models

    def reload_model_weights(self, checkpoint: FakeModel, *, same_object: bool) -> None:
        """``sd_models.reload_model_weights(info=...)``: the model-loaded callback fires for a model loaded or
        loaded into, not for a switch to one already loaded."""
        from lib_hires.webui import job

        if checkpoint is None or checkpoint is self.sd_model:
            return
        if not same_object:
            already_loaded = any(m is checkpoint for m in self.loaded)
            self.shared.sd_model = checkpoint
            self.loaded[:] = [checkpoint, *(m for m in self.loaded if m is not checkpoint)]
            if not already_loaded:
                job.on_model_loaded(checkpoint)  # load_model
            return
        current = self.sd_model
        current.model.diffusion_model.load_state_dict(checkpoint.model.diffusion_model.state_dict())
        current.sd_checkpoint_info = checkpoint.sd_checkpoint_info
        job.on_model_loaded(current)  # reload_model_weights, after load_model_weights


class InnerModel:
    """``CFGDenoiser.inner_model``: k-diffusion's CompVisDenoiser around the model, taking the cond dict."""

    def __init__(self, k_diffusion, sd_model):
        self.inner_model = sd_model
        self.denoiser = k_diffusion.external.CompVisDenoiser(sd_model, quantize=True)

    def __call__(self, x, sigma, cond):
        return self.denoiser(x, sigma, cond=cond)


class FakeCFGDenoiser:
    def __init__(self, webui: FakeWebUI, k_diffusion, sampler):
        self.webui, self.k_diffusion, self.sampler = webui, k_diffusion, sampler
        self.model_wrap = None
        self.step = 0
        self.cond_scale_miltiplier = 1.0
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None
        self.skip_uncond = False   # as NGMS / "skip early CFG" decide per step
        self.steps: list[dict] = []  # what each call saw and returned

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = InnerModel(self.k_diffusion, self.webui.sd_model)
        return self.model_wrap

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def _apply_refiner(self) -> None:
        refiner = self.webui.refiner
        if refiner is None or self.step < refiner[0] or self.webui.sd_model is refiner[1]:
            return
        if self.webui.sd_model.sd_checkpoint_info is refiner[1].sd_checkpoint_info:
            return
        self.webui.reload_model_weights(refiner[1], same_object=refiner[2])
        self.model_wrap = None  # update_inner_model()

    def forward(self, x, sigma, uncond, cond, cond_scale, image_cond):
        from lib_hires.webui import job

        self._apply_refiner()
        conds_list = [[(i, 1.0)] for i in range(x.shape[0])]
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        image_cond_in = torch.cat([image_cond, image_cond])
        params = SimpleNamespace(x=x_in, image_cond=image_cond_in, sigma=sigma_in, text_cond=cond, text_uncond=uncond,
                                 denoiser=self)
        job.on_cfg_denoiser(params)  # cfg_denoiser_callback
        rows = x.shape[0]
        if self.skip_uncond:
            x_out = self.inner_model(params.x[:-rows], params.sigma[:-rows],
                                     cond={"c_crossattn": [cond], "c_concat": [params.image_cond[:-rows]]})
            x_out = torch.cat([x_out, x_out[[c[0][0] for c in conds_list]]])  # cond rows as the fake uncond
        else:
            x_out = self.inner_model(params.x, params.sigma, cond={"c_crossattn": [torch.cat([cond, uncond])],
                                                                   "c_concat": [params.image_cond]})
        if self.need_last_noise_uncond:
            self.last_noise_uncond = torch.clone(x_out[-uncond.shape[0]:])
        scale = 1.0 if self.skip_uncond else cond_scale * self.cond_scale_miltiplier
        denoised = self.combine_denoised(x_out, conds_list, uncond, scale)
        self.steps.append(dict(x=x, sigma=sigma, x_out=x_out, denoised=denoised, scale=scale,
                               last_noise_uncond=self.last_noise_uncond))
        self._store_latent(denoised)
        self.step += 1
        return denoised

    def _store_latent(self, preview) -> None:
        """``sd_samplers_common.store_latent``: the in-step preview decode without a preview thread."""
        shared = self.webui.shared
        shared.state.current_latent = preview
        if shared.parallel_processing_allowed or not shared.opts.live_previews_enable:
            return
        method = shared.opts.show_progress_type
        if method == "Full" and self.webui.lowvram.enabled and not shared.opts.live_preview_allow_lowvram_full:
            method = "Approx NN"
        if method == "TAESD":
            self.webui.sd_vae_taesd.decoder_model()(preview)
        elif method == "Approx NN":
            self.webui.sd_vae_approx.model()(preview)
        else:
            self.webui.sd_model.decode_first_stage(preview)


class FakeSampler:
    def __init__(self, webui: FakeWebUI, k_diffusion, *, cfgpp=False, skip_uncond=False):
        self.model_wrap_cfg = FakeCFGDenoiser(webui, k_diffusion, self)
        self.model_wrap_cfg.skip_uncond = skip_uncond
        if cfgpp:  # what ddim_cfgpp sets on the denoiser before its loop
            self.model_wrap_cfg.cond_scale_miltiplier = 1 / 12.5
            self.model_wrap_cfg.need_last_noise_uncond = True

    def sample(self, p, x, steps: int):
        """Euler on the karras-free schedule of the model, as k-diffusion's sample_euler."""
        cfg = self.model_wrap_cfg
        sigmas = cfg.inner_model.denoiser.get_sigmas(steps)
        x = x * sigmas[0]
        for i in range(steps):
            s = sigmas[i] * x.new_ones(x.shape[0])
            denoised = cfg.forward(x, s, p.uncond, p.cond, p.cfg_scale, p.image_cond(x))
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x


class FakeTxt2Img:
    """``StableDiffusionProcessingTxt2Img`` with the WebUI's ``sample`` call order (see the module docstring)."""

    def __init__(self, webui: FakeWebUI, k_diffusion, *, width=128, height=128, steps=2, enable_hr=False,
                 hr_scale=2, hr_checkpoint: FakeModel | None = None, hr_same_object=False, seed=3, cfgpp=False,
                 skip_uncond=False, hr_upscaler="Latent", inpainting_mask_weight=1.0):
        self.sampler_options = dict(cfgpp=cfgpp, skip_uncond=skip_uncond)
        self.webui, self.k_diffusion = webui, k_diffusion
        self.width, self.height, self.steps = width, height, steps
        self.enable_hr, self.is_hr_pass = enable_hr, False
        self.hr_upscale_to_x, self.hr_upscale_to_y = width * hr_scale, height * hr_scale
        self.hr_checkpoint, self.hr_same_object = hr_checkpoint, hr_same_object
        self.hr_upscaler, self.inpainting_mask_weight = hr_upscaler, inpainting_mask_weight
        self.extra_generation_params: dict = {}
        self.cfg_scale = 7.0
        gen = torch.Generator().manual_seed(seed)
        self.cond, self.uncond = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 7, 32, generator=gen)
        self.noise = torch.randn(1, 4, height // 8, width // 8, generator=gen)
        self.hr_noise = torch.randn(1, 4, self.hr_upscale_to_y // 8, self.hr_upscale_to_x // 8, generator=gen)
        self.sampler = None
        self.samplers: list[FakeSampler] = []
        self.job = None
        self.decoded_by: list[FakeModel] = []

    @property
    def sd_model(self) -> FakeModel:
        return self.webui.sd_model

    @staticmethod
    def image_cond(x):
        return x.new_zeros(x.shape[0], 5, 1, 1)

    def process_before_every_sampling(self, x) -> None:
        self.samplers.append(self.sampler)
        if self.job is not None:
            self.job.start_pass(self, x)

    def init(self, all_prompts, all_seeds, all_subseeds):
        """Txt2img has no init images to encode."""

    def sample(self, *args, **kwargs):
        self.sampler = FakeSampler(self.webui, self.k_diffusion, **self.sampler_options)
        self.process_before_every_sampling(self.noise)
        samples = self.sampler.sample(self, self.noise, self.steps)
        if not self.enable_hr:
            return samples
        pixel = not self.hr_upscaler.startswith("Latent")
        if pixel:  # decode_latent_batch on the first pass's model
            images = torch.cat([self.sd_model.decode_first_stage(samples[i:i + 1]) for i in range(samples.shape[0])])
        self.webui.reload_model_weights(self.hr_checkpoint, same_object=self.hr_same_object)
        self.is_hr_pass = True
        self.sampler = FakeSampler(self.webui, self.k_diffusion, **self.sampler_options)
        size = self.hr_noise.shape[-2:]
        if pixel:  # images.resize_image, then images_tensor_to_samples on the hires model
            upscaled_images = F.interpolate(images, size=(8 * size[0], 8 * size[1]), mode="nearest")
            upscaled = self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(upscaled_images))
        else:
            upscaled = F.interpolate(samples, size=size, mode="bilinear", align_corners=False)
            if self.inpainting_mask_weight < 1.0:  # img2img_image_conditioning(decode_first_stage(...))
                self.sd_model.decode_first_stage(upscaled)
        self.process_before_every_sampling(upscaled)
        samples = self.sampler.sample(self, 0.3 * upscaled / 8 + self.hr_noise, self.steps)
        decoded = [self.sd_model.decode_first_stage(samples[i:i + 1]) for i in range(samples.shape[0])]
        self.decoded_by.append(self.sd_model)
        self.is_hr_pass = False
        return SimpleNamespace(samples=samples, decoded=decoded)


def run_job(p: FakeTxt2Img, settings):
    """``process_images`` for one batch: before_process, process, p.sample, postprocess."""
    from lib_hires.webui import job

    active = job.begin(p, [settings.to_dict()], lambda: type(settings)())
    p.job = active
    if active is not None:
        active.write_infotext(p)
    try:
        return p.sample()
    finally:
        if active is not None:
            active.finish()
