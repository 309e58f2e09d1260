"""ScaleCrafter's Forge job and pass, driven through Forge's call order with fakes (tests/forge_fakes.py)."""
import types

import pytest
import torch

from lib_hires.vae.previews import PREVIEW_MAX_SIDE
from lib_hires.webui.forge import is_forge_model
from lib_hires.webui.forge import model as forge_model
from lib_hires.webui.forge import job as forge_job
from lib_hires.webui.forge.job import ForgeJob
from lib_hires.webui.forge.scalecrafter import CUSTOM_CFG, MULTIDIFFUSION, ForgeScaleCrafterPass
from lib_hires.settings import ScaleFusionSettings
from lib_hires.webui import job as webui_job
from lib_hires.webui.messages import RequestError
from lib_hires.webui.model_info import UnsupportedModelError
from lib_hires.webui.scalecrafter_pass import plan_for_latent
from tests import forge_fakes
from tests.conftest import tiny_unet
from tests.forge_fakes import FakeForgeModel, FakeForgeTxt2Img, run_forge_job


@pytest.fixture(autouse=True)
def backend():
    with forge_fakes.FakeBackend() as fake:
        yield fake


def settings(**changes):
    return ScaleFusionSettings(**{"enabled": True, "method": "ScaleCrafter", "native_size": 128, **changes})


@pytest.fixture
def model():
    return FakeForgeModel(tiny_unet("sd1"))


def unet_is_clean(unet) -> bool:
    return not unet._forward_pre_hooks and not any(
        "forward" in vars(m) or "_conv_forward" in vars(m) for m in unet.modules())


def plain(model, **kwargs):
    return FakeForgeTxt2Img(model, **kwargs).sample()


def test_forge_models_are_told_from_their_objects(model):
    assert is_forge_model(model)
    placeholder = type("FakeInitialModel", (), {"__module__": "modules.sd_models"})()
    assert is_forge_model(placeholder)  # Forge before its first load
    a1111 = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=tiny_unet("sd1")))
    assert not is_forge_model(a1111)
    with pytest.raises(UnsupportedModelError, match="no checkpoint is loaded yet"):
        forge_model.describe(placeholder)


def test_describe_reads_forges_model(model):
    info = forge_model.describe(model)
    assert info.family == "sd1" and info.train_size == 512 and info.unet is tiny_unet("sd1")
    assert forge_model.describe(model, 128).train_size == 128
    flux = FakeForgeModel(tiny_unet("sd1"), "flux1-dev", legacy=False)
    with pytest.raises(UnsupportedModelError, match="flux1-dev is not an SD1.x, SD2.x or SDXL UNet model"):
        forge_model.describe(flux)


def test_scalecrafter_changes_the_result_and_leaves_nothing_behind(model):
    before = plain(model, width=256, height=256)
    p = FakeForgeTxt2Img(model, width=256, height=256)
    out = run_forge_job(p, settings())
    assert isinstance(p.job, ForgeJob) and out.shape == before.shape
    assert not torch.allclose(out, before, atol=1e-4)
    assert p.extra_generation_params["ScaleFusion"] == "ScaleCrafter" and "ScaleCrafter preset" in \
        p.extra_generation_params
    sampled = p.sampled_with[0]
    assert sampled is not model.forge_objects_after_applying_lora.unet  # a clone carried the hooks
    assert len(sampled.model_options["sampler_pre_cfg_function"]) == 1
    assert model.forge_objects_after_applying_lora.unet.model_options == {}
    assert unet_is_clean(model.forge_objects.unet.model.diffusion_model) and not webui_job._live_hooks
    assert torch.equal(plain(model, width=256, height=256), before)
    assert torch.equal(run_forge_job(FakeForgeTxt2Img(model, width=256, height=256), settings()), out)


def test_a_clone_made_after_the_pass_samples_the_same(model):
    """Another extension cloning forge_objects.unet after us (SAG, Kohya HRFix) deep-copies model_options:
    the pass's functions are closures, copied by reference, and the UNet module is shared."""
    def reclone(p):
        p.sd_model.forge_objects.unet = p.sd_model.forge_objects.unet.clone()

    alone = run_forge_job(FakeForgeTxt2Img(model, width=256, height=256), settings(noise_damped_cfg="on"))
    p = FakeForgeTxt2Img(model, width=256, height=256, scripts=[reclone])
    assert torch.equal(run_forge_job(p, settings(noise_damped_cfg="on")), alone)


