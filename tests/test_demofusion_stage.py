"""A stage with Euler against a slow reference loop, and the same stage driven through k-diffusion."""
import math

import pytest
import torch
import torch.nn.functional as F

from lib_hires.demofusion import (DemoFusionSettings, FusedDenoiser, euler, plan_stages, row_stats, sample_stage,
                                  sample_stages, skip_residual, skip_weight, upsample_latent)
from tests.conftest import ldm
from tests.test_demofusion_fused import ToyDenoiser, cond_for, direct_gaussian, schedule  # noqa: F401 (fixture)


def test_the_skip_residual_is_its_formula():
    x, z0, eps = torch.randn(3, 2, 5, 4, dtype=torch.float64).unbind(0)
    x, z0, eps = x[None].repeat(2, 1, 1, 1), z0[None].repeat(2, 1, 1, 1), eps[None].repeat(2, 1, 1, 1)
    sigma, c1 = torch.tensor([2.0, 0.5], dtype=torch.float64), torch.tensor([0.9, 0.1], dtype=torch.float64)
    out = skip_residual(x, z0, eps, sigma, c1)
    for r in range(2):
        expected = (1 - c1[r]) * x[r] + c1[r] * (z0[r] + sigma[r] * eps[r])
        torch.testing.assert_close(out[r], expected, rtol=0, atol=1e-15)
    assert torch.equal(skip_residual(x, z0, eps, 2.0, 1.0), z0 + 2.0 * eps)
    assert torch.equal(skip_residual(x, z0, eps, 2.0, 0.0), x)


def official_starts(length, window, stride):
    if length <= window:
        return [0]
    n = int((length - window) / stride - 1e-6) + 2
    starts = []
    for i in range(n):
        start = i * stride
        if start + window > length:
            start = length - window
        starts.append(start)
    return starts


def official_jitter(start, end, length, jr, u):
    """The official if/elif chain, with the documented map from a uniform draw to U{lo..hi}."""
    if start != 0 and end != length:
        lo, hi = -jr, jr
    elif start == 0 and end != length:
        lo, hi = -jr, 0
    elif start != 0 and end == length:
        lo, hi = 0, jr
    else:
        lo, hi = 0, 0
    return lo + min(math.floor(u * (hi - lo + 1)), hi - lo)


