"""DemoFusion through the real WebUI's API: stages, sizes, samplers, SDXL crops, ControlNet, no leaked hooks.

``native_size=128`` makes the tiny checkpoints' window 16 latent px, so ×2 of a 256 px first stage has the
view geometry the real SD1 model has at ×2 of 512 px, in a fraction of the time.
"""
import threading
import time

import numpy as np
import pytest
import torch

from tests.integration.conftest import gradient_png
from tests.integration.test_api_scalecrafter import assert_clean, scalefusion

pytestmark = pytest.mark.usefixtures("fresh_plain")


def demofusion(**settings):
    return scalefusion(method="DemoFusion", native_size=128, **settings)


@pytest.mark.parametrize("width,height,scale,size", [(256, 256, 2, (512, 512)), (256, 192, 2.5, (640, 512)),
                                                     (192, 256, 2, (384, 512))])
def test_sizes_infotext_and_determinism(txt2img, width, height, scale, size):
    runs = [txt2img(width=width, height=height, alwayson_scripts=demofusion(scale=scale)) for _ in range(2)]
    assert runs[0].status == 200, runs[0].json
    assert runs[0].size == size
    params = runs[0].params()
    assert params["Size-1"] == str(width) and params["Size-2"] == str(height)  # Size stays the first stage
    assert params["ScaleFusion"] == "DemoFusion" and float(params["DemoFusion scale"]) == scale
    assert (params["DemoFusion final size-1"], params["DemoFusion final size-2"]) == tuple(map(str, size))
    assert np.array_equal(runs[0].image, runs[1].image)


def test_the_documented_dict_example(txt2img):
    result = txt2img(width=256, height=256, alwayson_scripts={"ScaleFusion": {"args": [
        {"enabled": True, "method": "DemoFusion", "scale": 2.5, "native_size": 128}]}})
    assert result.status == 200 and result.size == (640, 640)


def test_pasting_the_infotext_reproduces_instead_of_upscaling_twice(txt2img):
    first = txt2img(width=256, height=256, alwayson_scripts=demofusion(scale=2, stride=12, cosine_scale_2=0.5))
    pasted = txt2img(infotext=first.infotext)
    assert pasted.status == 200 and pasted.size == first.size == (512, 512)
    assert np.array_equal(pasted.image, first.image)


def test_low_vram_gives_the_same_image(txt2img):
    normal = txt2img(width=256, height=256, alwayson_scripts=demofusion(scale=2))
    low = txt2img(width=256, height=256, alwayson_scripts=demofusion(scale=2, low_vram=True))
    assert np.abs(normal.image.astype(int) - low.image.astype(int)).max() <= 1  # float summation order only


def test_each_image_of_a_batch_equals_its_seed_alone(api, txt2img):
    batch = txt2img(width=256, height=256, seed=11, batch_size=2, alwayson_scripts=demofusion(scale=2))
    assert batch.status == 200 and len(batch.images) == 2
    alone = txt2img(width=256, height=256, seed=12, alwayson_scripts=demofusion(scale=2))
    assert np.abs(batch.images[1].astype(int) - alone.image.astype(int)).max() <= 1
    count = txt2img(width=256, height=256, seed=11, n_iter=2, alwayson_scripts=demofusion(scale=2))
    assert count.status == 200 and len(count.images) == 2 and all(i.shape[:2] == (512, 512) for i in count.images)


@pytest.mark.parametrize("settings,message", [
    ({"scale": 5}, "scale must be a number in [1.5, 4]; got 5"),
    ({"stride": 32}, "stride must be at most the model's window of 16 latent px"),
    ({"view_batch": 0}, "view_batch must be an integer in [1, 64]; got 0"),
    ({"redilation": "everywhere"}, "redilation must be one of"),
])
def test_bad_settings_answer_422_naming_the_field(webui, txt2img, fresh_plain, settings, message):
    result = txt2img(alwayson_scripts=demofusion(**settings))
    assert result.status == 422 and message in result.json["detail"], result.json
    assert_clean(webui, txt2img, fresh_plain)


def test_hires_fix_is_refused_clearly(webui, txt2img, fresh_plain):
    hires = txt2img(enable_hr=True, hr_scale=2, hr_upscaler="Latent", alwayson_scripts=demofusion())
    assert hires.status == 422 and "turn Hires. fix off" in hires.json["detail"]
    assert_clean(webui, txt2img, fresh_plain)


