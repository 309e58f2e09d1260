"""DemoFusion on the WebUI's timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC): VP state, ε model.

Two sources of sampler functions:

* ``restated``: this file's own statement of the update rules of WebUI v1.10.1's
  ``modules/sd_samplers_timesteps_impl.py`` (DDIM and DDIM CFG++ at eta 0, PLMS), written from their formulas
  so the checks run in CI without a WebUI (UniPC: only its predictor-corrector shape). They are a
  re-statement for testing, not the WebUI's code;
* ``webui``: the real functions, loaded from ``$WEBUI_DIR/modules`` in isolation (their ``modules.shared``
  and ``torch_utils`` imports stubbed for the duration of the test); skipped without ``WEBUI_DIR``.

The engine's reference is the official pipeline's DDIM form written out per view (each view and each dilated
sample stepped by DDIM on its own, then averaged), on a tiny random-weight SD1 UNet, jitter off.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lib_hires.demofusion import DemoFusionSettings, FusedDenoiser, Stage
from lib_hires.demofusion.step_starts import CORRECTED, REPORTED_BEFORE, UnsupportedSampler, probe
from lib_hires.demofusion.vp import EpsFusion, VPSchedule
from lib_hires.webui.demofusion_sampler import StageSampling
from tests.conftest import _k_diffusion, ldm
from tests.test_demofusion_fused import direct_gaussian
from tests.test_demofusion_stage import official_starts

CFG_SCALE = 5.0


# ---- the samplers: a local re-statement (CI) and the WebUI's own functions (WEBUI_DIR) ---------------------

def _alphas(model, timesteps):
    table = model.inner_model.inner_model.alphas_cumprod
    prev = torch.cat([timesteps.new_zeros(1), timesteps[:-1]])  # the step below each timestep; t=0 for the first
    return table[timesteps], table[prev].to(torch.float64)


def restated_ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, cfgpp=False):
    """DDIM, eta 0: from the highest timestep down to the second lowest, ``x_prev = sqrt(a_prev) x0 +
    sqrt(1 - a_prev) e`` (CFG++: ``e`` of the re-noising is the uncond prediction; guidance scale / 12.5)."""
    a, a_prev = _alphas(model, timesteps)
    if cfgpp:
        model.cond_scale_miltiplier, model.need_last_noise_uncond = 1 / 12.5, True
    ones = x.new_ones(x.shape[0])
    for i, k in enumerate(range(len(timesteps) - 1, 0, -1)):
        e = model(x, timesteps[k].item() * ones, **(extra_args or {}))
        renoise = model.last_noise_uncond if cfgpp else e
        x0 = (x - math.sqrt(1 - a[k].item()) * e) / math.sqrt(a[k].item())
        x = math.sqrt(a_prev[k].item()) * x0 + math.sqrt(1 - a_prev[k].item()) * renoise
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": x0})
    return x


def restated_ddim_cfgpp(model, x, timesteps, extra_args=None, callback=None, disable=None):
    return restated_ddim(model, x, timesteps, extra_args, callback, disable, cfgpp=True)


def restated_plms(model, x, timesteps, extra_args=None, callback=None, disable=None):
    """PLMS: a pseudo improved-Euler first step (a second evaluation at the next timestep), then Adams-Bashforth
    combinations of up to four ε predictions, each step a DDIM update with the combined ε."""
    a, a_prev = _alphas(model, timesteps)
    ones = x.new_ones(x.shape[0])
    history: list[torch.Tensor] = []
    coefficients = {0: [1.0], 1: [1.5, -0.5], 2: [23 / 12, -16 / 12, 5 / 12], 3: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}

    def ddim_step(state, e, k):
        x0 = (state - math.sqrt(1 - a[k].item()) * e) / math.sqrt(a[k].item())
        return math.sqrt(a_prev[k].item()) * x0 + math.sqrt(1 - a_prev[k].item()) * e, x0

    for i, k in enumerate(range(len(timesteps) - 1, 0, -1)):
        e = model(x, timesteps[k].item() * ones, **(extra_args or {}))
        if not history:
            guess, _ = ddim_step(x, e, k)
            e_used = (e + model(guess, timesteps[max(k - 1, 0)].item() * ones, **(extra_args or {}))) / 2
        else:
            past = [e, *reversed(history)]
            e_used = sum(c * value for c, value in zip(coefficients[len(history)], past))
        x, x0 = ddim_step(x, e_used, k)
        history = (history + [e])[-3:]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": x0})
    return x


RESTATED = {"ddim": restated_ddim, "ddim_cfgpp": restated_ddim_cfgpp, "plms": restated_plms}


@pytest.fixture(scope="module")
def webui_impl():
    """The WebUI's ``sd_samplers_timesteps_impl`` module, loaded alone from an install the user names."""
    if not os.environ.get("WEBUI_DIR"):
        pytest.skip("WEBUI_DIR is not set: no WebUI install to take the timestep samplers from")
    root = Path(os.environ["WEBUI_DIR"]) / "modules"
    if not (root / "sd_samplers_timesteps_impl.py").exists():
        pytest.skip(f"no sd_samplers_timesteps_impl.py under {root}")
    pytest.importorskip("tqdm")
    _k_diffusion()  # the impl imports k_diffusion.sampling: the compat loader makes it importable here
    stubs = {
        "modules": types.ModuleType("modules"),
        "modules.shared": types.ModuleType("modules.shared"),
        "modules.torch_utils": types.ModuleType("modules.torch_utils"),
        "modules.models": types.ModuleType("modules.models"),
        "modules.models.diffusion": types.ModuleType("modules.models.diffusion"),
        "modules.models.diffusion.uni_pc": types.ModuleType("modules.models.diffusion.uni_pc"),
    }
    stubs["modules.shared"].opts = SimpleNamespace(uni_pc_variant="bh1", uni_pc_skip_type="time_uniform",
                                                   uni_pc_order=3, uni_pc_lower_order_final=True)
    stubs["modules.torch_utils"].float64 = lambda t: torch.float64
    saved = {name: sys.modules.get(name) for name in [*stubs, "modules.models.diffusion.uni_pc.uni_pc"]}
    try:
        sys.modules.update(stubs)
        stubs["modules"].shared = stubs["modules.shared"]
        uni_pc = _load("modules.models.diffusion.uni_pc.uni_pc", root / "models" / "diffusion" / "uni_pc" / "uni_pc.py")
        stubs["modules.models.diffusion.uni_pc"].uni_pc = uni_pc
        yield _load("webui_sd_samplers_timesteps_impl", root / "sd_samplers_timesteps_impl.py")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["restated", "webui"])