def reference_stage(denoiser, z_up, noise, sigmas, *, s, window, stride, scales, blur_scale, sigma_to_t, seed,
                    rows_cond):
    """demofusion.md §1.4/§4.3 step by step: every view and every dilated sample of every row on its own."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    a1, a2, a3 = scales
    x = z_up + sigmas[0] * noise
    rows, channels, height, width = x.shape
    jr = (window - stride) // 4
    for i in range(len(sigmas) - 1):
        sig = sigmas[i]
        t = float(sigma_to_t(sig))
        cf = 0.5 * (1 + math.cos(math.pi * (1000 - t) / 1000))
        c1, c2, c3 = cf ** a1, cf ** a2, 0.99 * cf ** a3 + 0.01
        x = (1 - c1) * x + c1 * (z_up + sig * noise)

        eh, ew = min(window, height), min(window, width)
        boxes = [(h, w) for h in official_starts(height, window, stride) for w in official_starts(width, window, stride)]
        draws = torch.rand((len(boxes), 2), generator=gen, dtype=torch.float64).tolist() if gen else None
        padded = F.pad(x, (jr, jr, jr, jr))
        value = torch.zeros_like(padded)
        count = torch.zeros(height + 2 * jr, width + 2 * jr)
        for k, (h, w) in enumerate(boxes):
            dh = official_jitter(h, h + eh, height, jr, draws[k][0]) if gen else 0
            dw = official_jitter(w, w + ew, width, jr, draws[k][1]) if gen else 0
            top, left = h + dh + jr, w + dw + jr
            count[top:top + eh, left:left + ew] += 1
            for r in range(rows):
                crop = padded[r:r + 1, :, top:top + eh, left:left + ew]
                value[r:r + 1, :, top:top + eh, left:left + ew] += denoiser(crop, sig.reshape(1), cond=rows_cond(r))
        local = (value / count)[..., jr:jr + height, jr:jr + width]

        h_pad, w_pad = (s - height % s) % s, (s - width % s) % s
        zg = F.pad(x, (w_pad, 0, h_pad, 0))
        blurred = direct_gaussian(zg, 2 * s - 1, torch.full((rows,), blur_scale * c3)) if s > 1 else zg
        glob = torch.zeros_like(zg)
        for r in range(rows):
            b, z = blurred[r], zg[r]
            if s > 1:
                b = (b - b.mean()) / b.std() * z.std() + z.mean()
            for a in range(s):
                for c in range(s):
                    d = denoiser(b[None, :, a::s, c::s], sig.reshape(1), cond=rows_cond(r))[0]
                    glob[r, :, a::s, c::s] = d + (z - b)[:, a::s, c::s]
        glob = glob[..., h_pad:, w_pad:]
        denoised = (1 - c2) * local + c2 * glob
        x = x + (sigmas[i + 1] - sig) * (x - denoised) / sig
    return x


def toy_rows_cond(cond):
    return lambda r: {"c_crossattn": [cond["c_crossattn"][0][r:r + 1]], "c_concat": cond["c_concat"]}


@pytest.mark.parametrize("size,s,window,stride,seed", [((40, 56), 3, 16, 8, 4), ((24, 24), 2, 16, 8, None),
                                                       ((12, 30), 2, 16, 4, 9), ((20, 20), 1, 24, 8, 1)])
def test_a_stage_matches_the_slow_reference_loop(schedule, size, s, window, stride, seed):
    gen = torch.Generator().manual_seed(0)
    z_up, noise = torch.randn(2, 2, 4, *size, generator=gen).unbind(0)
    sigmas = schedule.get_sigmas(5)
    cond = cond_for(2)
    kw = dict(window=window, stride=stride, sigma_to_t=schedule.sigma_to_t)
    out = sample_stage(ToyDenoiser(), z_up, noise, sigmas, dilation=s, view_batch=4, cosine_scale_1=2.0,
                       cosine_scale_2=1.5, cosine_scale_3=0.7, sigma=0.9,
                       jitter=None if seed is None else torch.Generator().manual_seed(seed),
                       extra_args={"cond": cond}, **kw)
    expected = reference_stage(ToyDenoiser(), z_up, noise, sigmas, s=s, scales=(2.0, 1.5, 0.7), blur_scale=0.9,
                               seed=seed, rows_cond=toy_rows_cond(cond), **kw)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def compvis(k_diffusion):
    return k_diffusion.external.CompVisDenoiser(ldm("sd1"))


def test_a_stage_on_a_tiny_unet_matches_the_reference_loop(compvis):
    gen = torch.Generator().manual_seed(1)
    z_up, noise = torch.randn(2, 2, 4, 16, 32, generator=gen).unbind(0)
    context = torch.randn(2, 7, 32, generator=gen)
    sigmas = compvis.get_sigmas(3)
    kw = dict(window=16, stride=8, sigma_to_t=compvis.sigma_to_t)
    out = sample_stage(compvis, z_up, noise, sigmas, dilation=2, jitter=torch.Generator().manual_seed(3),
                       extra_args={"cond": context}, **kw)
    expected = reference_stage(compvis, z_up, noise, sigmas, s=2, scales=(3.0, 1.0, 1.0), blur_scale=0.8, seed=3,
                               rows_cond=lambda r: context[r:r + 1], **kw)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def cfg(inner):
    """The WebUI's layering: CFG around a denoiser that sees the cond rows, then the uncond rows."""
    def model(x, sigma, cond, uncond, cond_scale):
        out = inner(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        positive, negative = out.chunk(2)
        return negative + (positive - negative) * cond_scale
    return model


def test_k_diffusion_euler_with_the_fused_inner_model_equals_sample_stage(k_diffusion, compvis):
    """What the WebUI adapter does: the skip residual written into the sampler's own state, the fused
    denoiser in place of CFGDenoiser.inner_model, CFG around it, k-diffusion's sample_euler driving."""
    gen = torch.Generator().manual_seed(2)
    z_up, noise = torch.randn(2, 1, 4, 32, 32, generator=gen).unbind(0)
    extra = {"cond": torch.randn(1, 7, 32, generator=gen), "uncond": torch.randn(1, 7, 32, generator=gen),
             "cond_scale": 5.0}
    sigmas = k_diffusion.sampling.get_sigmas_karras(4, compvis.sigma_min.item(), compvis.sigma_max.item())
    geometry = dict(dilation=2, window=16, stride=8, view_batch=16, sigma_to_t=compvis.sigma_to_t)

    fused = FusedDenoiser(compvis, jitter=torch.Generator().manual_seed(6), **geometry)
    guided = cfg(fused)

    def webui_model(x, sigma, **kw):
        c1 = skip_weight(compvis.sigma_to_t(sigma), 3.0)
        x.copy_(skip_residual(x, z_up, noise, sigma, c1))  # the step continues from x̂
        return guided(x, sigma, **kw)

    # it stands in for the inner model object: the sampler can still read the wrapped one's schedule
    assert torch.equal(fused.sigmas, compvis.sigmas) and torch.equal(fused.get_sigmas(3), compvis.get_sigmas(3))
    driven = k_diffusion.sampling.sample_euler(webui_model, z_up + sigmas[0] * noise, sigmas, extra_args=extra,
                                               disable=True)
    assert fused.model_calls == fused.evaluations == 4  # 9 windows + 4 samples of 16x16 in one call per step
    direct = sample_stage(cfg(compvis), z_up, noise, sigmas, jitter=torch.Generator().manual_seed(6),
                          extra_args=extra, **geometry)
    torch.testing.assert_close(driven, direct, atol=1e-5, rtol=1e-5)


def test_rows_are_independent_through_a_whole_stage(compvis):
    gen = torch.Generator().manual_seed(4)
    z_up, noise = torch.randn(2, 2, 4, 32, 16, generator=gen).unbind(0)
    context = torch.randn(2, 7, 32, generator=gen)
    sigmas = compvis.get_sigmas(3)
    kw = dict(dilation=2, window=16, stride=8, sigma_to_t=compvis.sigma_to_t)
    both = sample_stage(compvis, z_up, noise, sigmas, jitter=torch.Generator().manual_seed(1),
                        extra_args={"cond": context}, **kw)
    for r in range(2):
        one = sample_stage(compvis, z_up[r:r + 1], noise[r:r + 1], sigmas, jitter=torch.Generator().manual_seed(1),
                           extra_args={"cond": context[r:r + 1]}, **kw)
        torch.testing.assert_close(both[r:r + 1], one, atol=1e-5, rtol=1e-5)


def test_a_dilation_1_stage_at_the_window_size_is_plain_euler_with_the_skip_residual(schedule):
    gen = torch.Generator().manual_seed(5)
    z_up, noise = torch.randn(2, 1, 4, 16, 16, generator=gen).unbind(0)
    sigmas = schedule.get_sigmas(4)
    out = sample_stage(ToyDenoiser(), z_up, noise, sigmas, dilation=1, window=16, stride=8,
                       sigma_to_t=schedule.sigma_to_t, jitter=torch.Generator().manual_seed(0))

    def residual(x, sigma):
        return skip_residual(x, z_up, noise, sigma, skip_weight(schedule.sigma_to_t(sigma), 3.0))

    plain = euler(ToyDenoiser(), z_up + sigmas[0] * noise, sigmas, before_step=residual)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)