def test_every_sampler_completes(api, txt2img):
    failures, refused = {}, []
    for name in [s["name"] for s in api.get("/sdapi/v1/samplers").json()]:
        result = txt2img(sampler_name=name, steps=4, width=128, height=128, alwayson_scripts=demofusion(scale=2))
        if result.status == 422 and "cannot put its skip residual" in result.json["detail"]:
            refused.append(name)
        elif result.status != 200 or result.size != (256, 256):
            failures[name] = result.json
    assert not failures
    assert refused == []  # timestep samplers included (issue 21)
    # UniPC's later stages at 3 steps would run 2 timesteps, fewer than its order: refused before sampling
    few = txt2img(sampler_name="UniPC", steps=3, width=128, height=128, alwayson_scripts=demofusion(scale=2))
    assert few.status == 422 and "later stages run UniPC over 2 timesteps" in few.json["detail"], few.json


def test_euler_stage_equals_the_engine(monkeypatch, txt2img):
    """The WebUI path (fused views under the CFG denoiser, skip residual in the sampler state) gives what
    ``lib_hires.demofusion.sample_stage`` gives for the same stage, noise, views and sigmas."""
    from lib_hires.demofusion import sample_stage
    from lib_hires.webui import demofusion_sampler as dfs

    seen = {}
    init, sample = dfs.StageSampling.__init__, dfs.DemoFusionRun._sample_stage

    def spy_init(self, p, stage, settings, z_up, noise, *args, **kwargs):
        seen.update(p=p, stage=stage, settings=settings, z_up=z_up.clone(), noise=noise.clone(), sampler=p.sampler)
        init(self, p, stage, settings, z_up, noise, *args, **kwargs)

    def spy_sample(self, *args):
        out = sample(self, *args)
        seen["out"] = out.clone()
        return out

    monkeypatch.setattr(dfs.StageSampling, "__init__", spy_init)
    monkeypatch.setattr(dfs.DemoFusionRun, "_sample_stage", spy_sample)
    assert txt2img(width=256, height=256, steps=5, alwayson_scripts=demofusion(scale=2)).status == 200

    p, sampler, settings = seen["p"], seen["sampler"], seen["settings"]
    cfg = sampler.model_wrap_cfg  # the patches are gone: a plain CFG denoiser over the plain inner model
    assert "forward" not in vars(cfg) and "forward" not in vars(cfg.inner_model)
    sigmas = sampler.get_sigmas(p, p.steps)
    with torch.no_grad():
        expected = sample_stage(cfg, seen["z_up"], seen["noise"], sigmas, dilation=seen["stage"].dilation,
                                window=settings.window, stride=settings.stride, view_batch=1,  # CFG per view
                                cosine_scale_1=settings.cosine_scale_1, cosine_scale_2=settings.cosine_scale_2,
                                cosine_scale_3=settings.cosine_scale_3, sigma=settings.sigma,
                                sigma_to_t=cfg.inner_model.sigma_to_t,
                                jitter=torch.Generator().manual_seed(dfs.JITTER_SEED),
                                extra_args=sampler.sampler_extra_args)
    scale = seen["out"].abs().max()
    assert (expected - seen["out"]).abs().max() <= 1e-4 * scale


def test_lora_and_controlnet_with_demofusion(webui, api, txt2img, fresh_plain):
    if "controlnet" not in [s["name"] for s in api.get("/sdapi/v1/script-info").json()]:
        pytest.skip("sd-webui-controlnet is not installed in this WebUI")
    from lib_hires.webui import controlnet_hints

    unit = {"enabled": True, "module": "none", "model": "control_tiny_sd15_random", "weight": 1.0,
            "image": gradient_png(256)}
    hint_shapes, hints_at_end = [], []
    set_call = controlnet_hints.StageHints.set_call

    def spy(self, call):
        set_call(self, call)
        hint_shapes.append((tuple(self.params[0].hint_cond.shape), call.rows * len(call.views), call.size))

    controlnet_hints.StageHints.set_call = spy
    try:
        both = dict(prompt="a cat <lora:tiny:1>", width=256, height=256,
                    alwayson_scripts={**demofusion(scale=2), "controlnet": {"args": [unit]}})
        result = txt2img(**both)
    finally:
        controlnet_hints.StageHints.set_call = set_call
    assert result.status == 200 and result.size == (512, 512), result.json
    assert "ControlNet 0" in result.params() and "Lora hashes" in result.params()
    # every UNet call of stage 2 got a hint of its views' size, one per row
    assert hint_shapes and all(shape[0] == rows and shape[-2:] == (8 * size[0], 8 * size[1])
                               for shape, rows, size in hint_shapes)
    without_cn = txt2img(**{**both, "alwayson_scripts": demofusion(scale=2)})
    assert not np.array_equal(result.image, without_cn.image)
    assert_clean(webui, txt2img, fresh_plain)