def samplers(request):
    if request.param == "restated":
        return RESTATED
    impl = request.getfixturevalue("webui_impl")
    return {name: getattr(impl, name) for name in ("ddim", "ddim_cfgpp", "plms", "unipc")}


# ---- a WebUI-shaped timestep sampler stack on the tiny UNet ------------------------------------------------

class TimestepsInner(torch.nn.Module):
    """``CompVisTimestepsDenoiser``: ε from the model at a timestep."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, x, timesteps, cond=None):
        return self.inner_model.apply_model(x, timesteps, cond)


class TimestepsCFG(torch.nn.Module):
    """``CFGDenoiserTimesteps`` reduced to what the samplers use: cond rows then uncond rows through the inner
    model, ε combined, the uncond ε kept as ``last_noise_uncond`` (DDIM CFG++)."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = TimestepsInner(model)
        self.cond_scale_miltiplier, self.need_last_noise_uncond, self.last_noise_uncond = 1.0, False, None

    def forward(self, x, t, cond=None, uncond=None, cond_scale=CFG_SCALE):
        out = self.inner_model(torch.cat([x, x]), torch.cat([t, t]), cond=torch.cat([cond, uncond]))
        positive, negative = out.chunk(2)
        self.last_noise_uncond = negative
        return negative + (positive - negative) * cond_scale * self.cond_scale_miltiplier


