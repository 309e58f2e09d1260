"""DemoFusion's speed levers: user stage plans, the partial start of later stages, and the exact savings."""
import pytest
import torch

import lib_hires.demofusion.fused as fused_module
from lib_hires.demofusion import (NEGLIGIBLE_WEIGHT, DemoFusionSettings, FusedDenoiser, check_stage_factors,
                                  fusion_weight, later_stage_start, parse_stage_factors, partial_sigmas,
                                  partial_steps, plan_stages, sample_stages, steps_run)
from tests.conftest import ldm
from tests.test_demofusion_fused import ToyDenoiser, cond_for, schedule  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def compvis(k_diffusion):
    return k_diffusion.external.CompVisDenoiser(ldm("sd1"))


# --- stage plans -------------------------------------------------------------------------------------------

def test_a_user_plan_sets_the_stages_and_the_automatic_factors_give_the_automatic_plan():
    plan = plan_stages(1024, 1024, 4, window=128, factors=(2.0, 4.0))
    assert [(st.factor, st.width, st.dilation) for st in plan.stages] == [(1, 1024, 1), (2, 2048, 2), (4, 4096, 4)]
    assert plan_stages(1024, 1024, 4, window=128, factors=(2.0, 3.0, 4.0)) == plan_stages(1024, 1024, 4, window=128)
    odd = plan_stages(512, 512, 3.2, window=64, factors=(1.5, 2.5, 3.2))
    assert [st.dilation for st in odd.stages] == [1, 2, 3, 3]
    assert odd.final.width == 1664 and [st.width for st in odd.stages] == [512, 768, 1344, 1664]
    # fewer stages, fewer views per step summed over the stages: the point of a plan
    auto = plan_stages(1024, 1024, 4, window=128, stride=64)
    assert sum(st.views_per_step(128, 64) for st in plan.stages) == 1 + 13 + 65
    assert sum(st.views_per_step(128, 64) for st in auto.stages) == 1 + 13 + 34 + 65


@pytest.mark.parametrize("factors,scale,message", [
    ((2.0, 3.0), 4.0, r"the last scale must equal Scale \(4\); got 3"),
    ((4.0,), 4.0, r"at most 2x the one before \(x1 allows up to x2\); got x4"),
    ((2.0, 4.5), 4.5, r"x2 allows up to x4\); got x4.5"),
    ((1.0, 2.0), 2.0, r"increase from above 1"),
    ((2.0, 1.8, 3.0), 3.0, r"1.8 follows x2"),
])
def test_plan_rules(factors, scale, message):
    with pytest.raises(ValueError, match=message):
        check_stage_factors(factors, scale)
    with pytest.raises(ValueError, match=message):
        plan_stages(512, 512, scale, window=64, factors=factors)


def test_plan_text():
    assert parse_stage_factors(" 1.5, 2.5 ,3.2") == (1.5, 2.5, 3.2)
    assert parse_stage_factors("") == parse_stage_factors("  ") == ()
    for bad, message in (("2, , 4", "'' is not a number"), ("2 4", "'2 4' is not a number"), ("inf", "finite")):
        with pytest.raises(ValueError, match=message):
            parse_stage_factors(bad)
    check_stage_factors((1.5, 2.5, 3.2), 3.2)
    check_stage_factors((2.0, 4.0), 4.0)


# --- where a later stage starts ----------------------------------------------------------------------------

@pytest.mark.parametrize("steps,strength,fixed,expected", [
    # hand-computed from the WebUI's rule (sd_samplers_common.setup_img2img_steps, v1.10.1)
    (20, 1.0, True, (20, 19)),     # int(20 / 0.999) = 20: the full schedule
    (20, 0.6, True, (33, 19)),     # the hires pass at 0.6: 20 of a 33-step schedule
    (30, 0.5, True, (60, 29)),
    (12, 0.6, True, (20, 11)),     # 12 = 0.6 x 20: the last 12 steps of the 20-step schedule
    (20, 0.6, False, (20, 12)),    # img2img's default: 13 of the 20 steps
    (20, 1.0, False, (20, 19)),    # min(1, 0.999) * 20 = 19.98 -> 19
    (1000, 1.0, True, (1001, 999)),
])
def test_partial_steps_follow_the_webui_rule(steps, strength, fixed, expected):
    assert partial_steps(steps, strength, fixed_steps=fixed) == expected
    assert steps_run(steps, strength, fixed_steps=fixed) == expected[1] + 1


