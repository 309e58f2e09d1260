"""The skip residual at every step start of every k-diffusion sampler, driven through the WebUI stage patches.

Each test runs the REAL sampler function (k-diffusion's, the WebUI's Restart when its file is at hand) through
``StageSampling`` on a stand-in sampler and records every model evaluation: the state the sampler passed in
(before the patch) and what the model saw (after it). The step starts are derived here from the samplers'
documented call order (a fixed-step sampler reports its state right after that step's first evaluation; the
adaptive solver reports after each attempt and starts the next one right after), independently of the identity
rule the implementation uses.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lib_hires.demofusion import DemoFusionSettings, Stage, skip_residual, skip_weight
from lib_hires.demofusion.step_starts import (REPORTED_AFTER, REPORTED_BEFORE, StepPattern, StepStarts,
                                              StepTrackingError, UnsupportedSampler, probe)
from lib_hires.webui.demofusion_sampler import StageSampling

COSINE_SCALE_1 = 1.0


def sigma_to_t(sigma):
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return 999.0 * sigma / (sigma + 1.0)


class Inner(torch.nn.Module):
    """A nonlinear k-diffusion-style inner model: x0 from x and the cond rows."""

    def forward(self, x, sigma, cond=None):
        return 0.6 * x / (1 + sigma.view(-1, 1, 1, 1) ** 2) ** 0.5 + 0.2 * torch.sin(x) \
            + cond["c_crossattn"][0].mean(dim=(1, 2)).view(-1, 1, 1, 1)

    def sigma_to_t(self, sigma):
        return sigma_to_t(sigma)


class CFG(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner_model = Inner()

    def forward(self, x, sigma, cond=None):
        return self.inner_model(x, sigma, cond={"c_crossattn": [cond]})


class Recording:
    """The sampler's ``model``: logs the state it gets and what the (patched) CFG denoiser saw."""

    def __init__(self, cfg):
        self.cfg, self.log, self.order = cfg, [], []

    def __call__(self, x, sigma, **kwargs):
        entry = SimpleNamespace(x=x, before=x.clone(), sigma=sigma.clone())
        out = self.cfg(x, sigma, **kwargs)
        entry.seen = x.clone()
        self.log.append(entry)
        self.order.append(("eval", len(self.log) - 1))
        return out

    def callback(self, d):
        self.order.append(("report", d["x"].clone()))


def stage_sampling(func):
    cfg = CFG()
    sampler = SimpleNamespace(model_wrap_cfg=cfg, callback_state=lambda d: None, func=func)
    gen = torch.Generator().manual_seed(3)
    z_up, noise = torch.randn(2, 1, 4, 16, 16, generator=gen).unbind(0)
    settings = DemoFusionSettings(window=8, stride=4, jitter=False, cosine_scale_1=COSINE_SCALE_1)
    patches = StageSampling(SimpleNamespace(sampler=sampler), Stage(2, 2.0, 128, 128, 2), settings, z_up, noise,
                            None, None, None, lambda: None, sampler_name=getattr(func, "__name__", "sampler"))
    return sampler, patches, cfg, z_up, noise


def reference(entry, z_up, noise):
    c1 = skip_weight(sigma_to_t(entry.sigma), COSINE_SCALE_1)
    return skip_residual(entry.before, z_up, noise, entry.sigma, c1)


def starts_by_call_order(order, adaptive: bool) -> list[int]:
    """Fixed-step samplers: the evaluation just before each report. Adaptive: the first evaluation and each one
    right after a report."""
    starts = []
    for k, (kind, value) in enumerate(order):
        if kind != "report":
            continue
        if adaptive:
            if k + 1 < len(order) and order[k + 1][0] == "eval":
                starts.append(order[k + 1][1])
        else:
            assert order[k - 1][0] == "eval"
            starts.append(order[k - 1][1])
    return ([0] + starts) if adaptive else starts


