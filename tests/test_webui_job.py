"""A ScaleFusion job against stand-ins of the WebUI's call order (``tests/webui_fakes.py``), no WebUI needed.

Model switches inside one job (a hires pass on another checkpoint, the refiner), DDIM CFG++'s guidance
multiplier and uncond re-noising, X/Y/Z cells sharing ``extra_generation_params``, request overrides of the
saved defaults, and the in-step TAESD preview of --medvram.
"""
import copy

import pytest
import torch

from lib_hires.scalecrafter import guided_combine
from lib_hires.settings import DF, SC, ScaleFusionSettings, SettingsError
from lib_hires.vae import shrink_latent
from lib_hires.webui import decoding, job, options
from tests.conftest import tiny_unet
from tests.webui_fakes import FakeModel, FakeTxt2Img, FakeWebUI, InnerModel, perturbed, run_job

SC_2X = ScaleFusionSettings(enabled=True, method=SC, native_size=128)  # 256 px: the official 2x preset


def model(name="base", family="sd1"):
    return FakeModel(copy.deepcopy(tiny_unet("sd1")), name, family=family)


@pytest.fixture
def webui(monkeypatch):
    return FakeWebUI(model()).install(monkeypatch)


class UNetCalls:
    """For each UNet call of a model: (latent size, whether any of its 3x3 convs is hooked at that moment)."""

    def __init__(self, *models):
        self.calls = {id(m): [] for m in models}
        self.handles = [m.model.diffusion_model.register_forward_pre_hook(self._recorder(m)) for m in models]

    def _recorder(self, m):
        def record(unet, args):
            hooked = any("_conv_forward" in vars(c) for c in unet.modules())
            self.calls[id(m)].append((tuple(args[0].shape[-2:]), hooked))
        return record

    def of(self, m):
        return self.calls[id(m)]

    def remove(self):
        for h in self.handles:
            h.remove()


def assert_no_hooks(*models):
    for m in models:
        unet = m.model.diffusion_model
        assert not unet._forward_pre_hooks or all("UNetCalls" in repr(h) for h in unet._forward_pre_hooks.values())
        assert not any("_conv_forward" in vars(c) for c in unet.modules())
        assert "decode_first_stage" not in vars(m)
    assert not job._live_hooks and job._current.job is None


# --- a hires pass on another checkpoint --------------------------------------------------------------------------

@pytest.mark.parametrize("same_object", [False, True], ids=["new model object", "weights into the same object"])
def test_a_hires_pass_on_another_checkpoint_is_re_dilated_and_its_decode_tiled(webui, k_diffusion, same_object):
    base = webui.sd_model
    other = perturbed(base, "other")
    webui.shared.opts.data["scalefusion_decode_tile"] = 16
    settings = SC_2X.replace(passes="hires")

    def txt2img(s):
        webui.shared.sd_model = base
        base.model.diffusion_model.load_state_dict(tiny_unet("sd1").state_dict())  # the base weights again
        base.sd_checkpoint_info = type(base.sd_checkpoint_info)(name_for_extra="base")
        p = FakeTxt2Img(webui, k_diffusion, width=64, height=64, steps=1, enable_hr=True, hr_scale=4,
                        hr_checkpoint=other, hr_same_object=same_object)
        return p, run_job(p, s)

    calls = UNetCalls(base, other)
    try:
        p, result = txt2img(settings)
        hires_model = base if same_object else other
        hires_calls = [hooked for size, hooked in calls.of(hires_model) if size == (32, 32)]
        assert hires_calls and all(hires_calls)  # the model that samples the hires pass is the re-dilated one
        assert p.extra_generation_params["ScaleCrafter hires preset"] == "sd1.5_1024x1024"
        assert "ScaleCrafter preset" not in p.extra_generation_params  # passes: hires
        assert p.decoded_by == [hires_model] and hires_model.decoded and max(map(max, hires_model.decoded)) <= 16
        assert_no_hooks(base, other)
        _, plain = txt2img(ScaleFusionSettings())
        assert not torch.allclose(result.samples, plain.samples, atol=1e-4)  # ScaleCrafter changed the hires pass
        assert hires_model.decoded[-1] == (32, 32)  # the plain job's decode is untouched
    finally:
        calls.remove()


def test_a_hires_checkpoint_without_a_preset_runs_vanilla_and_says_so(webui, k_diffusion):
    base = webui.sd_model
    refiner_like = perturbed(base, "refiner-like", family="sdxl")  # an SDXL-flagged 4-level UNet, as the refiner
    calls = UNetCalls(base, refiner_like)
    try:
        p = FakeTxt2Img(webui, k_diffusion, width=64, height=64, steps=1, enable_hr=True, hr_scale=4,
                        hr_checkpoint=refiner_like)
        run_job(p, SC_2X.replace(passes="hires"))
        assert calls.of(refiner_like) and not any(hooked for _, hooked in calls.of(refiner_like))
        said = p.extra_generation_params["ScaleCrafter hires preset"]
        assert said.startswith("none (refiner-like: ") and "4 levels" in said
        assert_no_hooks(base, refiner_like)
    finally:
        calls.remove()