def test_sdxl_views_get_their_crops_and_every_call_the_final_size(webui, load_checkpoint, txt2img):
    model = load_checkpoint("tiny-sdxl")
    unet = model.model.diffusion_model
    vectors = []
    handle = unet.register_forward_pre_hook(lambda m, a, k: vectors.append((a[0].shape[-2:], k["y"].clone())),
                                            with_kwargs=True)
    try:
        result = txt2img(width=256, height=256, steps=2, alwayson_scripts=scalefusion(
            method="DemoFusion", native_size=256, scale=2))
    finally:
        handle.remove()
    assert result.status == 200 and result.size == (512, 512)
    embed = {key: e for e in model.conditioner.embedders for key in [getattr(e, "input_key", None)]}

    def emb(key, h, w):
        return embed[key](torch.tensor([[h, w]], dtype=torch.float32)).to(vectors[0][1])

    final_original, final_target = emb("original_size_as_tuple", 512, 512), emb("target_size_as_tuple", 512, 512)
    width = final_target.shape[-1]
    crops = set()
    for size, y in vectors:
        assert torch.allclose(y[:, -3 * width:-2 * width], final_original.expand(len(y), -1), atol=1e-5)
        assert torch.allclose(y[:, -width:], final_target.expand(len(y), -1), atol=1e-5)
        for row in y[:, -2 * width:-width]:
            crops.add(next(c for c in [(t, l) for t in range(0, 513, 8) for l in range(0, 513, 8)]
                           if torch.allclose(row, emb("crop_coords_top_left", *c)[0], atol=1e-4)))
    assert (0, 0) in crops and len(crops) > 1  # dilated samples and stage 1 at (0, 0); local views elsewhere
    assert all(t % 8 == 0 and l % 8 == 0 for t, l in crops)


def test_img2img_upscales_the_input(img2img):
    init = gradient_png(256)
    result = img2img(init_images=[init], denoising_strength=0.6, width=256, height=256,
                     alwayson_scripts=demofusion(scale=2))
    assert result.status == 200 and result.size == (512, 512)
    assert result.params()["DemoFusion final size-1"] == "512"


def test_progress_names_the_stage_and_interrupt_returns_the_current_stage(webui, api, txt2img, fresh_plain):
    texts, results = set(), []
    worker = threading.Thread(target=lambda: results.append(
        txt2img(width=256, height=256, steps=40, alwayson_scripts=demofusion(scale=3))))
    worker.start()
    deadline = time.time() + 600
    while worker.is_alive() and time.time() < deadline:
        progress = api.get("/sdapi/v1/progress?skip_current_image=true").json()
        texts.add(progress["textinfo"] or "")
        if "stage 2/3" in (progress["textinfo"] or "") and progress["state"]["sampling_step"] >= 2:
            assert progress["state"]["job_count"] == 3
            api.post("/sdapi/v1/interrupt")
            break
        time.sleep(0.05)
    worker.join()
    assert any("DemoFusion stage 1/3" in t for t in texts) and any("DemoFusion stage 2/3: 512x512" in t for t in texts)
    assert results[0].status == 200 and results[0].size == (512, 512)  # the whole stage-2 image, not a crop
    assert_clean(webui, txt2img, fresh_plain)


def test_an_error_during_a_stage_leaves_nothing_behind(webui, txt2img, fresh_plain):
    from lib_hires.webui import demofusion_sampler as dfs

    before_call = dfs.StageSampling._before_call
    calls = []

    def failing(self, call):
        calls.append(call)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        before_call(self, call)

    dfs.StageSampling._before_call = failing
    try:
        result = txt2img(alwayson_scripts=demofusion(scale=2))
    finally:
        dfs.StageSampling._before_call = before_call
    assert result.status == 500 and "injected failure" in result.json["errors"]
    assert_clean(webui, txt2img, fresh_plain)


def test_tiled_decode_of_a_large_output(txt2img):
    tiled = txt2img(width=256, height=256, override_settings={"scalefusion_decode_tile": 16},
                    alwayson_scripts=demofusion(scale=2))
    full = txt2img(width=256, height=256, alwayson_scripts=demofusion(scale=2))
    assert tiled.status == 200 and tiled.size == full.size == (512, 512)
    difference = np.abs(tiled.image.astype(int) - full.image.astype(int))
    assert difference.mean() < 8  # the same image up to the blended tile seams of a random-weight VAE


def test_scalecrafter_inside_demofusion(txt2img):
    """With a first stage above the native size, re-dilation applies to stage 1 and the dilated samples."""
    plain = txt2img(width=256, height=256, alwayson_scripts=demofusion(scale=2))
    crafted = txt2img(width=256, height=256, alwayson_scripts=scalefusion(
        method="DemoFusion", native_size=128, scale=2, redilation="both"))
    assert crafted.status == 200 and crafted.size == (512, 512)
    params = crafted.params()
    assert params["DemoFusion stage 1 preset"] == "sd1.5_1024x1024" and params["DemoFusion re-dilation"] == "both"
    assert not np.array_equal(plain.image, crafted.image)