def drive(func, *args, **kwargs):
    sampler, patches, cfg, z_up, noise = stage_sampling(func)
    model = Recording(cfg)
    cond = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(1))
    x = z_up + args[0][0] * noise if args else z_up + kwargs["sigma_max"] * noise
    try:
        out = sampler.func(model, x, *args, extra_args={"cond": cond}, callback=model.callback, disable=True, **kwargs)
    finally:
        patches.remove()
    assert "func" not in vars(sampler) or sampler.func is func
    return out, model, z_up, noise


def check_every_step_start(model, z_up, noise, *, adaptive=False, steps=None):
    starts = starts_by_call_order(model.order, adaptive)
    assert starts, "no step found"
    if steps is not None:
        assert len(starts) == steps
    start_set = set(starts)
    residualed = {}
    for index, entry in enumerate(model.log):
        if index in start_set:
            assert torch.allclose(entry.seen, reference(entry, z_up, noise), rtol=0, atol=1e-6), \
                f"evaluation {index}: the step's state does not carry skip_residual(state)"
            assert not torch.equal(entry.seen, entry.before)
            residualed[id(entry.x)] = entry
        else:
            assert torch.equal(entry.seen, entry.before), f"evaluation {index} is no step start but was changed"
    # the callback reports the state that carries the residual (fixed-step samplers report the step's own state)
    if not adaptive:
        reports = [value for kind, value in model.order if kind == "report"]
        for report, index in zip(reports, starts):
            assert torch.equal(report, model.log[index].seen)
    return starts


SIGMAS = None


def karras(k_diffusion, n):
    return k_diffusion.sampling.get_sigmas_karras(n, 0.0292, 14.6146)


SINGLE = ["sample_euler", "sample_euler_ancestral", "sample_lms", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
          "sample_dpmpp_3m_sde"]
TWO_EVALUATIONS = ["sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
                   "sample_dpmpp_sde"]


@pytest.mark.parametrize("name", SINGLE + TWO_EVALUATIONS)
def test_every_step_start_carries_the_residual_once(k_diffusion, name):
    func = getattr(k_diffusion.sampling, name)
    n = 5
    sigmas = karras(k_diffusion, n)
    pattern = probe(func, lambda x, s: x, torch.zeros(1, 4, 16, 16), sigmas, callback=lambda d: None)
    assert pattern.rule == REPORTED_AFTER
    out, model, z_up, noise = drive(func, sigmas)
    starts = check_every_step_start(model, z_up, noise, steps=n)
    assert list(pattern.starts) == starts
    if name in SINGLE:
        assert starts == list(range(n)) and len(model.log) == n
    else:
        # two evaluations per step, the last step (to sigma 0) one: the second one is never a start
        assert len(model.log) == 2 * n - 1 and starts == [2 * i for i in range(n)]
    assert torch.isfinite(out).all()


def test_dpmpp_2m_sde_heun_solver(k_diffusion):
    func = k_diffusion.sampling.sample_dpmpp_2m_sde
    _, model, z_up, noise = drive(func, karras(k_diffusion, 4), solver_type="heun")
    check_every_step_start(model, z_up, noise, steps=4)


def test_heun_continues_from_the_residualed_state(k_diffusion):
    """End to end: k-diffusion's Heun through the patches equals Heun written out with the residual on x."""
    func = k_diffusion.sampling.sample_heun
    sigmas = karras(k_diffusion, 4)
    out, model, z_up, noise = drive(func, sigmas)
    sampler, patches, cfg, _, _ = stage_sampling(func)  # same z_up/noise (same seed); no sampler run: no residual
    cond = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(1))
    try:
        x = z_up + sigmas[0] * noise
        s_in = x.new_ones([1])
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i] * s_in
            x = skip_residual(x, z_up, noise, sigma, skip_weight(sigma_to_t(sigma), COSINE_SCALE_1))
            d = (x - cfg(x, sigma, cond=cond)) / sigmas[i]
            dt = sigmas[i + 1] - sigmas[i]
            if sigmas[i + 1] == 0:
                x = x + d * dt
            else:
                x_2 = x + d * dt
                d_2 = (x_2 - cfg(x_2, sigmas[i + 1] * s_in, cond=cond)) / sigmas[i + 1]
                x = x + (d + d_2) / 2 * dt
    finally:
        patches.remove()
    assert torch.allclose(out, x, atol=1e-5)


