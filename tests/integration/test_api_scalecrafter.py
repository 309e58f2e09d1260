"""ScaleCrafter through the real WebUI's API: sizes, infotext, errors, no leaked hooks, samplers, LoRA, ControlNet.

Sizes are kept small with ``native_size``: the tiny checkpoints then plan 2x/4x per side at 256-512 px, with
the same official presets the real models get at 1024-2048 px (one test checks the automatic 512 px of SD1).
"""
import json
import threading
import time

import numpy as np
import pytest

from lib_hires.settings import FIELDS
from tests.integration.conftest import gradient_png

pytestmark = pytest.mark.usefixtures("fresh_plain")


def scalefusion(**settings):
    return {"ScaleFusion": {"args": [{"enabled": True, **settings}]}}


def hooks_left(webui):
    from lib_hires.webui import job, scalecrafter_pass
    unet = webui.sd_model.model.diffusion_model
    return (sum("_conv_forward" in vars(m) for m in unet.modules()) + len(unet._forward_pre_hooks)
            + len(job._live_hooks) + (scalecrafter_pass._capture.denoiser is not None)
            + ("decode_first_stage" in vars(webui.sd_model)) + ("do_set_current_image" in vars(webui.state)))


def assert_clean(webui, txt2img, fresh_plain):
    assert hooks_left(webui) == 0
    again = txt2img()
    assert again.status == 200 and np.array_equal(again.image, fresh_plain.image)


@pytest.mark.parametrize("per_side,preset", [(2, "sd1.5_1024x1024"), (4, "sd1.5_2048x2048")])
def test_sd1_right_size_infotext_and_deterministic(txt2img, per_side, preset):
    size = 128 * per_side
    first = txt2img(width=size, height=size, alwayson_scripts=scalefusion(native_size=128))
    assert first.status == 200, first.json
    assert first.size == (size, size)
    params = first.params()
    assert params["ScaleFusion"] == "ScaleCrafter" and params["ScaleCrafter preset"] == preset
    assert params["ScaleFusion native size"] == "128" and params["Size-1"] == str(size)
    second = txt2img(width=size, height=size, alwayson_scripts=scalefusion(native_size=128))
    assert np.array_equal(first.image, second.image)
    plain = txt2img(width=size, height=size)
    assert not np.array_equal(first.image, plain.image)


def test_sd1_default_native_size_is_512(txt2img):
    result = txt2img(width=1024, height=1024, steps=2, alwayson_scripts=scalefusion())
    assert result.status == 200 and result.size == (1024, 1024)
    assert result.params()["ScaleCrafter preset"] == "sd1.5_1024x1024"


@pytest.mark.parametrize("per_side,preset", [(2, "sdxl_2048x2048"), (4, "sdxl_4096x4096")])
def test_sdxl_right_size_and_deterministic(load_checkpoint, txt2img, per_side, preset):
    load_checkpoint("tiny-sdxl")
    size = 256 * per_side
    runs = [txt2img(width=size, height=size, steps=3, alwayson_scripts=scalefusion(native_size=256)) for _ in range(2)]
    assert runs[0].status == 200 and runs[0].size == (size, size)
    assert runs[0].params()["ScaleCrafter preset"] == preset
    assert np.array_equal(runs[0].image, runs[1].image)


def test_positional_args_in_ui_order(txt2img):
    dict_form = txt2img(width=512, height=512, alwayson_scripts=scalefusion(native_size=128, dilation_multiplier=0.75))
    positional = txt2img(width=512, height=512,
                         alwayson_scripts={"ScaleFusion": {"args": [True, "scalecrafter", 128, 0.75]}})
    assert positional.status == 200 and np.array_equal(dict_form.image, positional.image)
    assert positional.params()["ScaleCrafter multiplier"] == "0.75"


def test_script_info_lists_every_setting(api):
    info = [s for s in api.get("/sdapi/v1/script-info").json() if s["name"] == "scalefusion" and not s["is_img2img"]]
    assert len(info) == 1 and len(info[0]["args"]) == len(FIELDS)


@pytest.mark.parametrize("args,field", [
    ([{"enabled": True, "dilation_multiplier": 9}], "dilation_multiplier must be a number in [0.1, 4]; got 9"),
    ([{"enabled": True, "method": "Tiled"}], "method must be one of"),
    ([{"enabled": "yes"}], "enabled must be true or false"),
    ([{"enabled": True, "tau": 30}], "unknown key(s) 'tau'"),
    ([True, "ScaleCrafter", 0, "lots"], "dilation_multiplier must be a number in [0.1, 4]; got 'lots' (positional argument 3)"),
])
def test_bad_settings_answer_422_naming_the_field(webui, txt2img, fresh_plain, args, field):
    result = txt2img(alwayson_scripts={"ScaleFusion": {"args": args}})
    assert result.status == 422 and field in result.json["detail"], result.json
    assert_clean(webui, txt2img, fresh_plain)


def test_a_size_the_engine_cannot_plan_is_refused_before_sampling(webui, txt2img, fresh_plain):
    result = txt2img(width=8256, height=64, steps=1, alwayson_scripts=scalefusion())
    assert result.status == 422 and "width must be a multiple of 8 from 64 to 8192" in result.json["detail"]
    assert_clean(webui, txt2img, fresh_plain)


def test_an_error_during_sampling_leaves_nothing_behind(webui, txt2img, fresh_plain):
    unet = webui.sd_model.model.diffusion_model
    calls = []

    def fail_on_third_call(module, args):
        calls.append(sum("_conv_forward" in vars(m) for m in unet.modules()))
        if len(calls) == 3:
            raise RuntimeError("injected failure")

    handle = unet.register_forward_pre_hook(fail_on_third_call)
    try:
        result = txt2img(width=512, height=512, alwayson_scripts=scalefusion(native_size=128))
    finally:
        handle.remove()
    assert result.status == 500 and "injected failure" in result.json["errors"]
    assert calls[0] > 0  # the hooks were installed when it failed
    assert_clean(webui, txt2img, fresh_plain)


