"""Stage plan, settings and the cosine weights."""
import math

import pytest
import torch

from lib_hires.demofusion import (DemoFusionSettings, blur_weight, cosine_factor, default_settings, plan_stages,
                                  stage_dilation, step_weights)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_integer_scales_are_the_official_stages(scale):
    plan = plan_stages(1024, 1024, scale, window=128)
    assert [(st.factor, st.width, st.height, st.dilation) for st in plan.stages] == [
        (k, 1024 * k, 1024 * k, k if k > 1 else 1) for k in range(1, scale + 1)]
    assert all(st.sample_size == (128, 128) for st in plan.stages[1:])
    # demofusion.md §6.2: 13, 34, 65 model inputs per step at the official stages
    assert [st.views_per_step(128, 64) for st in plan.stages[1:]] == [13, 34, 65][:scale - 1]
    assert [st.model_calls_per_step(128, 64, 16) for st in plan.stages[1:]] == [1, 3, 5][:scale - 1]


def test_non_square_integer_stages_keep_the_aspect_ratio():
    plan = plan_stages(512, 768, 3, window=64)
    assert [(st.width, st.height, st.dilation) for st in plan.stages] == [(512, 768, 1), (1024, 1536, 2), (1536, 2304, 3)]
    assert plan.final.sample_size == (96, 64)


@pytest.mark.parametrize("base", [(512, 512), (512, 768), (1024, 576), (832, 1216), (520, 712)])
@pytest.mark.parametrize("scale", [1.5, 2.0, 2.5, 3.2, 3.7, 4.0])
def test_fractional_scales_and_any_aspect_ratio(base, scale):
    width, height = base
    plan = plan_stages(width, height, scale, window=64)
    stages = plan.stages
    assert len(stages) == math.ceil(scale) and stages[0].latent_size == (height // 8, width // 8)
    factors = [st.factor for st in stages]
    steps = [b - a for a, b in zip(factors, factors[1:])]
    assert max(steps) <= 1 + 1e-9 and max(steps) - min(steps) < 1e-9  # evenly spaced, no stage grows > 1 base
    assert factors[-1] == pytest.approx(scale)
    for st in stages[1:]:
        h, w = st.latent_size
        assert h % 8 == 0 and w % 8 == 0
        s = st.dilation
        # dilated samples stay between sqrt((s-1)/s) and sqrt((s+1)/s) of the base size
        assert s == stage_dilation(st.factor) and math.sqrt((s - 1) / s) <= st.factor / s < math.sqrt((s + 1) / s)
        if st is not stages[-1]:
            assert h % (8 * s) == 0 and w % (8 * s) == 0  # intermediate: whole dilated samples of 8k latent px
    h, w = plan.final.latent_size
    assert abs(h - scale * height / 8) <= 4 and abs(w - scale * width / 8) <= 4


def test_the_dilation_is_the_nearest_integer_on_a_log_scale():
    assert [stage_dilation(f) for f in (1.0, 1.4, 1.42, 2.0, 2.44, 2.45, 3.0, 3.46, 3.47, 4.0)] == \
        [1, 1, 2, 2, 2, 3, 3, 3, 4, 4]


def test_the_plan_describes_every_stage():
    text = plan_stages(512, 768, 2.5, window=64).describe()
    assert "512x768 x2.5 -> 1280x1920" in text and "plain sampling" in text
    assert len(text.splitlines()) == 2 + 3


@pytest.mark.parametrize("args,message", [
    ((1001, 512, 2), "width must be a positive multiple of 8"),
    ((512, 0, 2), "height must be a positive multiple of 8"),
    ((512, 512, 0.5), "scale must be a number from 1 to 8"),
    ((512, 512, 9), "scale must be a number from 1 to 8"),
])
def test_bad_plan_input_names_the_field(args, message):
    with pytest.raises(ValueError, match=message):
        plan_stages(*args, window=64)
    with pytest.raises(ValueError, match="stride must be an integer from 1 to the window 64"):
        plan_stages(512, 512, 2, window=64, stride=65)


def test_defaults_per_family():
    assert [(s.window, s.stride) for s in (default_settings("sd1"), default_settings("sd2"),
                                           default_settings("sd2", v_prediction=True), default_settings("sdxl"))] == \
        [(64, 32), (64, 32), (96, 48), (128, 64)]
    sdxl = default_settings("sdxl")
    assert (sdxl.cosine_scale_1, sdxl.cosine_scale_2, sdxl.cosine_scale_3, sdxl.sigma, sdxl.view_batch, sdxl.jitter) == \
        (3.0, 1.0, 1.0, 0.8, 16, True)
    with pytest.raises(ValueError, match="family must be one of"):
        default_settings("sd3")


@pytest.mark.parametrize("kwargs,message", [
    ({"window": 60}, "window must be a multiple of 8"),
    ({"stride": 65}, "stride must be an integer from 1 to 64"),
    ({"view_batch": 0}, "view_batch must be an integer from 1"),
    ({"cosine_scale_1": -1}, r"cosine_scale_1 must be a number in \[0, 10\]"),
    ({"sigma": 0}, r"sigma must be a number in \(0, 10\]"),
    ({"jitter": 1}, "jitter must be true or false"),
])
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DemoFusionSettings(**kwargs)


def test_the_weights_along_the_official_trajectory():
    # demofusion.md §1.10 (SDXL, 50 leading steps, α = 3/1/1)
    table = {981: (0.999, 0.997, 0.999), 801: (0.905, 0.742, 0.906), 501: (0.502, 0.126, 0.507),
             201: (0.096, 0.001, 0.105), 1: (0.000, 0.000, 0.010)}
    for t, (cf, c1, c3) in table.items():
        w = step_weights(float(t))
        assert (round(cosine_factor(float(t)), 3), round(w.c1, 3), round(w.c3, 3)) == (cf, c1, c3)
        assert w.c2 == cosine_factor(float(t))
    rows = step_weights(torch.tensor([981.0, 501.0]))
    torch.testing.assert_close(rows.c1, torch.tensor([step_weights(981.0).c1, step_weights(501.0).c1]))
    assert cosine_factor(0.0) == 0.0 and cosine_factor(1000.0) == 1.0 and blur_weight(0.0, 1.0) == 0.01
