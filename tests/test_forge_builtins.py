"""Forge's built-ins beside ScaleFusion (issue 23 §3), without Forge: what ``lib_hires.webui.forge.installed`` reads
from a step's ``model_options``, and the passes' decisions through Forge's call order (tests/forge_fakes.py).
The real built-ins on Forge's own classes: tests/integration_forge/test_forge_builtins.py."""
import pytest
import torch

from lib_hires.settings import ScaleFusionSettings
from lib_hires.webui import job as webui_job
from lib_hires.webui.forge import installed
from lib_hires.webui.forge.demofusion import RESIZED as DF_RESIZED
from lib_hires.webui.forge.scalecrafter import CUSTOM_CFG, RESIZED
from lib_hires.webui.messages import RequestError
from tests import forge_fakes
from tests.conftest import tiny_unet
from tests.forge_fakes import FakeForgeDemoFusionTxt2Img, FakeForgeModel, FakeForgeTxt2Img, run_forge_job

SAG_NAME = "SelfAttentionGuidance.patch.<locals>.post_cfg_function"


def refusal(what):
    return f"refused: {what}"


def shrink(h, transformer_options):   # Kohya HRFix's input patch at its block, factor 2
    if transformer_options["block"][1] == 3:
        h = torch.nn.functional.interpolate(h, scale_factor=0.5)
    return h


def keep(h, hsp, transformer_options):  # FreeU's output patch: scales, keeps the sizes
    return h * 1.5, hsp * 0.5


def options_with(**patches):
    return {"transformer_options": {"patches": {k: list(v) for k, v in patches.items()}}, "other": 1}


def test_a_block_patch_that_resizes_the_features_is_refused_where_it_does():
    options = options_with(input_block_patch_after_skip=[shrink], output_block_patch=[keep])
    guarded = installed.resize_guarded(options, refusal)
    patch = guarded["transformer_options"]["patches"]["input_block_patch_after_skip"][0]
    h = torch.randn(1, 8, 12, 10)
    assert torch.equal(patch(h, {"block": ("input", 2)}), h)  # another block: the size is kept, nothing said
    with pytest.raises(RequestError) as error:
        patch(h, {"block": ("input", 3)})
    assert str(error.value) == "refused: input_block_patch_after_skip at input block 3: 12x10 -> 6x5"
    out_h, out_hsp = guarded["transformer_options"]["patches"]["output_block_patch"][0](h, h, {"block": ("output", 0)})
    assert torch.equal(out_h, h * 1.5) and torch.equal(out_hsp, h * 0.5)
    # the patcher's own options are untouched; guarding again does not wrap twice
    assert options["transformer_options"]["patches"]["input_block_patch_after_skip"] == [shrink]
    again = installed.resize_guarded(guarded, refusal)["transformer_options"]["patches"]
    assert again["input_block_patch_after_skip"][0] is patch and guarded["other"] == 1


def test_output_patches_and_block_modifiers_are_guarded_too_and_nothing_installed_is_the_same_object():
    def grow(h, hsp, transformer_options):
        return torch.nn.functional.interpolate(h, scale_factor=2.0), hsp

    def modifier(h, when, transformer_options):
        return h[..., :-1] if when == "after" else h

    options = {"transformer_options": {"patches": {"output_block_patch": [grow]}, "block_modifiers": [modifier]}}
    guarded = installed.resize_guarded(options, refusal)["transformer_options"]
    h = torch.randn(1, 4, 8, 8)
    with pytest.raises(RequestError, match=r"output_block_patch at output block 5: 8x8 -> 16x16"):
        guarded["patches"]["output_block_patch"][0](h, h, {"block": ("output", 5)})
    assert torch.equal(guarded["block_modifiers"][0](h, "before", {"block": ("middle", 0)}), h)
    with pytest.raises(RequestError, match=r"a block modifier \(after\) at middle block 0: 8x8 -> 8x7"):
        guarded["block_modifiers"][0](h, "after", {"block": ("middle", 0)})
    plain = {"transformer_options": {"patches": {"attn1_patch": [lambda *a: a]}}}
    assert installed.resize_guarded(plain, refusal) is plain and installed.resize_guarded({}, refusal) == {}


def test_running_last_and_the_whole_latent_attention_reader():
    def a(args):
        return args

    def b(args):
        return args

    options = {"sampler_post_cfg_function": [b, a]}
    assert installed.running_last(options, b)["sampler_post_cfg_function"] == [a, b]
    assert options["sampler_post_cfg_function"] == [b, a]
    assert installed.running_last(options, a) is options and installed.running_last({}, a) == {}
    assert installed.whole_latent_attention(options) is None
    b.__qualname__ = SAG_NAME
    assert "Self-Attention Guidance" in installed.whole_latent_attention(options)