def test_noise_damped_cfg_is_the_base_uncond_plus_the_guidance(model):
    info = forge_model.describe(model, 128)
    plan = plan_for_latent(info, settings(noise_damped_cfg="on"), (32, 32))
    assert plan.base == {} and plan.base_at(961) == {}  # the paper's form: a vanilla base
    patcher = model.forge_objects.unet.clone()
    gen = torch.Generator().manual_seed(0)
    x, cond, uncond = torch.randn(1, 4, 32, 32, generator=gen), torch.randn(1, 7, 32), torch.randn(1, 7, 32)
    sigma = patcher.model.predictor.sigmas[960].view(1)
    active = ForgeScaleCrafterPass(plan, info, patcher)
    try:
        out, cond_pred, uncond_pred = forge_fakes.sampling_function_inner(
            patcher.model, x, sigma, forge_fakes.conds(uncond), forge_fakes.conds(cond), 7.0, patcher.model_options)
        with active.controller.base_pass():
            _, base = forge_fakes.calc_cond_uncond_batch(patcher.model, [], forge_fakes.conds(uncond), x, sigma, {})
        dilated_cond, dilated_uncond = forge_fakes.calc_cond_uncond_batch(
            patcher.model, forge_fakes.conds(cond), forge_fakes.conds(uncond), x, sigma, {})
    finally:
        active.remove()
    vanilla_uncond = forge_fakes.calc_cond_uncond_batch(patcher.model, [], forge_fakes.conds(uncond), x, sigma, {})[1]
    assert torch.equal(base, vanilla_uncond) and not torch.allclose(dilated_uncond, base)
    assert torch.equal(cond_pred, dilated_cond)
    assert torch.allclose(out, base + 7.0 * (dilated_cond - dilated_uncond), atol=1e-5)
    assert torch.equal(uncond_pred, base)  # the uncond this step returns is the base's (Forge's DDIM CFG++ uses it)
    assert active.base_evaluations == 1
    # removed: the functions left in the clone's options are inert, the UNet is back to plain
    again, _, _ = forge_fakes.sampling_function_inner(
        patcher.model, x, sigma, forge_fakes.conds(uncond), forge_fakes.conds(cond), 7.0, patcher.model_options)
    reference, _, _ = forge_fakes.sampling_function_inner(
        patcher.model, x, sigma, forge_fakes.conds(uncond), forge_fakes.conds(cond), 7.0, {})
    assert torch.equal(again, reference) and unet_is_clean(info.unet)


def test_no_base_call_where_cfg_computes_no_uncond(model):
    p = FakeForgeTxt2Img(model, width=256, height=256, cfg_scale=1.0)
    active = []
    p.scripts = [lambda p: active.append(p.job.active)]
    run_forge_job(p, settings(noise_damped_cfg="on"))
    assert active[0].base_evaluations == 0
    p = FakeForgeTxt2Img(model, width=256, height=256)
    p.scripts = [lambda p: active.append(p.job.active)]
    run_forge_job(p, settings(noise_damped_cfg="on"))
    assert active[1].base_evaluations == 1  # steps at t 600 and 200: only the first is in the base range (t >= 401)


def test_the_hires_pass_is_armed_after_forges_second_reset(model):
    p = FakeForgeTxt2Img(model, width=128, height=128, enable_hr=True)
    armed = []
    p.scripts = [lambda p: armed.append((p.job.active, sorted(type(h).__name__ for h in webui_job._live_hooks)))]
    run_forge_job(p, settings())
    first, hires_before_reset, hires = armed
    assert first[0] is None  # 128 px at native 128: nothing to dilate
    assert hires_before_reset[0] is not None and hires[0] is not None and hires[1] == ["ForgeScaleCrafterPass", "SmallPreviews", "TiledVae"]  # one pass at a time
    assert hires_before_reset[0].removed and hires[0].removed
    assert "sampler_pre_cfg_function" in p.sampled_with[1].model_options
    assert "ScaleCrafter hires preset" in p.extra_generation_params
    assert unet_is_clean(tiny_unet("sd1"))


def test_an_exception_while_sampling_removes_every_hook(model):
    p = FakeForgeTxt2Img(model, width=256, height=256, fail_at_step=1)
    with pytest.raises(RuntimeError, match="the sampler failed"):
        run_forge_job(p, settings())
    assert unet_is_clean(tiny_unet("sd1")) and not webui_job._live_hooks


