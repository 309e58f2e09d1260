"""The user-facing settings: positional and dict API forms, validation messages, infotext round trip."""
import dataclasses

import pytest

from lib_hires.settings import FIELDS, METHODS, ScaleFusionSettings, SettingsError
from lib_hires.summary import scalecrafter_summary, short_source, size_warnings

NAMES = [f.name for f in FIELDS]


def test_fields_match_the_dataclass_in_order_and_defaults():
    assert NAMES == [f.name for f in dataclasses.fields(ScaleFusionSettings)]
    defaults = ScaleFusionSettings()
    assert [getattr(defaults, f.name) for f in FIELDS] == [f.default for f in FIELDS]
    assert NAMES[:2] == ["enabled", "method"]  # args[0] is the accordion; the dict form replaces it


def test_positional_values_in_ui_order():
    values = ScaleFusionSettings(enabled=True, dilation_multiplier=1.5, stop_at=0.5).ui_values()
    assert len(values) == len(FIELDS)
    parsed = ScaleFusionSettings.from_script_args(values)
    assert parsed.enabled and parsed.dilation_multiplier == 1.5 and parsed.stop_at == 0.5
    # the UI sends 0 for "preset" / "auto"
    assert ScaleFusionSettings.from_script_args(ScaleFusionSettings().ui_values()) == ScaleFusionSettings()
    values = ScaleFusionSettings().ui_values()
    assert values[NAMES.index("stop_at")] == 0 and isinstance(values[NAMES.index("stop_at")], float)
    # the API converts pasted infotext values to the type of the component's default value
    for f, value in zip(FIELDS, values):
        assert isinstance(value, {"bool": bool, "choice": str, "int": int, "float": float, "stages": str}[f.kind]), f.name


def test_missing_trailing_positional_values_keep_the_defaults():
    defaults = ScaleFusionSettings(view_batch=4)
    parsed = ScaleFusionSettings.from_script_args([True, "demofusion"], defaults)
    assert parsed == ScaleFusionSettings(enabled=True, method="DemoFusion", view_batch=4)


def test_dict_form_is_named_and_case_insensitive_for_choices():
    parsed = ScaleFusionSettings.from_script_args([{"enabled": True, "method": "demoFUSION", "scale": 2.5}, False, "x"])
    assert parsed == ScaleFusionSettings(enabled=True, method="DemoFusion", scale=2.5)
    parsed = ScaleFusionSettings.from_script_args([{"enabled": True, "noise_damped_cfg": "ON", "stop_at": None}])
    assert parsed.noise_damped_cfg == "on" and parsed.stop_at is None
    assert ScaleFusionSettings.from_dict({"view_batch": 8.0}).view_batch == 8


@pytest.mark.parametrize("data,message", [
    ({"enabled": "yes"}, r"enabled must be true or false; got 'yes'"),
    ({"method": "Tiled"}, r'method must be one of "ScaleCrafter", "DemoFusion"; got \'Tiled\''),
    ({"dilation_multiplier": 5}, r"dilation_multiplier must be a number in \[0.1, 4\]; got 5"),
    ({"dilation_multiplier": "2"}, r"dilation_multiplier must be a number"),
    ({"stop_at": 1.5}, r"stop_at must be a number in \(0, 1\], or 0 / null for preset; got 1.5"),
    ({"scale": 1.0}, r"scale must be a number in \[1.5, 4\]; got 1.0"),
    ({"scale": float("nan")}, r"scale must be a number"),
    ({"view_batch": 2.5}, r"view_batch must be an integer in \[1, 64\]; got 2.5"),
    ({"view_batch": True}, r"view_batch must be an integer"),
    ({"stride": 4}, r"stride must be an integer in \[8, 256\], or 0 / null for auto; got 4"),
    ({"native_size": 100}, r"native_size must be an integer in \[128, 2048\], or 0 / null for auto; got 100"),
    ({"tau": 3}, r"unknown key\(s\) 'tau'; known keys: enabled, method, "),
])
def test_bad_values_name_the_field_and_the_allowed_range(data, message):
    with pytest.raises(SettingsError, match=r"^ScaleFusion: " + message):
        ScaleFusionSettings.from_script_args([data])


def test_bad_positional_value_names_its_position():
    with pytest.raises(SettingsError, match=r"dilation_multiplier must be .* \(positional argument 3\)"):
        ScaleFusionSettings.from_script_args([True, "ScaleCrafter", 0, 9.0])
    with pytest.raises(SettingsError, match=f"at most {len(FIELDS)} positional arguments"):
        ScaleFusionSettings.from_script_args([False] * (len(FIELDS) + 1))