# Through Forge's call order --------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def backend():
    with forge_fakes.FakeBackend() as fake:
        yield fake


def sc_settings(**changes):
    return ScaleFusionSettings(**{"enabled": True, "method": "ScaleCrafter", "native_size": 128, **changes})


def unet_is_clean(unet) -> bool:
    return not unet._forward_pre_hooks and not any(
        "forward" in vars(m) or "_conv_forward" in vars(m) for m in unet.modules())


def clone_with(p, **options):
    unet = p.sd_model.forge_objects.unet.clone()
    for key, value in options.items():
        if key.startswith("sampler_") and key.endswith("_cfg_function") and key != "sampler_cfg_function":
            unet.model_options[key] = unet.model_options.get(key, []) + [value]
        else:
            unet.model_options[key] = value
    p.sd_model.forge_objects.unet = unet


def test_a_resizing_block_patch_is_refused_at_the_first_step_before_any_unet_call():
    model = FakeForgeModel(tiny_unet("sd1"))
    reached = []

    def kohya(p):
        clone_with(p, transformer_options={"patches": {"input_block_patch": [shrink]}})
        unet = p.sd_model.forge_objects.unet

        def pre_cfg(model, cond, uncond, x, timestep, model_options):  # a pre-CFG function after ours
            reached.append(model_options["transformer_options"]["patches"]["input_block_patch"][0])
            return model, cond, uncond, x, timestep, model_options

        unet.model_options["sampler_pre_cfg_function"].append(pre_cfg)

    p = FakeForgeTxt2Img(model, width=256, height=256, scripts=[kohya])
    run_forge_job(p, sc_settings())  # the fake UNet has no blocks that call the patches: this records the guard
    guard = reached[0]
    assert getattr(guard, "_resize_guarded", False) and guard.__wrapped__ is shrink
    with pytest.raises(RequestError) as error:
        guard(torch.randn(1, 4, 8, 8), {"block": ("input", 3)})
    assert str(error.value) == RESIZED.format(what="input_block_patch at input block 3: 8x8 -> 4x4")
    assert "Kohya HRFix" in str(error.value) and unet_is_clean(tiny_unet("sd1")) and not webui_job._live_hooks


def test_a_custom_cfg_function_with_noise_damping_is_refused_before_the_first_unet_call():
    model = FakeForgeModel(tiny_unet("sd1"))
    calls = []
    handle = tiny_unet("sd1").register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        p = FakeForgeTxt2Img(model, width=256, height=256,
                             scripts=[lambda p: clone_with(p, sampler_cfg_function=lambda a: a["cond"])])
        with pytest.raises(RequestError) as error:
            run_forge_job(p, sc_settings(noise_damped_cfg="on"))
    finally:
        handle.remove()
    assert str(error.value) == CUSTOM_CFG and calls == []
    assert unet_is_clean(tiny_unet("sd1")) and not webui_job._live_hooks