# --- the refiner -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("same_object", [False, True], ids=["new model object", "weights into the same object"])
def test_the_refiner_samples_re_dilated_with_its_own_noise_damped_base(webui, k_diffusion, same_object):
    base = webui.sd_model
    refiner = perturbed(base, "refiner")
    webui.refiner = (1, refiner, same_object)   # after the first of 3 steps (at t = 999, 500, 0)
    calls = UNetCalls(base, refiner)
    try:
        p = FakeTxt2Img(webui, k_diffusion, width=256, height=256, steps=3)
        run_job(p, SC_2X.replace(noise_damped_cfg="on"))  # a base (uncond) call per step: 2 UNet calls
        refined_by = base if same_object else refiner
        after_switch = calls.of(refined_by)[2:] if same_object else calls.of(refiner)
        # step 2: the main and the base call; step 3 is past the base set's end (t < 401): the main call only
        assert len(after_switch) == 3 and all(hooked for _, hooked in after_switch)
        assert len(calls.of(base)) == (5 if same_object else 2)
        params = p.extra_generation_params
        assert params["ScaleCrafter preset"] == "sd1.5_1024x1024"
        if not same_object:  # a new model object: the pass was armed again on it
            assert params["ScaleCrafter refiner preset"] == "sd1.5_1024x1024"
        assert_no_hooks(base, refiner)
    finally:
        calls.remove()


def test_a_refiner_without_a_preset_runs_vanilla_without_base_calls(webui, k_diffusion):
    base = webui.sd_model
    refiner = perturbed(base, "xl-refiner", family="sdxl")  # 4 levels under the SDXL flag: no preset fits
    webui.refiner = (1, refiner, False)
    calls = UNetCalls(base, refiner)
    try:
        p = FakeTxt2Img(webui, k_diffusion, width=256, height=256, steps=3)  # t = 999, 500, 0
        run_job(p, SC_2X.replace(noise_damped_cfg="on"))
        assert [hooked for _, hooked in calls.of(base)] == [True, True]  # step 1: main + base call, re-dilated
        assert len(calls.of(refiner)) == 2 and not any(hooked for _, hooked in calls.of(refiner))  # no base calls
        said = p.extra_generation_params["ScaleCrafter refiner preset"]
        assert said.startswith("none (xl-refiner: ") and "4 levels" in said
        assert_no_hooks(base, refiner)
    finally:
        calls.remove()


def test_a_model_without_a_preset_is_refused_before_sampling(monkeypatch, k_diffusion):
    webui = FakeWebUI(model("xl-refiner", family="sdxl")).install(monkeypatch)
    p = FakeTxt2Img(webui, k_diffusion, width=256, height=256)
    with pytest.raises(job.RequestError, match="4 levels"):
        run_job(p, SC_2X)
    assert_no_hooks(webui.sd_model)


# --- DDIM CFG++ --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg_scale", [12.5, 6.0])
def test_ddim_cfgpp_gets_the_damped_guidance_and_re_noises_along_the_base_uncond(webui, k_diffusion, cfg_scale):
    """``ddim_cfgpp`` sets ``cond_scale_miltiplier = 1/12.5`` (so CFG 12.5 reaches combine_denoised as 1.0)
    and re-noises along ``last_noise_uncond``; under noise damping both must be the base UNet's.
    With ``noise_damped_cfg: on`` at 2x the base UNet is the vanilla one, so it is computed here after the job."""
    p = FakeTxt2Img(webui, k_diffusion, width=256, height=256, steps=1, cfgpp=True)
    p.cfg_scale = cfg_scale
    run_job(p, SC_2X.replace(noise_damped_cfg="on"))
    step = p.samplers[0].model_wrap_cfg.steps[0]
    inner = InnerModel(k_diffusion, webui.sd_model)
    base = inner(step["x"], step["sigma"], cond={"c_crossattn": [p.uncond], "c_concat": [p.image_cond(step["x"])]})
    torch.testing.assert_close(step["last_noise_uncond"], base)
    assert not torch.allclose(step["last_noise_uncond"], step["x_out"][-1:], atol=1e-3)
    expected = guided_combine(step["x_out"], [[(0, 1.0)]], cfg_scale / 12.5, base)
    torch.testing.assert_close(step["denoised"], expected, atol=1e-5, rtol=1e-5)
    assert_no_hooks(webui.sd_model)


