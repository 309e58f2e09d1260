"""ScaleCrafter in WebUI configurations off the default path: checkpoint switches inside a job (hires checkpoint,
refiner), fp8 storage, lora_functional, override_settings of the defaults, X/Y/Z cells, TAESD previews in-step."""
import json

import numpy as np
import pytest

from tests.integration.test_api_scalecrafter import assert_clean, scalefusion

pytestmark = pytest.mark.usefixtures("fresh_plain")
SC_2X = dict(method="ScaleCrafter", native_size=128)  # 256 px: the official 2x preset on the tiny SD1


@pytest.fixture
def sampling_record(webui):
    """One entry per CFG denoiser call (after the extension's own callback): hires pass?, the checkpoint that
    samples, and whether that model's UNet has re-dilation hooks installed."""
    from modules import script_callbacks

    record = []

    def note(params):
        model = webui.sd_model
        unet = model.model.diffusion_model
        record.append((bool(getattr(params.denoiser.p, "is_hr_pass", False)), model.sd_checkpoint_info.name_for_extra,
                       any("_conv_forward" in vars(m) for m in unet.modules())))

    script_callbacks.on_cfg_denoiser(note)
    yield record
    script_callbacks.remove_callbacks_for_function(note)


HIRES = dict(width=128, height=128, steps=2, enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.6,
             hr_second_pass_steps=2)


@pytest.mark.parametrize("limit", [1, 2], ids=["same model object", "new model object"])
def test_a_hires_pass_on_another_checkpoint_is_re_dilated(webui, txt2img, fresh_plain, perturbed_checkpoint,
                                                           sampling_record, limit):
    switch = dict(HIRES, hr_checkpoint_name=perturbed_checkpoint, override_settings={"sd_checkpoints_limit": limit})
    plain = txt2img(**switch)
    assert plain.status == 200, plain.json
    sampling_record.clear()
    crafted = txt2img(**switch, alwayson_scripts=scalefusion(**SC_2X, passes="hires"))
    assert crafted.status == 200, crafted.json
    hires = [entry for entry in sampling_record if entry[0]]
    assert hires and all(name == perturbed_checkpoint and hooked for _, name, hooked in hires)
    assert not any(hooked for is_hr, _, hooked in sampling_record if not is_hr)  # passes: hires
    params = crafted.params()
    assert params["ScaleCrafter hires preset"] == "sd1.5_1024x1024" and params["Hires checkpoint"]
    assert crafted.size == plain.size == (256, 256)
    assert not np.array_equal(crafted.image, plain.image)
    assert_clean(webui, txt2img, fresh_plain)


@pytest.mark.parametrize("limit", [1, 2], ids=["same model object", "new model object"])
def test_the_refiner_samples_re_dilated(webui, txt2img, fresh_plain, perturbed_checkpoint, sampling_record, limit):
    refined = dict(width=256, height=256, steps=4, refiner_checkpoint=perturbed_checkpoint, refiner_switch_at=0.5,
                   override_settings={"sd_checkpoints_limit": limit})
    result = txt2img(**refined, alwayson_scripts=scalefusion(**SC_2X, noise_damped_cfg="on"))
    assert result.status == 200, result.json
    names = [name for _, name, _ in sampling_record]
    assert names[0] != perturbed_checkpoint and names[-1] == perturbed_checkpoint  # the refiner took over
    assert all(hooked for _, _, hooked in sampling_record)  # before and after the switch
    params = result.params()
    assert params["Refiner"].startswith(perturbed_checkpoint) and params["ScaleCrafter preset"] == "sd1.5_1024x1024"
    if limit > 1:
        assert params["ScaleCrafter refiner preset"] == "sd1.5_1024x1024"
    plain_refined = txt2img(**refined)
    assert plain_refined.status == 200 and not np.array_equal(result.image, plain_refined.image)
    assert_clean(webui, txt2img, fresh_plain)


def test_an_override_of_a_default_applies_to_that_request_only(webui, txt2img, fresh_plain):
    request = dict(width=256, height=256, steps=2, alwayson_scripts=scalefusion(native_size=128))
    default = txt2img(**request)
    overridden = txt2img(**request, override_settings={"scalefusion_default_dilation_multiplier": 1.5})
    again = txt2img(**request)
    assert default.status == overridden.status == again.status == 200, overridden.json
    assert default.params()["ScaleCrafter multiplier"] == again.params()["ScaleCrafter multiplier"] == "1"
    assert overridden.params()["ScaleCrafter multiplier"] == "1.5"
    assert not np.array_equal(default.image, overridden.image) and np.array_equal(default.image, again.image)
    bad = txt2img(**request, override_settings={"scalefusion_default_noise_damped_cfg": "sometimes"})
    assert bad.status == 422 and "scalefusion_default_noise_damped_cfg" in bad.json["detail"]
    assert_clean(webui, txt2img, fresh_plain)


