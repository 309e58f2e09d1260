"""The fused denoiser against the formulas of demofusion.md §1.5, §1.6 and §4.3, on small exact denoisers."""
import math

import pytest
import torch
import torch.nn.functional as F

from lib_hires.demofusion import (DilatedView, FusedDenoiser, LocalView, cosine_factor, dilated_views, local_views,
                                  repeat_rows)
from tools.tiny_ldm import scaled_linear_alphas_cumprod

NO_GLOBAL = math.inf   # cosine_scale_2 = inf: c2 = cf^inf = 0 for every cf < 1
ONLY_GLOBAL = 0.0      # cosine_scale_2 = 0: c2 = 1


@pytest.fixture(scope="module")
def schedule(k_diffusion):
    ac = scaled_linear_alphas_cumprod()
    return k_diffusion.external.DiscreteSchedule(((1 - ac) / ac) ** 0.5, quantize=False)


class ToyDenoiser:
    """x0 from elementwise ops and zero-padded neighbours only, so its result for a row does not depend on
    what else is in the batch (bit for bit). It depends on the position inside its input (a ramp) and on
    the input's border (zero padding), so a wrong crop, offset or view size changes the result."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x, sigma, cond=None):
        self.inputs.append(x)
        s = sigma.reshape(-1, 1, 1, 1)
        xi = x / (s ** 2 + 1) ** 0.5
        p = F.pad(xi, (1, 1, 1, 1))
        neighbours = (p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]) / 4
        h, w = x.shape[-2:]
        ramp = 0.01 * torch.arange(h)[:, None] - 0.02 * torch.arange(w)[None, :]
        out = 0.5 * xi + 0.3 * neighbours + ramp + 0.01 * s
        if cond is not None:
            ctx, = cond["c_crossattn"]
            dummy, = cond["c_concat"]  # a [1, 5, 1, 1] tensor that broadcasts over the batch
            out = out + dummy[:, :4] - 1
            out = out + ctx[:, :1, None, None] + 0.1 * ctx[:, 1:2, None, None] * torch.arange(4.0)[:, None, None]
        return out


def cond_for(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"c_crossattn": [torch.randn(rows, 3, generator=g)], "c_concat": [torch.ones(1, 5, 1, 1)]}


def fused(toy, schedule, seed=0, **kw):
    kw.setdefault("window", 16)
    kw.setdefault("stride", 8)
    kw.setdefault("dilation", 2)
    return FusedDenoiser(toy, sigma_to_t=schedule.sigma_to_t,
                         jitter=None if seed is None else torch.Generator().manual_seed(seed), **kw)


def sigma_rows(rows, value=2.5):
    return torch.full((rows,), value)


@pytest.mark.parametrize("size,dilation", [((16, 16), 2), ((12, 16), 2), ((16, 16), 1), ((10, 13), 1)])
def test_with_one_view_and_no_global_share_it_is_the_plain_denoiser(schedule, size, dilation):
    x = torch.randn(2, 4, *size)
    cond = cond_for(2)
    plain = ToyDenoiser()(x, sigma_rows(2), cond=cond)
    scale2 = NO_GLOBAL if dilation > 1 else 1.0  # at dilation 1 the global path is the plain denoiser too
    out = fused(ToyDenoiser(), schedule, dilation=dilation, cosine_scale_2=scale2)(x, sigma_rows(2), cond=cond)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size,window,stride", [((40, 56), 16, 8), ((16, 72), 16, 4), ((33, 47), 16, 16),
                                                ((9, 40), 16, 12), ((64, 24), 24, 8)])
def test_a_constant_denoiser_is_unchanged_by_the_views(schedule, size, window, stride):
    value = torch.randn(2, 4, 1, 1)
    f = fused(lambda x, sigma: value.repeat(x.shape[0] // 2, 1, *x.shape[-2:]), schedule, seed=3,
              window=window, stride=stride, cosine_scale_2=NO_GLOBAL)
    out = f(torch.randn(2, 4, *size), sigma_rows(2))
    torch.testing.assert_close(out, value.expand_as(out), atol=1e-6, rtol=0)


def direct_gaussian(frame, size, sigma):
    """The 2-D Gaussian as a sum over taps, one row at a time: no conv, no separability."""
    out = torch.zeros_like(frame)
    r = size // 2
    padded = F.pad(frame, (r, r, r, r))
    h, w = frame.shape[-2:]
    for row in range(frame.shape[0]):
        taps = [math.exp(-(i - (size - 1) / 2) ** 2 / (2 * float(sigma[row]) ** 2)) for i in range(size)]
        total = sum(taps) ** 2
        for a in range(size):
            for b in range(size):
                out[row] += taps[a] * taps[b] / total * padded[row, :, a:a + h, b:b + w]
    return out


@pytest.mark.parametrize("size,dilation", [((32, 32), 2), ((30, 44), 3), ((17, 40), 2)])
def test_the_dilated_path_matches_a_direct_per_sample_computation(schedule, size, dilation):
    rows = 2
    spread, offset = torch.tensor([1.0, 3.0]).view(-1, 1, 1, 1), torch.tensor([0.0, 2.0]).view(-1, 1, 1, 1)
    x = torch.randn(rows, 4, *size) * spread + offset
    sigma = sigma_rows(rows, 4.0)
    cond = cond_for(rows)
    toy = ToyDenoiser()
    out = fused(toy, schedule, dilation=dilation, cosine_scale_2=ONLY_GLOBAL, cosine_scale_3=1.0, sigma=0.8)(
        x, sigma, cond=cond)

    s = dilation
    t = schedule.sigma_to_t(sigma)
    cf = 0.5 * (1 + torch.cos(math.pi * (1000 - t) / 1000))
    blur_sigma = 0.8 * (0.99 * cf + 0.01)
    h_pad, w_pad = (s - size[0] % s) % s, (s - size[1] % s) % s
    zg = F.pad(x, (w_pad, 0, h_pad, 0))
    blurred = direct_gaussian(zg, 2 * s - 1, blur_sigma)
    expected = torch.zeros_like(zg)
    for row in range(rows):  # per-row statistics: the rows are far apart, global ones would mix them
        b, z = blurred[row], zg[row]
        b = (b - b.mean()) / b.std() * z.std() + z.mean()
        one = {"c_crossattn": [cond["c_crossattn"][0][row:row + 1]], "c_concat": cond["c_concat"]}
        for i in range(s):
            for j in range(s):
                sample = b[None, :, i::s, j::s]
                expected[row, :, i::s, j::s] = (ToyDenoiser()(sample, sigma[row:row + 1], cond=one)[0]
                                                + (z - b)[:, i::s, j::s])
    torch.testing.assert_close(out, expected[..., h_pad:, w_pad:], atol=1e-5, rtol=1e-5)


def test_view_batch_changes_nothing_but_the_number_of_calls(schedule):
    x, sigma, cond = torch.randn(2, 4, 40, 56), sigma_rows(2), cond_for(2)
    results, calls = [], []
    for view_batch in (1, 5, 16, 64):
        f = fused(ToyDenoiser(), schedule, seed=7, dilation=3, view_batch=view_batch)
        results.append(torch.cat([f(x, sigma, cond=cond), f(x, sigma * 0.5, cond=cond)]))
        calls.append(f.model_calls // 2)
    for other in results[1:]:
        assert torch.equal(other, results[0])
    views = len(local_views(40, 56, 16, 8))  # 4 x 6 windows of 16x16; 9 samples of 14x19
    assert views == 24
    assert calls == [views + 9, math.ceil(views / 5) + math.ceil(9 / 5), 2 + 1, 1 + 1]


def test_local_and_dilated_views_of_one_size_share_calls(schedule):
    f = fused(ToyDenoiser(), schedule, window=16, stride=8, dilation=2)
    f(torch.randn(1, 4, 32, 32), sigma_rows(1))  # the official shape: 3x3 windows and 2x2 samples of 16x16
    assert f.model_calls == math.ceil((9 + 4) / 16) == 1 and f.model_views == 13


def test_the_same_seed_gives_the_same_result_and_another_seed_other_views(schedule):
    x, sigma = torch.randn(1, 4, 40, 40), sigma_rows(1)
    a = fused(ToyDenoiser(), schedule, seed=11)
    b = fused(ToyDenoiser(), schedule, seed=11)
    c = fused(ToyDenoiser(), schedule, seed=12)
    first = [a(x, sigma), a(x, sigma * 0.9)]
    assert all(torch.equal(p, q) for p, q in zip(first, [b(x, sigma), b(x, sigma * 0.9)]))
    assert not torch.equal(first[0], c(x, sigma))
    # a new noise level draws new views; repeating one (cond and uncond in separate calls) keeps them
    assert a.views_for(sigma * 0.9, 40, 40) is a.views_for(sigma * 0.9, 40, 40)
    assert a.views_for(sigma * 0.8, 40, 40) != a.views_for(sigma * 0.7, 40, 40)


def test_rows_of_a_batch_are_independent(schedule):
    x = torch.randn(3, 4, 28, 44)
    cond = cond_for(3)
    sigma = sigma_rows(3, 1.7)
    together = fused(ToyDenoiser(), schedule, seed=5, dilation=3)(x, sigma, cond=cond)
    for row in range(3):
        one = {"c_crossattn": [cond["c_crossattn"][0][row:row + 1]], "c_concat": cond["c_concat"]}
        alone = fused(ToyDenoiser(), schedule, seed=5, dilation=3)(x[row:row + 1], sigma[row:row + 1], cond=one)
        assert torch.equal(together[row:row + 1], alone)


def test_cond_and_uncond_rows_may_come_in_separate_calls_at_one_noise_level(schedule):
    x, sigma, cond = torch.randn(4, 4, 40, 40), sigma_rows(4), cond_for(4)
    f = fused(ToyDenoiser(), schedule, seed=2)
    whole = fused(ToyDenoiser(), schedule, seed=2)(x, sigma, cond=cond)
    halves = [f(x[k:k + 2], sigma[k:k + 2], cond={"c_crossattn": [cond["c_crossattn"][0][k:k + 2]],
                                                  "c_concat": cond["c_concat"]}) for k in (0, 2)]
    assert torch.equal(torch.cat(halves), whole)


def test_each_call_stacks_views_view_major_and_repeats_only_batch_aligned_args(schedule):
    rows = 2
    x, sigma = torch.randn(rows, 4, 24, 40), torch.tensor([3.0, 3.0])
    extra = {"cond": {"crossattn": torch.randn(rows, 7, 8), "vector": torch.randn(rows, 6),
                      "c_concat": [torch.randn(1, 5, 1, 1)], "pair": (torch.randn(rows, 2), 0.5)},
             "cond_scale": 7.5}
    seen = []

    def recorder(x_in, sigma_in, cond, cond_scale):
        seen.append((x_in, sigma_in, cond, cond_scale))
        return x_in * 0.5

    calls = []
    f = FusedDenoiser(recorder, dilation=2, window=16, stride=8, view_batch=4, sigma_to_t=schedule.sigma_to_t,
                      jitter=torch.Generator().manual_seed(0), before_call=calls.append)
    f(x, sigma, **extra)
    assert len(seen) == len(calls) == f.model_calls
    assert [c.index for c in calls] == list(range(len(calls))) and {c.count for c in calls} == {len(calls)}
    assert sum(len(c.views) for c in calls) == 2 * 4 + 4
    for call, (x_in, sigma_in, cond, cond_scale) in zip(calls, seen):
        k = len(call.views)
        assert x_in.shape[0] == k * rows and sigma_in.shape == (k * rows,)
        assert cond_scale == 7.5 and cond["pair"][1] == 0.5
        assert cond["c_concat"][0] is extra["cond"]["c_concat"][0]
        for v, view in enumerate(call.views):
            part = slice(v * rows, (v + 1) * rows)
            assert torch.equal(cond["crossattn"][part], extra["cond"]["crossattn"])
            assert torch.equal(cond["vector"][part], extra["cond"]["vector"])
            assert torch.equal(cond["pair"][0][part], extra["cond"]["pair"][0])
            assert torch.equal(sigma_in[part], sigma)
            if isinstance(view, LocalView):
                assert torch.equal(x_in[part], view.cut(x))
        if all(isinstance(v, LocalView) for v in call.views):
            assert torch.equal(x_in, call.cut(x))


def test_view_cond_receives_padded_frame_crops_and_before_call_the_geometry(schedule):
    crops_seen, calls = [], []

    def view_cond(extra_args, crops):
        crops_seen.append(list(crops))
        return repeat_rows(extra_args, 1, len(crops))

    f = FusedDenoiser(lambda x, sigma, **kw: x, dilation=2, window=16, stride=8, view_batch=16,
                      sigma_to_t=schedule.sigma_to_t, view_cond=view_cond, before_call=calls.append)
    f(torch.randn(1, 4, 32, 32), sigma_rows(1))  # 3x3 windows and 2x2 samples of 16x16: one call
    pad = 2  # (16 - 8) // 4, also without jitter
    (call,), (crops,) = calls, crops_seen
    assert crops == call.crops
    local = [v for v in call.views if isinstance(v, LocalView)]
    dilated = [v for v in call.views if isinstance(v, DilatedView)]
    assert [(v.h0, v.w0) for v in local] == [(pad + h, pad + w) for h in (0, 8, 16) for w in (0, 8, 16)]
    assert crops[:len(local)] == [(8 * v.h0, 8 * v.w0) for v in local] and crops[0] == (16, 16)
    assert crops[len(local):] == [(0, 0)] * 4
    assert dilated == dilated_views(32, 32, 2)


def test_dilated_view_cut_is_the_strided_sample_and_the_official_hint_slice():
    frame = torch.randn(1, 3, 10, 14)
    for view in dilated_views(10, 14, 3):  # 2 zero rows on top, 1 zero column on the left
        padded = F.pad(frame, (1, 0, 2, 0))
        assert torch.equal(view.cut(frame), padded[..., view.offset_h::3, view.offset_w::3])
        hint = torch.randn(1, 3, 80, 112)
        cut = view.cut(hint, scale=8)
        assert cut.shape[-2:] == (8 * 4, 8 * 5)
        official = F.pad(hint, (8, 0, 16, 0))[..., 8 * view.offset_h::3, 8 * view.offset_w::3]
        h, w = min(cut.shape[-2], official.shape[-2]), min(cut.shape[-1], official.shape[-1])
        assert torch.equal(cut[..., :h, :w], official[..., :h, :w])


def test_local_view_cut_pads_with_zeros_at_every_scale():
    view = LocalView(0, 6, 3, 9, pad=2)
    frame = torch.randn(1, 2, 8, 8)
    cut = view.cut(frame)
    assert torch.equal(cut[..., :2, :], torch.zeros(1, 2, 2, 6)) and torch.equal(cut[..., 2:, :], frame[..., :4, 1:7])
    assert torch.equal(view.cut(frame.repeat_interleave(8, -1).repeat_interleave(8, -2), scale=8),
                       cut.repeat_interleave(8, -1).repeat_interleave(8, -2))


def test_the_fusion_weight_comes_from_the_timestep(schedule):
    sigma = schedule.t_to_sigma(torch.tensor([500.0]))
    t = float(schedule.sigma_to_t(sigma))
    assert cosine_factor(t) == pytest.approx(0.5 * (1 + math.cos(math.pi * (1000 - t) / 1000)))
    # 1 for the 8-wide local views, 0 for the 7-wide dilated samples; x = 0 makes B = x, so D = 1 - c2
    f = fused(lambda x, sigma: torch.full_like(x, float(x.shape[-1] == 8)), schedule, seed=None,
              cosine_scale_2=2.0, dilation=2, window=8, stride=8)
    out = f(torch.zeros(1, 4, 16, 14), sigma)
    torch.testing.assert_close(out, torch.full_like(out, 1 - cosine_factor(t) ** 2), atol=1e-6, rtol=0)


def test_geometry_is_validated(schedule):
    with pytest.raises(ValueError, match="stride 20 exceeds window 16"):
        FusedDenoiser(ToyDenoiser(), dilation=2, window=16, stride=20, sigma_to_t=schedule.sigma_to_t)
    with pytest.raises(ValueError, match="dilation must be a positive integer"):
        FusedDenoiser(ToyDenoiser(), dilation=0, window=16, stride=8, sigma_to_t=schedule.sigma_to_t)
    with pytest.raises(ValueError, match="view_batch"):
        FusedDenoiser(ToyDenoiser(), dilation=2, window=16, stride=8, view_batch=0, sigma_to_t=schedule.sigma_to_t)