@pytest.fixture(scope="module")
def tiny():
    return ldm("sd1")


def conds():
    g = torch.Generator().manual_seed(11)
    return {"cond": torch.randn(1, 7, 32, generator=g), "uncond": torch.randn(1, 7, 32, generator=g)}


def latents(size):
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 1, 4, *size, generator=g).unbind(0)


PIECES = {  # each isolates one piece of the stage; "all" has every piece at once
    "residual": dict(size=(16, 16), window=16, stride=8, dilation=1, scales=(3.0, 1.0, 1.0), blur=0.8),
    "views": dict(size=(16, 24), window=16, stride=8, dilation=1, scales=(2.0, 10.0, 1.0), blur=0.8),
    "dilated": dict(size=(16, 32), window=16, stride=8, dilation=2, scales=(3.0, 0.0, 1.0), blur=1e-3),
    "blur": dict(size=(24, 24), window=16, stride=8, dilation=3, scales=(3.0, 0.0, 0.5), blur=1.1),
    "all": dict(size=(32, 32), window=16, stride=8, dilation=2, scales=(3.0, 1.0, 1.0), blur=0.8),
}


def settings_for(piece):
    a1, a2, a3 = piece["scales"]
    return DemoFusionSettings(window=piece["window"], stride=piece["stride"], view_batch=4, cosine_scale_1=a1,
                              cosine_scale_2=a2, cosine_scale_3=a3, sigma=piece["blur"], jitter=False)


def through_the_patches(func, model, piece, z_up, noise, timesteps, x, callback=None, record=None):
    """A later stage's sampling as the WebUI adapter runs it: ``StageSampling`` on the sampler's CFG denoiser."""
    cfg = TimestepsCFG(model)
    sampler = SimpleNamespace(model_wrap_cfg=cfg, func=func)
    stage = Stage(2, 2.0, z_up.shape[-1] * 8, z_up.shape[-2] * 8, piece["dilation"])
    patches = StageSampling(SimpleNamespace(sampler=sampler), stage, settings_for(piece), z_up, noise, None, None,
                            None, lambda: None, sampler_name=func.__name__, vp=VPSchedule(model.alphas_cumprod))
    caller = cfg if record is None else record(cfg)
    try:
        return sampler.func(caller, x, timesteps, extra_args=conds(), callback=callback, disable=True), caller
    finally:
        patches.remove()
        assert sampler.func is func and "forward" not in vars(cfg) and "forward" not in vars(cfg.inner_model)


# ---- the official DDIM form, per view ----------------------------------------------------------------------

def eps_cfg(model, crop, t, c):
    out = model.apply_model(torch.cat([crop, crop]), torch.full((2,), float(t)), torch.cat([c["cond"], c["uncond"]]))
    positive, negative = out.chunk(2)
    return negative + (positive - negative) * CFG_SCALE