def test_xyz_cells_each_describe_only_themselves(api, txt2img):
    scripts = api.get("/sdapi/v1/script-info").json()
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = xyz["args"][0]["choices"]
    method, nothing = labels.index("[ScaleFusion] Method"), labels.index("Nothing")
    enabled = labels.index("[ScaleFusion] Enabled")
    # choice axes take their values from the dropdown lists (csv_mode off)
    args = [enabled, "", ["True", "False"], method, "", ["ScaleCrafter", "DemoFusion"], nothing, "", [],
            True, True, False, False, False, False, False, 0, False]
    result = txt2img(width=256, height=256, steps=1, script_name="x/y/z plot", script_args=args,
                     alwayson_scripts=scalefusion(native_size=128, scale=1.5))
    assert result.status == 200, result.json
    cells = json.loads(result.json["info"])["infotexts"][1:]
    assert len(cells) == 4  # (True, ScaleCrafter), (False, ScaleCrafter), (True, DemoFusion), (False, DemoFusion)
    assert "ScaleFusion: ScaleCrafter" in cells[0] and "ScaleCrafter preset" in cells[0]
    assert "ScaleFusion" not in cells[1] and "ScaleCrafter" not in cells[1] and "DemoFusion" not in cells[1]
    assert "ScaleFusion: DemoFusion" in cells[2] and "ScaleCrafter preset" not in cells[2]
    assert "ScaleFusion" not in cells[3] and "DemoFusion" not in cells[3]


def test_in_step_taesd_previews_of_medvram_are_decoded_small(webui, txt2img, monkeypatch, fresh_plain):
    """--medvram/--lowvram decode the preview inside the step; with TAESD that goes through its own decoder."""
    from types import SimpleNamespace

    from modules import sd_vae_taesd

    decoder = sd_vae_taesd.decoder()  # random weights: the real ones are a download
    seen = []  # what the decoder's first layer is given (the patched forward shrinks before it)
    decoder[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    monkeypatch.setitem(sd_vae_taesd.sd_vae_taesd_models, "taesd_decoder.pth", SimpleNamespace(decoder=decoder))
    monkeypatch.setattr(webui, "parallel_processing_allowed", False)  # what --medvram sets at start-up
    previews = {"show_progress_type": "TAESD", "live_previews_enable": True, "show_progress_every_n_steps": 1}
    result = txt2img(width=1536, height=1024, steps=2, override_settings=previews,
                     alwayson_scripts=scalefusion(method="ScaleCrafter"))
    assert result.status == 200, result.json
    assert seen == [(85, 128), (85, 128)]  # a 128x192 latent, shrunk to 128 px on its long side
    assert "forward" not in vars(decoder)
    seen.clear()
    assert txt2img(width=1536, height=1024, steps=1, override_settings=previews).status == 200
    assert seen == [(128, 192)]  # the WebUI's own preview without ScaleFusion
    assert_clean(webui, txt2img, fresh_plain)


def test_lora_functional_gives_the_merged_image(webui, txt2img, fresh_plain):
    import sys

    from modules import shared

    # The WebUI restores only the overridden options already in opts.data (processing.process_images'
    # stored_opts): a default-valued lora_functional stays True after the request and leaks into later tests.
    saved_options = dict(shared.opts.data)
    lora = dict(prompt="a cat <lora:tiny:1>", width=256, height=256, steps=3,
                alwayson_scripts=scalefusion(**SC_2X, dispersion=True))
    try:
        merged = txt2img(**lora)
        functional = txt2img(**lora, override_settings={"lora_functional": True})
        assert merged.status == functional.status == 200, functional.json
        without = txt2img(**{**lora, "prompt": "a cat"})
        assert not np.array_equal(merged.image, without.image)  # the LoRA changes the image
        difference = np.abs(merged.image.astype(int) - functional.image.astype(int))
        assert difference.max() <= 2, difference.max()  # the same image up to float rounding
        from tests.integration.test_api_scalecrafter import hooks_left
        assert hooks_left(webui) == 0
        networks = sys.modules["networks"]
        assert not any("forward" in vars(m) for n in networks.loaded_networks for m in n.modules.values())
    finally:
        # Not ScaleFusion's: the same three requests without it leave the text encoder's LoRA merge behind too
        # (the functional request takes its conds from the cache, so the text encoder's merged weights are never
        # restored there) and the next plain image a level off; reload and forget the cached conds.
        reload_exact_weights()
        shared.opts.data.clear()
        shared.opts.data.update(saved_options)
    assert_clean(webui, txt2img, fresh_plain)


@pytest.mark.runs_last
def test_fp8_storage_with_dispersion(webui, txt2img):
    """fp8 storage on a CPU computes under a bfloat16 autocast; dispersion used to crash there.

    Runs last: entering and leaving fp8 the WebUI passes the model through half() (``load_model_weights``), and
    the plain images after it are no longer bit-identical to a fresh server's, with or without ScaleFusion. That
    nothing of ours is left is checked inside fp8: the plain fp8 image before and after is the same."""
    from tests.integration.test_api_scalecrafter import hooks_left

    fp8 = dict(width=256, height=256, steps=2, override_settings={"fp8_storage": "Enable"})
    try:
        plain = txt2img(**fp8)
        result = txt2img(**fp8, alwayson_scripts=scalefusion(**SC_2X, dispersion=True))
        assert result.status == 200, result.json
        assert result.params().get("FP8 weight") == "Enable" and result.params()["ScaleCrafter dispersion"] == "True"
        assert not np.array_equal(result.image, plain.image)
        assert hooks_left(webui) == 0
        again = txt2img(**fp8)
        assert again.status == 200 and np.array_equal(again.image, plain.image)
    finally:
        assert txt2img().status == 200  # back out of fp8
        reload_exact_weights()


def reload_exact_weights():
    """The checkpoint's weights from the file again, and no conds cached from before."""
    from modules import processing, sd_models

    sd_models.reload_model_weights(forced_reload=True)
    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]
