"""T2I-Adapters and FreeU beside ScaleFusion on Forge's own classes, in this process (issue 23 §3): Forge's ``T2IAdapter``
(``backend/patcher/controlnet.py``: its ``get_control`` resizes, broadcasts and merges the features) around Forge's
``Adapter`` network in its SDXL layout, feeding the tiny SDXL ``IntegratedUNet2DConditionModel`` (tiny_sdxl.py),
whose ``apply_control`` adds the features at the input and middle blocks.

The fixture checkpoint of the server tests cannot take one: Forge's loader gives a T2I-Adapter the 320/640/1280
feature widths of a full SD1, and the fixture UNet is 320 wide at every level, so Forge would skip every feature
with a warning. Here the adapter is built at the tiny UNet's widths (what a loaded SDXL adapter is to SDXL).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from tests.integration_forge.tiny_sdxl import ADM_CHANNELS, CONTEXT_DIM

GEOMETRY = dict(dilation=2, window=8, stride=4)   # a 16x16 latent: 9 local views, 4 dilated samples of 8x8


@pytest.fixture
def t2i(forge_backend):
    """A fresh T2IAdapter unit with a one-image hint (what Forge's ControlNet script hands the patcher)."""
    from backend.nn.cnets.t2i_adapter import Adapter
    from backend.patcher.controlnet import T2IAdapter

    torch.manual_seed(5)  # the network's initial weights come from torch's global generator
    adapter = Adapter(channels=[32, 64, 128, 128], nums_rb=2, cin=3 * 16 * 16, ksize=1, sk=True, use_conv=False,
                      xl=True).eval().requires_grad_(False)

    def make(hint_px: int = 128, seed: int = 6):
        unit = T2IAdapter(adapter, adapter.input_channels, device=torch.device("cpu"))
        hint = torch.rand(1, 3, hint_px, hint_px, generator=torch.Generator().manual_seed(seed))
        return unit.set_cond_hint(hint, strength=1.0)
    return make


def forge_apply_model(unet):
    """``KModel.apply_model`` reduced to what these tests compare: the UNet's output for the given control."""
    def apply_model(x, t, c_crossattn=None, y=None, control=None, transformer_options=None, **_):
        return unet(x, timesteps=t * 100, context=c_crossattn, y=y, control=control,
                    transformer_options=dict(transformer_options or {}))
    return apply_model


def latent_inputs(rows: int = 2, hw: int = 16, sigma: float = 2.5):
    """``sigma`` x 100 is the UNet's timestep (forge_apply_model): 9.61 is t = 961, where the plans re-dilate."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, 4, hw, hw, generator=g), torch.full((rows,), sigma),
            {"c_crossattn": torch.randn(rows, 7, CONTEXT_DIM, generator=g), "y": torch.randn(rows, ADM_CHANNELS,
                                                                                             generator=g)})


def test_the_adapter_steers_forges_unet(sdxl_unet, t2i):
    """The set-up is live: Forge's unit adds features of the right shapes (no 'could not be applied')."""
    unet = sdxl_unet(seed=2)
    x, sigma, c = latent_inputs()
    apply_model = forge_apply_model(unet)
    with torch.no_grad():
        plain = apply_model(x, sigma, **c)
        control = t2i().get_control(x, sigma, c, 2)
        features = [tuple(f.shape) for f in control["input"] + control["middle"] if f is not None]
        steered = apply_model(x, sigma, control=control, **c)   # apply_control pops what it adds
    assert features == [(1, 128, 4, 4), (1, 64, 8, 8), (1, 32, 8, 8), (1, 128, 4, 4)], features
    assert all(f is None for f in control["input"]) and not control["middle"]   # each feature reached a block
    assert not torch.allclose(steered, plain, atol=1e-3)


def run_views(unet, unit, view_batch: int):
    from lib_hires.demofusion import FusedDenoiser
    from lib_hires.webui.forge.demofusion_views import ControlViews, ViewFunction
    from lib_hires.webui.instance_patch import InstancePatch

    x, sigma, c = latent_inputs()
    controls = ControlViews(unit)
    gate = InstancePatch(unit, "get_control", controls.gate)
    seen = []
    try:
        assert unit.get_control(x, sigma, c, 2) is None   # the sampler's whole-latent call: skipped
        make = functools.partial(FusedDenoiser, **GEOMETRY, view_batch=view_batch, sigma_to_t=lambda s: s * 100,
                                 jitter=torch.Generator().manual_seed(7))
        wrapper = ViewFunction(make, controls=controls)
        args = {"input": x, "timestep": sigma, "cond_or_uncond": [0, 1],
                "c": {**c, "control": None, "control_model": unit,
                      "transformer_options": {"sigmas": sigma[:1], "cond_or_uncond": [0, 1]}}}
        apply_model = forge_apply_model(unet)

        def recording(xv, t, **cv):
            seen.append((tuple(xv.shape), tuple(unit.cond_hint.shape)))
            return apply_model(xv, t, **cv)
        with torch.no_grad():
            out = wrapper(recording, args)
    finally:
        gate.remove()
        controls.restore()
    return out, seen


def test_each_view_of_a_call_gets_the_features_of_its_own_cut_of_a_one_image_hint(sdxl_unet, t2i):
    """Calls of four views (rows view-major) equal calls of one view each: a one-image hint cut per view keeps
    one copy per row, so Forge's broadcast inside ``get_control`` never falls back to the first view's piece."""
    unet = sdxl_unet(seed=2)
    batched, seen = run_views(unet, t2i(), view_batch=4)
    one_by_one, _ = run_views(unet, t2i(), view_batch=1)
    assert [rows for rows, _ in seen] == [(8, 4, 8, 8)] * 3 + [(2, 4, 8, 8)]  # 13 views (9 local, 4 dilated)
    assert all(hint == (rows[0], 3, 64, 64) for rows, hint in seen)   # every row its own hint, cut like the latent
    assert torch.allclose(batched, one_by_one, rtol=0, atol=1e-5), (batched - one_by_one).abs().max()
    without, _ = run_views(unet, t2i(hint_px=128, seed=8), view_batch=4)
    assert not torch.allclose(batched, without, atol=1e-3)   # the hint steers the views


def test_scalecrafter_redilates_while_the_adapter_adds_its_features(sdxl_unet, t2i):
    """ScaleCrafter and a T2I-Adapter compose: the adapter's features reach the re-dilated UNet (the output with
    them differs from the re-dilated one without) and the re-dilation still changes the output with the adapter
    on (it differs from the vanilla UNet with the same features)."""
    from lib_hires.scalecrafter import ScaleCrafterController, build_plan
    from lib_hires.webui.forge.scalecrafter import forge_conv_weights

    unet = sdxl_unet(seed=2)
    x, sigma, c = latent_inputs(hw=64, sigma=9.61)
    apply_model = forge_apply_model(unet)
    plan = build_plan("sdxl", 512, 512, train_size=128)
    with torch.no_grad():
        unit = t2i(hint_px=512)
        control = unit.get_control(x, sigma, c, 2)
        vanilla_steered = apply_model(x, sigma, control=t2i(hint_px=512).get_control(x, sigma, c, 2), **c)
        with ScaleCrafterController(unet, plan, weights=forge_conv_weights):
            redilated = apply_model(x, sigma, **c)
            redilated_steered = apply_model(x, sigma, control=control, **c)
    assert not torch.allclose(redilated_steered, redilated, atol=1e-3)        # the adapter's effect
    assert not torch.allclose(redilated_steered, vanilla_steered, atol=1e-3)  # ScaleCrafter's
    assert not any("forward" in vars(m) for m in unet.modules())


# FreeU ---------------------------------------------------------------------------------------------------------

UI_ONLY = ("gradio", "modules", "modules.scripts", "modules.script_callbacks", "modules.ui_components")


def forge_builtin_script(forge_dir: str, relative: str):
    """A built-in's script file of this Forge, executed as a module: its patch functions are Forge's own code.
    What it imports only for its UI and script registration (gradio, ``modules.*``) is stubbed while it loads,
    and only where this process has not imported the real one."""
    import importlib.util
    import sys
    from types import ModuleType

    path = Path(forge_dir) / "extensions-builtin" / relative
    stubs = {name: ModuleType(name) for name in UI_ONLY if name not in sys.modules}
    if "modules.scripts" in stubs:
        stubs["modules.scripts"].Script, stubs["modules.scripts"].AlwaysVisible = object, object()
    if "modules.script_callbacks" in stubs:
        stubs["modules.script_callbacks"].on_cfg_denoiser = lambda *a, **k: None
        stubs["modules.script_callbacks"].remove_current_script_callbacks = lambda *a, **k: None
    if "modules.ui_components" in stubs:
        stubs["modules.ui_components"].InputAccordion = object
    if "modules" in stubs:
        for name in ("scripts", "script_callbacks", "ui_components"):
            setattr(stubs["modules"], name, stubs.get(f"modules.{name}") or sys.modules[f"modules.{name}"])
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(f"forge_builtin_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return module


@pytest.fixture
def freeu_patcher(forge_backend):
    """``make(unet)`` -> (a real UnetPatcher on ``unet`` with Forge's FreeU v2 patch set by Forge's own
    ``patch_freeu_v2`` at the SDXL preset, the same without FreeU)."""
    from backend.patcher.unet import UnetPatcher

    freeu = forge_builtin_script(os.environ["FORGE_DIR"], "sd_forge_freeu/scripts/forge_freeu.py")
    freeu.FreeUForForge.doFreeU = True

    def make(unet):
        holder = torch.nn.Module()
        holder.diffusion_model = unet
        plain = UnetPatcher(holder, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
        return freeu.patch_freeu_v2(plain, 1.3, 1.4, 0.9, 0.2), plain
    return make


def step_transformer_options(patcher) -> dict:
    """The ``transformer_options`` a step of the ScaleCrafter or DemoFusion pass runs with: the patcher's, through
    the same resize guard (FreeU keeps the sizes: nothing is refused)."""
    from lib_hires.webui.forge import installed

    def refuse(what):
        raise AssertionError(f"refused a size-keeping patch: {what}")
    guarded = installed.resize_guarded(patcher.model_options, refuse)
    assert guarded["transformer_options"]["patches"]["output_block_patch"][0].__wrapped__.__qualname__ == \
        "patch_freeu_v2.<locals>.output_block_patch"
    return guarded["transformer_options"]


def test_freeu_and_scalecrafter_compose_on_forges_unet(sdxl_unet, freeu_patcher):
    from lib_hires.scalecrafter import ScaleCrafterController, build_plan
    from lib_hires.webui.forge.scalecrafter import forge_conv_weights

    unet = sdxl_unet(seed=2)
    patched, plain = freeu_patcher(unet)
    x, sigma, c = latent_inputs(hw=64, sigma=9.61)
    apply_model = forge_apply_model(unet)
    plan = build_plan("sdxl", 512, 512, train_size=128)
    with torch.no_grad():
        vanilla = apply_model(x, sigma, **c)
        freeu_only = apply_model(x, sigma, transformer_options=step_transformer_options(patched), **c)
        with ScaleCrafterController(unet, plan, weights=forge_conv_weights):
            redilated = apply_model(x, sigma, transformer_options=plain.model_options["transformer_options"], **c)
            both = apply_model(x, sigma, transformer_options=step_transformer_options(patched), **c)
    assert not torch.allclose(freeu_only, vanilla, atol=1e-3)   # FreeU acts on these widths (64 and 128 = 2x, 4x)
    assert not torch.allclose(both, redilated, atol=1e-3)       # ... beside ScaleCrafter too
    assert not torch.allclose(both, freeu_only, atol=1e-3)      # and ScaleCrafter still re-dilates
    assert not any("forward" in vars(m) for m in unet.modules())


def test_freeu_acts_in_each_call_of_demofusions_views(sdxl_unet, freeu_patcher):
    from lib_hires.demofusion import FusedDenoiser
    from lib_hires.webui.forge.demofusion_views import ViewFunction

    unet = sdxl_unet(seed=2)
    patched, plain = freeu_patcher(unet)
    x, sigma, c = latent_inputs()
    apply_model = forge_apply_model(unet)
    outputs, shapes = [], []
    for patcher in (patched, plain):
        make = functools.partial(FusedDenoiser, **GEOMETRY, view_batch=4, sigma_to_t=lambda s: s * 100,
                                 jitter=torch.Generator().manual_seed(7))
        options = {**(step_transformer_options(patcher) if patcher is patched else {}), "sigmas": sigma[:1],
                   "cond_or_uncond": [0, 1]}

        def recording(xv, t, transformer_options=None, **cv):
            shapes.append(tuple(xv.shape))
            assert ("patches" in transformer_options) == (patcher is patched)   # the views carry FreeU's patch
            return apply_model(xv, t, transformer_options=transformer_options, **cv)
        with torch.no_grad():
            outputs.append(ViewFunction(make)(recording, {"input": x, "timestep": sigma, "cond_or_uncond": [0, 1],
                                                          "c": {**c, "transformer_options": options}}))
    assert shapes == [(8, 4, 8, 8)] * 3 + [(2, 4, 8, 8)] + [(8, 4, 8, 8)] * 3 + [(2, 4, 8, 8)]
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)