def test_dpm_fast(k_diffusion):
    func = k_diffusion.sampling.sample_dpm_fast
    for n in (6, 7, 8):  # orders 3,2,1 / 3,3,1 / 3,3,2
        pattern = probe(func, lambda x, s: x, torch.zeros(1, 4, 8, 8), 0.0292, 14.6146, n, callback=None)
        assert pattern.rule == REPORTED_AFTER
        _, model, z_up, noise = drive(func, sigma_min=0.0292, sigma_max=14.6146, n=n)
        m = math.floor(n / 3) + 1
        orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
        starts = check_every_step_start(model, z_up, noise, steps=len(orders))
        assert len(model.log) == n and starts == [sum(orders[:i]) for i in range(len(orders))]


def test_dpm_adaptive_with_rejected_steps_gets_the_residual_once_per_step(k_diffusion):
    func = k_diffusion.sampling.sample_dpm_adaptive
    pattern = probe(func, lambda x, s: x, torch.zeros(1, 4, 8, 8), 0.0292, 14.6146, callback=None)
    assert pattern.rule == REPORTED_BEFORE
    _, model, z_up, noise = drive(func, sigma_min=0.5, sigma_max=14.6146, rtol=0.002, atol=0.0005, h_init=0.8)
    starts = starts_by_call_order(model.order, adaptive=True)
    first_attempt = {}   # the state object -> its first attempt's evaluation
    repeats = 0
    for index in starts:
        entry = model.log[index]
        if id(entry.x) in first_attempt:  # a rejected attempt restarts from the same state object
            repeats += 1
            assert torch.equal(entry.seen, entry.before), "the residual was applied a second time"
            assert torch.equal(entry.before, model.log[first_attempt[id(entry.x)]].seen)
        else:
            first_attempt[id(entry.x)] = index
            assert torch.allclose(entry.seen, reference(entry, z_up, noise), rtol=0, atol=1e-6)
    assert repeats > 0, "the test needs rejected steps"
    for index, entry in enumerate(model.log):
        if index not in set(starts):
            assert torch.equal(entry.seen, entry.before)


def webui_restart_sampler():
    # The WebUI's own restart sampler, read only from an install the user names: a clone tests without one.
    if not os.environ.get("WEBUI_DIR"):
        pytest.skip("WEBUI_DIR is not set: no WebUI install to take restart_sampler from")
    path = Path(os.environ["WEBUI_DIR"]) / "modules" / "sd_samplers_extra.py"
    if not path.exists():
        pytest.skip(f"the WebUI's restart_sampler is not at {path}")
    spec = importlib.util.spec_from_file_location("webui_sd_samplers_extra", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.restart_sampler


@pytest.mark.parametrize("n", [6, 20])  # 20 steps: with its restart jumps back up the schedule
def test_webui_restart_sampler(k_diffusion, n):
    func = webui_restart_sampler()
    sigmas = karras(k_diffusion, n)
    _, model, z_up, noise = drive(func, sigmas)
    starts = check_every_step_start(model, z_up, noise)
    sigmas_seen = [float(model.log[i].sigma[0]) for i in starts]
    if n == 20:
        assert any(b > a for a, b in zip(sigmas_seen, sigmas_seen[1:])), "no restart jump was exercised"


# ---- the rule itself, on hand-written samplers ------------------------------------------------------------


def heun_like(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Restart's structure: Heun steps with noise jumps back up, the callback inside each step."""
    for i in range(len(sigmas) - 1):
        if i == 2:
            x = x + torch.randn_like(x) * 0.1  # a jump: the new state object starts the next step
        denoised = model(x, sigmas[i], **(extra_args or {}))
        if callback:
            callback({"x": x, "i": i})
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] > 0:
            x_2 = x + d * dt
            d = (d + (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]) / 2
        x = x + d * dt
    return x


def test_probe_follows_the_structure_not_the_name():
    sigmas = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0])
    pattern = probe(heun_like, lambda x, s: x, torch.zeros(1, 4, 8, 8), sigmas, callback=None)
    assert pattern == StepPattern(REPORTED_AFTER, (0, 2, 4, 6), 7)


