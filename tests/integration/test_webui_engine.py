"""The engine on the real WebUI: real ldm/sgm UNets, the built-in LoRA patches, real sampling."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib_hires.scalecrafter import (ScaleCrafterController, build_plan, canonical_layout, disperse_weight,
                                    dispersion_transform, redilate, scan_unet)


@pytest.mark.parametrize("checkpoint,family,module", [("tiny-sd1", "sd1", "ldm."), ("tiny-sdxl", "sdxl", "sgm.")])
def test_layout_of_the_real_unet(load_checkpoint, checkpoint, family, module):
    unet = load_checkpoint(checkpoint).model.diffusion_model
    assert type(unet).__module__.startswith(module)
    assert scan_unet(unet) == canonical_layout(family)


def lora_convs(webui, prompt):
    """Activates the LoRA in ``prompt`` and returns (layer names it patches, cleanup)."""
    from modules import extra_networks, processing
    import networks

    prompts, data = extra_networks.parse_prompts([prompt])
    p = processing.StableDiffusionProcessingTxt2Img(sd_model=webui.sd_model, prompt=prompts[0])
    p.all_prompts = prompts
    extra_networks.activate(p, data)
    names = set().union(*(net.modules for net in networks.loaded_networks))

    def cleanup():
        extra_networks.deactivate(p, data)
        networks.load_networks([])
    return names, cleanup


def test_lora_merged_weights_reach_the_dilated_and_dispersed_convs(webui, load_checkpoint):
    unet = load_checkpoint("tiny-sd1").model.diffusion_model
    names, cleanup = lora_convs(webui, "a cat <lora:tiny:1>")
    try:
        sites = [p for p in canonical_layout("sd1").paths
                 if getattr(unet.get_submodule(p), "network_layer_name", None) in names]
        assert len(sites) >= 2, "the tiny LoRA should patch some re-dilatable convs"
        dilated, dispersed = (unet.get_submodule(p) for p in sites[:2])
        x = torch.randn(1, dilated.in_channels, 16, 16)
        y = torch.randn(1, dispersed.in_channels, 16, 16)
        with torch.no_grad(), redilate(unet, {sites[0]: 2, sites[1]: 3}, dispersed=[sites[1]]):
            out_dilated, out_dispersed = dilated(x), dispersed(y)
        # the LoRA extension merges lazily inside Conv2d.forward; the backup holds the original weight
        assert dilated.network_weights_backup is not None
        assert not torch.equal(dilated.weight, dilated.network_weights_backup.to(dilated.weight))
        expected = F.conv2d(x, dilated.weight, dilated.bias, 1, 2, 2)
        assert torch.allclose(out_dilated, expected, atol=1e-5)
        w5 = disperse_weight(dispersed.weight, dispersion_transform())
        expected = F.interpolate(F.conv2d(F.interpolate(y, size=(21, 21), mode="bilinear"), w5, dispersed.bias,
                                          1, 4, 2), size=(16, 16), mode="bilinear")
        assert torch.allclose(out_dispersed, expected, atol=1e-5)
    finally:
        cleanup()
    assert not any("_conv_forward" in vars(m) for m in unet.modules())


def txt2img(webui, prompt, size, sampler="Euler", steps=4):
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=webui.sd_model, prompt=prompt, negative_prompt="", steps=steps, sampler_name=sampler,
        width=size, height=size, seed=7, cfg_scale=7, do_not_save_samples=True, do_not_save_grid=True)
    return np.asarray(processing.process_images(p).images[0], dtype=np.int16)


class Recorder:
    def __init__(self, unet, controller):
        self.controller, self.calls = controller, []
        self.handle = unet.register_forward_pre_hook(lambda m, a, k: self.calls.append(controller.last_call),
                                                     with_kwargs=True)


@pytest.mark.parametrize("checkpoint,family,size,sampler,prompt", [
    ("tiny-sd1", "sd1", 256, "DPM++ 2M", "a cat <lora:tiny:1>"),
    ("tiny-sdxl", "sdxl", 512, "Euler a", "a cat <lora:tiny-sdxl:1>"),
])
def test_txt2img_with_the_controller(webui, load_checkpoint, checkpoint, family, size, sampler, prompt):
    model = load_checkpoint(checkpoint)
    unet = model.model.diffusion_model
    vanilla = txt2img(webui, prompt, size, sampler)
    plan = build_plan(family, size, size, train_size=size // 2)  # the official 2x-per-side preset
    with ScaleCrafterController(unet, plan) as controller:
        recorder = Recorder(unet, controller)
        try:
            crafted = txt2img(webui, prompt, size, sampler)
        finally:
            recorder.handle.remove()
    calls = [c for c in recorder.calls if c is not None]
    assert len(calls) == len(recorder.calls) >= 4  # every UNet call was seen at the planned latent size
    assert any(factors for _, _, factors in calls) and any(not factors for _, _, factors in calls)
    for t, base_mode, factors in calls:
        assert not base_mode and factors == plan.main_at(t)
    assert np.abs(crafted - vanilla).max() > 0
    assert np.array_equal(txt2img(webui, prompt, size, sampler), vanilla)  # nothing left behind
    assert not unet._forward_pre_hooks and not any("_conv_forward" in vars(m) for m in unet.modules())
