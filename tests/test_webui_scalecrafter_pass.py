"""The WebUI-side ScaleCrafter pass against a stand-in of the WebUI's CFGDenoiser (no WebUI needed).

The stand-in builds the CFG batch, calls the ``on_cfg_denoiser`` callback and ``combine_denoised``
exactly as ``modules/sd_samplers_cfg_denoiser.py`` of v1.10.1 does.
"""
from types import SimpleNamespace

import pytest
import torch

from lib_hires.scalecrafter import build_plan, guided_combine, scan_unet
from lib_hires.settings import ScaleFusionSettings
from lib_hires.webui import scalecrafter_pass
from lib_hires.webui.model_info import ModelInfo
from lib_hires.webui.scalecrafter_pass import ScaleCrafterPass, on_cfg_denoiser, plan_for_latent
from tests.conftest import ldm
from tests.test_guidance import CONDS_LIST, webui_combine_denoised


class InnerModel:
    """``CFGDenoiser.inner_model``: a k-diffusion denoiser taking the WebUI's cond dict."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def __call__(self, x, sigma, cond):
        assert cond["c_concat"][0].shape[0] == x.shape[0]
        return self.denoiser(x, sigma, cond=cond["c_crossattn"][0])


class StandInCFGDenoiser:
    def __init__(self, inner_model):
        self.inner_model = inner_model

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        return webui_combine_denoised(x_out, conds_list, uncond.shape[0], cond_scale)

    def forward(self, x, sigma, cond, uncond, cond_scale, image_cond):
        repeats = [len(c) for c in CONDS_LIST]
        x_in = torch.cat([torch.stack([x[i]] * n) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i]] * n) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i]] * n) for i, n in enumerate(repeats)] + [image_cond])
        params = SimpleNamespace(x=x_in, sigma=sigma_in, image_cond=image_cond_in, text_cond=cond, text_uncond=uncond,
                                 denoiser=self)
        on_cfg_denoiser(params)
        cond_in = torch.cat([cond, uncond])
        x_out = self.inner_model(params.x, params.sigma, cond={"c_crossattn": [cond_in], "c_concat": [params.image_cond]})
        return self.combine_denoised(x_out, CONDS_LIST, uncond, cond_scale), x_out, params


@pytest.fixture
def setup(k_diffusion):
    model = ldm("sd1")
    unet = model.model.diffusion_model
    denoiser = k_diffusion.external.CompVisDenoiser(model)
    info = ModelInfo("sd1", 64, unet, scan_unet(unet))   # 4x per side at a 32x32 latent: the official 16x preset
    cfg = StandInCFGDenoiser(InnerModel(denoiser))
    sd_model = SimpleNamespace(model=SimpleNamespace(conditioning_key="crossattn"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 32, generator=gen)
    cond = torch.randn(3, 7, 32, generator=gen)
    uncond = torch.randn(2, 7, 32, generator=gen)
    image_cond = torch.zeros(2, 5, 1, 1)
    return SimpleNamespace(unet=unet, denoiser=denoiser, info=info, cfg=cfg, sd_model=sd_model, x=x, cond=cond,
                           uncond=uncond, image_cond=image_cond)


def sigma_at(denoiser, t):
    return denoiser.t_to_sigma(torch.tensor(float(t))).expand(2)


def test_noise_damped_combine_uses_one_uncond_base_pass(setup):
    plan = plan_for_latent(setup.info, ScaleFusionSettings(enabled=True), (32, 32))
    assert plan.base is not None and plan.base_at(901)
    active = ScaleCrafterPass(plan, setup.info, setup.cfg, setup.sd_model)
    try:
        sigma = sigma_at(setup.denoiser, 901)
        combined, x_out, params = setup.cfg.forward(setup.x, sigma, setup.cond, setup.uncond, 7.0, setup.image_cond)
        assert active.base_evaluations == 2
        with active.controller.base_pass():
            base = setup.denoiser(setup.x, sigma, cond=setup.uncond)
        assert active.controller.last_call[1] is True and active.controller.last_call[2] == plan.base_at(901)
        expected = guided_combine(x_out, CONDS_LIST, 7.0, base)
        assert torch.allclose(combined, expected, atol=1e-4)
        assert not torch.allclose(combined, webui_combine_denoised(x_out, CONDS_LIST, 2, 7.0), atol=1e-3)
    finally:
        active.remove()


@pytest.mark.parametrize("t,scale", [(101, 7.0), (901, 1.0)])
def test_plain_cfg_where_noise_damping_is_off(setup, t, scale):
    """After the base set's tau, and with no guidance (as when the WebUI skips the uncond rows)."""
    plan = plan_for_latent(setup.info, ScaleFusionSettings(enabled=True), (32, 32))
    active = ScaleCrafterPass(plan, setup.info, setup.cfg, setup.sd_model)
    try:
        combined, x_out, _ = setup.cfg.forward(setup.x, sigma_at(setup.denoiser, t), setup.cond, setup.uncond, scale,
                                               setup.image_cond)
        assert active.base_evaluations == 0
        assert torch.equal(combined, webui_combine_denoised(x_out, CONDS_LIST, 2, scale))
    finally:
        active.remove()