def reference_ddim_stage(model, z_up, noise, timesteps, x, piece):
    """demofusion.md §1.4 with a DDIM scheduler (eta 0): the skip residual on the VP latent, every local view
    and every dilated sample stepped on its own (the dilated ones with the noise predicted from their blurred
    copies), the stepped latents averaged and fused."""
    a1, a2, a3 = piece["scales"]
    s, window, stride = piece["dilation"], piece["window"], piece["stride"]
    table = model.alphas_cumprod.to(torch.float64)
    c = conds()
    _, _, height, width = x.shape
    x = x.to(torch.float64)
    z_up, noise = z_up.to(torch.float64), noise.to(torch.float64)
    for k in range(len(timesteps) - 1, 0, -1):
        t, t_prev = int(timesteps[k]), int(timesteps[k - 1])
        a, a_prev = table[t], table[t_prev]
        cf = 0.5 * (1 + math.cos(math.pi * (1000 - t) / 1000))
        c1, c2, c3 = cf ** a1, cf ** a2, 0.99 * cf ** a3 + 0.01
        x = (1 - c1) * x + c1 * (a.sqrt() * z_up + (1 - a).sqrt() * noise)

        def step(state, e):
            x0 = (state - (1 - a).sqrt() * e) / a.sqrt()
            return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e

        def eps(crop):
            return eps_cfg(model, crop.to(torch.float32), t, c).to(torch.float64)

        value, count = torch.zeros_like(x), torch.zeros_like(x)
        for h in official_starts(height, window, stride):
            for w in official_starts(width, window, stride):
                crop = x[..., h:h + window, w:w + window]
                value[..., h:h + window, w:w + window] += step(crop, eps(crop))
                count[..., h:h + window, w:w + window] += 1
        local = value / count

        h_pad, w_pad = (s - height % s) % s, (s - width % s) % s
        zg = F.pad(x, (w_pad, 0, h_pad, 0))
        if s > 1:
            b = direct_gaussian(zg, 2 * s - 1, torch.full((1,), piece["blur"] * c3, dtype=torch.float64))
            b = (b - b.mean()) / b.std() * zg.std() + zg.mean()
        else:
            b = zg
        glob = torch.zeros_like(zg)
        for i in range(s):
            for j in range(s):
                glob[..., i::s, j::s] = step(zg[..., i::s, j::s], eps(b[..., i::s, j::s]))
        x = (1 - c2) * local + c2 * glob[..., h_pad:, w_pad:]
    return x


TIMESTEPS = torch.tensor([1, 201, 401, 601, 801])  # a 5-step DDIM list (get_timesteps' spacing, fewer steps)


@pytest.mark.parametrize("piece", list(PIECES))
def test_a_ddim_stage_equals_the_official_ddim_form(samplers, tiny, piece):
    spec = PIECES[piece]
    z_up, noise = latents(spec["size"])
    a = tiny.alphas_cumprod[901]
    x = a.sqrt() * z_up + (1 - a).sqrt() * noise  # img2img's start: noised one timestep above the first step
    out, _ = through_the_patches(samplers["ddim"], tiny, spec, z_up, noise, TIMESTEPS, x.clone())
    expected = reference_ddim_stage(tiny, z_up, noise, TIMESTEPS, x, spec)
    torch.testing.assert_close(out.to(torch.float64), expected, atol=1e-4, rtol=0)
    assert (out - x).abs().max() > 0.1  # it sampled


def test_the_restated_functions_are_the_webuis(webui_impl, tiny):
    """Plain sampling (no DemoFusion) with both sources agrees: the restatement the CI relies on is faithful."""
    z, _ = latents((8, 8))
    for name, restated in RESTATED.items():
        ours = restated(TimestepsCFG(tiny), z.clone(), TIMESTEPS, extra_args=conds())
        theirs = getattr(webui_impl, name)(TimestepsCFG(tiny), z.clone(), TIMESTEPS, extra_args=conds(), disable=True)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=name)


# ---- the fused prediction is the k-diffusion path's, in ε (and for v models) -------------------------------

