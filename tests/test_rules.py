"""Presets for sizes that are not official, and the user's overrides."""
import pytest

from lib_hires.scalecrafter import ScaleCrafterSettings, SettingsError, build_plan, preset_for, resolve_dilations
from lib_hires.scalecrafter.presets import OFFICIAL, rule_preset


def inner(plan, t=981):
    return plan.main_at(t).get("middle_block.0.in_layers.2", 1.0)


def test_at_or_below_the_training_size_nothing_is_dilated(family):
    size = 1024 if family == "sdxl" else 512
    for w, h in ((size, size), (size // 2, size), (size + 8, size // 2)):
        plan = build_plan(family, w, h)
        assert plan.is_noop and not plan.main_at(981) and plan.base_at(981) is None


def test_factors_grow_smoothly_with_the_size(family):
    train = 1024 if family == "sdxl" else 512
    sizes = range(train + 64, 4 * train + 1, 64)
    factors = [inner(build_plan(family, s, s)) for s in sizes]
    assert all(b >= a for a, b in zip(factors, factors[1:]))
    assert factors[-1] == 4.0
    # linear in s between anchors: no jump larger than one 64-px step can explain
    assert max(b - a for a, b in zip(factors, factors[1:])) <= 4.0 * 64 / train + 1e-9


def test_official_anchors_are_reached_continuously():
    assert inner(build_plan("sd1", 1032, 1032)) == pytest.approx(2.0 + 0.5 * (8 / 256), abs=1e-9)
    assert inner(build_plan("sd1", 1016, 1016)) == pytest.approx(1 + (1016 / 512 - 1), abs=1e-9)


def test_fractional_factors_between_anchors():
    plan = build_plan("sd1", 1536, 1536)  # s = 3: a third of the way from the 2.5x to the 4x preset
    assert inner(plan) == pytest.approx(3.0)
    assert plan.main["input_blocks.4.0.in_layers.2"] == pytest.approx(2.5 + (2 - 2.5) / 3)


def test_large_ratios_switch_on_progressive_decay_and_noise_damping():
    small = build_plan("sd1", 1408, 1408)   # s = 2.75, s^2 < 8
    large = build_plan("sd1", 1472, 1472)   # s = 2.875, s^2 > 8
    assert not small.progressive and small.base is None
    assert large.progressive and large.base is not None and large.base_at(981) is not None
    huge = build_plan("sd1", 4096, 4096)    # beyond the last anchor: 4x factors scaled by s/4 = 2
    assert inner(huge) == 8.0 and huge.progressive and huge.base_at(981)


def test_the_long_side_decides_but_thin_strips_are_capped():
    # 1.5:1 uses its long side like the official 2:1 panoramas
    assert inner(build_plan("sd1", 1536, 1024)) == inner(build_plan("sd1", 1536, 1536))
    # 2048x512: s = min(4, 2 * 1) = 2
    assert inner(build_plan("sd1", 2048, 512)) == 2.0
    assert resolve_dilations("sd1", 2048, 512, 981) == resolve_dilations("sd1", 1024, 1024, 981)


def test_every_official_preset_is_found_by_its_size():
    for (family, r_long, r_short), preset in OFFICIAL.items():
        train = 1024 if family == "sdxl" else 512
        assert preset_for(family, int(r_long * train), int(r_short * train)) is preset
        assert rule_preset(family, r_long, r_short).source.startswith("rule")


def test_multiplier_scales_and_drops_factors():
    plan = build_plan("sd1", 2048, 2048, ScaleCrafterSettings(enabled=True, dilation_multiplier=0.5))
    assert inner(plan) == 2.0
    assert "input_blocks.4.0.in_layers.2" not in plan.main  # 2 * 0.5 = 1: vanilla
    capped = build_plan("sd1", 4096, 4096, ScaleCrafterSettings(enabled=True, dilation_multiplier=4.0))
    assert max(capped.main.values()) == 16.0 and any("capped" in n for n in capped.notes)


def test_stop_point_moves_both_thresholds():
    plan = build_plan("sd1", 2048, 2048, ScaleCrafterSettings(enabled=True, stop_at=0.4))
    assert plan.tau == 20 and plan.base_tau == 20
    assert plan.main_at(601) and not plan.main_at(581)
    assert plan.base_at(601) is not None and plan.base_at(581) is None


def test_noise_damping_modes():
    auto = build_plan("sd1", 1024, 1024)
    on = build_plan("sd1", 1024, 1024, ScaleCrafterSettings(enabled=True, noise_damped_cfg="on"))
    off = build_plan("sd1", 2048, 2048, ScaleCrafterSettings(enabled=True, noise_damped_cfg="off"))
    assert auto.base is None
    assert on.base == {} and on.base_at(981) == {}  # forced on without a preset base: the vanilla UNet
    assert on.base_at(381) is None
    assert off.base is None and off.base_at(981) is None
    forced = build_plan("sd2", 2048, 1024, ScaleCrafterSettings(enabled=True, noise_damped_cfg="on"))
    assert forced.base_at(981)  # the official 2:1 SD2 base set, whose tau 0 "on" overrides


def test_dispersion_is_limited_to_dilated_convs():
    plan = build_plan("sdxl", 2048, 2048, ScaleCrafterSettings(enabled=True, dispersion=True))
    assert plan.dispersed and plan.dispersed <= set(plan.main)
    none = build_plan("sd1", 512, 512, ScaleCrafterSettings(enabled=True, dispersion=True))
    assert not none.dispersed and any("dispersion" in n for n in none.notes)


@pytest.mark.parametrize("kwargs,message", [
    ({"dilation_multiplier": 0}, r"dilation_multiplier must be in \[0.1, 4\]; got 0"),
    ({"dilation_multiplier": 5.0}, r"dilation_multiplier must be in \[0.1, 4\]"),
    ({"dilation_multiplier": "2"}, "dilation_multiplier must be a number"),
    ({"stop_at": 0.0}, r"stop_at must be in \(0, 1\]; got 0.0"),
    ({"stop_at": 1.5}, r"stop_at must be in \(0, 1\]"),
    ({"noise_damped_cfg": "yes"}, "noise_damped_cfg must be one of auto, on, off"),
    ({"dispersion": 1}, "dispersion must be true or false"),
    ({"enabled": "true"}, "enabled must be true or false"),
])
def test_bad_settings_name_the_field_and_range(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        ScaleCrafterSettings(**kwargs)


@pytest.mark.parametrize("args,message", [
    (("sd1", 1001, 1024), "width must be a multiple of 8 from 64 to 8192"),
    (("sd1", 1024, 16384), "height must be a multiple of 8 from 64 to 8192"),
    (("sd3", 1024, 1024), "family must be one of sd1, sd2, sdxl"),
])
def test_bad_plan_input_names_the_field(args, message):
    with pytest.raises(ValueError, match=message):
        build_plan(*args)
    with pytest.raises(ValueError, match=message):
        resolve_dilations(*args, 500)
