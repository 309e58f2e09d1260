"""Large outputs in a real WebUI: 2048² SDXL in both modes completes on a CPU machine, tiled decodes,
small live previews, and the peak resident memory of the process for each."""
import numpy as np
import pytest

from tests.integration.test_api_demofusion import demofusion
from tests.integration.test_api_scalecrafter import assert_clean, scalefusion

pytestmark = pytest.mark.usefixtures("fresh_plain")
GIB = 2 ** 30


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


@pytest.fixture
def peak_rss(capsys):
    """Peak resident memory of this process (the WebUI) during the test; printed with the test's name."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pytest.skip("peak RSS cannot be reset on this system")
    readings = {}
    yield readings
    readings["peak"] = _status_bytes("VmHWM:")
    with capsys.disabled():
        print(f"\n  peak RSS of the WebUI process: {readings['peak'] / GIB:.2f} GiB ({readings.get('what', '')})")


def _layer_inputs(webui, part: str):
    """Sizes the first layer of the VAE's ``part`` is given: the decoder or encoder module itself is entered
    with the whole input and runs its layers tile by tile."""
    seen = []
    handle = getattr(webui.sd_model.first_stage_model, part).conv_in.register_forward_pre_hook(
        lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    return seen, handle


@pytest.fixture
def decoder_inputs(webui):
    """Latent sizes the VAE decoder's layers are given during the test."""
    seen, handle = _layer_inputs(webui, "decoder")
    yield seen
    handle.remove()


@pytest.fixture
def encoder_inputs(webui):
    """Image sizes the VAE encoder's layers are given during the test."""
    seen, handle = _layer_inputs(webui, "encoder")
    yield seen
    handle.remove()


@pytest.fixture
def sdxl(load_checkpoint):
    return load_checkpoint("tiny-sdxl")


def test_sdxl_scalecrafter_at_2048(sdxl, webui, txt2img, peak_rss, decoder_inputs):
    result = txt2img(width=2048, height=2048, steps=2, alwayson_scripts=scalefusion(method="ScaleCrafter"))
    peak_rss["what"] = "tiny SDXL, ScaleCrafter, 2048x2048, 2 Euler steps"
    assert result.status == 200, result.json
    assert result.size == (2048, 2048)
    assert max(max(s) for s in decoder_inputs) < 256  # the 256² latent was never decoded whole
    assert _status_bytes("VmHWM:") < 22 * GIB  # what a 24 GB machine leaves the WebUI


def test_sdxl_demofusion_x2_from_1024(sdxl, webui, txt2img, peak_rss, decoder_inputs):
    result = txt2img(width=1024, height=1024, steps=2,
                     alwayson_scripts=scalefusion(method="DemoFusion", scale=2, view_batch=4))
    peak_rss["what"] = "tiny SDXL, DemoFusion x2 from 1024x1024, 2 Euler steps per stage"
    assert result.status == 200, result.json
    assert result.size == (2048, 2048)
    assert max(max(s) for s in decoder_inputs) < 256
    assert _status_bytes("VmHWM:") < 22 * GIB  # what a 24 GB machine leaves the WebUI


def test_sdxl_img2img_at_2048_encodes_in_tiles(sdxl, webui, img2img, peak_rss, encoder_inputs, decoder_inputs):
    """The init image is encoded in p.init, before any sampling: in tiles, with whole-image GroupNorms."""
    from tests.integration.conftest import gradient_png

    result = img2img(init_images=[gradient_png(2048)], width=2048, height=2048, steps=2, denoising_strength=0.5,
                     alwayson_scripts=scalefusion(method="ScaleCrafter"))
    peak_rss["what"] = "tiny SDXL, img2img 2048x2048 ScaleCrafter, 2 Euler steps at strength 0.5"
    assert result.status == 200, result.json
    assert result.size == (2048, 2048)
    assert len(encoder_inputs) > 2 and max(max(s) for s in encoder_inputs) <= 1024  # tiles of at most 1024 px
    assert max(max(s) for s in decoder_inputs) <= 128
    assert "forward" not in vars(webui.sd_model.first_stage_model.encoder)
    assert _status_bytes("VmHWM:") < 22 * GIB