def test_noise_damping_runs_after_a_guidance_post_cfg_function_installed_after_it():
    """SAG and PAG add guidance from the step's own (re-dilated) predictions: installed after ours, they still run
    first and see the re-dilated uncond, and the result is base + w (cond - uncond) + their term."""
    from lib_hires.webui.forge import model as forge_model
    from lib_hires.webui.forge.scalecrafter import ForgeScaleCrafterPass
    from lib_hires.webui.scalecrafter_pass import plan_for_latent

    model = FakeForgeModel(tiny_unet("sd1"))
    info = forge_model.describe(model, 128)
    plan = plan_for_latent(info, sc_settings(noise_damped_cfg="on"), (32, 32))
    ours = model.forge_objects.unet.clone()
    seen = []

    def guidance(args):   # a SAG-like term from the uncond prediction
        seen.append(args["uncond_denoised"].clone())
        return args["denoised"] + 0.25 * args["uncond_denoised"]

    gen = torch.Generator().manual_seed(0)
    x, cond, uncond = torch.randn(1, 4, 32, 32, generator=gen), torch.randn(1, 7, 32), torch.randn(1, 7, 32)
    sigma = ours.model.predictor.sigmas[960].view(1)
    active = ForgeScaleCrafterPass(plan, info, ours)
    try:
        theirs = ours.clone()   # SAG's script after ours: its clone, its post-CFG function last on the patcher
        theirs.set_model_sampler_post_cfg_function(guidance)
        assert theirs.model_options["sampler_post_cfg_function"][-1] is guidance
        out, _, _ = forge_fakes.sampling_function_inner(
            theirs.model, x, sigma, forge_fakes.conds(uncond), forge_fakes.conds(cond), 7.0, theirs.model_options)
        with active.controller.base_pass():
            _, base = forge_fakes.calc_cond_uncond_batch(theirs.model, [], forge_fakes.conds(uncond), x, sigma, {})
        dilated_cond, dilated_uncond = forge_fakes.calc_cond_uncond_batch(
            theirs.model, forge_fakes.conds(cond), forge_fakes.conds(uncond), x, sigma, {})
    finally:
        active.remove()
    assert len(seen) == 1 and torch.equal(seen[0], dilated_uncond) and not torch.allclose(base, dilated_uncond)
    expected = base + 7.0 * (dilated_cond - dilated_uncond) + 0.25 * dilated_uncond
    assert torch.allclose(out, expected, atol=1e-5) and active.base_evaluations == 1
    assert theirs.model_options["sampler_post_cfg_function"][-1] is guidance  # the patcher's own order is kept
    assert unet_is_clean(tiny_unet("sd1"))


def df_settings(**changes):
    return ScaleFusionSettings(**{"enabled": True, "method": "DemoFusion", "native_size": 128, "scale": 2.0,
                                  "stride": 16, **changes})


@pytest.fixture
def stages(k_diffusion):
    with forge_fakes.FakeForgeStages(k_diffusion.sampling.sample_euler):
        yield


def df_run(p, job_settings):
    from lib_hires.webui.forge.job import ForgeJob

    active = webui_job.begin(p, [job_settings.to_dict()], lambda: type(job_settings)(), ForgeJob)
    p.job = active
    try:
        return p.sample(conditioning=p.cond, unconditional_conditioning=p.uncond, seeds=p.seeds,
                        subseeds=p.subseeds, subseed_strength=0.0, prompts=[""])
    finally:
        active.finish()


def test_demofusion_refuses_sag_from_what_it_installed_at_stage_1s_first_step(stages):
    model = FakeForgeModel(tiny_unet("sd1"))
    calls = []

    def sag(args):
        return args["denoised"]

    sag.__qualname__ = SAG_NAME
    handle = tiny_unet("sd1").register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        p = FakeForgeDemoFusionTxt2Img(model, width=256, height=256,
                                       scripts=[lambda p: clone_with(p, sampler_post_cfg_function=sag)])
        with pytest.raises(RequestError) as error:
            df_run(p, df_settings())
    finally:
        handle.remove()
    assert "DemoFusion cannot run with Self-Attention Guidance" in str(error.value) and calls == []
    assert unet_is_clean(tiny_unet("sd1")) and not webui_job._live_hooks
    # the same post-CFG function under another name (not SAG's) runs
    other = FakeForgeDemoFusionTxt2Img(model, width=256, height=256,
                                       scripts=[lambda p: clone_with(p, sampler_post_cfg_function=lambda a:
                                                                     a["denoised"])])
    assert df_run(other, df_settings()).shape == (1, 4, 64, 64)


def test_demofusions_stages_guard_the_block_patches_with_its_own_reason(stages):
    model = FakeForgeModel(tiny_unet("sd1"))
    guards = []

    def kohya(p):
        clone_with(p, transformer_options={"patches": {"input_block_patch": [shrink]}})

        def pre_cfg(model, cond, uncond, x, timestep, model_options):
            guards.append((p.job.run.stage.index, model_options["transformer_options"]["patches"]["input_block_patch"][0]))
            return model, cond, uncond, x, timestep, model_options

        p.sd_model.forge_objects.unet.model_options["sampler_pre_cfg_function"].append(pre_cfg)

    p = FakeForgeDemoFusionTxt2Img(model, width=256, height=256, scripts=[kohya])
    df_run(p, df_settings())
    assert {index for index, _ in guards} == {1, 2}  # every stage, every step
    for _, guard in guards:
        with pytest.raises(RequestError) as error:
            guard(torch.randn(1, 4, 8, 8), {"block": ("input", 3)})
        assert str(error.value) == DF_RESIZED.format(what="input_block_patch at input block 3: 8x8 -> 4x4")
    assert unet_is_clean(tiny_unet("sd1")) and not webui_job._live_hooks