def test_remove_restores_the_sampler_and_the_unet(setup):
    plan = plan_for_latent(setup.info, ScaleFusionSettings(enabled=True, noise_damped_cfg="on"), (32, 32))
    sigma = sigma_at(setup.denoiser, 901)
    _, before, _ = setup.cfg.forward(setup.x, sigma, setup.cond, setup.uncond, 7.0, setup.image_cond)
    active = ScaleCrafterPass(plan, setup.info, setup.cfg, setup.sd_model)
    assert "combine_denoised" in vars(setup.cfg) and scalecrafter_pass._capture.denoiser is setup.cfg
    active.remove()
    active.remove()  # idempotent
    assert "combine_denoised" not in vars(setup.cfg)
    assert scalecrafter_pass._capture.denoiser is None and scalecrafter_pass._capture.params is None
    assert not setup.unet._forward_pre_hooks and not any("_conv_forward" in vars(m) for m in setup.unet.modules())
    _, after, _ = setup.cfg.forward(setup.x, sigma, setup.cond, setup.uncond, 7.0, setup.image_cond)
    assert torch.equal(before, after)


def test_callback_ignores_denoisers_that_are_not_armed(setup):
    on_cfg_denoiser(SimpleNamespace(denoiser=object()))
    assert scalecrafter_pass._capture.params is None
    plan = build_plan("sd1", 256, 256, ScaleFusionSettings(enabled=True, noise_damped_cfg="off").scalecrafter(),
                      train_size=64)
    active = ScaleCrafterPass(plan, setup.info, setup.cfg, setup.sd_model)
    try:
        assert "combine_denoised" not in vars(setup.cfg)  # nothing to damp: the sampler stays untouched
        assert scalecrafter_pass._capture.denoiser is None
    finally:
        active.remove()


def test_another_extensions_combine_patch_stays_in_the_chain(setup):
    calls = []
    original = setup.cfg.combine_denoised

    def other(x_out, conds_list, uncond, cond_scale):
        calls.append(cond_scale)
        return original(x_out, conds_list, uncond, cond_scale)

    setup.cfg.combine_denoised = other
    plan = plan_for_latent(setup.info, ScaleFusionSettings(enabled=True), (32, 32))
    active = ScaleCrafterPass(plan, setup.info, setup.cfg, setup.sd_model)
    setup.cfg.forward(setup.x, sigma_at(setup.denoiser, 901), setup.cond, setup.uncond, 7.0, setup.image_cond)
    active.remove()
    assert calls == [7.0] and setup.cfg.combine_denoised is other
