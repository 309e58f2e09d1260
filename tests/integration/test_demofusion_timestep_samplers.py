"""DemoFusion on the WebUI's timestep samplers (issue 21), through the real API: DDIM, DDIM CFG++, PLMS and
UniPC run in txt2img and img2img at the final size, their infotext pastes back to the same image, and the next
plain image is unchanged."""
import numpy as np
import pytest

from tests.integration.conftest import gradient_png
from tests.integration.test_api_demofusion import demofusion
from tests.integration.test_api_scalecrafter import assert_clean

pytestmark = pytest.mark.usefixtures("fresh_plain")

TIMESTEP_SAMPLERS = ["DDIM", "DDIM CFG++", "PLMS", "UniPC"]


@pytest.mark.parametrize("sampler", TIMESTEP_SAMPLERS)
def test_txt2img_final_size_paste_back_and_a_clean_server(webui, txt2img, fresh_plain, sampler):
    first = txt2img(sampler_name=sampler, steps=6, alwayson_scripts=demofusion(scale=2, cosine_scale_2=0.5))
    assert first.status == 200, first.json
    assert first.size == (512, 512)
    assert first.params()["Sampler"] == sampler
    # the API takes from an infotext only what the request leaves out: the sampler and steps are in PLAIN
    pasted = txt2img(infotext=first.infotext, sampler_name=sampler, steps=6)
    assert pasted.status == 200 and pasted.size == first.size
    assert np.array_equal(pasted.image, first.image)
    plain = txt2img(sampler_name=sampler, steps=6)
    assert plain.status == 200 and plain.size == (256, 256)
    assert_clean(webui, txt2img, fresh_plain)


@pytest.mark.parametrize("sampler", TIMESTEP_SAMPLERS)
def test_img2img_upscales_the_input(webui, img2img, txt2img, fresh_plain, sampler):
    result = img2img(init_images=[gradient_png(128)], denoising_strength=0.6, sampler_name=sampler, steps=6,
                     width=128, height=128, alwayson_scripts=demofusion(scale=2))
    assert result.status == 200, result.json
    assert result.size == (256, 256) and result.params()["DemoFusion final size-1"] == "256"
    assert result.params()["Sampler"] == sampler and result.params()["ScaleFusion"] == "DemoFusion"
    # (no repeat-equality here: the WebUI's img2img encode samples the VAE posterior from the global RNG, so two
    # identical img2img requests differ slightly with any sampler, Euler included)
    assert_clean(webui, txt2img, fresh_plain)
