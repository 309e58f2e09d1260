"""ScaleCrafter inside a real stable-diffusion-webui-forge (CPU, the seeded SD1 fixture), and on Forge's own SDXL
UNet class in this process (the tiny ``IntegratedUNet2DConditionModel`` of tiny_sdxl.py)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tests.integration_forge.conftest import differs, scalefusion

SC = dict(method="ScaleCrafter")
# native size 128 makes a 256 px request a 2x one (the official 2x preset) at a CPU-friendly size
SMALL = dict(width=256, height=256, steps=3)
SMALL_SC = scalefusion(native_size=128, **SC)



def test_scalecrafter_1024_from_sd1_is_the_right_size_deterministic_and_changes_the_image(forge, fresh_plain):
    first = forge.txt2img(width=1024, height=1024, steps=2, alwayson_scripts=scalefusion(**SC))
    assert first.status == 200 and first.size == (1024, 1024), first
    assert "ScaleFusion: ScaleCrafter" in first.infotext and "ScaleCrafter preset: " in first.infotext, first.infotext
    again = forge.txt2img(width=1024, height=1024, steps=2, alwayson_scripts=scalefusion(**SC))
    assert np.array_equal(again.image, first.image)
    plain = forge.txt2img(width=1024, height=1024, steps=2)
    assert plain.status == 200 and differs(first.image, plain.image), "ScaleCrafter changed nothing"
    assert "ScaleFusion" not in plain.infotext
    after = forge.txt2img()
    assert np.array_equal(after.image, fresh_plain.image), "a hook outlived the job"
    assert "[ScaleFusion] ScaleCrafter plan: sd1 1024x1024" in forge.log_tail(10**7)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "Heun"])
def test_scalecrafter_with_each_sampler(forge, fresh_plain, sampler):
    result = forge.txt2img(sampler_name=sampler, alwayson_scripts=SMALL_SC, **SMALL)
    assert result.status == 200 and result.size == (256, 256), result
    again = forge.txt2img(sampler_name=sampler, alwayson_scripts=SMALL_SC, **SMALL)
    assert np.array_equal(again.image, result.image)
    plain = forge.txt2img(sampler_name=sampler, **SMALL)
    assert differs(result.image, plain.image), sampler
    assert np.array_equal(forge.txt2img().image, fresh_plain.image)


def test_noise_damped_cfg_and_dispersion_change_the_image_and_leave_nothing(forge, fresh_plain):
    base = forge.txt2img(alwayson_scripts=scalefusion(native_size=128, noise_damped_cfg="off", **SC), **SMALL)
    damped = forge.txt2img(alwayson_scripts=scalefusion(native_size=128, noise_damped_cfg="on", **SC), **SMALL)
    dispersed = forge.txt2img(alwayson_scripts=scalefusion(native_size=128, dispersion=True, **SC),
                              width=512, height=512, steps=2)
    assert base.status == damped.status == dispersed.status == 200, (base, damped, dispersed)
    assert differs(base.image, damped.image, 0.2), "noise-damped CFG changed nothing"
    assert "ScaleCrafter noise-damped CFG: on" in damped.infotext and "ScaleCrafter dispersion: True" in \
        dispersed.infotext
    plain512 = forge.txt2img(width=512, height=512, steps=2,
                             alwayson_scripts=scalefusion(native_size=128, dispersion=False, **SC))
    assert differs(dispersed.image, plain512.image, 0.2), "dispersion changed nothing"
    assert np.array_equal(forge.txt2img().image, fresh_plain.image)


def test_hires_fix_passes(forge, fresh_plain):
    hires = dict(enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.9, hr_second_pass_steps=4,
                 hr_additional_modules=["Use same choices"],  # Forge's API fails on its default None
                 width=128, height=128, steps=2)
    both = forge.txt2img(alwayson_scripts=scalefusion(native_size=128, passes="both", **SC), **hires)
    first_only = forge.txt2img(alwayson_scripts=scalefusion(native_size=128, passes="first", **SC), **hires)
    plain = forge.txt2img(**hires)
    assert both.status == first_only.status == plain.status == 200 and both.size == (256, 256), both
    assert "ScaleCrafter hires preset: " in both.infotext and "ScaleCrafter hires preset" not in first_only.infotext
    # the first pass is at the native size (nothing to dilate): only the hires pass differs
    assert np.array_equal(first_only.image, plain.image)
    assert differs(both.image, plain.image)
    assert np.array_equal(forge.txt2img().image, fresh_plain.image)


def test_img2img(forge, fresh_plain):
    result = forge.img2img(alwayson_scripts=SMALL_SC, denoising_strength=0.75, **SMALL)
    plain = forge.img2img(denoising_strength=0.75, **SMALL)
    assert result.status == plain.status == 200 and result.size == (256, 256), result
    assert differs(result.image, plain.image) and "ScaleCrafter preset: " in result.infotext
    assert np.array_equal(forge.txt2img().image, fresh_plain.image)


@pytest.mark.parametrize("settings, message", [
    (dict(noise_damped_cfg="sometimes"), "noise_damped_cfg must be one of"),
    (dict(stop_at=1.5), "stop_at must be a number in (0, 1]"),
])
def test_bad_settings_and_what_forge_cannot_run_answer_422(forge, fresh_plain, settings, message):
    result = forge.txt2img(alwayson_scripts=scalefusion(**{**SC, **settings}), **SMALL)
    assert result.status == 422 and message in result.detail, result
    assert np.array_equal(forge.txt2img().image, fresh_plain.image)


def test_xyz_axes_sweep_the_settings_and_each_cell_describes_only_itself(forge, fresh_plain):
    """Issue 23 §4: a ScaleFusion number axis x Enabled x a sampler axis in a real Forge."""
    status, scripts = forge.get("/sdapi/v1/script-info")
    assert status == 200, scripts
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = xyz["args"][0]["choices"]
    multiplier = labels.index("[ScaleFusion] ScaleCrafter Dilation multiplier")
    enabled, sampler = labels.index("[ScaleFusion] Enabled"), labels.index("Sampler")
    # X: a number axis (csv values), Y and Z: choice axes (dropdown values); legend, lone images, no sub-grids, ...
    args = [multiplier, "1, 2", [], enabled, "", ["True", "False"], sampler, "", ["Euler", "DPM++ 2M"],
            True, True, False, False, False, False, False, 0, False]
    result = forge.txt2img(script_name="x/y/z plot", script_args=args, alwayson_scripts=SMALL_SC, **SMALL)
    assert result.status == 200, result
    cells = json.loads(result.json["info"])["infotexts"]
    cells = cells[len(cells) - 8:]  # after the grid (one per Z value, then the Z-grid): the 8 cells, X fastest
    assert len(cells) == 8, cells
    for z, name in enumerate(["Euler", "DPM++ 2M"]):
        on, off = cells[4 * z:4 * z + 2], cells[4 * z + 2:4 * z + 4]   # (1, True), (2, True), (1, False), (2, False)
        assert all(f"Sampler: {name}," in c for c in on + off), (name, on + off)
        assert [c.split("ScaleCrafter multiplier: ")[1].split(",")[0] for c in on] == ["1", "2"], on
        assert all("ScaleFusion" not in c and "ScaleCrafter" not in c for c in off), off
    images = result.images[len(result.images) - 8:]
    assert differs(images[0], images[1])  # the multiplier changes the ScaleCrafter image
    assert np.array_equal(images[2], images[3])  # off: the multiplier changes nothing
    assert not np.array_equal(images[2], images[6])  # the sampler axis changes the plain image (3 steps: faintly)
    assert np.array_equal(forge.txt2img().image, fresh_plain.image)


def test_multidiffusion_integrated_is_refused_by_name(forge, fresh_plain):
    result = forge.txt2img(alwayson_scripts={**SMALL_SC, "MultiDiffusion Integrated": {
        "args": [True, "MultiDiffusion", 128, 128, 32, 4]}}, **SMALL)
    assert result.status == 422 and "MultiDiffusion Integrated" in result.detail, result
    assert np.array_equal(forge.txt2img().image, fresh_plain.image)


def _tiny_lora(path, sd1_checkpoint, rank: int = 4, seed: int = 3):
    """A kohya-style LoRA on the fixture's re-dilated 3x3 convs (3x3 down, 1x1 up), made at test time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state = {}
    with safe_open(str(sd1_checkpoint), "pt") as f:
        keys = [k for k in f.keys() if k.startswith("model.diffusion_model.") and k.endswith("in_layers.2.weight")]
        for key in keys:
            out_ch, in_ch = f.get_slice(key).get_shape()[:2]
            name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
            state[f"{name}.lora_down.weight"] = torch.randn(rank, in_ch, 3, 3, generator=gen) * 0.05
            state[f"{name}.lora_up.weight"] = torch.randn(out_ch, rank, 1, 1, generator=gen) * 0.05
            state[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file({k: v.to(torch.float16) for k, v in state.items()}, str(path))
    return path


def test_lora_works_with_scalecrafter(forge, fresh_plain, forge_data_dir, sd1_checkpoint):
    folder = forge_data_dir / "models" / "Lora"
    folder.mkdir(parents=True, exist_ok=True)
    lora = _tiny_lora(folder / "scalefusion_test_lora.safetensors", sd1_checkpoint)
    try:
        forge.request("POST", "/sdapi/v1/refresh-loras", {})
        with_lora = dict(prompt="a cat <lora:scalefusion_test_lora:1>", **SMALL)
        sc_lora = forge.txt2img(alwayson_scripts=SMALL_SC, **with_lora)
        assert sc_lora.status == 200, sc_lora
        assert "scalefusion_test_lora" in sc_lora.infotext, "the LoRA was not applied"
        sc = forge.txt2img(alwayson_scripts=SMALL_SC, **SMALL)
        plain_lora = forge.txt2img(**with_lora)
        assert differs(sc_lora.image, sc.image, 0.2), "the LoRA changed nothing under ScaleCrafter"
        assert differs(sc_lora.image, plain_lora.image), "ScaleCrafter changed nothing with the LoRA"
        assert np.array_equal(forge.txt2img(alwayson_scripts=SMALL_SC, **with_lora).image, sc_lora.image)
    finally:
        lora.unlink()
    assert np.array_equal(forge.txt2img().image, fresh_plain.image)


def test_bf16_unet_manual_cast_branch(forge_bf16):
    """``--unet-in-bf16``: Forge's convs take the manual-cast branch; the re-dilated ones still apply."""
    plain_small = forge_bf16.txt2img()
    result = forge_bf16.txt2img(alwayson_scripts=SMALL_SC, **SMALL)
    assert result.status == 200 and result.size == (256, 256), result
    assert np.array_equal(forge_bf16.txt2img(alwayson_scripts=SMALL_SC, **SMALL).image, result.image)
    plain = forge_bf16.txt2img(**SMALL)
    assert differs(result.image, plain.image)
    assert np.array_equal(forge_bf16.txt2img().image, plain_small.image)


# Forge's own SDXL UNet class, in this process ------------------------------------------------------------------

def _plain_twin(unet):
    """The UNet with every ForgeOperations conv turned back into a plain torch conv holding the kernel Forge
    computes with (bf16 storage cast to the computation dtype, as the manual-cast branch casts it)."""
    from backend.operations import ForgeOperations, get_weight_and_bias

    twin = copy.deepcopy(unet)
    for conv in [m for m in twin.modules() if isinstance(m, ForgeOperations.Conv2d)]:
        weight, bias = get_weight_and_bias(conv, dict(dtype=torch.float32), dict(dtype=torch.float32))
        conv.__class__ = ForgeOperations.Conv2d.__mro__[1]  # torch.nn.Conv2d
        conv.weight = torch.nn.Parameter(weight, requires_grad=False)
        conv.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
    return twin  # the rest (linears, norms) stays Forge's, computing as in the original


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_sdxl_redilation_hooks_install_on_forges_module_paths_and_match_the_plain_path(sdxl_unet, storage):
    from backend.operations import ForgeOperations

    from lib_hires.webui.forge.scalecrafter import forge_conv_weights
    from lib_hires.scalecrafter import ScaleCrafterController, build_plan, canonical_layout, scan_unet
    from lib_hires.scalecrafter.redilated_conv import ConvHook, ForwardConvHook

    unet = sdxl_unet(seed=1, storage_dtype=storage, computation_dtype=torch.float32)
    layout = scan_unet(unet)
    assert layout.levels == 3 and layout.paths == canonical_layout("sdxl").paths  # Forge's module tree is SDXL's
    plan = build_plan("sdxl", 512, 512, train_size=128)   # a 4x request for this 128-px-trained UNet
    inputs = sdxl_unet.inputs(batch=1, latent_hw=(64, 64))
    inputs["timesteps"] = torch.tensor([961.0])
    with torch.no_grad():
        vanilla = unet(**inputs)
        with ScaleCrafterController(unet, plan, weights=forge_conv_weights) as controller:
            hooked = {p: unet.get_submodule(p) for p in controller.handle.hooks}
            assert all(isinstance(m, ForgeOperations.Conv2d) and isinstance(vars(m)["forward"], ForwardConvHook)
                       for m in hooked.values())
            assert all(m.parameters_manual_cast == (storage != torch.float32) for m in hooked.values())
            out = unet(**inputs)
            with controller.base_pass():
                base = unet(**inputs)
        assert not any("forward" in vars(m) for m in unet.modules())
        assert torch.equal(unet(**inputs), vanilla)
        twin = _plain_twin(unet)
        with ScaleCrafterController(twin, plan) as controller:
            assert all(isinstance(vars(twin.get_submodule(p))["_conv_forward"], ConvHook) for p in controller.handle.hooks)
            expected = twin(**inputs)
            with controller.base_pass():
                expected_base = twin(**inputs)
    assert not torch.allclose(out, vanilla) and not torch.allclose(base, out)
    assert torch.equal(out, expected) and torch.equal(base, expected_base)