def test_a_sampler_reporting_a_copy_is_refused():
    def copying(model, x, sigmas, callback=None):
        for i in range(len(sigmas) - 1):
            model(x, sigmas[i])
            callback({"x": x.clone()})
        return x

    with pytest.raises(UnsupportedSampler, match="copying: no model evaluation of each step takes the state"):
        probe(copying, None, torch.zeros(1), torch.tensor([2.0, 1.0, 0.0]), callback=None)


def test_a_data_dependent_step_structure_is_refused():
    def whimsical(model, x, sigmas, callback=None):
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i])
            callback({"x": x})
            if denoised.mean() > 0:
                model(x + 1, sigmas[i])
            x = x - 0.1
        return x

    with pytest.raises(UnsupportedSampler, match="depends on the model's output"):
        probe(whimsical, None, torch.zeros(1, 1, 2, 2), torch.tensor([3.0, 2.0, 1.0, 0.0]), callback=None)


def test_the_probe_draws_nothing_from_the_job(k_diffusion):
    """The WebUI's TorchHijack draws from p.rng: the probe uses the real torch and a forked RNG, and puts back
    what it swapped."""
    sampling = k_diffusion.sampling

    class Hijack:
        def __getattr__(self, item):
            if item == "randn_like":
                raise AssertionError("the probe drew from the job's rng")
            return getattr(torch, item)

    hijack = Hijack()
    previous = sampling.torch
    sampling.torch = hijack
    try:
        state = torch.get_rng_state()
        for name in ("sample_euler_ancestral", "sample_heun", "sample_dpmpp_sde", "sample_dpm_2_ancestral"):
            probe(getattr(sampling, name), None, torch.zeros(1, 4, 8, 8), karras(k_diffusion, 4), callback=None)
        assert sampling.torch is hijack
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        sampling.torch = previous


def test_a_sampler_leaving_its_probed_structure_raises():
    pattern = StepPattern(REPORTED_AFTER, (0, 2), 3)
    steps = StepStarts(pattern, torch.zeros(1), "Heun")
    x = torch.zeros(1)
    assert steps.is_start(x)
    x.add_(1)
    steps.applied(x)
    steps.report(x)
    assert not steps.is_start(torch.zeros(1))
    with pytest.raises(StepTrackingError, match="lost track of Heun's steps at callback 2"):
        steps.report(torch.zeros(1))  # the state reported is not the one that got the residual


def test_reported_before_skips_a_repeated_attempt_but_not_a_changed_state():
    x0 = torch.zeros(1)
    steps = StepStarts(StepPattern(REPORTED_BEFORE, (), 0), x0)
    assert steps.is_start(x0)
    x0.add_(1)
    steps.applied(x0)
    assert not steps.is_start(torch.ones(1))    # an intermediate point
    steps.report(x0)                            # rejected: the same state again
    assert not steps.is_start(x0)               # carries it already
    steps.report(x0)
    x0.add_(1)                                  # changed in place since: a new state
    assert steps.is_start(x0)
    with pytest.raises(StepTrackingError):
        steps.report(torch.zeros(1))
        steps.report(torch.zeros(1))            # an interval without any step start