@pytest.mark.parametrize("settings", [
    ScaleFusionSettings(enabled=True, dilation_multiplier=1.25, stop_at=0.6, noise_damped_cfg="off", dispersion=True,
                        passes="hires"),
    ScaleFusionSettings(enabled=True, method="DemoFusion", native_size=768, scale=2.5, stride=48, view_batch=4, cosine_scale_1=2.5,
                        sigma=0.6, jitter=False, save_stages=True, low_vram=True, redilation="global path"),
    ScaleFusionSettings(enabled=True, method="DemoFusion", scale=3.2, stages="1.5, 2.5, 3.2", stage_strength=0.6,
                        later_steps=12),
    ScaleFusionSettings(enabled=True),
])
def test_infotext_round_trip(settings):
    text = settings.to_infotext()
    assert text["ScaleFusion"] == settings.method
    assert all(isinstance(v, str) for v in text.values())
    # only the active method's settings are written
    other = [f.infotext for f in FIELDS if f.method not in (None, settings.method)]
    assert not set(text) & set(other)
    pasted = ScaleFusionSettings.from_infotext({"Steps": "20", **text})
    for f in settings.fields_in_use():
        assert getattr(pasted, f.name) == getattr(settings, f.name), f.name
    assert pasted.method == settings.method and pasted.enabled


def test_infotext_without_our_keys_leaves_the_extension_off():
    assert ScaleFusionSettings().to_infotext() == {}
    assert ScaleFusionSettings.from_infotext({"Steps": "20", "Size": "512x512"}) == ScaleFusionSettings()


def test_malformed_infotext_is_refused_with_the_key():
    with pytest.raises(SettingsError, match="'ScaleCrafter multiplier' must be a number; got 'lots'"):
        ScaleFusionSettings.from_infotext({"ScaleFusion": "ScaleCrafter", "ScaleCrafter multiplier": "lots"})
    with pytest.raises(SettingsError, match="method must be one of"):
        ScaleFusionSettings.from_infotext({"ScaleFusion": "Magic"})


def test_engine_settings_and_passes():
    s = ScaleFusionSettings(enabled=True, dilation_multiplier=2.0, stop_at=0.4, noise_damped_cfg="on", passes="first")
    engine = s.scalecrafter()
    assert (engine.dilation_multiplier, engine.stop_at, engine.noise_damped_cfg) == (2.0, 0.4, "on")
    assert s.applies_to_pass(False) and not s.applies_to_pass(True)
    assert ScaleFusionSettings().applies_to_pass(True) and ScaleFusionSettings().applies_to_pass(False)


def test_every_method_has_settings_and_every_field_documents_itself():
    for method in METHODS:
        assert ScaleFusionSettings(method=method).fields_in_use()
    for f in FIELDS:
        assert f.help and f.label and f.infotext
        f.check(f.default)


def test_summary_names_the_preset_and_sizes():
    s = ScaleFusionSettings(enabled=True)
    summary = scalecrafter_summary("sd1", 512, 2048, 2048, s)
    assert summary.header == "2048×2048 · latent 256×256 · sd1.5_2048x2048 · max dilation 4, noise-damped CFG"
    assert "ScaleCrafter plan: sd1 2048x2048" in summary.details and not summary.warnings
    summary = scalecrafter_summary("sdxl", 1024, 1000, 1536, s)
    assert "rule s=1.5" in summary.header and len(summary.warnings) == 1 and "width 1000" in summary.warnings[0]
    assert "no dilation" in scalecrafter_summary("sd1", 512, 512, 512, s).header
    assert "width must be a multiple of 8" in scalecrafter_summary("sd1", 512, 9000, 512, s).header


def test_size_warnings_and_short_source():
    assert size_warnings(1024, 576) == []
    assert "multiples of 64 (e.g. 960 or 1024)" in size_warnings(1000, 1024)[0]
    assert short_source("official sd1.5_1024x1024") == "sd1.5_1024x1024"
    assert short_source("rule s=3 (long side 3x, short side 2x): interpolated") == "rule s=3"


def test_the_stage_speed_fields_come_last_so_old_positional_calls_keep_their_meaning():
    assert NAMES[-3:] == ["stage_strength", "stages", "later_steps"]
    old = ScaleFusionSettings(enabled=True, method="DemoFusion", scale=3.0, low_vram=True).ui_values()[:-3]
    parsed = ScaleFusionSettings.from_script_args(old)
    assert parsed.low_vram and parsed.scale == 3.0
    assert (parsed.stage_strength, parsed.stages, parsed.later_steps) == (1.0, "", 0)
    new = ScaleFusionSettings.from_script_args([*old, 0.6, "2, 3", 12])
    assert (new.stage_strength, new.stages, new.later_steps, new.stage_factors) == (0.6, "2, 3", 12, (2.0, 3.0))