def test_multidiffusion_integrated_is_refused_at_the_first_step(model):
    def multidiffusion(p):
        unet = p.sd_model.forge_objects.unet.clone()
        unet.model_options["model_function_wrapper"] = lambda apply, args: apply(args["input"], args["timestep"],
                                                                                   **args["c"])
        unet.model_options["tiled_diffusion"] = True
        p.sd_model.forge_objects.unet = unet

    p = FakeForgeTxt2Img(model, width=256, height=256, scripts=[multidiffusion])
    with pytest.raises(RequestError) as error:
        run_forge_job(p, settings())
    assert str(error.value) == MULTIDIFFUSION and error.value.status_code == 422
    assert unet_is_clean(tiny_unet("sd1"))


def test_a_custom_cfg_function_is_refused_with_noise_damping_only(model):
    def dynamic_thresholding(p):
        unet = p.sd_model.forge_objects.unet.clone()
        unet.model_options["sampler_cfg_function"] = lambda a: a["uncond"] + (a["cond"] - a["uncond"]) * a["cond_scale"]
        p.sd_model.forge_objects.unet = unet

    with pytest.raises(RequestError, match="noise-damped CFG cannot be combined") as error:
        run_forge_job(FakeForgeTxt2Img(model, width=256, height=256, scripts=[dynamic_thresholding]),
                      settings(noise_damped_cfg="on"))
    assert str(error.value) == CUSTOM_CFG
    run_forge_job(FakeForgeTxt2Img(model, width=256, height=256, scripts=[dynamic_thresholding]),
                  settings(noise_damped_cfg="off"))
    assert unet_is_clean(tiny_unet("sd1"))


def test_what_cannot_run_is_refused_before_sampling(model):
    p = FakeForgeTxt2Img(model, width=256, height=256)
    p.width = 8200
    with pytest.raises(RequestError, match="width must be a multiple of 8 from 64 to 8192"):
        run_forge_job(p, settings())
    p = FakeForgeTxt2Img(FakeForgeModel(tiny_unet("sd1"), "flux1-dev", legacy=False))
    with pytest.raises(RequestError, match="flux1-dev is not an SD1.x"):
        run_forge_job(p, settings())
    assert not p.sampled_with


def test_demofusion_calls_out_to_forges_run(model, monkeypatch):
    calls = []

    class ForgeDemoFusionRun:
        def __init__(self, p, job, original_sample):
            calls.append(("init", job.settings.method))
            self.original_sample = original_sample

        def __call__(self, *args, **kwargs):
            calls.append(("run", p.job.info.family))
            return self.original_sample(*args, **kwargs)

        def start_pass(self, p, x):
            calls.append(("pass", tuple(x.shape[-2:])))

    monkeypatch.setattr(forge_job, "ForgeDemoFusionRun", ForgeDemoFusionRun)
    p = FakeForgeTxt2Img(model)
    run_forge_job(p, settings(method="DemoFusion"))
    assert calls == [("init", "DemoFusion"), ("run", "sd1"), ("pass", (16, 16))]


def test_post_sample_hands_the_decode_to_forges_decoding(model, monkeypatch):
    job = ForgeJob(FakeForgeTxt2Img(model), settings())
    ps = types.SimpleNamespace(samples=torch.zeros(1, 4, 8, 8))
    seen = []
    monkeypatch.setattr(forge_job.decoding, "post_sample", lambda p, ps: seen.append((p, ps)))
    job.post_sample(job.p, ps)
    assert seen == [(job.p, ps)]


# Large outputs: the VAE and previews through Forge's call order (issue 19 §7) ------------------------------------

def vae_model(backend):
    from lib_hires.webui.decoding import TILE_OPTION
    backend.opts.data[TILE_OPTION] = 16  # latent px: the 32-px latents below are tiled, 16-px ones are not
    return FakeForgeModel(tiny_unet("sd1"), vae=forge_fakes.FakeForgeVae(forge_fakes.tiny_first_stage()))


