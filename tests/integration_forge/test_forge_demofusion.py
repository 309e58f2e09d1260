"""DemoFusion inside a real stable-diffusion-webui-forge server (CPU, the seeded SD1 fixture), and its view wrapper
and SDXL crop conditioning on Forge's own tiny SDXL UNet.

The SD1 fixture's UNet is full width (320 channels), so the UNet calls of a later stage are slow on a CPU: most
requests go 256 -> 512 (one local view plus four dilated samples per step); the x2 from 512^2 case runs once, and
once more for determinism.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.integration_forge.conftest import gradient_png, scalefusion
from tests.integration_forge.df_models import CONTROLNET_NAME, LORA_NAME, ensure_models

SMALL = dict(width=256, height=256)


def demofusion(**settings) -> dict:
    return scalefusion(method="DemoFusion", **settings)


@pytest.fixture(scope="module")
def df_server(forge_servers, forge_data_dir, fresh_plain):
    """The default server, with the ControlNet and the LoRA in its models folders (Forge lists ControlNets when it
    boots: a server that started before they existed is restarted)."""
    ensure_models(forge_data_dir)
    server = forge_servers.get()
    status, listed = server.get("/controlnet/model_list")
    if not any(name.startswith(CONTROLNET_NAME) for name in (listed or {}).get("model_list", [])):
        forge_servers.stop()
        server = forge_servers.get()
    server.request("POST", "/sdapi/v1/refresh-loras", {})
    return server


@pytest.fixture(scope="module")
def controlnet_model(df_server) -> str:
    status, listed = df_server.get("/controlnet/model_list")
    names = [n for n in listed["model_list"] if n.startswith(CONTROLNET_NAME)]
    assert status == 200 and names, listed
    return names[0]


def controlnet_unit(model: str, size: int = 256, weight: float = 1.0) -> dict:
    return {"ControlNet": {"args": [{"enabled": True, "module": "None", "model": model, "weight": weight,
                                     "image": gradient_png(size), "resize_mode": "Crop and Resize",
                                     "control_mode": "Balanced", "pixel_perfect": False}]}}


@pytest.fixture(scope="module")
def small_df(df_server):
    result = df_server.txt2img(**SMALL, alwayson_scripts=demofusion(scale=2))
    assert result.status == 200, result
    return result


def assert_nothing_left(server, fresh_plain):
    after = server.txt2img()
    assert after.status == 200 and np.array_equal(after.image, fresh_plain.image), "a plain request changed"
    assert "DemoFusion" not in after.infotext


def test_x2_from_512_returns_the_final_size_is_deterministic_and_differs_from_plain(df_server, fresh_plain):
    first = df_server.txt2img(width=512, height=512, alwayson_scripts=demofusion(scale=2))
    assert first.status == 200 and first.size == (1024, 1024), first
    assert "DemoFusion final size: 1024x1024" in first.infotext and "Size: 512x512" in first.infotext
    again = df_server.txt2img(width=512, height=512, alwayson_scripts=demofusion(scale=2))
    assert np.array_equal(again.image, first.image)
    plain = df_server.txt2img(width=1024, height=1024)
    assert plain.status == 200 and not np.array_equal(plain.image, first.image)
    assert_nothing_left(df_server, fresh_plain)


def test_small_stage_plan_is_right_and_the_infotext_is_a1111s(small_df):
    assert small_df.size == (512, 512)
    for field in ("ScaleFusion: DemoFusion", "DemoFusion scale: 2",
                  "DemoFusion final size: 512x512", "DemoFusion view batch: 16"):
        assert field in small_df.infotext, small_df.infotext


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Heun"])
def test_other_samplers_run_through_their_step_starts(df_server, small_df, fresh_plain, sampler):
    result = df_server.txt2img(**SMALL, sampler_name=sampler, alwayson_scripts=demofusion(scale=2))
    assert result.status == 200 and result.size == (512, 512), result
    assert not np.array_equal(result.image, small_df.image)  # another sampler, another image (Euler: small_df)
    again = df_server.txt2img(**SMALL, sampler_name=sampler, alwayson_scripts=demofusion(scale=2))
    assert np.array_equal(again.image, result.image)
    assert_nothing_left(df_server, fresh_plain)


@pytest.mark.parametrize("settings,message", [
    (dict(scale=9), "scale must be a number in [1.5, 4]; got 9"),
    (dict(stride=512), "stride must be an integer in [8, 256]"),
    (dict(view_batch=0), "view_batch must be an integer in [1, 64]"),
    (dict(stride=128), "stride must be at most the model's window of 64 latent px"),
])
def test_bad_settings_answer_422(df_server, fresh_plain, settings, message):
    result = df_server.txt2img(**SMALL, alwayson_scripts=demofusion(**settings))
    assert result.status == 422 and message in result.detail, result
    assert_nothing_left(df_server, fresh_plain)


def test_global_path_redilation_runs_on_the_dilated_samples(df_server, fresh_plain):
    """Issue 23 §2: at native size 128 the 256 px stage 1 gives stage 2 views of 16x16 latent px (vanilla) and four
    dilated samples of 32x32 (re-dilated, the 256-px preset on a 128-px model), as in A1111."""
    chosen = dict(scale=2, native_size=128, stride=16)
    off = df_server.txt2img(**SMALL, alwayson_scripts=demofusion(**chosen))
    redilated = df_server.txt2img(**SMALL, alwayson_scripts=demofusion(redilation="global path", **chosen))
    assert off.status == 200 and redilated.status == 200, (off, redilated)
    assert redilated.size == (512, 512) and not np.array_equal(redilated.image, off.image)
    assert "DemoFusion stage 2 global preset: " in redilated.infotext and "DemoFusion stage 1 preset" not in \
        redilated.infotext, redilated.infotext
    assert "DemoFusion re-dilation: global path" in redilated.infotext
    assert_nothing_left(df_server, fresh_plain)


@pytest.mark.parametrize("payload,message", [
    (dict(sampler_name="DDIM"), "DDIM is a timestep sampler"),
    (dict(enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.5), "replaces Hires. fix"),
])
def test_what_demofusion_cannot_run_is_refused_with_a_reason(df_server, fresh_plain, payload, message):
    result = df_server.txt2img(**SMALL, **payload, alwayson_scripts=demofusion(scale=2))
    assert result.status == 422 and message in result.detail, result
    assert_nothing_left(df_server, fresh_plain)


def test_forges_builtin_controlnet_steers_every_view(df_server, small_df, fresh_plain, controlnet_model):
    controlled = df_server.txt2img(**SMALL, alwayson_scripts={**demofusion(scale=2),
                                                              **controlnet_unit(controlnet_model)})
    assert controlled.status == 200 and controlled.size == (512, 512), controlled
    assert not np.array_equal(controlled.image, small_df.image)
    again = df_server.txt2img(**SMALL, alwayson_scripts={**demofusion(scale=2), **controlnet_unit(controlnet_model)})
    assert np.array_equal(again.image, controlled.image)
    assert "ControlNet" in controlled.infotext
    assert_nothing_left(df_server, fresh_plain)


def test_lora_changes_the_demofusion_image(df_server, small_df, fresh_plain):
    with_lora = df_server.txt2img(**SMALL, prompt=f"a cat <lora:{LORA_NAME}:1>", alwayson_scripts=demofusion(scale=2))
    assert with_lora.status == 200 and with_lora.size == (512, 512), with_lora
    assert not np.array_equal(with_lora.image, small_df.image)
    assert_nothing_left(df_server, fresh_plain)


def test_img2img_runs_the_later_stages(df_server, fresh_plain):
    result = df_server.img2img(**SMALL, init_images=[gradient_png(256)], denoising_strength=0.5,
                               alwayson_scripts=demofusion(scale=2))
    assert result.status == 200 and result.size == (512, 512), result
    assert_nothing_left(df_server, fresh_plain)


# In-process, on Forge's own SDXL UNet (tiny_sdxl.py): the view wrapper with Forge's KModel and the crop columns.

def test_views_on_forges_sdxl_unet_equal_the_engines_fused_result(sdxl_unet):
    from backend.modules.k_model import KModel
    from backend.nn.unet import Timestep
    from lib_hires.demofusion import FusedDenoiser, repeat_rows
    from lib_hires.webui.forge.demofusion_views import ViewFunction, cond_mark
    from lib_hires.webui.forge.sdxl_size import ForgeSizeConditioning
    from tests.integration_forge.tiny_sdxl import CONTEXT_DIM

    unet = sdxl_unet(seed=3)
    from types import SimpleNamespace

    config = SimpleNamespace(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             num_train_timesteps=1000, prediction_type="epsilon")
    model = KModel(unet, diffusers_scheduler=SimpleNamespace(config=config))
    embedder = Timestep(2)  # the tiny SDXL's ADM vector: 4 pooled + 6 x 2
    size = ForgeSizeConditioning(SimpleNamespace(embedder=embedder), final_width=512, final_height=512)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g) * 4
    sigma = torch.full((2,), 3.0)
    y = torch.randn(2, 16, generator=g)
    c = {"c_crossattn": torch.randn(2, 7, CONTEXT_DIM, generator=g), "y": y}

    def make(denoiser, **hooks):  # each its own jitter generator, seeded alike
        return FusedDenoiser(denoiser, dilation=2, window=16, stride=8, view_batch=4,
                             sigma_to_t=model.predictor.timestep, jitter=torch.Generator().manual_seed(4), **hooks)

    def view_cond(extra, crops):
        args = repeat_rows(extra, 2, len(crops))
        args["y"] = size.edit(args["y"], crops)
        return args

    with torch.no_grad():
        reference = make(lambda xv, sv, **cv: model.apply_model(xv, sv, **cv), view_cond=view_cond)(x, sigma, **c)
        options = {"sigmas": sigma[:1], "cond_or_uncond": [0, 1], "cond_mark": cond_mark([0, 1], sigma[:1])}
        out = ViewFunction(make, size_cond=size)(model.apply_model, {"input": x, "timestep": sigma,
                                                                      "c": {**c, "transformer_options": options},
                                                                      "cond_or_uncond": [0, 1]})
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)
    # the crop columns hold Forge's own embedding of each view's crop
    crops = [(8 * 4, 8 * 12)]
    edited = size.edit(y[:1], crops)
    assert torch.allclose(edited[0, 8:12], torch.cat([embedder(torch.Tensor([32]))[0], embedder(torch.Tensor([96]))[0]]))
    assert torch.allclose(edited[0, 4:8], torch.cat([embedder(torch.Tensor([512]))[0]] * 2))
