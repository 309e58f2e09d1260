"""Real k-diffusion samplers drive the scheduled re-dilation through the UNet's timestep."""
import pytest
import torch

from lib_hires.scalecrafter import NoiseDampedCFG, ScaleCrafterController, build_plan, official_step
from tests.conftest import ldm

LATENT = (32, 32)


class CallRecorder:
    """A forward pre-hook registered after the controller's: sees the factors every conv will use."""

    def __init__(self, unet, controller):
        self.controller = controller
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        hooks = self.controller.handle.hooks
        t = float(args[1].max())
        active = {p: h.factor for p, h in hooks.items() if h.factor > 1.0}
        dispersed = {p for p, h in hooks.items() if h.dispersed}
        self.calls.append((t, self.controller._base_mode, active, dispersed))


def run(k_diffusion, sampler, sigmas, plan, *, x=None, callback=None, seed=0):
    model = ldm("sd1")
    unet = model.model.diffusion_model
    denoiser = k_diffusion.external.CompVisDenoiser(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, *LATENT, generator=gen) * sigmas[0] if x is None else x
    extra = {"cond": torch.randn(1, 7, 32, generator=gen), "uncond": torch.randn(1, 7, 32, generator=gen),
             "cond_scale": 7.5}
    with ScaleCrafterController(unet, plan) as controller:
        recorder = CallRecorder(unet, controller)
        try:
            guided = NoiseDampedCFG(denoiser, controller, sigma_to_t=denoiser.sigma_to_t)
            torch.manual_seed(seed)
            out = sampler(guided, x, sigmas, extra_args=extra, callback=callback, disable=True)
        finally:
            recorder.handle.remove()
    assert not unet._forward_pre_hooks and not any("_conv_forward" in vars(m) for m in unet.modules())
    return out, recorder.calls, denoiser


def check_calls_follow_the_plan(calls, plan):
    assert calls
    for t, base_mode, active, dispersed in calls:
        expected = (plan.base_at(t) or {}) if base_mode else plan.main_at(t)
        assert active == expected, (t, base_mode)
        assert dispersed == plan.dispersed_among(expected)
    main_calls = [c for c in calls if not c[1]]
    base_calls = [c for c in calls if c[1]]
    assert len(base_calls) == sum(1 for t, *_ in main_calls if plan.base_at(t) is not None)


PLAN = build_plan("sd1", 256, 256, train_size=64)  # the official 16x preset (progressive + noise damping)


@pytest.mark.parametrize("name,schedule,steps", [
    ("sample_euler", "karras", 8),
    ("sample_euler_ancestral", "karras", 6),
    ("sample_heun", "exponential", 5),
    ("sample_dpmpp_2m", "karras", 10),
    ("sample_lms", "default", 7),
])
def test_every_sampler_dilates_by_noise_level(k_diffusion, name, schedule, steps):
    kd = k_diffusion.sampling
    denoiser = k_diffusion.external.CompVisDenoiser(ldm("sd1"))
    if schedule == "default":
        sigmas = denoiser.get_sigmas(steps)
    elif schedule == "karras":
        sigmas = kd.get_sigmas_karras(steps, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    else:
        sigmas = kd.get_sigmas_exponential(steps, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    out, calls, _ = run(k_diffusion, getattr(kd, name), sigmas, PLAN)
    assert torch.isfinite(out).all()
    check_calls_follow_the_plan(calls, PLAN)
    steps_seen = {official_step(t) for t, *_ in calls}
    assert min(steps_seen) < PLAN.tau <= max(steps_seen)  # both dilated and vanilla calls happened
    assert any(a for _, _, a, _ in calls) and any(not a for _, _, a, _ in calls)


def test_a_partial_schedule_starts_at_its_own_noise_level(k_diffusion):
    """Hires fix / img2img: the first call is at t ~ 600, so it gets official step ~19's factors."""
    kd = k_diffusion.sampling
    denoiser = k_diffusion.external.CompVisDenoiser(ldm("sd1"))
    full = kd.get_sigmas_karras(20, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    start = int((full > denoiser.t_to_sigma(torch.tensor(600.0))).sum())
    sigmas = full[start:]
    x = torch.randn(1, 4, *LATENT) * sigmas[0]
    _, calls, _ = run(k_diffusion, kd.sample_euler, sigmas, PLAN, x=x)
    t0, _, active, _ = calls[0]
    assert 560 < t0 <= 600 and official_step(t0) in (19, 20, 21)
    assert set(active.values()) == {2.0}  # progressive decay has reached 2 on every layer by then
    check_calls_follow_the_plan(calls, PLAN)


def test_dispersion_runs_inside_a_sampler(k_diffusion):
    from lib_hires.scalecrafter import ScaleCrafterSettings
    plan = build_plan("sd1", 256, 256, ScaleCrafterSettings(enabled=True, dispersion=True), train_size=64)
    kd = k_diffusion.sampling
    denoiser = k_diffusion.external.CompVisDenoiser(ldm("sd1"))
    sigmas = kd.get_sigmas_karras(5, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    out, calls, _ = run(k_diffusion, kd.sample_euler, sigmas, plan)
    assert torch.isfinite(out).all()
    assert any(dispersed for *_, dispersed in calls)
    check_calls_follow_the_plan(calls, plan)


def test_an_interrupt_mid_sampling_removes_every_hook(k_diffusion):
    kd = k_diffusion.sampling
    denoiser = k_diffusion.external.CompVisDenoiser(ldm("sd1"))
    sigmas = kd.get_sigmas_karras(6, denoiser.sigma_min.item(), denoiser.sigma_max.item())

    class Interrupted(BaseException):  # the WebUI's InterruptedException is a BaseException too
        pass

    def interrupt(info):
        if info["i"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(k_diffusion, kd.sample_euler, sigmas, PLAN, callback=interrupt)
    unet = ldm("sd1").model.diffusion_model
    assert not unet._forward_pre_hooks and not any("_conv_forward" in vars(m) for m in unet.modules())


def test_redilation_changes_the_result_and_a_noop_plan_does_not(k_diffusion):
    kd = k_diffusion.sampling
    denoiser = k_diffusion.external.CompVisDenoiser(ldm("sd1"))
    sigmas = kd.get_sigmas_karras(4, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    dilated, _, _ = run(k_diffusion, kd.sample_euler, sigmas, PLAN)
    noop, calls, _ = run(k_diffusion, kd.sample_euler, sigmas, build_plan("sd1", 256, 256, train_size=256))
    model = ldm("sd1")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, *LATENT, generator=gen) * sigmas[0]
    cond, uncond = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 7, 32, generator=gen)
    plain = NoiseDampedCFG(k_diffusion.external.CompVisDenoiser(model), sigma_to_t=denoiser.sigma_to_t)
    vanilla = kd.sample_euler(plain, x, sigmas, extra_args={"cond": cond, "uncond": uncond, "cond_scale": 7.5},
                              disable=True)
    assert torch.equal(noop, vanilla)
    assert not any(a for _, _, a, _ in calls)
    assert not torch.allclose(dilated, vanilla, atol=1e-3)
