import pytest
import torch

from lib_hires.scalecrafter import ScaleCrafterController, build_plan
from tests.conftest import tiny_unet
from tools.unet_factory import example_inputs


def factors_in_force(controller):
    return {p: h.factor for p, h in controller.handle.hooks.items() if h.factor > 1.0}


def test_timestep_is_read_positionally_and_by_keyword():
    unet = tiny_unet("sdxl")
    plan = build_plan("sdxl", 512, 512, train_size=128)  # official 16x at a 64x64 latent
    x, context, y = example_inputs(unet, 1, (64, 64))
    with ScaleCrafterController(unet, plan) as controller:
        unet(x, torch.tensor([901.0]), context, y)
        assert controller.last_call[0] == 901.0 and factors_in_force(controller) == plan.main_at(901)
        unet(x, timesteps=torch.tensor([401.0]), context=context, y=y)
        assert controller.last_call[0] == 401.0 and factors_in_force(controller) == plan.main_at(401)
        assert plan.main_at(901) != plan.main_at(401)


def test_calls_at_another_latent_size_run_vanilla():
    unet = tiny_unet("sd1")
    plan = build_plan("sd1", 256, 256, train_size=64)
    x, context, _ = example_inputs(unet, 1, (16, 16))  # e.g. a first pass or a tile: not the planned size
    t = torch.tensor([981.0])
    vanilla = unet(x, t, context)
    with ScaleCrafterController(unet, plan) as controller:
        assert torch.equal(unet(x, t, context), vanilla)
        assert controller.last_call is None and not factors_in_force(controller)


def test_base_pass_mode_is_scoped():
    unet = tiny_unet("sd1")
    plan = build_plan("sd1", 256, 256, train_size=64)
    x, context, _ = example_inputs(unet, 1, (32, 32))
    with ScaleCrafterController(unet, plan) as controller:
        with pytest.raises(RuntimeError):
            with controller.base_pass():
                unet(x, torch.tensor([981.0]), context)
                assert factors_in_force(controller) == plan.base_at(981)
                raise RuntimeError
        unet(x, torch.tensor([981.0]), context)
        assert factors_in_force(controller) == plan.main_at(981)


def test_exception_during_a_unet_call_leaves_nothing_installed():
    unet = tiny_unet("sd1")
    plan = build_plan("sd1", 256, 256, train_size=64)
    x, context, _ = example_inputs(unet, 1, (32, 32))
    with pytest.raises(RuntimeError):
        with ScaleCrafterController(unet, plan):
            unet(x, torch.tensor([981.0]), context[:, :, :5])  # wrong context width: fails inside the UNet
    assert not unet._forward_pre_hooks
    assert not any("_conv_forward" in vars(m) for m in unet.modules())