def test_the_stage_loop_upsamples_anchors_and_is_reproducible(compvis):
    settings = DemoFusionSettings(window=16, stride=8, view_batch=8)
    plan = plan_stages(128, 64, 2, window=16)
    assert [st.latent_size for st in plan.stages] == [(8, 16), (16, 32)]
    sigmas = compvis.get_sigmas(3)
    context = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    seen = []

    def run(seed):
        noise = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(seed))
        return sample_stages(compvis, plan.stages, sigmas, noise, settings=settings, sigma_to_t=compvis.sigma_to_t,
                             generator=torch.Generator().manual_seed(seed + 1),
                             jitter_generator=torch.Generator().manual_seed(seed + 2),
                             extra_args={"cond": context}, callback=lambda k, info: seen.append((k, info["i"])))

    first, final = run(0)
    assert seen == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert final.shape == (1, 4, 16, 32)
    for got, want in zip(row_stats(final), row_stats(first)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    again = run(0)
    assert all(torch.equal(a, b) for a, b in zip(again, (first, final)))
    assert not torch.equal(run(1)[1], final)
    # stage 2 starts from the bicubic latent upsample of stage 1
    assert upsample_latent(first, (16, 32)).shape == final.shape
    with pytest.raises(ValueError, match="pass a jitter_generator"):
        sample_stages(compvis, plan.stages, sigmas, torch.zeros(1, 4, 8, 16), settings=settings,
                      sigma_to_t=compvis.sigma_to_t, generator=torch.Generator())