def test_strength_one_is_the_full_schedule_and_strength_times_steps_its_tail(compvis):
    full = compvis.get_sigmas(20)
    assert torch.equal(partial_sigmas(compvis.get_sigmas, 20, 1.0), full)
    assert torch.equal(partial_sigmas(compvis.get_sigmas, 12, 0.6), full[8:])
    hires = partial_sigmas(compvis.get_sigmas, 20, 0.6)
    assert len(hires) == 21 and torch.equal(hires, compvis.get_sigmas(33)[13:])
    assert hires[0] < full[0] and hires[-1] == 0


def test_later_stage_start_keeps_todays_defaults():
    # txt2img: the official full schedule, as the stage loop called it before (strength 1, steps = p.steps)
    start = later_stage_start(img2img=False, stage_strength=1.0, steps=20, later_steps=0)
    assert (start.strength, start.steps) == (1.0, 20) and start.steps_run(20, fix_steps=False) == 20
    fast = later_stage_start(img2img=False, stage_strength=0.6, steps=20, later_steps=12)
    assert (fast.strength, fast.steps, fast.steps_run(20, fix_steps=False)) == (0.6, 12, 12)
    # img2img: Denoising strength and img2img's own step rule, unless asked otherwise
    start = later_stage_start(img2img=True, stage_strength=1.0, steps=20, later_steps=0, denoising_strength=0.75)
    assert (start.strength, start.steps) == (0.75, None)
    assert start.steps_run(20, fix_steps=False) == 16 and start.steps_run(20, fix_steps=True) == 20
    lower = later_stage_start(img2img=True, stage_strength=0.5, steps=20, later_steps=8, denoising_strength=0.75)
    assert (lower.strength, lower.steps, lower.steps_run(20, fix_steps=False)) == (0.5, 8, 8)


def test_later_stages_of_the_engine_loop_run_the_partial_schedule(compvis):
    plan = plan_stages(64, 64, 2, window=8)
    context = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    first = compvis.get_sigmas(5)
    later = partial_sigmas(compvis.get_sigmas, 3, 0.6)
    seen = []
    sample_stages(compvis, plan.stages, first, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
                  settings=DemoFusionSettings(window=8, stride=4), sigma_to_t=compvis.sigma_to_t,
                  generator=torch.Generator().manual_seed(2), jitter_generator=torch.Generator().manual_seed(3),
                  extra_args={"cond": context}, later_sigmas=later,
                  callback=lambda k, info: seen.append((k, float(info["sigma"]))))
    assert [s for k, s in seen if k == 1] == first[:-1].tolist()
    assert [s for k, s in seen if k == 2] == later[:-1].tolist() and len(later) == 4


# --- exact savings -----------------------------------------------------------------------------------------

def _no_savings(monkeypatch):
    monkeypatch.setattr(fused_module, "NEGLIGIBLE_WEIGHT", -1.0)


def _fused(denoiser, schedule, **kw):
    return FusedDenoiser(denoiser, dilation=2, window=16, stride=8, sigma_to_t=schedule.sigma_to_t,
                         jitter=torch.Generator().manual_seed(4), **kw)


def test_the_dilated_path_is_skipped_where_c2_is_zero_and_the_result_is_the_same(schedule, monkeypatch):
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = schedule.sigmas[0].expand(2)  # t = 0: cf = 0, c2 = 0
    assert float(fusion_weight(schedule.sigma_to_t(sigma[0]), 1.0)) == 0.0
    saving = _fused(ToyDenoiser(), schedule, view_batch=1)
    out = saving(x, sigma, cond=cond_for(2))
    assert (saving.skipped_calls, saving.skipped_views, saving.model_calls) == (4, 4, 9)
    _no_savings(monkeypatch)
    full = _fused(ToyDenoiser(), schedule, view_batch=1)
    assert torch.equal(out, full(x, sigma, cond=cond_for(2))) and full.skipped_calls == 0
    # a call holding views of both paths is evaluated whole (its batch, hence its rounding, unchanged)
    monkeypatch.undo()
    mixed = _fused(ToyDenoiser(), schedule, view_batch=8)  # calls: 8 views | 1 view + 4 samples
    mixed(x, sigma, cond=cond_for(2))
    assert (mixed.skipped_calls, mixed.model_calls) == (0, 2)


