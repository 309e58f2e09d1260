"""DemoFusion with the refiner in Forge (issue 23 §1), through Forge's call order (tests/forge_fakes.py): the refiner
waits for the final stage and takes over at its Switch at, as in A1111. Forge's switch makes a freshly loaded model
``p.sd_model`` inside a denoiser call; the stage's views move to the refiner's UnetPatcher before any UNet call of
the refiner, which samples with the conds Forge rebuilt with it."""
from types import SimpleNamespace

import pytest
import torch

from lib_hires.webui import job as webui_job
from lib_hires.webui.messages import RequestError
from tests.conftest import tiny_unet
from tests.forge_fakes import FakeForgeDemoFusionTxt2Img, FakeForgeModel
from tests.test_forge_demofusion_redilation import SIZE, run, settings, stages, unet_is_clean  # noqa: F401 (fixture)


def with_refiner(p, unet, switch_at=0.5, name="tiny-refiner"):
    refiner = FakeForgeModel(unet, name)
    refiner.p = p  # create_sampler finds p through the model, whichever is loaded
    refiner.sd_checkpoint_info = SimpleNamespace(short_title=name, name_for_extra=name)
    p.refiner_model, p.refiner_checkpoint_info, p.refiner_switch_at = refiner, refiner.sd_checkpoint_info, switch_at
    return refiner


def rows_from(context, *conds):
    """Which of ``conds`` each row of a UNet call's context is (its index), or -1."""
    return {next((i for i, c in enumerate(conds) if torch.equal(row, c[0])), -1) for row in context}


def test_the_refiner_takes_over_the_final_stage_through_the_views(stages):
    base, refiner_unet = tiny_unet("sd1"), tiny_unet("sd1", seed=1)
    p = FakeForgeDemoFusionTxt2Img(FakeForgeModel(base), width=SIZE, height=SIZE)
    info = with_refiner(p, refiner_unet).sd_checkpoint_info
    calls, handles = [], []
    for name, unet in (("base", base), ("refiner", refiner_unet)):
        def record(module, args, kwargs, output, name=name):
            calls.append((name, p.job.run.stage.index, tuple(args[0].shape[-2:]), kwargs["context"]))
        handles.append(unet.register_forward_hook(record, with_kwargs=True))
    try:
        out = run(p, settings())
    finally:
        for handle in handles:
            handle.remove()
    assert out.shape == (1, 4, 64, 64)
    # stage 1 (Forge's own sampling) never switches: the refiner is held back for the final stage
    assert {(name, hw) for name, stage, hw, _ in calls if stage == 1} == {("base", (32, 32))}
    # one switch, at the final stage's second evaluation (Switch at 0.5 of 2 steps)
    assert p.refiner_switches == [(1, (1, 4, 64, 64))]
    final = [(name, hw, context) for name, stage, hw, context in calls if stage == 2]
    base_calls = [c for c in final if c[0] == "base"]
    refiner_calls = [c for c in final if c[0] == "refiner"]
    # each evaluation: one call of the 16 views (16x16), one of the 4 dilated samples (32x32); never the whole
    # 64x64 latent on either UNet
    assert [hw for _, hw, _ in base_calls] == [(16, 16), (32, 32)]
    assert [hw for _, hw, _ in refiner_calls] == [(16, 16), (32, 32)]
    for _, _, context in base_calls:
        assert rows_from(context, p.cond, p.uncond) == {0, 1}
    for _, _, context in refiner_calls:  # the conds Forge rebuilt with the refiner at the switch
        assert rows_from(context, *p.refiner_conds) == {0, 1}
    assert p.extra_generation_params["Refiner"] == "tiny-refiner"
    assert p.refiner_checkpoint_info is info  # given back after the run
    assert len(p.job.run.fused) == 2 and all(fused.evaluations == 1 for fused in p.job.run.fused)
    assert unet_is_clean(base) and unet_is_clean(refiner_unet) and not webui_job._live_hooks
    refiner_objects = p.refiner_model.forge_objects
    assert not getattr(refiner_objects.unet.model_options.get("model_function_wrapper"), "active", False)


def test_the_global_paths_redilation_with_a_refiner_is_refused_as_in_a1111(stages):
    p = FakeForgeDemoFusionTxt2Img(FakeForgeModel(tiny_unet("sd1")), width=SIZE, height=SIZE)
    with_refiner(p, tiny_unet("sd1", seed=1))
    with pytest.raises(RequestError, match=r"re-dilation of the global path \(global path\) cannot follow the refiner"):
        run(p, settings(redilation="global path"))
    assert not p.sampled_with and not webui_job._live_hooks
    p = FakeForgeDemoFusionTxt2Img(FakeForgeModel(tiny_unet("sd1")), width=SIZE, height=SIZE)
    with_refiner(p, tiny_unet("sd1", seed=1))
    run(p, settings(redilation="first stage"))
    assert "DemoFusion stage 1 preset" in p.extra_generation_params and len(p.refiner_switches) == 1
