"""DemoFusion's Forge adapter without Forge: the model-function wrapper's views against the engine's fused result
(what A1111 runs) on a tiny UNet, the per-view ControlNet hints and SDXL crops, and the stage's patches on stand-ins
with the shapes of Forge's UnetPatcher, ControlNet and sampler."""
import copy
import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lib_hires.demofusion import DemoFusionSettings, FusedDenoiser, Stage, repeat_rows, skip_residual, skip_weight
from lib_hires.webui.demofusion_sampler import SkipResidualSteps
from lib_hires.webui.forge.demofusion import (StageViews, ViewBatchMemory, largest_call, request_reason,
                                        unsupported_reason)
from lib_hires.webui.forge.demofusion_views import ControlViews, ViewFunction, ViewsUnsupported, cond_indices, cond_mark
from lib_hires.webui.forge.sdxl_size import FinalSizeModifier, ForgeSizeConditioning
from lib_hires.webui.instance_patch import InstancePatch
from lib_hires.webui.messages import RequestError
from tests.conftest import tiny_unet
from tools.tiny_ldm import scaled_linear_alphas_cumprod

GEOMETRY = dict(dilation=2, window=8, stride=4, view_batch=4)  # 16x16 latent: 9 local views + 4 samples of 8x8


class Predictor:
    """Forge's epsilon ``Prediction``: quantised timesteps from the log-sigma table."""

    def __init__(self):
        ac = scaled_linear_alphas_cumprod()
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.prediction_type = "epsilon"

    def timestep(self, sigma):
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)


class KModel:
    """``KModel.apply_model`` (epsilon) around a tiny UNet; control signals are added to its output, and every
    call's transformer options are kept."""

    def __init__(self, unet):
        self.unet, self.predictor = unet, Predictor()
        self.calls = []

    def apply_model(self, x, t, c_crossattn=None, control=None, transformer_options={}, y=None, **kwargs):
        self.calls.append(SimpleNamespace(shape=tuple(x.shape), options=transformer_options, control=control))
        s = t.reshape(-1, 1, 1, 1)
        out = self.unet(x / (s ** 2 + 1) ** 0.5, self.predictor.timestep(t).float(), context=c_crossattn, y=y)
        if control is not None:
            out = out + control["output"][0]
        return x - out * s

    def memory_required(self, shape):
        return shape[0] * shape[2] * shape[3]