def test_the_local_views_are_skipped_where_their_weight_is_zero(schedule, monkeypatch):
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([2.5])
    only_global = _fused(ToyDenoiser(), schedule, view_batch=4, cosine_scale_2=0.0)  # c2 = cf^0 = 1
    out = only_global(x, sigma, cond=cond_for(1))
    # 9 views + 4 samples in calls of 4: [v0-v3] [v4-v7] [v8 s0 s1 s2] [s3]: two calls of views only
    assert (only_global.skipped_calls, only_global.skipped_views, only_global.model_calls) == (2, 8, 2)
    _no_savings(monkeypatch)
    full = _fused(ToyDenoiser(), schedule, view_batch=4, cosine_scale_2=0.0)
    assert torch.equal(out, full(x, sigma, cond=cond_for(1))) and full.model_calls == 4


def test_a_whole_run_with_the_savings_is_the_run_without_them_within_1e_6(compvis, monkeypatch):
    """Six Euler steps per stage at t = 999, 799, 599, 400, 200, 0: c2 is 0 at t = 0 and, with cosine scale 2
    at 10, 6e-11 at t = 200 (0.0955^10), below 2^-24, so the dilated-only calls of two steps are skipped.
    (At the default cosine scale only t = 0 qualifies; the regression fingerprints show that run bit-identical.)"""
    cosine_scale_2 = 10.0
    plan = plan_stages(64, 64, 2, window=8)
    sigmas = compvis.get_sigmas(6)
    t = compvis.sigma_to_t(sigmas[:-1])
    negligible = int((fusion_weight(t, cosine_scale_2) <= NEGLIGIBLE_WEIGHT).sum())
    assert negligible == 2
    context = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    settings = DemoFusionSettings(window=8, stride=4, view_batch=4, cosine_scale_2=cosine_scale_2)

    def run():
        fused = []
        out = sample_stages(compvis, plan.stages, sigmas, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
                            settings=settings, sigma_to_t=compvis.sigma_to_t, generator=torch.Generator().manual_seed(2),
                            jitter_generator=torch.Generator().manual_seed(3), extra_args={"cond": context},
                            fused_denoisers=fused)[-1]
        return out, fused

    saving_out, saving = run()
    _no_savings(monkeypatch)
    full_out, full = run()
    # stage x2: 9 views + 4 samples (all 8x8) in calls of 4: 2 of views, 1 mixed, 1 of a sample only
    assert [f.skipped_calls for f in saving] == [f.skipped_views for f in saving] == [negligible]
    assert [f.model_calls + f.skipped_calls for f in saving] == [f.model_calls for f in full]
    assert all(f.skipped_calls == 0 for f in full)
    scale = full_out.abs().max()
    assert float((saving_out - full_out).abs().max() / scale) <= 1e-6


def test_xyz_axes_for_the_levers_parse_their_values():
    from types import SimpleNamespace

    from lib_hires.webui import xyz

    made = []
    grid = SimpleNamespace(AxisOption=lambda label, kind, apply, confirm=None, choices=None:
                           made.append(SimpleNamespace(label=label, kind=kind, apply=apply, confirm=confirm)) or made[-1])
    axes = {a.label: a for a in xyz.axis_options(grid)}
    plan = axes["[ScaleFusion] DemoFusion Stage plan (scales, empty = automatic)"]
    strength = axes["[ScaleFusion] DemoFusion Stage strength"]
    steps = axes["[ScaleFusion] DemoFusion Steps of later stages (0 = same)"]
    assert (plan.kind, strength.kind, steps.kind) == (str, float, int)
    p = SimpleNamespace()
    plan.apply(p, "2 ,4", None)
    strength.apply(p, 0.6, None)
    steps.apply(p, 12, None)
    assert xyz.overrides_of(p) == {"stages": "2, 4", "stage_strength": 0.6, "later_steps": 12, "enabled": True}
    with pytest.raises(ValueError, match="stages must be"):
        plan.confirm(p, ["2, 4", "two"])
