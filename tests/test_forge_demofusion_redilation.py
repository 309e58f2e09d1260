"""ScaleCrafter inside DemoFusion in Forge (issue 23 §2): a whole DemoFusion run through Forge's call order (fakes of
``tests/forge_fakes.py``: stage 1 as Forge's txt2img, each later stage through ``ForgeDemoFusionRun._sample_stage``,
its resets, ``process_before_every_sampling``, the views in the model-function wrapper, k-diffusion's Euler on
Forge's CFG denoiser). The global path's re-dilation goes to the dilated samples' UNet calls only, the local views
run vanilla, and the stage equals A1111's layering of the engine (CFG around the fused inner model, the pass's
controller on the plain UNet's ``_conv_forward``) on the same tiny UNet."""
import pytest
import torch

from lib_hires.demofusion import FusedDenoiser, euler, restandardize, row_stats, skip_residual, skip_weight, \
    upsample_latent
from lib_hires.scalecrafter import ScaleCrafterController
from lib_hires.settings import ScaleFusionSettings
from lib_hires.summary import short_source
from lib_hires.webui import job as webui_job
from lib_hires.webui.demofusion_sampler import JITTER_SEED, engine_settings, stage_plan
from lib_hires.webui.forge import model as forge_model
from lib_hires.webui.forge.job import ForgeJob
from lib_hires.webui.scalecrafter_pass import plan_for_latent
from tests import forge_fakes
from tests.conftest import tiny_unet
from tests.forge_fakes import FakeForgeDemoFusionTxt2Img, FakeForgeModel, FakeForgeTxt2Img, FakeImageRNG

SIZE = 256  # stage 1 at 256 px (latent 32) on native 128: stage 2 is 64x64 with 16x16 views and 32x32 samples


@pytest.fixture
def stages(k_diffusion):
    with forge_fakes.FakeBackend(), forge_fakes.FakeForgeStages(k_diffusion.sampling.sample_euler):
        yield


def settings(**changes):
    return ScaleFusionSettings(**{"enabled": True, "method": "DemoFusion", "native_size": 128, "scale": 2.0,
                                  "stride": 16, **changes})


class UnetCalls:
    """Another extension's ``process_before_every_sampling``: a forward hook on the UNet (installed at the first
    pass) that records each call's stage, latent size and the largest factor its convs ran with (set by the
    controller's pre-hook for that call)."""

    def __init__(self):
        self.calls, self.handle = [], None
        self.options = {}   # stage index: how many functions each model_options list of the scripts' UnetPatcher holds

    def __call__(self, p):
        self.options[p.job.run.stage.index] = {k: len(v) for k, v in p.sd_model.forge_objects.unet.model_options.items()
                                               if isinstance(v, list)}
        if self.handle is not None:
            return
        unet = p.sd_model.forge_objects.unet.model.diffusion_model

        def record(module, args, output):
            active = p.job.active
            factors = [h.factor for h in active.controller.handle.hooks.values()] if active else [1.0]
            self.calls.append((p.job.run.stage.index, tuple(args[0].shape[-2:]), max(factors)))

        self.handle = unet.register_forward_hook(record)

    def stage(self, index):
        return [call[1:] for call in self.calls if call[0] == index]

    def remove(self):
        if self.handle is not None:
            self.handle.remove()


def run(p, job_settings):
    """``process_images`` for one batch: before_process, p.sample with the conds, postprocess."""
    active = webui_job.begin(p, [job_settings.to_dict()], lambda: type(job_settings)(), ForgeJob)
    p.job = active
    active.write_infotext(p)
    try:
        return p.sample(conditioning=p.cond, unconditional_conditioning=p.uncond, seeds=p.seeds,
                        subseeds=p.subseeds, subseed_strength=0.0, prompts=[""])
    finally:
        active.finish()


def unet_is_clean(unet) -> bool:
    return not unet._forward_pre_hooks and not any(
        "forward" in vars(m) or "_conv_forward" in vars(m) for m in unet.modules())


def a1111_stage(model, p, z1, job_settings):
    """Stage 2 as A1111 runs it: CFG around the fused inner model, the skip residual written at each step start,
    Euler; the global pass armed on the plain UNet (``_conv_forward`` hooks) for the samples' size only."""
    info = forge_model.describe(model, job_settings.native_size)
    engine = engine_settings(job_settings, info)
    stage = stage_plan(job_settings, info, SIZE, SIZE).stages[1]
    kmodel = model.forge_objects_after_applying_lora.unet.model
    sigma_to_t = kmodel.predictor.timestep
    z_up = upsample_latent(z1, stage.latent_size)
    noise = FakeImageRNG(z_up.shape[1:], p.seeds).next()
    fused = FusedDenoiser.from_settings(lambda x, s, cond: kmodel.apply_model(x, s, c_crossattn=cond), engine,
                                        dilation=stage.dilation, sigma_to_t=sigma_to_t,
                                        jitter=torch.Generator().manual_seed(JITTER_SEED))

    def guided(x, sigma, cond, uncond, cond_scale):
        positive, negative = fused(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond])).chunk(2)
        return negative + (positive - negative) * cond_scale

    def residual(x, sigma):
        return skip_residual(x, z_up, noise, sigma, skip_weight(sigma_to_t(sigma), engine.cosine_scale_1))

    sigmas = p.schedule(p.steps)
    extra = {"cond": p.cond, "uncond": p.uncond, "cond_scale": p.cfg_scale}
    plan = plan_for_latent(info, job_settings, stage.sample_size)
    with ScaleCrafterController(info.unet, plan):
        out = euler(guided, z_up + sigmas[0] * noise, sigmas, extra, before_step=residual)
    return restandardize(out, *row_stats(z1))