def test_skipped_uncond_rows_get_no_base_call_under_cfgpp(webui, k_diffusion):
    """NGMS / skip early CFG pass a literal 1.0 with cond rows copied into the uncond slot: plain CFG, no base."""
    calls = UNetCalls(webui.sd_model)
    try:
        p = FakeTxt2Img(webui, k_diffusion, width=256, height=256, steps=1, cfgpp=True, skip_uncond=True)
        run_job(p, SC_2X.replace(noise_damped_cfg="on"))
        assert len(calls.of(webui.sd_model)) == 1  # one cond-only call
        for step in p.samplers[0].model_wrap_cfg.steps:
            assert torch.equal(step["denoised"], step["x_out"][:1])
            assert torch.equal(step["last_noise_uncond"], step["x_out"][:1])
    finally:
        calls.remove()


# --- X/Y/Z cells -------------------------------------------------------------------------------------------------

def test_xyz_cells_each_describe_only_themselves(webui, k_diffusion):
    """``xyz_grid`` builds each cell with ``copy(p)``: one ``extra_generation_params`` dict for all cells."""
    grid_p = FakeTxt2Img(webui, k_diffusion, width=128, height=128, steps=1)  # the native size: a no-op plan
    grid_p.extra_generation_params["Other extension"] = "kept"
    enabled = copy.copy(grid_p)
    run_job(enabled, SC_2X)
    assert enabled.extra_generation_params["ScaleFusion"] == SC
    assert enabled.extra_generation_params["ScaleCrafter preset"] == "rule s=1"
    disabled = copy.copy(grid_p)
    run_job(disabled, ScaleFusionSettings())
    assert disabled.extra_generation_params == {"Other extension": "kept"}
    demofusion = copy.copy(enabled)  # even a cell copied from an enabled one
    active = job.begin(demofusion, [ScaleFusionSettings(enabled=True, method=DF).to_dict()], ScaleFusionSettings)
    active.write_infotext(demofusion)
    keys = set(demofusion.extra_generation_params)
    assert "ScaleCrafter preset" not in keys and "ScaleFusion" in keys and "Other extension" in keys
    assert grid_p.extra_generation_params == {"Other extension": "kept"}  # the grid's own p is untouched
    active.finish()


# --- override_settings -------------------------------------------------------------------------------------------

def test_request_overrides_of_the_saved_defaults_apply_to_that_request_only():
    opts = type("Opts", (), {"data": {"scalefusion_default_dilation_multiplier": 1.5}})()
    assert options.defaults(opts).dilation_multiplier == 1.5
    overridden = options.defaults(opts, {"scalefusion_default_dilation_multiplier": 2.0,
                                         "scalefusion_default_noise_damped_cfg": "off", "sd_vae": "whatever"})
    assert overridden.dilation_multiplier == 2.0 and overridden.noise_damped_cfg == "off"
    assert options.defaults(opts).dilation_multiplier == 1.5
    with pytest.raises(SettingsError, match=r"override_settings\['scalefusion_default_dilation_multiplier'\]"):
        options.defaults(opts, {"scalefusion_default_dilation_multiplier": 9.0})


def test_an_invalid_override_refuses_the_request(webui, k_diffusion):
    p = FakeTxt2Img(webui, k_diffusion)
    opts = type("Opts", (), {"data": {}})()
    job.begin(p, [{"enabled": True}],
              lambda: options.defaults(opts, {"scalefusion_default_noise_damped_cfg": "sometimes"}))
    with pytest.raises(job.RequestError, match="noise_damped_cfg"):
        p.sample()


# --- in-step TAESD previews (--medvram / --lowvram) ---------------------------------------------------------------

@pytest.mark.parametrize("method,lowvram", [("TAESD", False), ("Approx NN", False), ("Full", True)],
                         ids=["TAESD", "Approx NN", "Full under --lowvram is Approx NN"])
def test_in_step_previews_of_preview_decoders_are_decoded_from_a_shrunk_latent(webui, k_diffusion, monkeypatch,
                                                                              method, lowvram):
    monkeypatch.setattr(decoding, "shrink_latent", lambda z: shrink_latent(z, max_side=8))  # 16 px latents here
    webui.shared.parallel_processing_allowed = False  # what --medvram / --lowvram set
    webui.shared.opts.show_progress_type = method
    webui.lowvram.enabled = lowvram
    decoder = webui.taesd if method == "TAESD" else webui.approx_nn
    p = FakeTxt2Img(webui, k_diffusion, width=128, height=128, steps=2)
    run_job(p, SC_2X)
    assert decoder.seen == [(8, 8), (8, 8)]
    assert "forward" not in vars(decoder) and not webui.sd_model.decoded
    decoder.seen.clear()
    run_job(FakeTxt2Img(webui, k_diffusion, width=128, height=128, steps=1), ScaleFusionSettings())
    assert decoder.seen == [(16, 16)]  # without ScaleFusion the WebUI's own preview