def test_sdxl_hires_lanczos_1024_to_2048_encodes_in_tiles(sdxl, webui, txt2img, peak_rss, encoder_inputs,
                                                         decoder_inputs):
    """The Hires. fix encodes the Lanczos-upscaled first pass inside p.sample: in tiles too."""
    result = txt2img(width=1024, height=1024, steps=2, enable_hr=True, hr_scale=2, hr_upscaler="Lanczos",
                     denoising_strength=0.5, hr_second_pass_steps=2, alwayson_scripts=scalefusion(method="ScaleCrafter"))
    peak_rss["what"] = "tiny SDXL, Hires. fix 1024 -> 2048 (Lanczos), ScaleCrafter, 2 + 2 Euler steps"
    assert result.status == 200, result.json
    assert result.size == (2048, 2048)
    assert len(encoder_inputs) > 2 and max(max(s) for s in encoder_inputs) <= 1024
    assert max(max(s) for s in decoder_inputs) <= 128
    assert "forward" not in vars(webui.sd_model.first_stage_model.encoder)
    assert _status_bytes("VmHWM:") < 22 * GIB


@pytest.fixture
def previews(webui):
    """Calls the progress thread's preview decode after every CFG step; collects the preview sizes."""
    from modules import script_callbacks

    sizes = []

    def preview_now(params):
        webui.state.do_set_current_image()
        sizes.append(webui.state.current_image.size)

    script_callbacks.on_cfg_after_cfg(preview_now)
    yield sizes
    script_callbacks.remove_callbacks_for_function(preview_now)


def test_live_previews_decode_a_downscaled_latent(txt2img, previews, decoder_inputs):
    result = txt2img(width=1536, height=1024, steps=2, override_settings={"show_progress_type": "Full"},
                     alwayson_scripts=scalefusion(method="ScaleCrafter"))
    assert result.status == 200, result.json
    assert previews and set(previews) == {(1024, 680)}  # 192x128 latent shown as 128x85
    assert (85, 128) in decoder_inputs


def test_plain_previews_are_untouched(txt2img, previews):
    assert txt2img(width=1536, height=1024, steps=1, override_settings={"show_progress_type": "Full"}).status == 200
    assert set(previews) == {(1536, 1024)}


def test_in_step_previews_of_medvram_are_decoded_small(webui, txt2img, decoder_inputs, monkeypatch):
    """--medvram/--lowvram decode the preview inside the step (store_latent), not in the progress thread."""
    monkeypatch.setattr(webui, "parallel_processing_allowed", False)  # what --medvram sets at start-up
    previews = {"show_progress_type": "Full", "live_previews_enable": True, "show_progress_every_n_steps": 1}
    result = txt2img(width=1536, height=1024, steps=2, override_settings=previews,
                     alwayson_scripts=scalefusion(method="ScaleCrafter"))
    assert result.status == 200, result.json
    assert (85, 128) in decoder_inputs and max(max(s) for s in decoder_inputs) <= 128  # tiles, small previews
    decoder_inputs.clear()
    assert txt2img(width=1536, height=1024, steps=2, override_settings=previews).status == 200
    assert (128, 192) in decoder_inputs  # the WebUI's own preview and decode, without ScaleFusion


def test_hires_first_pass_and_final_decode_are_tiled(webui, txt2img, decoder_inputs, fresh_plain):
    """A non-latent upscaler decodes the first pass inside p.sample: that decode is tiled as well."""
    tiny_tiles = {"scalefusion_decode_tile": 16}
    hires = dict(width=256, height=256, enable_hr=True, hr_scale=2, hr_upscaler="Lanczos", denoising_strength=0.5,
                 hr_second_pass_steps=2)
    tiled = txt2img(**hires, override_settings=tiny_tiles, alwayson_scripts=scalefusion(method="ScaleCrafter"))
    assert tiled.status == 200 and tiled.size == (512, 512)
    assert decoder_inputs and max(max(s) for s in decoder_inputs) <= 16
    decoder_inputs.clear()
    full = txt2img(**hires, alwayson_scripts=scalefusion(method="ScaleCrafter"))
    assert (32, 32) in decoder_inputs and (64, 64) in decoder_inputs
    difference = np.abs(tiled.image.astype(int) - full.image.astype(int))
    assert difference.mean() < 8  # the same image up to the blended seams of a random-weight VAE
    assert_clean(webui, txt2img, fresh_plain)


def test_the_decode_guard_is_gone_after_an_error(webui, txt2img, fresh_plain):
    from lib_hires.webui import decoding

    original = decoding.LargeOutputGuard._decode

    def failing(self, z, *args, **kwargs):
        raise RuntimeError("injected decode failure")

    decoding.LargeOutputGuard._decode = failing
    try:
        result = txt2img(width=256, height=256, enable_hr=True, hr_scale=2, hr_upscaler="Lanczos",
                         denoising_strength=0.5, alwayson_scripts=scalefusion(method="ScaleCrafter"))
    finally:
        decoding.LargeOutputGuard._decode = original
    assert result.status == 500 and "injected decode failure" in result.json["errors"]
    assert_clean(webui, txt2img, fresh_plain)
