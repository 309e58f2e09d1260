"""The refiner with ScaleCrafter in Forge (issue 23 §1), through Forge's call order (tests/forge_fakes.py): at the
switch ``apply_refiner`` makes a freshly loaded model ``p.sd_model`` inside a denoiser call, the on_cfg_denoiser
callbacks run, then ``sampling_function`` reads that model's ``forge_objects.unet``. The pass follows: the base's
hooks come off, the refiner's UNet is re-dilated with its own plan on a clone of its UnetPatcher, or runs vanilla
(no base calls) where no preset fits it, as in A1111."""
from types import SimpleNamespace

import pytest
import torch

from lib_hires.settings import ScaleFusionSettings
from lib_hires.webui import job as webui_job
from tests import forge_fakes
from tests.conftest import tiny_unet
from tests.forge_fakes import FakeForgeModel, FakeForgeTxt2Img, run_forge_job

SWITCH_AT = 0.3   # of 3 steps (t 980, 600, 200): the base samples step 0, the refiner steps 1 and 2


@pytest.fixture(autouse=True)
def backend():
    with forge_fakes.FakeBackend() as fake:
        yield fake


def settings(**changes):
    return ScaleFusionSettings(**{"enabled": True, "method": "ScaleCrafter", "native_size": 128, **changes})


def with_refiner(p, unet, name="tiny-refiner", family="sd1"):
    refiner = FakeForgeModel(unet, name, family=family)
    refiner.sd_checkpoint_info = SimpleNamespace(short_title=name, name_for_extra=name)
    p.refiner_model, p.refiner_checkpoint_info, p.refiner_switch_at = refiner, refiner.sd_checkpoint_info, SWITCH_AT
    return refiner


def unet_is_clean(unet) -> bool:
    return not unet._forward_pre_hooks and not any(
        "forward" in vars(m) or "_conv_forward" in vars(m) for m in unet.modules())


class Calls:
    """Forward hooks on both UNets: which UNet ran, the largest factor its convs ran with (the job's pass, where it
    is armed on that UNet), and whether the base UNet had any hook left at that moment."""

    def __init__(self, p, **unets):
        self.calls, self.handles = [], []
        base = unets["base"]
        for name, unet in unets.items():
            def record(module, args, output, name=name):
                active = p.job.active
                on_this = active is not None and active.unet is module
                factor = max(h.factor for h in active.controller.handle.hooks.values()) if on_this else 1.0
                self.calls.append((name, factor, unet_is_clean(base)))
            self.handles.append(unet.register_forward_hook(record))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def run_with_refiner(refiner_unet, chosen, **refiner):
    base = tiny_unet("sd1")
    p = FakeForgeTxt2Img(FakeForgeModel(base), width=256, height=256, steps=3)
    refiner_model = with_refiner(p, refiner_unet, **refiner)
    calls = Calls(p, base=base, refiner=refiner_unet)
    try:
        out = run_forge_job(p, chosen)
    finally:
        calls.remove()
    return p, refiner_model, calls.calls, out


def test_the_refiner_is_redilated_with_its_own_plan_and_noise_damped_base():
    refiner_unet = tiny_unet("sd1", seed=1)
    p, refiner, calls, out = run_with_refiner(refiner_unet, settings(noise_damped_cfg="on"))
    # step 0 (t 980) on the base: re-dilated, then its vanilla base call of the uncond rows; step 1 (t 600) the
    # same on the refiner, with the base UNet already clean; step 2 (t 200) past the preset's t >= 401: vanilla
    assert calls == [("base", 2.0, False), ("base", 1.0, False),
                     ("refiner", 2.0, True), ("refiner", 1.0, True), ("refiner", 1.0, True)]
    params = p.extra_generation_params
    assert params["ScaleCrafter refiner preset"] == params["ScaleCrafter preset"]  # the same family and size
    assert params["Refiner"] == "tiny-refiner"
    sampled = p.refined_with[0]
    assert sampled is refiner.forge_objects_after_applying_lora.unet  # what Forge loaded; a clone of it sampled
    assert refiner.forge_objects.unet is not sampled
    assert len(refiner.forge_objects.unet.model_options["sampler_post_cfg_function"]) == 1
    assert sampled.model_options == {}
    assert unet_is_clean(tiny_unet("sd1")) and unet_is_clean(refiner_unet) and not webui_job._live_hooks
    assert webui_job._current.job is None
    again = run_with_refiner(refiner_unet, settings(noise_damped_cfg="on"))[3]
    assert torch.equal(again, out)


def test_a_refiner_without_a_preset_runs_vanilla_with_no_base_calls_and_says_so():
    refiner_like = tiny_unet("sd1", seed=2)   # a 4-level UNet flagged SDXL, as the SDXL refiner (no preset)
    p, refiner, calls, out = run_with_refiner(refiner_like, settings(noise_damped_cfg="on"), name="refiner-like",
                                              family="sdxl")
    assert calls == [("base", 2.0, False), ("base", 1.0, False), ("refiner", 1.0, True), ("refiner", 1.0, True)]
    said = p.extra_generation_params["ScaleCrafter refiner preset"]
    assert said.startswith("none (refiner-like: ") and "4 levels" in said
    assert refiner.forge_objects.unet is refiner.forge_objects_after_applying_lora.unet  # nothing armed there
    assert unet_is_clean(tiny_unet("sd1")) and unet_is_clean(refiner_like) and not webui_job._live_hooks


def test_without_a_switch_nothing_follows():
    p = FakeForgeTxt2Img(FakeForgeModel(tiny_unet("sd1")), width=256, height=256, steps=3)
    with_refiner(p, tiny_unet("sd1", seed=1))
    p.refiner_switch_at = 1.0
    run_forge_job(p, settings())
    assert not p.refined_with and "ScaleCrafter refiner preset" not in p.extra_generation_params
    assert "ScaleCrafter preset" in p.extra_generation_params and not webui_job._live_hooks


def test_the_next_batch_after_a_switch_arms_on_the_reloaded_base_again():
    """Forge reloads the base model at each batch of ``process_images`` (``forge_model_reload``): the job describes
    it anew (another object than the refiner it followed last) and re-dilates the base's steps again."""
    from lib_hires.webui.forge.job import ForgeJob

    base_model = FakeForgeModel(tiny_unet("sd1"))
    refiner_like = tiny_unet("sd1", seed=2)
    p = FakeForgeTxt2Img(base_model, width=256, height=256, steps=3)
    with_refiner(p, refiner_like, name="refiner-like", family="sdxl")  # the refiner runs vanilla
    active = webui_job.begin(p, [settings().to_dict()], lambda: ScaleFusionSettings(), ForgeJob)
    p.job = active
    calls = Calls(p, base=tiny_unet("sd1"), refiner=refiner_like)
    try:
        p.sample()
        first = list(calls.calls)
        p.sd_model = base_model  # the next batch: Forge loads the base again
        p.sample()
        second = calls.calls[len(first):]
    finally:
        calls.remove()
        active.finish()
    assert first == second == [("base", 2.0, False), ("refiner", 1.0, True), ("refiner", 1.0, True)]
    assert unet_is_clean(tiny_unet("sd1")) and unet_is_clean(refiner_like) and not webui_job._live_hooks