def test_an_interrupt_returns_an_image_and_leaves_nothing_behind(webui, api, txt2img, fresh_plain):
    from modules import shared

    results = []
    worker = threading.Thread(target=lambda: results.append(
        txt2img(width=512, height=512, steps=30, alwayson_scripts=scalefusion(native_size=128))))
    worker.start()
    deadline = time.time() + 600
    while shared.state.sampling_step < 2 and worker.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    api.post("/sdapi/v1/interrupt")
    worker.join()
    assert results[0].status == 200 and results[0].size == (512, 512)
    assert_clean(webui, txt2img, fresh_plain)


def test_lora_and_controlnet_together_with_scalecrafter(webui, api, txt2img):
    if "controlnet" not in [s["name"] for s in api.get("/sdapi/v1/script-info").json()]:
        pytest.skip("sd-webui-controlnet is not installed in this WebUI")
    unit = {"enabled": True, "module": "none", "model": "control_tiny_sd15_random", "weight": 1.0,
            "image": gradient_png(512)}
    both = dict(prompt="a cat <lora:tiny:1>", width=512, height=512,
                alwayson_scripts={**scalefusion(native_size=128), "controlnet": {"args": [unit]}})
    result = txt2img(**both)
    assert result.status == 200 and result.size == (512, 512)
    params = result.params()
    assert "ControlNet 0" in params and "Lora hashes" in params and params["ScaleCrafter preset"] == "sd1.5_2048x2048"
    without_cn = txt2img(**{**both, "alwayson_scripts": scalefusion(native_size=128)})
    without_lora = txt2img(**{**both, "prompt": "a cat"})
    assert not np.array_equal(result.image, without_cn.image)
    assert not np.array_equal(result.image, without_lora.image)
    # ControlNet's own model is never dilated
    cn_model = next(m for name, m in webui.sd_model.named_modules() if name.endswith("control_model")) \
        if any(name.endswith("control_model") for name, _ in webui.sd_model.named_modules()) else None
    if cn_model is not None:
        assert not any("_conv_forward" in vars(m) for m in cn_model.modules())


def test_every_sampler_completes(api, txt2img):
    names = [s["name"] for s in api.get("/sdapi/v1/samplers").json()]
    assert len(names) >= 10
    failures = {}
    for name in names:
        result = txt2img(sampler_name=name, steps=3, width=512, height=512,
                         alwayson_scripts=scalefusion(native_size=128))  # 4x: noise-damped CFG is active
        if result.status != 200 or result.size != (512, 512):
            failures[name] = result.json
    assert not failures


def test_img2img(img2img):
    init = gradient_png(512)
    result = img2img(init_images=[init], denoising_strength=0.75, width=512, height=512,
                     alwayson_scripts=scalefusion(native_size=128))
    assert result.status == 200 and result.size == (512, 512)
    assert result.params()["ScaleCrafter preset"] == "sd1.5_2048x2048"


@pytest.mark.parametrize("passes,keys", [("both", {"ScaleCrafter preset", "ScaleCrafter hires preset"}),
                                         ("first", {"ScaleCrafter preset"}),
                                         ("hires", {"ScaleCrafter hires preset"})])
def test_hires_fix_passes_each_with_its_own_plan(txt2img, passes, keys):
    result = txt2img(width=256, height=256, enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.7,
                     alwayson_scripts=scalefusion(native_size=128, passes=passes))
    assert result.status == 200 and result.size == (512, 512)
    params = result.params()
    assert {k for k in params if k.startswith("ScaleCrafter") and k.endswith("preset")} == keys
    if "ScaleCrafter hires preset" in keys:
        assert params["ScaleCrafter hires preset"] == "sd1.5_2048x2048"


def test_pasted_infotext_reproduces_the_image_and_plain_infotext_leaves_it_off(txt2img, fresh_plain):
    crafted = txt2img(width=512, height=512, alwayson_scripts=scalefusion(native_size=128, dilation_multiplier=1.5,
                                                                          noise_damped_cfg="off"))
    pasted = txt2img(infotext=crafted.infotext, width=512, height=512)  # request fields win over the infotext
    assert pasted.status == 200 and np.array_equal(pasted.image, crafted.image)
    assert pasted.params()["ScaleCrafter multiplier"] == "1.5"
    plain = txt2img(infotext=fresh_plain.infotext)
    assert np.array_equal(plain.image, fresh_plain.image) and "ScaleFusion" not in plain.params()


def test_xyz_plot_axis(api, txt2img):
    scripts = api.get("/sdapi/v1/script-info").json()
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = xyz["args"][0]["choices"]
    axis = labels.index("[ScaleFusion] ScaleCrafter Dilation multiplier")
    nothing = labels.index("Nothing")
    args = [axis, "1, 2", [], nothing, "", [], nothing, "", [],
            True, True, False, False, False, False, False, 0, False]  # legend, lone images, ...
    result = txt2img(width=512, height=512, steps=2, script_name="x/y/z plot", script_args=args,
                     alwayson_scripts=scalefusion(native_size=128))
    assert result.status == 200, result.json
    assert len(result.images) == 3  # the grid and the two cells
    multipliers = [p.split("ScaleCrafter multiplier: ")[1].split(",")[0]
                   for p in json.loads(result.json["info"])["infotexts"][1:]]
    assert multipliers == ["1", "2"]
    assert not np.array_equal(result.images[1], result.images[2])