@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_the_fused_x0_equals_the_k_diffusion_paths(k_diffusion, tiny, parameterization):
    """EpsFusion's ε, read back as x0 the way the samplers read it, is FusedDenoiser's x0 over k-diffusion's
    CompVis denoiser at the same state (``x_t / sqrt(ᾱ)``, ``σ_t``); a v model converts through its own
    forward (``CompVisTimestepsVDenoiser``) and k-diffusion's ``CompVisVDenoiser`` is its reference."""
    table = tiny.alphas_cumprod
    if parameterization == "eps":
        def eps_model(x, t, cond=None):
            return tiny.apply_model(x, t, cond)
        reference = k_diffusion.external.CompVisDenoiser(tiny, quantize=True)
    else:
        def eps_model(x, t, cond=None):  # WebUI v1.10.1's predict_eps_from_z_and_v, with the UNet's output as v
            a = table[t.to(torch.int)][:, None, None, None]
            return a.sqrt() * tiny.apply_model(x, t, cond) + (1 - a).sqrt() * x
        reference = k_diffusion.external.CompVisVDenoiser(tiny, quantize=True)
    geometry = dict(dilation=2, window=16, stride=8, view_batch=3, cosine_scale_2=1.0, cosine_scale_3=1.0, sigma=0.8)
    schedule = VPSchedule(table)
    fusion = EpsFusion(eps_model, schedule, lambda d, sigma_to_t: FusedDenoiser(d, sigma_to_t=sigma_to_t, **geometry))
    k_fused = FusedDenoiser(reference, sigma_to_t=reference.sigma_to_t, **geometry)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 32, 16, generator=g)
    cond = torch.randn(2, 7, 32, generator=g)
    for t_value in (961, 501, 21):
        t = torch.full((2,), float(t_value))
        a = table[t_value]
        eps = fusion(x, t, cond=cond)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        sigma = ((1 - a) / a).sqrt().expand(2)
        expected = k_fused(x / a.sqrt(), sigma, cond=cond)
        torch.testing.assert_close(x0, expected, atol=2e-5, rtol=1e-5)
    assert fusion.model_calls == k_fused.model_calls > 0  # read through to the fused denoiser


def test_fractional_timesteps_interpolate_log_alpha_as_uni_pc_does(tiny):
    schedule = VPSchedule(tiny.alphas_cumprod)
    table = tiny.alphas_cumprod.to(torch.float64)
    assert torch.equal(schedule.alpha_bar(torch.tensor([0.0, 981.0, 999.0])),
                       table[[0, 981, 999]].to(torch.float32))
    mid = schedule.alpha_bar(torch.tensor([500.25], dtype=torch.float64))
    expected = (0.75 * table[500].log() + 0.25 * table[501].log()).exp()
    torch.testing.assert_close(mid, expected.reshape(1), rtol=1e-12, atol=0)


# ---- every timestep sampler: the residual on every step start, once ---------------------------------------

class Recording:
    """The sampler's model: the state each call got and what the patched CFG denoiser saw."""

    def __init__(self, cfg):
        self.cfg, self.log, self.order = cfg, [], []

    def __getattr__(self, name):
        return getattr(self.__dict__["cfg"], name)

    def __setattr__(self, name, value):
        if name in ("cfg", "log", "order"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.cfg, name, value)

    def __call__(self, x, t, **kwargs):
        entry = SimpleNamespace(x=x, before=x.clone(), t=t.clone())
        out = self.cfg(x, t, **kwargs)
        entry.seen, entry.out = x.clone(), out
        self.log.append(entry)
        self.order.append(("eval", len(self.log) - 1))
        return out

    def callback(self, d):
        self.order.append(("report", d["x"]))


def starts_from_call_order(order):
    """A timestep sampler's step starts from its documented order: the first evaluation, and each one right
    after a report (its callback reports the state the next step starts from)."""
    starts = [0]
    for k, (kind, _) in enumerate(order[:-1]):
        if kind == "report" and order[k + 1][0] == "eval":
            starts.append(order[k + 1][1])
    return starts