def test_img2img_init_images_are_encoded_in_tiles_on_the_objects_of_the_moment(backend):
    model = vae_model(backend)
    vae = model.forge_objects.vae
    seen = []
    hook = vae.first_stage_model.encoder.conv_in.register_forward_pre_hook(
        lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    image = torch.rand(1, 256, 256, 3)
    try:
        p = FakeForgeTxt2Img(model, width=256, height=256, steps=1, init_image=image)
        run_forge_job(p, settings())
    finally:
        hook.remove()
    assert p.init_latent.shape == (1, 4, 32, 32) and ("encode", (256, 256)) not in vae.inner_calls
    assert seen and max(max(s) for s in seen) <= 16 * 8  # the encoder saw tiles only
    with torch.no_grad():
        whole = vae.encode_inner(image)
    assert (p.init_latent - whole).abs().mean() < 0.25 * whole.abs().mean()  # the same image, up to the tiles
    assert model.forge_objects.vae is vae and vae.patcher.model_options == {} and not webui_job._live_hooks
    small = FakeForgeTxt2Img(model, width=128, height=128, steps=1, init_image=torch.rand(1, 128, 128, 3))
    run_forge_job(small, settings())
    assert vae.inner_calls[-1] == ("encode", (128, 128))  # one tile or less: Forge's own encode


def test_an_unsupported_models_init_images_are_left_to_forge(backend):
    model = vae_model(backend)
    model._legacy = False  # Flux and the other transformers are refused when p.sample starts
    p = FakeForgeTxt2Img(model, width=256, height=256, init_image=torch.rand(1, 256, 256, 3))
    with pytest.raises(RequestError, match="not an SD1.x, SD2.x or SDXL UNet"):
        run_forge_job(p, settings())
    assert model.forge_objects.vae.inner_calls == [("encode", (256, 256))]


def test_the_hires_encode_and_decode_of_a_big_image_are_tiled(backend):
    model = vae_model(backend)
    vae = model.forge_objects.vae
    p = FakeForgeTxt2Img(model, width=128, height=128, enable_hr=True, hr_upscaler="image", steps=1)
    run_forge_job(p, settings())
    # The first pass's 16-px latent through Forge's own decode; the hires encode (under the first pass's
    # objects, before the hires resets) and the hires decode of 32 px in tiles.
    assert vae.inner_calls == [("decode", (16, 16))]
    assert p.decoded.shape == (1, 256, 256, 3)
    plain_p = FakeForgeTxt2Img(model, width=128, height=128, enable_hr=True, hr_upscaler="image", steps=1)
    plain_p.sample()
    assert vae.inner_calls[1:] == [("decode", (16, 16)), ("encode", (256, 256)), ("decode", (32, 32))]
    assert model.forge_objects.vae is vae and model.forge_objects_after_applying_lora.vae is vae
    assert vae.patcher.model_options == {} and not webui_job._live_hooks


def test_previews_are_shrunk_while_a_job_samples_and_never_after(backend, model):
    p = FakeForgeTxt2Img(model, width=256, height=256)
    run_forge_job(p, settings())
    assert backend.state.previewed and all(patched for _, patched in backend.state.previewed)
    assert "do_set_current_image" not in vars(backend.state) and "end" not in vars(backend.state)
    backend.state.previewed.clear()
    failing = FakeForgeTxt2Img(model, width=256, height=256, fail_at_step=1)
    with pytest.raises(RuntimeError, match="the sampler failed"):
        run_forge_job(failing, settings())
    assert "do_set_current_image" not in vars(backend.state) and not webui_job._live_hooks
    plain(model, width=256, height=256)
    assert backend.state.previewed[-1] == ((1, 4, 32, 32), False)  # a plain job's previews are Forge's own


def test_previews_stay_shrunk_after_sampling_until_postprocess_or_the_end_of_the_job(backend, model):
    """The final decode in post_sample runs after p.sample returns, while the progress thread still previews the
    full-size current_latent: that preview is shrunk too (issue 19 §3); state.end() ends a job whose script
    postprocess never runs."""
    p = FakeForgeTxt2Img(model, width=256, height=256)
    active = webui_job.begin(p, [settings().to_dict()], lambda: type(settings())(), ForgeJob)
    p.init()
    p.sample()
    backend.state.previewed.clear()
    big = torch.zeros(1, 4, 4 * PREVIEW_MAX_SIDE, 4 * PREVIEW_MAX_SIDE)
    backend.state.current_latent = big
    backend.state.do_set_current_image()  # the progress thread, during post_sample's decode
    assert backend.state.previewed[-1] == ((1, 4, PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE), True)
    active.finish()
    assert "do_set_current_image" not in vars(backend.state) and not webui_job._live_hooks

    p = FakeForgeTxt2Img(model, width=256, height=256)
    active = webui_job.begin(p, [settings().to_dict()], lambda: type(settings())(), ForgeJob)
    p.init()
    p.sample()
    backend.state.end()  # a failure after p.sample: the WebUI ends the job, no script callback follows
    assert backend.state.ended
    assert "do_set_current_image" not in vars(backend.state) and "end" not in vars(backend.state)
    active.finish()  # idempotent
    plain(model, width=256, height=256)
    assert backend.state.previewed[-1] == ((1, 4, 32, 32), False)