def test_the_global_path_is_redilated_and_the_views_are_not(stages):
    model = FakeForgeModel(tiny_unet("sd1"))
    calls = UnetCalls()
    p = FakeForgeDemoFusionTxt2Img(model, width=SIZE, height=SIZE, scripts=[calls])
    chosen = settings(redilation="global path", noise_damped_cfg="on")
    try:
        out = run(p, chosen)
    finally:
        calls.remove()
    assert out.shape == (1, 4, 64, 64)
    # stage 2, per evaluation: one call of the 16 local views (16x16) and one of the 4 dilated samples (32x32)
    later = calls.stage(2)
    assert sorted(set(later)) == [((16, 16), 1.0), ((32, 32), 2.0)]
    assert len(later) == 2 * p.steps
    assert calls.stage(1) == [((32, 32), 1.0)] * p.steps  # stage 1 stays vanilla with "global path"
    info = forge_model.describe(model, 128)
    plan = plan_for_latent(info, chosen, (32, 32))
    assert not plan.is_noop and plan.base is not None  # noise damping asked for: the global path has none (A1111)
    assert p.extra_generation_params["DemoFusion stage 2 global preset"] == short_source(plan.preset.source)
    assert "DemoFusion stage 1 preset" not in p.extra_generation_params
    # each stage's guard (StageGuard); stage 2: the pass's step check too, no noise-damped post-CFG
    assert calls.options[2] == {"sampler_pre_cfg_function": 2}
    assert calls.options[1] == {"sampler_pre_cfg_function": 1}   # stage 1: no pass armed
    assert unet_is_clean(tiny_unet("sd1")) and not webui_job._live_hooks


def test_the_forge_stage_equals_a1111s_engine_layering(stages):
    model = FakeForgeModel(tiny_unet("sd1"))
    chosen = settings(redilation="global path")
    p = FakeForgeDemoFusionTxt2Img(model, width=SIZE, height=SIZE)
    out = run(p, chosen)
    z1 = FakeForgeTxt2Img(model, width=SIZE, height=SIZE).sample()  # stage 1 is not re-dilated here
    reference = a1111_stage(model, p, z1, chosen)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    vanilla = run(FakeForgeDemoFusionTxt2Img(model, width=SIZE, height=SIZE), settings(redilation="off"))
    assert (vanilla - out).abs().max() > 1e-2  # the re-dilated samples change the stage
    assert unet_is_clean(tiny_unet("sd1")) and not webui_job._live_hooks


def test_both_redilates_stage_1_whole_and_later_stages_on_their_samples(stages):
    model = FakeForgeModel(tiny_unet("sd1"))
    calls = UnetCalls()
    p = FakeForgeDemoFusionTxt2Img(model, width=SIZE, height=SIZE, scripts=[calls])
    try:
        out = run(p, settings(redilation="both", noise_damped_cfg="on"))
    finally:
        calls.remove()
    # stage 1: the whole 32x32 latent, re-dilated while the preset's t >= 401 (Forge's stage-1 steps: t 600, 200),
    # with the vanilla noise-damped base call of the uncond rows at t 600
    assert calls.stage(1) == [((32, 32), 2.0), ((32, 32), 1.0), ((32, 32), 1.0)]
    assert sorted(set(calls.stage(2))) == [((16, 16), 1.0), ((32, 32), 2.0)]
    # the stage guard and the pass's step check; stage 1: noise damping
    assert calls.options[1] == {"sampler_pre_cfg_function": 2, "sampler_post_cfg_function": 1}
    assert calls.options[2] == {"sampler_pre_cfg_function": 2}
    params = p.extra_generation_params
    assert "DemoFusion stage 1 preset" in params and "DemoFusion stage 2 global preset" in params
    assert params["DemoFusion re-dilation"] == "both"
    only_global = run(FakeForgeDemoFusionTxt2Img(model, width=SIZE, height=SIZE),
                      settings(redilation="global path", noise_damped_cfg="on"))
    assert (only_global - out).abs().max() > 1e-2
    assert unet_is_clean(tiny_unet("sd1")) and not webui_job._live_hooks
