"""DemoFusion's WebUI-side pieces that need no WebUI: SDXL size conditioning, ControlNet hint cutting,
the stage patches on a stand-in sampler, and the refusals."""
import math
from types import SimpleNamespace

import pytest
import torch

from lib_hires.demofusion import ModelCall, dilated_views, local_views
from lib_hires.scalecrafter import scan_unet
from lib_hires.settings import ScaleFusionSettings
from lib_hires.webui.controlnet_hints import StageHints, control_params
from lib_hires.webui.demofusion_sampler import (FinalSizeConditioning, StageSampling, engine_settings, stage_plan,
                                                unsupported_reason)
from lib_hires.webui.model_info import ModelInfo
from lib_hires.webui.sdxl_conditioning import SizeConditioning
from tests.conftest import tiny_unet


class SizeEmbedder(torch.nn.Module):
    """sgm's ConcatTimestepEmbedderND: each number embedded as [cos, sin] of 128 frequencies."""

    def __init__(self, input_key, outdim=256):
        super().__init__()
        self.input_key, self.outdim = input_key, outdim

    def forward(self, x):
        half = self.outdim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = x.reshape(-1, 1).float() * freqs
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(x.shape[0], -1)


class TextEmbedder(torch.nn.Module):
    input_key = "txt"


def conditioner():
    return SimpleNamespace(embedders=[TextEmbedder(), TextEmbedder(), SizeEmbedder("original_size_as_tuple"),
                                      SizeEmbedder("crop_coords_top_left"), SizeEmbedder("target_size_as_tuple")])


def vector(pooled, original, crop, target):
    embedders = conditioner().embedders
    rows = [torch.cat([pooled[i], embedders[2](torch.tensor([original]))[0], embedders[3](torch.tensor([crop[i]]))[0],
                       embedders[4](torch.tensor([target]))[0]]) for i in range(len(pooled))]
    return torch.stack(rows)


def test_size_conditioning_writes_the_final_size_and_each_views_crop():
    sd_model = SimpleNamespace(conditioner=conditioner())
    size = SizeConditioning(sd_model, final_width=2048, final_height=1536)
    assert size.available
    pooled = torch.randn(6, 64)  # 3 views x 2 rows (a cond and an uncond row)
    given = vector(pooled, [768, 1024], [(0, 0)] * 6, [768, 1024])
    crops = [(0, 0), (128, 256), (512, 8)]
    edited = size.edit(given, crops)
    expected = vector(pooled, [1536, 2048], [c for c in crops for _ in range(2)], [1536, 2048])
    assert torch.allclose(edited, expected, atol=1e-6)
    assert torch.equal(edited[:, :64], pooled)  # the pooled text embedding is untouched
    without_crops = size.edit(given)
    assert torch.allclose(without_crops, vector(pooled, [1536, 2048], [(0, 0)] * 6, [1536, 2048]), atol=1e-6)
    cond = {"crossattn": torch.randn(6, 7, 8), "vector": given}
    out = size.edit_cond(cond, crops)
    assert out["crossattn"] is cond["crossattn"] and torch.equal(out["vector"], edited)


def test_size_conditioning_is_unavailable_for_other_layouts():
    assert not SizeConditioning(SimpleNamespace(conditioner=SimpleNamespace(embedders=[TextEmbedder()])), 8, 8).available
    assert not SizeConditioning(SimpleNamespace(), 8, 8).available  # SD1/2 have no conditioner
    cond = {"c_crossattn": [torch.zeros(1)]}
    assert SizeConditioning(SimpleNamespace(), 8, 8).edit_cond(cond) is cond


class Param:
    """ControlNet's ControlParams: setting hint_cond drops its caches."""

    def __init__(self, hint):
        self._hint, self.cache_cleared = hint, 0

    @property
    def hint_cond(self):
        return self._hint

    @hint_cond.setter
    def hint_cond(self, value):
        self._hint, self.cache_cleared = value, self.cache_cleared + 1


def test_hints_follow_the_stage_and_every_view_of_a_call():
    hint = torch.rand(1, 3, 256, 192)  # made for a 32x24 latent first stage
    param = Param(hint)
    hints = StageHints([param])
    hints.set_stage((64, 48))
    assert param.hint_cond.shape == (1, 3, 512, 384)
    views = local_views(64, 48, 16, 8)[:3] + dilated_views(64, 48, 2)[:2]
    call = ModelCall(0, 1, tuple(views[:3]), rows=2, size=(16, 16), sigma=torch.ones(2))
    hints.set_call(call)
    assert param.hint_cond.shape == (6, 3, 128, 128)
    stage_hint = hints.stage_hints[0]
    for k, view in enumerate(views[:3]):
        for r in range(2):
            assert torch.equal(param.hint_cond[2 * k + r], view.cut(stage_hint, 8)[0])
    hints.set_call(ModelCall(1, 2, tuple(views[3:]), rows=2, size=(32, 24), sigma=torch.ones(2)))
    assert param.hint_cond.shape == (4, 3, 256, 192)
    hints.restore()
    assert param.hint_cond is hint