@pytest.mark.parametrize("data,message", [
    ({"stage_strength": 0}, r"stage_strength must be a number in \(0, 1\]; got 0"),
    ({"stage_strength": 1.5}, r"stage_strength must be a number in \(0, 1\]; got 1.5"),
    ({"later_steps": -1}, r"later_steps must be an integer in \[0, 150\]; got -1"),
    ({"later_steps": 2.5}, r"later_steps must be an integer"),
    ({"stages": 4}, r"stages must be a string of comma-separated stage scales.*expected a string"),
    ({"scale": 4, "stages": "2, four"}, r"stages must be .*'four' is not a number"),
    ({"scale": 4, "stages": "2, 3"}, r"stages must be .*the last scale must equal Scale \(4\); got 3"),
    ({"scale": 4, "stages": "3, 2, 4"}, r"stages must be .*each stage may be at most 2x the one before \(x1 allows up "
                                        r"to x2\); got x3"),
    ({"scale": 4, "stages": "2, 2, 4"}, r"stages must be .*the scales must increase .*; 2 follows x2"),
    ({"scale": 4, "stages": "4"}, r"stages must be .*at most 2x the one before"),
    ({"scale": 4, "stages": "1, 2, 4"}, r"stages must be .*increase from above 1"),
    ({"scale": 4, "stages": "2, nan, 4"}, r"stages must be .*'nan' is not a finite number"),
])
def test_bad_stage_settings_name_the_field_and_the_rule(data, message):
    with pytest.raises(SettingsError, match=r"^ScaleFusion: " + message):
        ScaleFusionSettings.from_dict({"enabled": True, "method": "DemoFusion", **data})


def test_stage_plans_are_normalised_and_checked_against_scale_for_demofusion_only():
    s = ScaleFusionSettings.from_dict({"method": "DemoFusion", "scale": 4, "stages": " 2 ,4.0 "})
    assert s.stages == "2, 4" and s.stage_factors == (2.0, 4.0)
    for automatic in ("", None, "auto", " AUTO "):
        assert ScaleFusionSettings(method="DemoFusion", stages=automatic).stages == ""
    # a plan left in the field does not block ScaleCrafter; its syntax is still checked
    assert ScaleFusionSettings(method="ScaleCrafter", scale=2, stages="2, 4").stages == "2, 4"
    with pytest.raises(SettingsError, match="stages must be"):
        ScaleFusionSettings(method="ScaleCrafter", stages="2;4")
    info = ScaleFusionSettings(enabled=True, method="DemoFusion", scale=4, stages="2, 4").to_infotext()
    assert info["DemoFusion stages"] == "2, 4"
    assert ScaleFusionSettings(enabled=True, method="DemoFusion").to_infotext()["DemoFusion stages"] == "auto"


def test_an_infotext_from_before_a_setting_existed_pastes_its_default():
    """The accordion's paste targets: a key the writer records for the method but the infotext lacks was not
    there when it was written, so the component gets the default the image was made with, not the UI's value."""
    from lib_hires.settings import FIELD_BY_NAME, pasted_ui_value

    modern = ScaleFusionSettings(enabled=True, method="DemoFusion", scale=3.0, stage_strength=0.5, stages="2, 3",
                                 later_steps=12).to_infotext()
    older = {k: v for k, v in modern.items()
             if k not in ("DemoFusion stage strength", "DemoFusion stages", "DemoFusion later steps")}
    params = {"Steps": "20", **older}
    for name in ("stage_strength", "stages", "later_steps"):
        f = FIELD_BY_NAME[name]
        assert pasted_ui_value(f, params) == f.to_ui(f.default) is not None, name
    assert pasted_ui_value(FIELD_BY_NAME["scale"], params) == 3.0
    assert pasted_ui_value(FIELD_BY_NAME["enabled"], params) is True
    assert pasted_ui_value(FIELD_BY_NAME["method"], params) == "DemoFusion"
    # ScaleCrafter's settings are never in a DemoFusion infotext: they keep what the UI shows
    assert all(pasted_ui_value(f, params) is None for f in FIELDS if f.method == "ScaleCrafter")


@pytest.mark.parametrize("method", ["ScaleCrafter", "DemoFusion"])
def test_every_written_setting_missing_from_an_infotext_pastes_its_default(method):
    from lib_hires.settings import pasted_ui_value

    # values away from the defaults where the method allows, so that a kept value could not pass for the default
    changed = ScaleFusionSettings(enabled=True, method=method, native_size=768, dilation_multiplier=1.5, stop_at=0.5,
                                  noise_damped_cfg="on", dispersion=True, passes="first", scale=3.0, stride=32,
                                  view_batch=4, cosine_scale_1=2.0, cosine_scale_2=2.0, cosine_scale_3=2.0,
                                  sigma=0.5, jitter=False, save_stages=True, low_vram=True, redilation="both",
                                  stage_strength=0.5, stages="2, 3", later_steps=12)
    text = changed.to_infotext()
    for f in changed.fields_in_use():
        # the stage plan's last scale is the scale: an infotext with one and not the other was never written
        dropped = {f.infotext, "DemoFusion stages"} if f.name == "scale" else {f.infotext}
        without = {k: v for k, v in text.items() if k not in dropped}
        assert pasted_ui_value(f, without) == f.to_ui(f.default), f.name
        assert pasted_ui_value(f, text) == f.to_ui(getattr(changed, f.name)), f.name


def test_an_infotext_without_our_key_only_turns_the_extension_off():
    from lib_hires.settings import pasted_ui_value

    params = {"Steps": "20", "DemoFusion scale": "3"}  # a stray key without "ScaleFusion" proves nothing
    assert pasted_ui_value(FIELDS[0], params) is False
    assert all(pasted_ui_value(f, params) is None for f in FIELDS[1:])
