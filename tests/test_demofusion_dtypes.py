"""DemoFusion's own ops (skip residual, views, blur, dilated path) under the WebUI's weight formats.

The WebUI's ``fp8_storage`` keeps the UNet's Conv2d/Linear weights as float8_e4m3fn and computes under
``devices.autocast()``, which on a CPU is ``torch.autocast('cpu', dtype=torch.bfloat16)``; bf16 weights compute the
same way. The sampler state stays float32 (the WebUI's latents are float32), so every DemoFusion op must run on
float32 states next to bf16 UNet outputs, and an in-place write must not meet a raw float8 tensor.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lib_hires.demofusion import DemoFusionSettings, FusedDenoiser, Stage, sample_stage
from lib_hires.webui.demofusion_sampler import StageSampling
from tools.tiny_ldm import TinyLatentDiffusion
from tools.unet_factory import build_unet


def denoiser(k_diffusion, weights: str):
    unet = build_unet("sd1", seed=0)
    if weights == "float8 storage":  # as sd_models.load_model_weights does for fp8_storage
        for module in unet.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.to(torch.float8_e4m3fn)
    elif weights == "bfloat16":
        unet.to(torch.bfloat16)
    return k_diffusion.external.CompVisDenoiser(TinyLatentDiffusion(unet))


def relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(2)
    return SimpleNamespace(x=torch.randn(1, 4, 32, 32, generator=gen), noise=torch.randn(1, 4, 32, 32, generator=gen),
                           cond=torch.randn(1, 7, 32, generator=gen))


@pytest.mark.parametrize("weights", ["float8 storage", "bfloat16"])
def test_fused_denoiser_and_a_stage_under_bf16_autocast(k_diffusion, inputs, weights):
    reference_model, model = denoiser(k_diffusion, "float32"), denoiser(k_diffusion, weights)
    sigmas = k_diffusion.sampling.get_sigmas_karras(2, 0.0292, 14.6146)

    def run(den):  # 2x2 jittered views and 2x2 dilated samples of 16, blurred, per evaluation
        fused = FusedDenoiser(den, dilation=2, window=16, stride=16, sigma_to_t=den.sigma_to_t,
                              jitter=torch.Generator().manual_seed(0))
        one = fused(inputs.x * 3, torch.tensor([3.0]), cond=inputs.cond)
        stage = sample_stage(den, inputs.x, inputs.noise, sigmas, dilation=2, window=16, stride=16,
                             sigma_to_t=den.sigma_to_t, jitter=torch.Generator().manual_seed(1),
                             extra_args={"cond": inputs.cond})
        return one, stage

    with torch.no_grad():
        expected = run(reference_model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = run(model)
    for out, ref in zip(got, expected):
        assert out.dtype == torch.float32 and torch.isfinite(out).all()  # the state keeps the sampler's dtype
        assert relative_error(out, ref) < (0.25 if weights == "float8 storage" else 0.05)


class CFG(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner_model = inner

    def forward(self, x, sigma, cond=None):
        return self.inner_model(x, sigma, cond=cond)


def test_the_webui_stage_patches_under_fp8_storage_autocast(k_diffusion, inputs, sampler="sample_heun"):
    """The residual written in place into the float32 state, views and blur under bf16 autocast over a
    float8-stored UNet, through a real k-diffusion sampler."""
    cfg = CFG(denoiser(k_diffusion, "float8 storage"))
    func = getattr(k_diffusion.sampling, sampler)
    stand_in = SimpleNamespace(model_wrap_cfg=cfg, callback_state=lambda d: None, func=func)
    patches = StageSampling(SimpleNamespace(sampler=stand_in), Stage(2, 2.0, 256, 256, 2),
                            DemoFusionSettings(window=16, stride=16), inputs.x, inputs.noise,
                            torch.Generator().manual_seed(9), None, None, lambda: None)
    sigmas = k_diffusion.sampling.get_sigmas_karras(2, 0.0292, 14.6146)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = stand_in.func(cfg, inputs.x + sigmas[0] * inputs.noise, sigmas, extra_args={"cond": inputs.cond},
                                callback=lambda d: None, disable=True)
    finally:
        patches.remove()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