def test_control_params_finds_controlnets_units_only():
    unit = Param(torch.zeros(1, 3, 8, 8))
    other = Param(None)
    controlnet = SimpleNamespace(title=lambda: "ControlNet", latest_network=SimpleNamespace(control_params=[unit, other]))
    broken = SimpleNamespace(title=lambda: 1 / 0)
    assert control_params(SimpleNamespace(scripts=SimpleNamespace(alwayson_scripts=[broken, controlnet]))) == [unit]
    assert control_params(SimpleNamespace(scripts=None)) == []


def info(window=64):
    unet = tiny_unet("sd1")
    return ModelInfo("sd1", window * 8, unet, scan_unet(unet))


def test_engine_settings_and_plan_from_the_user_settings():
    settings = ScaleFusionSettings(enabled=True, method="DemoFusion", scale=2.5, view_batch=8, low_vram=True,
                                   cosine_scale_1=2.0, jitter=False)
    engine = engine_settings(settings, info())
    assert (engine.window, engine.stride, engine.view_batch, engine.cosine_scale_1, engine.jitter) == (64, 32, 1, 2.0, False)
    plan = stage_plan(settings, info(), 512, 768)
    assert (plan.final.width, plan.final.height) == (1280, 1920) and len(plan.stages) == 3
    with pytest.raises(ValueError, match="stride must be at most the model's window of 64 latent px"):
        engine_settings(settings.replace(stride=96), info())


def test_unsupported_jobs_are_named():
    model = SimpleNamespace(model=SimpleNamespace(conditioning_key="crossattn"))
    assert unsupported_reason(SimpleNamespace(sd_model=model, enable_hr=False)) is None
    assert "turn Hires. fix off" in unsupported_reason(SimpleNamespace(sd_model=model, enable_hr=True))
    inpaint = SimpleNamespace(model=SimpleNamespace(conditioning_key="hybrid"))
    assert "inpainting" in unsupported_reason(SimpleNamespace(sd_model=inpaint, enable_hr=False))
    assert "masks" in unsupported_reason(SimpleNamespace(sd_model=model, enable_hr=False, image_mask=object()))


class StandInInner(torch.nn.Module):
    """A k-diffusion-like inner model: x0 = x * 0.5 + mean of the crossattn rows."""

    def forward(self, x, sigma, cond=None):
        self.calls = getattr(self, "calls", 0) + 1
        self.last_shape = tuple(x.shape)
        return 0.5 * x + cond["c_crossattn"][0].mean(dim=(1, 2)).view(-1, 1, 1, 1)

    def sigma_to_t(self, sigma):
        return torch.full_like(torch.as_tensor(sigma, dtype=torch.float32), 500.0)


