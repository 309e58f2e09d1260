"""DemoFusion's speed levers in the real WebUI: stage strength, stage plan, later steps (API, infotext, progress).

``native_size=128`` gives the tiny checkpoints a window of 16 latent px; a 128 px first stage is one window, as
the official pipeline's base image is, so x4 runs the official geometry (13, 34, 65 views) in seconds.
"""
import numpy as np
import pytest

from lib_hires.settings import FIELDS, ScaleFusionSettings
from tests.integration.test_api_scalecrafter import assert_clean, scalefusion

pytestmark = pytest.mark.usefixtures("fresh_plain")

OLD_FIELD_COUNT = 19  # the positional API before stage_strength, stages and later_steps


def demofusion(**settings):
    return scalefusion(method="DemoFusion", native_size=128, **settings)


def positional(settings: ScaleFusionSettings, count: int | None = None):
    return {"ScaleFusion": {"args": settings.ui_values()[:count]}}


@pytest.fixture
def first_sigmas(monkeypatch):
    """(pass, step, sigma) of every sampler step, recorded at the WebUI's own step callback."""
    from modules import sd_samplers_common, shared

    class Seen(list):
        job_counts: list = []

    seen = Seen()
    seen.job_counts = []
    original = sd_samplers_common.Sampler.callback_state

    def spy(self, d):
        if d["i"] == 0:
            seen.append([])
            seen.job_counts.append(shared.state.job_count)
        seen[-1].append(float(d["sigma"]))
        return original(self, d)

    monkeypatch.setattr(sd_samplers_common.Sampler, "callback_state", spy)
    return seen


def test_the_partial_step_rule_is_the_webuis(webui, monkeypatch):
    from modules import sd_samplers_common
    from types import SimpleNamespace

    from lib_hires.demofusion import partial_steps

    for fix in (False, True):
        monkeypatch.setitem(webui.opts.data, "img2img_fix_steps", fix)
        for steps in (1, 4, 20, 33, 150):
            for strength in (0.05, 0.3, 0.6, 0.75, 0.999, 1.0):
                p = SimpleNamespace(steps=steps, denoising_strength=strength)
                assert partial_steps(steps, strength, fixed_steps=True) == \
                    sd_samplers_common.setup_img2img_steps(p, steps)
                assert partial_steps(steps, strength, fixed_steps=fix) == sd_samplers_common.setup_img2img_steps(p)


def test_a_later_stage_starts_where_the_hires_pass_starts(txt2img, first_sigmas):
    hires = txt2img(width=128, height=128, steps=6, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                    hr_second_pass_steps=4, denoising_strength=0.6)
    assert hires.status == 200, hires.json
    _, hires_pass = first_sigmas
    first_sigmas.clear()
    stage = txt2img(width=128, height=128, steps=6, alwayson_scripts=demofusion(scale=2, stage_strength=0.6,
                                                                                later_steps=4))
    assert stage.status == 200 and stage.size == (256, 256)
    first, later = first_sigmas
    assert len(first) == 6 and later == hires_pass and len(later) == 4
    first_sigmas.clear()
    # the defaults: the official full schedule in every stage
    assert txt2img(width=128, height=128, steps=6, alwayson_scripts=demofusion(scale=2)).status == 200
    assert first_sigmas[0] == first_sigmas[1] and len(first_sigmas[1]) == 6