@pytest.mark.parametrize("name", ["ddim", "ddim_cfgpp", "plms"])
def test_every_step_start_carries_the_vp_residual_once(samplers, tiny, name):
    piece = dict(PIECES["all"], scales=(1.0, 1.0, 1.0))
    z_up, noise = latents(piece["size"])
    schedule = VPSchedule(tiny.alphas_cumprod)
    x = schedule.scales(torch.tensor(901.0))[0] * z_up + schedule.scales(torch.tensor(901.0))[1] * noise
    holder = {}

    def record(cfg):
        holder["r"] = Recording(cfg)
        return holder["r"]

    func = samplers[name]
    pattern = probe(func, TimestepsCFG(tiny), torch.zeros(1, 4, 8, 8), TIMESTEPS, callback=None)
    assert pattern.rule == REPORTED_BEFORE
    through_the_patches(func, tiny, piece, z_up, noise, TIMESTEPS, x,
                        callback=lambda d: holder["r"].callback(d), record=record)
    model = holder["r"]
    starts = starts_from_call_order(model.order)
    assert len(starts) == len(TIMESTEPS) - 1
    for index, entry in enumerate(model.log):
        if index in starts:
            expected = schedule.skip_residual(entry.before, z_up, noise, entry.t, 1.0)
            t = float(entry.t[0])
            a = tiny.alphas_cumprod[int(t)]
            c1 = (0.5 * (1 + math.cos(math.pi * (1000 - t) / 1000)))
            by_hand = (1 - c1) * entry.before + c1 * (a.sqrt() * z_up + (1 - a).sqrt() * noise)
            torch.testing.assert_close(entry.seen, by_hand, atol=1e-6, rtol=0)
            torch.testing.assert_close(entry.seen, expected, atol=0, rtol=0)
        else:
            assert torch.equal(entry.seen, entry.before), f"{name}: evaluation {index} is no step start"
    assert len(model.log) == len(starts) + (1 if name == "plms" else 0)  # PLMS: its first step's second call


@pytest.mark.parametrize("name", ["ddim", "ddim_cfgpp"])
def test_with_cosine_scale_1_zero_the_output_is_the_last_step_from_the_noised_upsample(samplers, tiny, name):
    """c1 = 1 everywhere: every step restarts from ``sqrt(ᾱ) z' + sqrt(1-ᾱ) ε``, so the output is the last DDIM
    step from there with the fused prediction D at that state: ``sqrt(ᾱ_prev) D + sqrt(1-ᾱ_prev) e``."""
    piece = dict(PIECES["all"], scales=(0.0, 1.0, 1.0))
    z_up, noise = latents(piece["size"])
    holder = {}

    def record(cfg):
        holder["r"] = Recording(cfg)
        return holder["r"]

    x = torch.randn(z_up.shape, generator=torch.Generator().manual_seed(9))  # the start state does not matter
    out, _ = through_the_patches(samplers[name], tiny, piece, z_up, noise, TIMESTEPS, x, record=record)
    last = holder["r"].log[-1]
    t_last, t_prev = int(TIMESTEPS[1]), int(TIMESTEPS[0])
    a, a_prev = tiny.alphas_cumprod[t_last], tiny.alphas_cumprod[t_prev]
    state = a.sqrt() * z_up + (1 - a).sqrt() * noise
    torch.testing.assert_close(last.seen, state, atol=1e-6, rtol=0)
    denoised = (state - (1 - a).sqrt() * last.out) / a.sqrt()
    renoise = holder["r"].cfg.last_noise_uncond if name == "ddim_cfgpp" else last.out
    torch.testing.assert_close(out, a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * renoise, atol=1e-5, rtol=0)


def restated_predictor_corrector(model, x, timesteps, extra_args=None, callback=None, disable=None):
    """UniPC's shape, reduced (not its coefficients): one evaluation per step at the predicted state at the next
    timestep, a correction from the previous state, the corrected state reported and stepped on from."""
    a = model.inner_model.inner_model.alphas_cumprod
    ones = x.new_ones(x.shape[0])
    previous = model(x, timesteps[-1].item() * ones, **(extra_args or {}))
    for k in range(len(timesteps) - 2, -1, -1):
        ratio = math.sqrt(a[timesteps[k]].item() / a[timesteps[k + 1]].item())
        predicted = ratio * x + 0.1 * previous
        current = model(predicted, (timesteps[k].item() + 0.5) * ones, **(extra_args or {}))  # fractional t
        x = ratio * x + 0.05 * (previous + current)
        previous = current
        if callback is not None:
            callback({"x": x, "i": len(timesteps) - 2 - k, "sigma": 0, "sigma_hat": 0, "denoised": current})
    return x


def predictor_corrector(samplers):
    return samplers.get("unipc", restated_predictor_corrector)


