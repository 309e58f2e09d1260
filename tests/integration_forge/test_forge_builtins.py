"""Forge's own built-ins beside ScaleFusion in a real stable-diffusion-webui-forge (issue 23 §3): each built-in's
real script patches the real UnetPatcher through the API (``alwayson_scripts`` by its title, its UI's values in
order), and the request either composes (the built-in's effect and ours: the image differs from each alone, both
infotexts are there) or is refused with a 422 that says why. Stand-ins of the same decisions:
tests/test_forge_builtins.py.

The built-ins' arguments are positional, in the order of their ``ui()`` (Forge main @ dfdcbab6). On the random-weight
fixture some effects are faint (Dynamic Thresholding and Latent Modifier move the mean pixel by ~0.002 levels), so
an effect is any difference from an image that the same request reproduces bit for bit. FreeU scales only features
of 2x and 4x the model's base width, and the fixture UNet is 320 wide at every level: here it must change nothing
(its effect beside ScaleCrafter and DemoFusion is shown on Forge's tiny SDXL UNet in
test_forge_builtins_in_process.py)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.integration_forge.conftest import differs, scalefusion

SMALL = dict(width=256, height=256, steps=3)
SC = scalefusion(method="ScaleCrafter", native_size=128, noise_damped_cfg="on")
SC_UNDAMPED = scalefusion(method="ScaleCrafter", native_size=128, noise_damped_cfg="off")
DF = scalefusion(method="DemoFusion", scale=2)
DF_SMALL = dict(width=128, height=128, steps=3)   # DemoFusion x2: 256 px out

FREEU = {"FreeU Integrated (SD 1.x, SD 2.x, SDXL)": {"args": [True, 1.3, 1.4, 0.9, 0.2, 0.0, 1.0]}}
SAG = {"SelfAttentionGuidance Integrated (SD 1.x, SD 2.x, SDXL)": {"args": [True, 1.5, 2.0, 1.0]}}
PAG = {"PerturbedAttentionGuidance Integrated": {"args": [True, 30.0, 0.0, 0.0, 1.0]}}
KOHYA = {"Kohya HRFix Integrated": {"args": [True, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic"]}}
DYNTHRES = {"DynamicThresholding (CFG-Fix) Integrated": {"args": [
    True, 4.0, 0.95, "Constant", 0.0, "Constant", 0.0, 1.0, "enable", "MEAN", "AD", 1.0]}}
LATENT_MODIFIER = {"LatentModifier Integrated": {"args": [
    True, 10.0, "anisotropic", 0.0, "reinhard", 100.0, 0.0, "subtract", 0.0, 0.0, "gaussian", "add", 0.0, 100, 127,
    0.0, "hard_clamp", 5.0, 0.0, "None", "None"]}}



def run(forge, *scripts, size=SMALL):
    merged = {k: v for s in scripts for k, v in s.items()}
    return forge.txt2img(alwayson_scripts=merged, **size)


def assert_composes(forge, ours, builtin, size, builtin_key):
    """``size`` is the request's; the built-in alone is asked for the output's size (DemoFusion's is twice)."""
    both, alone = run(forge, ours, builtin, size=size), run(forge, ours, size=size)
    assert both.status == alone.status == 200, (both, alone)
    builtin_alone = run(forge, builtin, size={**size, "width": both.size[0], "height": both.size[1]})
    assert builtin_alone.status == 200, builtin_alone
    assert differs(both.image, alone.image, 0), "the built-in changed nothing beside ScaleFusion"
    assert differs(both.image, builtin_alone.image, 0), "ScaleFusion changed nothing beside the built-in"
    assert "ScaleFusion: " in both.infotext and builtin_key in both.infotext, both.infotext
    assert np.array_equal(run(forge, ours, builtin, size=size).image, both.image)
    return both


def assert_refused(forge, ours, builtin, size, *phrases):
    result = run(forge, ours, builtin, size=size)
    assert result.status == 422 and all(p in result.detail for p in phrases), result
    return result


@pytest.fixture
def clean(forge, fresh_plain):
    yield forge
    assert np.array_equal(forge.txt2img().image, fresh_plain.image), "a hook outlived the job"


@pytest.mark.parametrize("ours, size", [(SC, SMALL), (DF, DF_SMALL)], ids=["ScaleCrafter", "DemoFusion"])
def test_freeu_runs_beside_scalefusion_and_leaves_the_320_wide_fixture_alone(clean, ours, size):
    both, alone = run(clean, ours, FREEU, size=size), run(clean, ours, size=size)
    assert both.status == alone.status == 200, (both, alone)
    assert "freeu_enabled: True" in both.infotext and "ScaleFusion: " in both.infotext, both.infotext
    assert np.array_equal(both.image, alone.image)


def test_self_attention_guidance_composes_with_noise_damped_scalecrafter(clean):
    assert_composes(clean, SC, SAG, SMALL, "sag_enabled: True")


def test_self_attention_guidance_is_refused_by_demofusion(clean):
    assert_refused(clean, DF, SAG, DF_SMALL, "Self-Attention Guidance", "DemoFusion")


@pytest.mark.parametrize("ours, size", [(SC, SMALL), (DF, DF_SMALL)], ids=["ScaleCrafter", "DemoFusion"])
def test_perturbed_attention_guidance_composes(clean, ours, size):
    assert_composes(clean, ours, PAG, size, "pagi_enabled: True")


@pytest.mark.parametrize("ours, size, method", [(SC, SMALL, "ScaleCrafter"), (DF, DF_SMALL, "DemoFusion")],
                         ids=["ScaleCrafter", "DemoFusion"])
def test_kohya_hrfix_is_refused_where_it_shrinks_the_features(clean, ours, size, method):
    assert_refused(clean, ours, KOHYA, size, f"{method} cannot run with a patch that resizes the UNet's features",
                   "input block 3", "Kohya HRFix")


@pytest.mark.parametrize("builtin", [DYNTHRES, LATENT_MODIFIER], ids=["DynamicThresholding", "LatentModifier"])
def test_a_custom_cfg_function_is_refused_with_noise_damping_and_composes_without(clean, builtin):
    assert_refused(clean, SC, builtin, SMALL, "noise-damped CFG cannot be combined")
    key = "dynthres_enabled: True" if builtin is DYNTHRES else "latent_modifier_enabled: True"
    assert_composes(clean, SC_UNDAMPED, builtin, SMALL, key)
    assert_composes(clean, DF, builtin, DF_SMALL, key)
