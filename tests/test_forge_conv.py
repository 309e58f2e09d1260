"""The re-dilated conv through the instance ``forward`` with a weight getter (Forge's conv path), without Forge."""
import copy

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lib_hires.webui.forge.scalecrafter import forge_conv_weights
from lib_hires.scalecrafter import RedilationHandle, ScaleCrafterController, build_plan, redilate
from lib_hires.scalecrafter.redilated_conv import ConvHook, ForwardConvHook
from tests import forge_fakes
from tests.conftest import tiny_unet
from tools.unet_factory import example_inputs


@pytest.fixture(autouse=True)
def backend():
    with forge_fakes.FakeBackend():
        yield


def forge_conv(*, manual_cast=False, storage=torch.float32, stride=1, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 6, 3, stride=stride, padding=1).to(storage)
    return forge_fakes.make_forge_conv(conv, manual_cast=manual_cast, scale=0.75, online_delta=True, seed=seed)


def plain_twin(conv) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` holding the Forge conv's final kernel and bias."""
    weight, bias = forge_fakes.final_weights(conv)
    twin = nn.Conv2d(6, 6, 3, stride=conv.stride, padding=1)
    twin.weight.data.copy_(weight)
    twin.bias.data.copy_(bias)
    return twin


def test_a_conv_forward_hook_is_skipped_by_forge_convs_outside_manual_cast():
    """Why Forge needs the forward hook: its plain branch calls ``super()._conv_forward``."""
    conv = forge_conv()
    x = torch.randn(1, 6, 16, 16)
    vanilla = conv(x)
    with RedilationHandle(nn.Sequential(conv), ["0"]) as handle:
        handle.set_factors({"0": 2.0})
        assert torch.equal(conv(x), vanilla)
    with RedilationHandle(nn.Sequential(conv), ["0"], forge_conv_weights) as handle:
        handle.set_factors({"0": 2.0})
        assert not torch.allclose(conv(x), vanilla)


@pytest.mark.parametrize("manual_cast", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("factor, dispersed", [(1.0, False), (2.0, False), (2.5, False), (3.0, True), (4.0, True)])
def test_weight_getter_path_is_bit_equal_to_the_plain_path(manual_cast, stride, factor, dispersed):
    conv = forge_conv(manual_cast=manual_cast, stride=stride)
    twin = plain_twin(conv)
    x = torch.randn(2, 6, 20, 28)
    vanilla = conv(x)
    with redilate(nn.Sequential(twin), {"0": factor}, dispersed={"0"} if dispersed else ()):
        expected = twin(x)
    with RedilationHandle(nn.Sequential(conv), ["0"], forge_conv_weights) as handle:
        handle.set_factors({"0": factor}, {"0"} if dispersed else ())
        out = conv(x)
    assert torch.equal(out, expected)
    if factor == 1.0:
        assert torch.equal(out, vanilla)  # the conv's own forward ran


def test_manual_cast_branch_casts_the_stored_kernel_and_convolves_inside_the_stream_worker():
    conv = forge_conv(manual_cast=True, storage=torch.bfloat16)
    twin = plain_twin(conv)  # the bf16 kernel cast to float32, scaled, plus the online delta
    x = torch.randn(1, 6, 16, 16)
    events = forge_fakes.EVENTS

    class ConvCalls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.nn.functional.conv2d, torch.conv2d):
                events.append("conv")
            return func(*args, **(kwargs or {}))

    with RedilationHandle(nn.Sequential(conv), ["0"], forge_conv_weights) as handle:
        handle.set_factors({"0": 2.0})
        events.clear()
        with ConvCalls():
            out = conv(x)
    assert events == ["worker enter signal", "conv", "worker exit"]
    with redilate(nn.Sequential(twin), {"0": 2.0}):
        assert torch.equal(out, twin(x))
    assert out.dtype == torch.float32


def snapshot(module):
    return dict(vars(module))


def test_install_and_uninstall_restore_the_instance_exactly():
    conv = forge_conv()
    before = snapshot(conv)
    handle = RedilationHandle(nn.Sequential(conv), ["0"], forge_conv_weights)
    assert isinstance(vars(conv)["forward"], ForwardConvHook) and "_conv_forward" not in vars(conv)
    handle.remove()
    assert snapshot(conv).keys() == before.keys()
    assert all(snapshot(conv)[k] is v for k, v in before.items())
    assert type(conv).forward is forge_fakes.ForgeConv2d.forward and "forward" not in vars(conv)


def test_chained_with_other_instance_overrides_before_and_after():
    conv = forge_conv()
    x = torch.randn(1, 6, 16, 16)
    vanilla = conv(x)
    calls = []

    def theirs(inner):
        def forward(input):
            calls.append("theirs")
            return inner(input)
        return forward

    first = theirs(conv.forward)
    conv.forward = first                     # another extension's override, before us
    ours = RedilationHandle(nn.Sequential(conv), ["0"], forge_conv_weights)
    assert torch.equal(conv(x), vanilla) and calls == ["theirs"]   # vanilla: the chain runs through
    ours.set_factors({"0": 2.0})
    calls.clear()
    dilated = conv(x)
    assert not calls and not torch.allclose(dilated, vanilla)
    after = theirs(conv.forward)
    conv.forward = after                     # and one wrapping us
    ours.remove()                            # out of order: we stay in their chain as a pass-through
    assert vars(conv)["forward"] is after
    calls.clear()
    assert torch.equal(conv(x), vanilla) and calls == ["theirs", "theirs"]
    conv.forward = first                     # they unwind theirs: the instance is back to the first override
    second = RedilationHandle(nn.Sequential(conv), ["0"], forge_conv_weights)
    third = RedilationHandle(nn.Sequential(conv), ["0"], forge_conv_weights)
    second.remove()
    third.remove()                           # skips the detached second hook: back to the first override
    assert vars(conv)["forward"] is first


def forge_unet(family):
    unet = copy.deepcopy(tiny_unet(family))
    for index, conv in enumerate(m for m in unet.modules() if isinstance(m, nn.Conv2d)):
        forge_fakes.make_forge_conv(conv, scale=1.0 + 0.01 * (index % 5), online_delta=index % 2 == 0, seed=index)
    return unet


def plain_unet(unet):
    plain = copy.deepcopy(unet)
    for conv in (m for m in plain.modules() if isinstance(m, nn.Conv2d)):
        weight, bias = forge_fakes.final_weights(conv)
        conv.__class__ = nn.Conv2d
        conv.weight.data.copy_(weight)
        if bias is not None:
            conv.bias.data.copy_(bias)
    return plain


@pytest.mark.parametrize("family, size, train", [("sd1", 256, 64), ("sdxl", 512, 128)])
def test_a_whole_unet_with_forge_convs_matches_the_plain_path(family, size, train):
    unet = forge_unet(family)
    plain = plain_unet(unet)
    plan = build_plan(family, size, size, train_size=train)
    x, context, y = example_inputs(unet, 1, (size // 8, size // 8))
    args = (x, torch.tensor([961.0]), context) + ((y,) if y is not None else ())
    vanilla = unet(*args)
    assert torch.equal(vanilla, plain(*args))  # vanilla: the Forge convs compute as the plain ones
    assert plan.main_at(961) and plan.base_at(961) is not None
    with ScaleCrafterController(plain, plan) as controller:
        expected = plain(*args)
        with controller.base_pass():
            expected_base = plain(*args)
    with ScaleCrafterController(unet, plan, weights=forge_conv_weights) as controller:
        assert all(isinstance(h, ForwardConvHook) for h in controller.handle.hooks.values())
        out = unet(*args)
        with controller.base_pass():
            base = unet(*args)
    assert torch.equal(out, expected) and torch.equal(base, expected_base)
    assert not torch.allclose(out, vanilla) and not torch.allclose(base, out)
    assert not any("forward" in vars(m) for m in unet.modules())
    assert not any(isinstance(vars(m).get("_conv_forward"), ConvHook) for m in unet.modules())
