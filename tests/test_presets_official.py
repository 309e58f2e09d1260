"""resolve_dilations must reproduce every official ScaleCrafter config at every official timestep.

Expected values are computed here straight from tests/data/scalecrafter-presets.json (the
layer tables of the official repository re-keyed to WebUI module paths) with the official schedule.
"""
import json
import math

import pytest
import torch

from lib_hires.scalecrafter import ScaleCrafterSettings, build_plan, redilate, resolve_dilations
from tests.conftest import PRESETS_JSON, tiny_unet

_DATA = json.loads(PRESETS_JSON.read_text())  # in the checkout: a missing file is an error, not a skip
CONFIGS = [(fam, res) for fam in ("sd1", "sd2", "sdxl") for res in _DATA.get(fam, {})]
TIMESTEPS = [981 - 20 * i for i in range(50)]


def official_factors(layers, tau, progressive, i):
    if i >= tau:
        return {}
    if not progressive:
        return {p: float(d) for p, d in layers.items()}
    return {p: float(max(math.ceil(d * (tau - i) / tau), 2)) for p, d in layers.items()}


def test_all_official_configs_are_covered():
    index = _DATA["official_config_index"]
    assert len(index) == 16
    covered = {f"{fam}.{res}" for fam, res in CONFIGS}
    for name, key in index.items():
        base_key = key.removesuffix(".dispersion")
        assert base_key in covered or key.startswith("baselines."), name


@pytest.mark.parametrize("family,res", CONFIGS)
def test_main_pass_matches_the_official_config_at_every_timestep(family, res):
    cfg = _DATA[family][res]
    width, height = cfg["pixel_width"], cfg["pixel_height"]
    for i, t in enumerate(TIMESTEPS):
        expected = official_factors(cfg["dilate_layers"], cfg["dilate_tau"], cfg["progressive"], i)
        assert resolve_dilations(family, width, height, t) == expected, (family, res, i)


@pytest.mark.parametrize("family,res", CONFIGS)
def test_noise_damped_base_pass_matches_the_official_config_at_every_timestep(family, res):
    cfg = _DATA[family][res]
    width, height = cfg["pixel_width"], cfg["pixel_height"]
    tau = cfg["ndcfg_tau"] if cfg["ndcfg_active"] else 0
    for i, t in enumerate(TIMESTEPS):
        expected = official_factors(cfg["ndcfg_layers"], tau, cfg["progressive"], i)
        assert resolve_dilations(family, width, height, t, ndcfg=True) == expected, (family, res, i)
        assert (build_plan(family, width, height).base_at(t) is not None) == bool(expected)


@pytest.mark.parametrize("family,res", [(f, r) for f, r in CONFIGS if _DATA[f][r]["dispersion"]])
def test_dispersion_configs_disperse_the_official_layers(family, res):
    cfg = _DATA[family][res]
    layers = set(cfg["dispersion"]["layers"])
    plan = build_plan(family, cfg["pixel_width"], cfg["pixel_height"], ScaleCrafterSettings(enabled=True, dispersion=True))
    assert plan.dispersed == layers
    for t in TIMESTEPS:
        main = plan.main_at(t)
        assert main == resolve_dilations(family, cfg["pixel_width"], cfg["pixel_height"], t)  # factors unchanged
        assert plan.dispersed_among(main) == layers & set(main)
        base = plan.base_at(t) or {}
        assert plan.dispersed_among(base) == layers & set(base)


def test_the_direct_inference_baseline_is_the_unhooked_unet():
    baseline = _DATA["baselines"]["sdxl"]["2048x2048"]
    assert baseline["dilate_tau"] == 0 and not baseline["dilate_layers"] and not baseline["ndcfg_layers"]
    unet = tiny_unet("sdxl")
    x, context, y = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32), torch.randn(1, 16)
    t = torch.tensor([981.0])
    vanilla = unet(x, t, context, y)
    with redilate(unet, {}):
        assert torch.equal(unet(x, t, context, y), vanilla)


@pytest.mark.parametrize("family,res", CONFIGS)
def test_portrait_orientation_uses_the_same_factors(family, res):
    cfg = _DATA[family][res]
    for t in (981, 801, 401, 301):
        assert resolve_dilations(family, cfg["pixel_height"], cfg["pixel_width"], t) == \
            resolve_dilations(family, cfg["pixel_width"], cfg["pixel_height"], t)


def test_a_768px_sd2_model_uses_the_presets_at_the_same_ratio():
    for t in TIMESTEPS:
        assert resolve_dilations("sd2", 1536, 1536, t, train_size=768) == resolve_dilations("sd2", 1024, 1024, t)
        assert resolve_dilations("sd2", 3072, 3072, t, train_size=768, ndcfg=True) == \
            resolve_dilations("sd2", 2048, 2048, t, ndcfg=True)