def test_a_predictor_corrector_residuals_every_evaluation_and_every_state_but_the_last(samplers, tiny, monkeypatch):
    """UniPC (the WebUI's, or its shape restated): every evaluation is the model's value for the state at its
    timestep and sees the residual; every corrected state the next step starts from gets it once in the callback,
    at that timestep; the final state gets none."""
    func = predictor_corrector(samplers)
    pattern = probe(func, TimestepsCFG(tiny), torch.zeros(1, 4, 8, 8), TIMESTEPS, callback=None)
    # UniPC runs len(timesteps) steps and evaluates no model at the last; the restated shape one step fewer
    steps = len(TIMESTEPS) - 1 if func is restated_predictor_corrector else len(TIMESTEPS)
    assert (pattern.rule, pattern.reports) == (CORRECTED, steps)
    assert pattern.evaluations == (steps + 1 if func is restated_predictor_corrector else steps)
    piece = dict(PIECES["all"], scales=(1.0, 1.0, 1.0))
    z_up, noise = latents(piece["size"])
    schedule = VPSchedule(tiny.alphas_cumprod)
    written, holder = [], {}
    on_reported = StageSampling._on_reported

    def spy(self, x):
        before = x.clone()
        on_reported(self, x)
        written.append((before, x.clone(), self._last_sigma.clone(), x))

    monkeypatch.setattr(StageSampling, "_on_reported", spy)

    def record(cfg):
        holder["r"] = Recording(cfg)
        return holder["r"]

    reports = []
    x = 0.5 * z_up + 0.8 * noise
    out, _ = through_the_patches(func, tiny, piece, z_up, noise, TIMESTEPS, x, record=record,
                                 callback=lambda d: reports.append(d["x"]))
    log = holder["r"].log
    assert len(log) == pattern.evaluations
    for entry in log:
        torch.testing.assert_close(entry.seen, schedule.skip_residual(entry.before, z_up, noise, entry.t, 1.0),
                                   atol=0, rtol=0)
        assert not torch.equal(entry.seen, entry.before)
    assert len(reports) == pattern.reports and len(written) == pattern.reports - 1
    for k, (before, after, t, state) in enumerate(written):
        assert state is reports[k]  # the very state the sampler steps on from
        assert torch.equal(t, log[k + 1].t)  # at the timestep of the evaluation that preceded it
        torch.testing.assert_close(after, schedule.skip_residual(before, z_up, noise, t, 1.0), atol=0, rtol=0)
    assert torch.isfinite(out).all() and out is reports[-1]


def test_a_sampler_whose_evaluations_take_no_state_at_all_is_refused():
    def wandering(model, x, timesteps, callback=None):
        for k in range(len(timesteps) - 1, 0, -1):
            model(x * 0.5, timesteps[k])
            x = x * 0.9
            callback({"x": x})
        return x

    with pytest.raises(UnsupportedSampler, match="no model evaluation of each step takes the state"):
        probe(wandering, None, torch.zeros(1, 4, 8, 8), TIMESTEPS, callback=None)


def test_a_schedule_the_sampler_itself_refuses_is_an_unsupported_sampler(samplers, tiny):
    """UniPC cannot run fewer steps than its order (3): the probe turns its own assertion into the refusal the
    request check reports, before any sampling."""
    func = predictor_corrector(samplers)
    if func is restated_predictor_corrector:
        def func(model, x, timesteps, extra_args=None, callback=None, disable=None):
            assert len(timesteps) >= 3, "order must be < sampling steps"
            return restated_predictor_corrector(model, x, timesteps, extra_args, callback, disable)
    with pytest.raises(UnsupportedSampler, match=r"refuses this schedule \(.*order must be < sampling steps"):
        probe(func, TimestepsCFG(tiny), torch.zeros(1, 4, 8, 8), TIMESTEPS[:2], callback=None)
    assert probe(func, TimestepsCFG(tiny), torch.zeros(1, 4, 8, 8), TIMESTEPS[:3], callback=None).rule == CORRECTED