def forge_args(x, sigma, c, cond_or_uncond):
    options = {"sigmas": sigma[:x.shape[0] // len(cond_or_uncond)], "cond_or_uncond": cond_or_uncond,
               "cond_mark": cond_mark(cond_or_uncond, sigma[:x.shape[0] // len(cond_or_uncond)])}
    return {"input": x, "timestep": sigma, "c": {**c, "transformer_options": options},
            "cond_or_uncond": cond_or_uncond}


def inputs(rows, seed=0, family="sd1"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, 16, 16, generator=g) * 3
    c = {"c_crossattn": torch.randn(rows, 7, 32, generator=g)}
    if family == "sdxl":
        c["y"] = torch.randn(rows, 16, generator=g)
    return x, torch.full((rows,), 2.5), c


def make_fused(predictor, seed=7, **kw):
    return functools.partial(FusedDenoiser, **{**GEOMETRY, **kw}, sigma_to_t=predictor.timestep,
                             jitter=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunks", [[0, 1], [1], [0, 1, 0, 1]])
def test_views_in_the_wrapper_equal_the_engines_fused_result(chunks):
    """cond+uncond in one call, a lone uncond chunk (Forge splits them when memory is short), batch 2."""
    model = KModel(tiny_unet("sd1"))
    x, sigma, c = inputs(len(chunks))
    reference = make_fused(model.predictor)(lambda xv, sv, **cv: model.apply_model(xv, sv, **cv))(x, sigma, **c)
    model.calls.clear()
    wrapper = ViewFunction(make_fused(model.predictor))
    out = wrapper(model.apply_model, forge_args(x, sigma, c, chunks))
    assert torch.equal(out, reference)
    # 13 views in calls of 4, 4, 4, 1; every call describes its chunks as Forge would: once per view
    assert [call.shape[0] for call in model.calls] == [4 * len(chunks)] * 3 + [len(chunks)]
    for call in model.calls:
        views = call.shape[0] // len(chunks)
        assert call.options["cond_or_uncond"] == chunks * views
        assert torch.equal(call.options["cond_mark"], torch.tensor(chunks * views, dtype=torch.float32))
        assert call.options["sigmas"].shape == (1,)


def test_a_crop_of_the_stage_latent_is_refused_not_fused():
    """Forge's area conditioning hands the model function a crop of the latent: views of it would be
    views of another image, so the wrapper refuses instead of fusing them."""
    model = KModel(tiny_unet("sd1"))
    x, sigma, c = inputs(2)
    wrapper = ViewFunction(make_fused(model.predictor), latent_hw=(16, 16))
    assert wrapper(model.apply_model, forge_args(x, sigma, c, [0, 1])).shape == x.shape  # the whole latent
    model.calls.clear()
    with pytest.raises(ViewsUnsupported, match="128x128 latent.*128x96 part of it"):
        wrapper(model.apply_model, forge_args(x[..., :12, :], sigma, c, [0, 1]))
    assert not model.calls


def test_cond_indices_follow_forges_layout():
    assert cond_indices([0, 1, 0], torch.zeros(2)) == ([0, 1, 4, 5], [2, 3])
    assert cond_mark([1, 0], torch.zeros(2)).tolist() == [1, 1, 0, 0]


def test_a_wrapper_that_held_the_slot_is_chained_and_a_removed_one_passes_through():
    model = KModel(tiny_unet("sd1"))
    x, sigma, c = inputs(2)
    seen = []

    def previous(apply_model, args):
        seen.append((tuple(args["input"].shape), list(args["cond_or_uncond"])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    plain = ViewFunction(make_fused(model.predictor))(model.apply_model, forge_args(x, sigma, c, [0, 1]))
    wrapper = ViewFunction(make_fused(model.predictor), previous=previous)
    assert torch.equal(wrapper(model.apply_model, forge_args(x, sigma, c, [0, 1])), plain)
    assert seen[0] == ((8, 4, 8, 8), [0, 1] * 4) and len(seen) == 4
    # UnetPatcher.clone deep-copies model_options: the copy is the same object, so remove() reaches every copy
    assert copy.deepcopy({"model_function_wrapper": wrapper})["model_function_wrapper"] is wrapper
    wrapper.remove()
    seen.clear()
    whole = wrapper(model.apply_model, forge_args(x, sigma, c, [0, 1]))
    assert seen == [((2, 4, 16, 16), [0, 1])]  # the whole latent, straight to the previous wrapper
    assert whole.shape == x.shape


class ControlNet:
    """Forge's ``ControlNet.get_control`` as far as hints go: resize when the size differs, broadcast when the
    batch does; the signal is the hint pooled to the latent, scaled per unit."""

    def __init__(self, hint, weight, previous=None):
        self.cond_hint_original, self.cond_hint, self.previous_controlnet = hint, None, previous
        self.weight, self.transformer_options = weight, {}
        self.manual_cast_dtype, self.control_model = None, SimpleNamespace(dtype=torch.float32)
        self.hints = []

    def get_control(self, x, t, cond, batched_number):
        prev = self.previous_controlnet.get_control(x, t, cond, batched_number) if self.previous_controlnet else None
        if self.cond_hint is None or self.cond_hint.shape[-2:] != (x.shape[2] * 8, x.shape[3] * 8):
            self.cond_hint = resize(self.cond_hint_original, x.shape[3] * 8, x.shape[2] * 8)
        if self.cond_hint.shape[0] != x.shape[0]:
            self.cond_hint = broadcast(self.cond_hint, x.shape[0], batched_number)
        self.hints.append(self.cond_hint)
        signal = F.avg_pool2d(self.cond_hint, 8)[:, :1].repeat(1, 4, 1, 1) * self.weight
        return {"output": [signal if prev is None else signal + prev["output"][0]]}


def resize(hint, width, height):
    return F.interpolate(hint, size=(height, width), mode="nearest-exact")


def broadcast(hint, rows, chunks):
    """Forge's ``broadcast_image_to``: a one-image hint stays as it is (torch broadcasts it); otherwise the first
    ``rows // chunks`` images, cycled to that many, once per chunk."""
    if hint.shape[0] == 1:
        return hint
    per_chunk = rows // chunks
    cycled = hint[torch.arange(per_chunk) % min(per_chunk, hint.shape[0])]
    return cycled if cycled.shape[0] == rows else torch.cat([cycled] * chunks)


def test_controlnet_hints_are_cut_per_view_and_the_whole_latent_call_is_skipped():
    model = KModel(tiny_unet("sd1"))
    x, sigma, c = inputs(2)
    g = torch.Generator().manual_seed(3)
    first = ControlNet(torch.rand(1, 3, 64, 64, generator=g), 0.5)   # hints at stage 1 (Width/Height)
    head = ControlNet(torch.rand(1, 3, 64, 64, generator=g), -0.25, previous=first)
    controls = ControlViews(head, resize=resize, broadcast=broadcast)
    gate = InstancePatch(head, "get_control", controls.gate)
    assert head.get_control(x, sigma, c, 2) is None  # what calc_cond_uncond_batch asks for the whole latent

    stage_hints = [resize(unit.cond_hint_original, 128, 128).expand(2, -1, -1, -1) for unit in (head, first)]

    def reference_denoiser(xv, sv, **cv):
        control = {"output": [sum(F.avg_pool2d(calls[-1].cut(h, 8), 8)[:, :1].repeat(1, 4, 1, 1) * w
                                  for h, w in zip(stage_hints, (-0.25, 0.5)))]}
        return model.apply_model(xv, sv, control=control, **cv)

    calls = []
    fused = make_fused(model.predictor)(reference_denoiser, before_call=lambda call: calls.append(call))
    reference = fused(x, sigma, **c)
    wrapper = ViewFunction(make_fused(model.predictor), controls=controls)
    args = forge_args(x, sigma, c, [0, 1])
    args["c"].update(control=None, control_model=head)
    out = wrapper(model.apply_model, args)
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)
    cut = [call.cut(stage_hints[0], 8) for call in calls]
    assert all(torch.equal(seen, expected) for seen, expected in zip(head.hints, cut)) and len(head.hints) == 4
    assert head.transformer_options["cond_or_uncond"] == [0, 1]  # the last call: one view
    gate.remove()
    controls.restore()
    assert head.cond_hint is None and first.cond_hint is None and "get_control" not in vars(head)


def test_controlnet_masks_are_refused_by_name():
    unit = ControlNet(torch.zeros(1, 3, 8, 8), 1.0)
    unit.advanced_mask_weighting = torch.ones(1, 1, 8, 8)
    with pytest.raises(RuntimeError, match="ControlNet masks"):
        ControlViews(unit, resize=resize, broadcast=broadcast)


class Timestep(torch.nn.Module):
    """Forge's ``backend.nn.unet.Timestep``: [cos, sin] of ``dim // 2`` frequencies per number."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def forge_vector(pooled, embedder, original, crop, target):
    """As Forge's SDXL engine builds ``vector``: pooled, then h, w, crop top, left, target h, w embedded one by one."""
    numbers = [original[0], original[1], crop[0], crop[1], target[0], target[1]]
    flat = torch.flatten(torch.cat([embedder(torch.Tensor([n])) for n in numbers]))
    return torch.cat([pooled, flat])


def test_sdxl_views_get_the_final_size_and_their_crops():
    model = KModel(tiny_unet("sdxl"))
    embedder = Timestep(2)   # the tiny SDXL's y: 4 pooled + 6 x 2
    size = ForgeSizeConditioning(SimpleNamespace(embedder=embedder), final_width=512, final_height=384)
    assert size.available
    x, sigma, c = inputs(2, family="sdxl")
    pooled = c["y"][:, :4]
    c["y"] = torch.stack([forge_vector(pooled[i], embedder, (128, 128), (0, 0), (128, 128)) for i in range(2)])

    def view_cond(extra, crops):
        args = repeat_rows(extra, 2, len(crops))
        args["y"] = torch.stack([forge_vector(pooled[i], embedder, (384, 512), crop, (384, 512))
                                 for crop in crops for i in range(2)])
        return args

    reference = make_fused(model.predictor)(lambda xv, sv, **cv: model.apply_model(xv, sv, **cv),
                                            view_cond=view_cond)(x, sigma, **c)
    out = ViewFunction(make_fused(model.predictor), size_cond=size)(model.apply_model, forge_args(x, sigma, c, [0, 1]))
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)

    # stage 1: the conditioning modifier puts the final size (crop untouched) into every cond and uncond
    class Condition:
        def __init__(self, cond):
            self.cond = cond

        def _copy_with(self, cond):
            return Condition(cond)

    cond = [{"model_conds": {"y": Condition(c["y"][:1])}}]
    uncond = [{"model_conds": {"y": Condition(c["y"][1:])}}]
    modifier = FinalSizeModifier(size)
    modifier(None, x, sigma, uncond, cond, 7.0, {}, 0)
    expected = forge_vector(pooled[0], embedder, (384, 512), (0, 0), (384, 512))
    assert torch.allclose(cond[0]["model_conds"]["y"].cond[0], expected, atol=1e-6)
    modifier.remove()
    before = uncond[0]["model_conds"]["y"]
    modifier(None, x, sigma, uncond, cond, 7.0, {}, 0)
    assert uncond[0]["model_conds"]["y"] is before  # removed: inert in every copy of the model options


class UnetPatcher:
    """The parts of Forge's UnetPatcher a stage touches."""

    def __init__(self, model, options=None, controlnet=None):
        self.model, self.model_options, self.controlnet_linked_list = model, options or {}, controlnet

    def clone(self):
        return UnetPatcher(self.model, copy.deepcopy(self.model_options), self.controlnet_linked_list)

    def memory_required(self, shape):
        return self.model.memory_required(shape)


def forge_p(unet):
    objects = SimpleNamespace(unet=unet)
    return SimpleNamespace(sd_model=SimpleNamespace(forge_objects=objects))


ENGINE = DemoFusionSettings(window=8, stride=4, view_batch=4)
STAGE = Stage(2, 2.0, 128, 128, 2)


def test_stage_views_install_on_a_clone_size_memory_to_the_views_and_come_off():
    model = KModel(tiny_unet("sd1"))
    head = ControlNet(torch.rand(1, 3, 64, 64), 1.0)
    unet = UnetPatcher(model, controlnet=head)
    p = forge_p(unet)
    views = StageViews(p, STAGE, ENGINE, torch.Generator().manual_seed(1), None, lambda: None)
    clone = p.sd_model.forge_objects.unet
    assert clone is not unet and clone.model_options["model_function_wrapper"] is views.views
    assert "model_function_wrapper" not in unet.model_options  # the patcher the scripts left is untouched
    # Forge asks for [2B, C, H, W] of the whole latent; the largest call holds 4 views of 8x8
    estimate = clone.model_options["memory_peak_estimation_modifier"]
    assert estimate.shape([2, 4, 16, 16]) == [8, 4, 8, 8] and estimate([2, 4, 16, 16]) == 8 * 8 * 8
    assert head.get_control(torch.zeros(2, 4, 16, 16), torch.ones(2), {}, 2) is None
    views.remove()
    assert p.sd_model.forge_objects.unet is unet and "get_control" not in vars(head) and not views.views.active


def test_memory_is_sized_to_the_largest_call_of_views():
    assert largest_call(128, 128, DemoFusionSettings(window=64, stride=32, view_batch=16), 2) == (13, (64, 64))
    assert largest_call(128, 128, DemoFusionSettings(window=64, stride=32, view_batch=1), 2) == (1, (64, 64))
    # 3x: 3x3 local views of 64x64 and 9 samples of 43x43 in separate calls; the local call is larger
    assert largest_call(128, 128, DemoFusionSettings(window=64, stride=32, view_batch=16), 3) == (9, (64, 64))
    # 5x5 local views and 9 samples, all 64x64, share calls of 16
    assert largest_call(192, 192, DemoFusionSettings(window=64, stride=32, view_batch=16), 3) == (16, (64, 64))
    memory = ViewBatchMemory(lambda shape: shape, DemoFusionSettings(window=64, stride=32, view_batch=16), 2)
    assert copy.deepcopy(memory) is memory and memory([4, 4, 128, 128]) == [52, 4, 64, 64]


def test_multidiffusion_integrated_in_the_slot_is_refused():
    p = forge_p(UnetPatcher(KModel(tiny_unet("sd1")), options={"tiled_diffusion": True,
                                                                 "model_function_wrapper": lambda f, a: None}))
    with pytest.raises(RequestError, match="MultiDiffusion Integrated"):
        StageViews(p, STAGE, ENGINE, None, None, lambda: None)


def two_evaluation_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Heun-like: a predictor evaluation after each step's callback (not a step start)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        x_2 = x + d * (sigmas[i + 1] - sigmas[i])
        if sigmas[i + 1] > 0:
            d = (d + (x_2 - model(x_2, sigmas[i + 1] * s_in, **extra_args)) / sigmas[i + 1]) / 2
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


class CFGDenoiser:
    """Forge's CFG denoiser signature: ``forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)``."""

    def forward(self, x, sigma, uncond=None, cond=None, cond_scale=1.0, s_min_uncond=0.0, image_cond=None):
        return 0.5 * x

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


def test_the_skip_residual_goes_to_each_step_start_of_forges_sampler():
    cfg = CFGDenoiser()
    callbacks = []
    sampler = SimpleNamespace(model_wrap_cfg=cfg, func=two_evaluation_sampler)
    z_up, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    predictor = Predictor()
    patches = SkipResidualSteps(sampler, z_up, noise, 3.0, predictor.timestep, "Heun")
    seen = []
    forward = cfg.forward

    def recording(x, sigma, **kwargs):
        before = x.clone()
        out = forward(x, sigma, **kwargs)
        seen.append((before, x.clone(), float(sigma[0])))
        return out

    cfg.forward = recording  # after SkipResidualSteps' patch: it sees the state before and after the residual
    extra = {"cond": None, "uncond": None, "cond_scale": 7.0, "s_min_uncond": 0.0, "image_cond": None}
    sampler.func(cfg, torch.randn(1, 4, 8, 8), torch.tensor([3.0, 2.0, 0.0]), extra_args=extra,
                 callback=callbacks.append)
    del cfg.forward
    (s0, r0, sig0), (m0, rm0, sigm), (s1, r1, sig1) = seen
    c1 = skip_weight(predictor.timestep(torch.tensor([3.0])), 3.0)
    assert torch.allclose(r0, skip_residual(s0, z_up, noise, torch.tensor([3.0]), c1))
    assert torch.equal(rm0, m0) and sigm == 2.0                      # the predictor point: untouched
    c1 = skip_weight(predictor.timestep(torch.tensor([2.0])), 3.0)
    assert sig1 == 2.0 and torch.allclose(r1, skip_residual(s1, z_up, noise, torch.tensor([2.0]), c1))
    assert [d["i"] for d in callbacks] == [0, 1]
    patches.remove()
    assert sampler.func is two_evaluation_sampler and "forward" not in vars(cfg)


def refusal_p(**kw):
    unet = SimpleNamespace(model=SimpleNamespace(predictor=SimpleNamespace(prediction_type=kw.pop("prediction",
                                                                                                "epsilon"))))
    model = SimpleNamespace(is_inpaint=kw.pop("inpaint", False), forge_objects=SimpleNamespace(unet=unet))
    return SimpleNamespace(sd_model=model, enable_hr=kw.pop("enable_hr", False), **kw)


class Script:
    def __init__(self, title, args_from):
        self._title, self.args_from, self.args_to = title, args_from, args_from + 2

    def title(self):
        return self._title


def test_what_forge_cannot_run_is_refused_by_name():
    assert unsupported_reason(refusal_p()) is None
    assert "replaces Hires. fix" in unsupported_reason(refusal_p(enable_hr=True))
    assert "inpainting" in unsupported_reason(refusal_p(inpaint=True))
    assert "predicts const" in unsupported_reason(refusal_p(prediction="const"))
    scripts = SimpleNamespace(alwayson_scripts=[Script("MultiDiffusion Integrated", 0),
                                                Script("SelfAttentionGuidance Integrated (SD 1.x, SD 2.x, SDXL)", 2)])
    assert unsupported_reason(refusal_p(scripts=scripts, script_args=[False, 1, False, 1])) is None
    assert "MultiDiffusion Integrated" in unsupported_reason(refusal_p(scripts=scripts,
                                                                       script_args=[True, 1, False, 1]))
    # SAG is refused from what it installed, at a stage's first step (tests/test_forge_builtins.py), not by title
    assert unsupported_reason(refusal_p(scripts=scripts, script_args=[False, 1, True, 1])) is None


def test_redilation_inside_demofusion_needs_the_jobs_pass_and_nothing_else(monkeypatch):
    """Every re-dilation (first stage, global path, both) is the Forge job's own ScaleCrafter pass
    (tests/test_forge_demofusion_redilation.py runs them); a job without it refuses each by name."""
    from lib_hires.webui.forge import demofusion
    from lib_hires.settings import ScaleFusionSettings

    for name in ("unsupported_reason", "timestep_sampler_reason", "sampler_reason", "refiner_reason"):
        monkeypatch.setattr(demofusion, name, lambda p, *settings: None)
    settings = ScaleFusionSettings(enabled=True, method="DemoFusion")
    job = SimpleNamespace(arm_scalecrafter=lambda p, latent_hw, key, noise_damping=True: None)
    for redilation in ("first stage", "global path", "both"):
        assert request_reason(refusal_p(), settings.replace(redilation=redilation), job) is None
        reason = request_reason(refusal_p(), settings.replace(redilation=redilation), SimpleNamespace())
        assert f"re-dilation {redilation}) is not available here" in reason
    assert request_reason(refusal_p(), settings.replace(redilation="off"), SimpleNamespace()) is None