class StandInCFG(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner_model = StandInInner()

    def forward(self, x, sigma, cond=None):
        return self.inner_model(x, sigma, cond={"c_crossattn": [cond]})


def two_evaluation_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Heun's call order: the step's state, the callback, then a predictor point at the next sigma."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        callback({"x": x, "i": i})
        d = (x - denoised) / sigmas[i]
        x_2 = x + d * (sigmas[i + 1] - sigmas[i])
        d_2 = (x_2 - model(x_2, sigmas[i + 1] * s_in, **extra_args)) / sigmas[i + 1]
        x = x + (d + d_2) / 2 * (sigmas[i + 1] - sigmas[i])
    return x


def test_stage_patches_apply_the_skip_residual_at_each_step_start_and_come_off():
    """The callback fires between a step's two evaluations: the residual goes to the state (the first), never to
    the predictor point after the callback."""
    from lib_hires.demofusion import DemoFusionSettings, Stage, skip_residual, skip_weight

    cfg = StandInCFG()
    callbacks = []
    sampler = SimpleNamespace(model_wrap_cfg=cfg, callback_state=callbacks.append, func=two_evaluation_sampler)
    p = SimpleNamespace(sampler=sampler)
    z_up, noise = torch.randn(1, 4, 32, 32), torch.randn(1, 4, 32, 32)
    settings = DemoFusionSettings(window=16, stride=8, jitter=False)
    patches = StageSampling(p, Stage(2, 2.0, 256, 256, 2), settings, z_up, noise, None, None, None, lambda: None)
    seen = []

    def model(x, sigma, **kwargs):
        before = x.clone()
        out = cfg(x, sigma, **kwargs)
        seen.append((before, x.clone(), float(sigma[0])))
        return out

    x = torch.randn(1, 4, 32, 32)
    sampler.func(model, x, torch.tensor([3.0, 2.0, 1.0]), extra_args={"cond": torch.randn(1, 7, 8)},
                 callback=sampler.callback_state)
    c1 = skip_weight(torch.tensor([500.0]), 3.0)
    (state_0, seen_0, _), (mid_0, mid_seen_0, sigma_mid), (state_1, seen_1, sigma_1), _ = seen
    assert torch.allclose(seen_0, skip_residual(state_0, z_up, noise, torch.tensor([3.0]), c1))  # step 1 start
    assert torch.equal(mid_seen_0, mid_0) and sigma_mid == 2.0   # the predictor point after the callback: untouched
    assert sigma_1 == 2.0 and torch.allclose(seen_1, skip_residual(state_1, z_up, noise, torch.tensor([2.0]), c1))
    assert [d["i"] for d in callbacks] == [0, 1] and torch.equal(callbacks[0]["x"], seen_0)  # the sampler's callback
    # every evaluation went through the views: 3x3 local views + 2x2 dilated samples of 16x16, one call each
    assert cfg.inner_model.calls == 4 and cfg.inner_model.last_shape == (13, 4, 16, 16)
    patches.remove()
    assert "forward" not in vars(cfg) and "forward" not in vars(cfg.inner_model)
    assert sampler.func is two_evaluation_sampler  # the sampler's own function is back


def test_stage_patches_stop_at_an_interrupt():
    from lib_hires.demofusion import DemoFusionSettings, Stage

    class Interrupted(BaseException):
        pass

    def interrupt():
        raise Interrupted

    cfg = StandInCFG()
    p = SimpleNamespace(sampler=SimpleNamespace(model_wrap_cfg=cfg, callback_state=lambda d: None,
                                                func=two_evaluation_sampler))
    z = torch.zeros(1, 4, 32, 32)
    patches = StageSampling(p, Stage(2, 2.0, 256, 256, 2), DemoFusionSettings(window=16, stride=8, jitter=False),
                            z, z, None, None, None, interrupt)
    with pytest.raises(Interrupted):
        cfg(torch.zeros(1, 4, 32, 32), torch.tensor([1.0]), cond=torch.zeros(1, 7, 8))
    assert cfg.inner_model.__dict__.get("calls", 0) == 0  # stopped before any UNet call
    patches.remove()


def test_final_size_conditioning_patch():
    edited = []
    size = SimpleNamespace(edit_cond=lambda cond: edited.append(cond) or {"edited": True})
    inner = StandInInner()
    seen = []
    inner.forward = lambda x, sigma, cond=None: seen.append(cond) or x
    patch = FinalSizeConditioning(inner, size)
    inner(torch.zeros(1), torch.zeros(1), cond={"vector": 1})
    assert seen == [{"edited": True}] and edited == [{"vector": 1}]
    patch.remove()
    assert vars(inner)["forward"] is not patch and inner(torch.ones(1), torch.zeros(1), cond={}) == 1  # the old patch is back


def test_unclip_img2img_and_a_refiner_with_global_redilation_are_refused():
    from lib_hires.webui.demofusion_sampler import refiner_reason

    unclip = SimpleNamespace(model=SimpleNamespace(conditioning_key="crossattn-adm"))
    reason = unsupported_reason(SimpleNamespace(sd_model=unclip, enable_hr=False, init_images=[object()]))
    assert "img2img does not support unCLIP" in reason
    assert unsupported_reason(SimpleNamespace(sd_model=unclip, enable_hr=False)) is None  # txt2img: as the WebUI's
    base, refiner = object(), object()
    model = SimpleNamespace(model=SimpleNamespace(conditioning_key="crossattn"), sd_checkpoint_info=base)

    def job(info, switch_at):
        return SimpleNamespace(sd_model=model, enable_hr=False, refiner_checkpoint_info=info,
                               refiner_switch_at=switch_at)

    redilated = ScaleFusionSettings(enabled=True, method="DemoFusion", redilation="global path")
    for switch_at in (0.5, None, 0.0):  # None: apply_refiner switches at once
        assert unsupported_reason(job(refiner, switch_at)) is None  # the refiner takes over in the final stage
        assert "cannot follow the refiner" in refiner_reason(job(refiner, switch_at), redilated)
        assert refiner_reason(job(refiner, switch_at), redilated.replace(redilation="first stage")) is None
    assert refiner_reason(job(refiner, 1.0), redilated) is None   # never switches
    assert refiner_reason(job(base, 0.5), redilated) is None      # the refiner is the model already: no switch
    assert refiner_reason(job(None, 0.5), redilated) is None


def test_img2img_stage_noise_follows_the_initial_noise_multiplier():
    from lib_hires.webui.demofusion_sampler import img2img_noise

    noise = torch.randn(1, 4, 8, 8)
    p = SimpleNamespace(initial_noise_multiplier=0.7, extra_generation_params={})
    assert torch.equal(img2img_noise(p, noise), noise * 0.7)
    assert p.extra_generation_params == {"Noise multiplier": 0.7}  # the key and value img2img's sample writes
    default = SimpleNamespace(initial_noise_multiplier=1.0, extra_generation_params={})
    assert img2img_noise(default, noise) is noise and default.extra_generation_params == {}


def test_the_patched_sampler_function_keeps_its_signature():
    """The WebUI chooses what it passes (sigmas, or sigma_min/sigma_max/n, noise_sampler...) from
    inspect.signature(sampler.func)."""
    import inspect

    from lib_hires.demofusion import DemoFusionSettings, Stage

    cfg = StandInCFG()
    sampler = SimpleNamespace(model_wrap_cfg=cfg, callback_state=lambda d: None, func=two_evaluation_sampler)
    z = torch.zeros(1, 4, 32, 32)
    patches = StageSampling(SimpleNamespace(sampler=sampler), Stage(2, 2.0, 256, 256, 2),
                            DemoFusionSettings(window=16, stride=8, jitter=False), z, z, None, None, None, lambda: None)
    try:
        assert sampler.func is not two_evaluation_sampler
        assert inspect.signature(sampler.func) == inspect.signature(two_evaluation_sampler)
    finally:
        patches.remove()


def test_the_refiner_takes_over_in_the_final_stage_with_its_own_conds_and_views(monkeypatch):
    """Fakes of the WebUI's switch (apply_refiner: load, rebuild the conds into sampler_extra_args, drop the inner
    model): the stage patches make it happen before the CFG call, move the views to the refiner's inner model and
    hand that call the refiner's conds."""
    import sys
    import types

    from lib_hires.demofusion import DemoFusionSettings, Stage
    from lib_hires.webui.demofusion_refiner import RefinerHold, RefinerSwitch

    class SwitchingCFG(StandInCFG):
        def __init__(self):
            super().__init__()
            self.conds_seen = []

        def forward(self, x, sigma, cond=None, uncond=None):
            self.conds_seen.append(cond)
            return self.inner_model(x, sigma, cond={"c_crossattn": [cond]})

    cfg = SwitchingCFG()
    base_inner, refiner_inner = cfg.inner_model, StandInInner()
    refiner_cond = torch.full((1, 7, 8), 2.0)
    sampler = SimpleNamespace(model_wrap_cfg=cfg, callback_state=lambda d: None, func=two_evaluation_sampler,
                              sampler_extra_args={})
    switches = []

    def apply_refiner(cfg_denoiser, sigma):
        if float(sigma[0]) > 2.5 or switches:
            return False
        switches.append(float(sigma[0]))
        cfg_denoiser.inner_model = refiner_inner
        sampler.sampler_extra_args.update(cond=refiner_cond, uncond=refiner_cond)
        return True

    fake = types.ModuleType("modules.sd_samplers_common")
    fake.apply_refiner = apply_refiner
    monkeypatch.setitem(sys.modules, "modules", types.SimpleNamespace(sd_samplers_common=fake))
    monkeypatch.setitem(sys.modules, "modules.sd_samplers_common", fake)

    p = SimpleNamespace(sampler=sampler, refiner_checkpoint_info="refiner")
    hold = RefinerHold(p)
    assert p.refiner_checkpoint_info is None  # earlier stages: apply_refiner never switches
    assert hold.release() == "refiner" and p.refiner_checkpoint_info == "refiner"
    z = torch.zeros(1, 4, 32, 32)
    patches = StageSampling(p, Stage(2, 2.0, 256, 256, 2), DemoFusionSettings(window=16, stride=8, jitter=False),
                            z, z, None, None, None, lambda: None, refiner=RefinerSwitch(cfg))
    sampler.sampler_extra_args.update(cond=torch.zeros(1, 7, 8))  # the WebUI passes this very dict as extra_args
    sampler.func(cfg, torch.randn(1, 4, 32, 32), torch.tensor([3.0, 2.0, 1.0]), extra_args=sampler.sampler_extra_args,
                 callback=lambda d: None)
    assert switches == [2.0]  # at step 1's predictor point: that very call already runs the refiner
    assert [c is refiner_cond for c in cfg.conds_seen] == [False, True, True, True]
    assert base_inner.calls == 1 and refiner_inner.calls == 3           # each evaluation one call through views
    assert refiner_inner.last_shape == (13, 4, 16, 16)                  # the refiner sees views, not the latent
    patches.remove()
    hold.remove()
    assert "forward" not in vars(base_inner) and "forward" not in vars(refiner_inner)
    assert p.refiner_checkpoint_info == "refiner"