def test_dict_and_positional_forms_and_old_length_positional_calls(txt2img):
    settings = ScaleFusionSettings(enabled=True, method="DemoFusion", native_size=128, scale=4, stage_strength=0.6,
                                   stages="2, 4", later_steps=2)
    by_dict = txt2img(width=128, height=128, steps=3, alwayson_scripts=demofusion(
        scale=4, stage_strength=0.6, stages="2, 4", later_steps=2))
    assert by_dict.status == 200 and by_dict.size == (512, 512), by_dict.json
    params = by_dict.params()
    assert (params["DemoFusion stages"], params["DemoFusion stage strength"], params["DemoFusion later steps"]) == \
        ("2, 4", "0.6", "2")
    by_position = txt2img(width=128, height=128, steps=3, alwayson_scripts=positional(settings))
    assert by_position.status == 200 and np.array_equal(by_position.image, by_dict.image)
    # a call written before the three fields existed: the defaults, i.e. today's image
    old = settings.replace(stage_strength=1.0, stages="", later_steps=0, scale=2)
    assert len(FIELDS) == OLD_FIELD_COUNT + 3
    old_call = txt2img(width=128, height=128, steps=3, alwayson_scripts=positional(old, OLD_FIELD_COUNT))
    new_call = txt2img(width=128, height=128, steps=3, alwayson_scripts=demofusion(scale=2))
    assert old_call.status == 200 and np.array_equal(old_call.image, new_call.image)


def test_pasting_the_infotext_reproduces_the_image(txt2img):
    from modules import infotext_utils

    first = txt2img(width=128, height=128, steps=4, alwayson_scripts=demofusion(
        scale=3.2, stages="1.5, 2.5, 3.2", stage_strength=0.7, later_steps=3))
    assert first.status == 200, first.json
    # the request's own fields win over the infotext's, so the base request is the first one's (PLAIN has 256 px)
    pasted = txt2img(width=128, height=128, steps=4, infotext=first.infotext)
    assert pasted.status == 200 and pasted.size == first.size and np.array_equal(pasted.image, first.image)
    parsed = ScaleFusionSettings.from_infotext(infotext_utils.parse_generation_parameters(first.infotext))
    assert (parsed.stages, parsed.stage_strength, parsed.later_steps) == ("1.5, 2.5, 3.2", 0.7, 3)


@pytest.mark.parametrize("settings,message", [
    ({"scale": 4, "stages": "2, 3"}, "the last scale must equal Scale (4); got 3"),
    ({"scale": 4, "stages": "4"}, "each stage may be at most 2x the one before"),
    ({"scale": 4, "stages": "2, four"}, "'four' is not a number"),
    ({"stage_strength": 0}, "stage_strength must be a number in (0, 1]; got 0"),
    ({"later_steps": -2}, "later_steps must be an integer in [0, 150]; got -2"),
])
def test_bad_stage_settings_answer_422(webui, txt2img, fresh_plain, settings, message):
    result = txt2img(alwayson_scripts=demofusion(**settings))
    assert result.status == 422 and message in result.json["detail"], result.json
    assert_clean(webui, txt2img, fresh_plain)


def test_progress_counts_the_steps_of_later_stages(webui, txt2img, first_sigmas, monkeypatch):
    totals = []
    original = webui.total_tqdm.updateTotal
    monkeypatch.setattr(webui.total_tqdm, "updateTotal", lambda total: (totals.append(total), original(total)))
    result = txt2img(width=128, height=128, steps=5, n_iter=2, alwayson_scripts=demofusion(
        scale=3, stage_strength=0.5, later_steps=2))
    assert result.status == 200 and len(result.images) == 2
    assert [len(steps) for steps in first_sigmas] == [5, 2, 2] * 2
    assert totals[-1] == 2 * (5 + 2 + 2) == sum(map(len, first_sigmas))
    assert set(first_sigmas.job_counts) == {2 * 3}


def test_img2img_later_stages_start_at_the_lower_strength_with_img2imgs_step_rule(img2img, first_sigmas):
    from tests.integration.conftest import gradient_png

    init = gradient_png(128)
    plain = img2img(init_images=[init], width=128, height=128, steps=4, denoising_strength=0.5)
    assert plain.status == 200
    (plain_pass,) = first_sigmas
    first_sigmas.clear()
    staged = img2img(init_images=[init], width=128, height=128, steps=4, denoising_strength=0.8,
                     alwayson_scripts=demofusion(scale=2, stage_strength=0.5))
    assert staged.status == 200 and staged.size == (256, 256)
    (stage_2,) = first_sigmas  # stage 1 is the encoded input image: not sampled
    assert stage_2 == plain_pass and len(stage_2) == int(0.5 * 4) + 1
