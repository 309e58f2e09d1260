import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib_hires.scalecrafter import (RedilationHandle, canonical_layout, disperse_weight, dispersion_transform,
                                    redilate, redilated_conv2d)
from tools.unet_factory import build_unet, example_inputs

R = dispersion_transform()


def reference_fractional(x, weight, bias, d, stride):
    """The official re-dilated forward (ScaleCrafter ReDilateConvProcessor), written out independently."""
    big_d = math.ceil(d)
    s = big_d / d
    h, w = x.shape[-2:]
    y = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear")
    y = F.conv2d(y, weight, bias, stride=stride, padding=big_d * (1 + (weight.shape[-1] - 3) // 2), dilation=big_d)
    return F.interpolate(y, size=(int(h / stride), int(w / stride)), mode="bilinear")


def conv(stride=1, channels=6, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1)


def snapshot(module: nn.Module):
    return {k: v for k, v in vars(module).items()}, {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("d", [2, 3, 4])
def test_integer_factor_is_bit_equal_to_a_dilated_conv2d(stride, d):
    c = conv(stride)
    x = torch.randn(2, 6, 32, 24)
    with redilate(nn.Sequential(c), {"0": d}):
        out = c(x)
    assert torch.equal(out, F.conv2d(x, c.weight, c.bias, stride, d, d))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("d", [2.5, 1.5, 3.25])
def test_fractional_factor_equals_the_reference_formula(stride, d):
    c = conv(stride)
    x = torch.randn(2, 6, 32, 40)
    with redilate(nn.Sequential(c), {"0": d}):
        out = c(x)
    expected = reference_fractional(x, c.weight, c.bias, d, stride)
    assert out.shape == expected.shape
    assert torch.equal(out, expected)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("d", [1.3, 2, 2.5, 3, 3.7, 4, 6])
@pytest.mark.parametrize("hw", [(8, 8), (13, 21), (40, 24), (17, 9)])
def test_output_size_is_always_the_vanilla_size(stride, d, hw):
    c = conv(stride)
    x = torch.randn(1, 6, *hw)
    vanilla = c(x).shape
    with redilate(nn.Sequential(c), {"0": d}):
        assert c(x).shape == vanilla


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("latent", [(32, 32), (24, 40), (64, 16)])
def test_whole_unet_keeps_its_shapes_with_every_conv_dilated(family, latent):
    unet = build_unet(family)
    x, context, y = example_inputs(unet, 1, latent)
    t = torch.tensor([700.0])
    vanilla = unet(x, t, context, y)
    layout = canonical_layout(family)
    factors = {p: [2, 2.5, 3, 4][i % 4] for i, p in enumerate(layout.paths)}
    dispersed = [p for i, p in enumerate(layout.paths) if i % 3 == 0]
    with redilate(unet, factors, dispersed=dispersed):
        out = unet(x, t, context, y)
    assert out.shape == vanilla.shape
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, vanilla)


def test_installed_but_inactive_hooks_are_bit_identical(sd1_unet):
    x, context, _ = example_inputs(sd1_unet, 2, (32, 32))
    t = torch.tensor([500.0, 500.0])
    vanilla = sd1_unet(x, t, context)
    handle = RedilationHandle(sd1_unet, canonical_layout("sd1").paths)
    try:
        assert torch.equal(sd1_unet(x, t, context), vanilla)
        handle.set_factors({p: 2.0 for p in handle.hooks})
        assert not torch.equal(sd1_unet(x, t, context), vanilla)
        handle.clear()
        assert torch.equal(sd1_unet(x, t, context), vanilla)
    finally:
        handle.remove()
    assert torch.equal(sd1_unet(x, t, context), vanilla)


def test_removal_restores_every_conv_exactly(sd1_unet):
    paths = canonical_layout("sd1").paths
    before = {p: snapshot(sd1_unet.get_submodule(p)) for p in paths}
    with redilate(sd1_unet, {p: 3 for p in paths}, dispersed=paths[:5]):
        assert all("_conv_forward" in vars(sd1_unet.get_submodule(p)) for p in paths)
    for p in paths:
        attrs, state = snapshot(sd1_unet.get_submodule(p))
        assert attrs.keys() == before[p][0].keys() and all(attrs[k] is before[p][0][k] for k in attrs)
        assert all(torch.equal(state[k], before[p][1][k]) for k in state)


def test_hooks_are_gone_after_an_exception(sd1_unet):
    x, context, _ = example_inputs(sd1_unet, 1, (16, 16))
    t = torch.tensor([900.0])
    vanilla = sd1_unet(x, t, context)
    paths = canonical_layout("sd1").paths
    with pytest.raises(RuntimeError, match="boom"):
        with redilate(sd1_unet, {p: 2 for p in paths}, dispersed=paths[:3]):
            sd1_unet(x, t, context)
            raise RuntimeError("boom")
    assert not any("_conv_forward" in vars(m) for m in sd1_unet.modules())
    assert torch.equal(sd1_unet(x, t, context), vanilla)


def test_bad_input_installs_nothing_and_names_the_field(sd1_unet):
    paths = canonical_layout("sd1").paths
    with pytest.raises(KeyError, match="input_blocks.99.0.op"):
        with redilate(sd1_unet, {paths[0]: 2, "input_blocks.99.0.op": 2}):
            pass
    with pytest.raises(ValueError, match=r"input_blocks.1.1.proj_in.*only 3x3 convs"):
        with redilate(sd1_unet, {"input_blocks.1.1.proj_in": 2}):  # a 1x1 conv
            pass
    for bad in (0.5, 17, float("nan"), "2", True):
        with pytest.raises(ValueError, match=r"dilations\['input_blocks.1.0.in_layers.2'\].*from 1 to 16"):
            with redilate(sd1_unet, {"input_blocks.1.0.in_layers.2": bad}):
                pass
    with pytest.raises(ValueError, match="dispersed.*not in dilations"):
        with redilate(sd1_unet, {paths[0]: 2}, dispersed=[paths[1]]):
            pass
    assert not any("_conv_forward" in vars(m) for m in sd1_unet.modules())


def lora_style_forward(delta_scale: float, functional: bool):
    """Mimics the WebUI's class-level Conv2d.forward patches that end in ``_conv_forward``."""
    original = nn.Conv2d.forward

    def forward(module, input):
        delta = getattr(module, "test_lora_delta", None)
        if delta is None:
            return original(module, input)
        if functional:  # lora_functional / manual_cast: a new weight tensor handed to _conv_forward
            return module._conv_forward(input, module.weight + delta_scale * delta, module.bias)
        if not getattr(module, "test_lora_merged", False):  # network_apply_weights: lazy in-place merge
            with torch.no_grad():
                module.weight += delta_scale * delta
            module.test_lora_merged = True
        return original(module, input)

    return forward


@pytest.mark.parametrize("functional", [False, True])
def test_a_class_level_weight_patch_reaches_the_dilated_and_dispersed_paths(monkeypatch, functional):
    dilated, dispersed = conv(seed=1), conv(seed=2)
    net = nn.Sequential(dilated, dispersed)
    x = torch.randn(1, 6, 24, 24)
    originals = {id(c): c.weight.detach().clone() for c in net}
    for c in net:
        c.test_lora_delta = torch.randn_like(c.weight)
    monkeypatch.setattr(nn.Conv2d, "forward", lora_style_forward(0.5, functional))
    with redilate(net, {"0": 2, "1": 3}, dispersed=["1"]):
        h = dilated(x)
        out = dispersed(h)
    merged = {id(c): originals[id(c)] + 0.5 * c.test_lora_delta for c in net}
    assert torch.allclose(h, F.conv2d(x, merged[id(dilated)], dilated.bias, 1, 2, 2), atol=1e-5)
    w5 = disperse_weight(merged[id(dispersed)], R)
    assert torch.allclose(out, redilated_conv2d(h, w5, dispersed.bias, 1.5), atol=1e-5)
    # the unmerged weight would have given something else
    assert not torch.allclose(h, F.conv2d(x, originals[id(dilated)], dilated.bias, 1, 2, 2), atol=1e-3)


def test_dispersed_conv_follows_in_place_weight_updates():
    c = conv()
    x = torch.randn(1, 6, 16, 16)
    with redilate(nn.Sequential(c), {"0": 4}, dispersed=["0"]):
        first = c(x)
        with torch.no_grad():
            c.weight.mul_(-1.0)  # e.g. a LoRA merged in place: same tensor, new values
        second = c(x)
    assert torch.allclose(second, redilated_conv2d(x, disperse_weight(c.weight, R), c.bias, 2.0), atol=1e-5)
    assert not torch.allclose(second, first)


def dispersed_reference(x, weight, bias, d, stride=1, padding_mode="zeros"):
    """``redilated_conv2d`` with the 5x5 kernel formed explicitly (what a UNet copy with 5x5 weights runs)."""
    return redilated_conv2d(x, disperse_weight(weight, R), bias, d, stride=stride, padding_mode=padding_mode)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("d", [1.0, 1.5, 2, 2.5, 3.25])
@pytest.mark.parametrize("hw", [(16, 16), (13, 21)])
def test_transform_argument_equals_the_formed_5x5_kernel(stride, d, hw):
    torch.manual_seed(3)
    x = torch.randn(2, 20, *hw, dtype=torch.float64)  # 20 input channels: chunks of 2
    w, b = torch.randn(7, 20, 3, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    got = redilated_conv2d(x, w, b, d, stride=stride, transform=R)
    expected = dispersed_reference(x, w, b, d, stride)
    assert got.shape == expected.shape == (2, 7, (hw[0] - 1) // stride + 1, (hw[1] - 1) // stride + 1)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-10
    got32 = redilated_conv2d(x.float(), w.float(), b.float(), d, stride=stride, transform=R.float())
    assert ((got32 - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("factor", [2, 3, 5])
def test_a_hooked_dispersed_conv_runs_the_dispersed_kernel_at_half_the_factor(stride, factor):
    c = conv(stride)
    x = torch.randn(2, 6, 20, 17)
    with redilate(nn.Sequential(c), {"0": factor}, dispersed=["0"]):
        out = c(x)
    expected = dispersed_reference(x, c.weight, c.bias, factor / 2, stride)
    assert out.shape == c(x).shape
    assert ((out - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_a_dispersed_conv_keeps_circular_padding():
    c = conv()
    c.padding_mode = "circular"
    x = torch.randn(1, 6, 20, 20)
    with redilate(nn.Sequential(c), {"0": 3}, dispersed=["0"]):
        out = c(x)
    expected = dispersed_reference(x, c.weight, c.bias, 1.5, padding_mode="circular")
    assert ((out - expected).abs().max() / expected.abs().max()).item() < 1e-5
    d = F.pad(x, (4, 4, 4, 4), mode="circular")  # integer case written out: D = 2, padding 2D on every side
    expected = F.conv2d(d, disperse_weight(c.weight, R), c.bias, 1, 0, 2)
    with redilate(nn.Sequential(c), {"0": 4}, dispersed=["0"]):
        assert torch.allclose(c(x), expected, atol=1e-5)


def test_grouped_convs_cannot_be_dispersed():
    grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2)
    with pytest.raises(ValueError, match="grouped convs"):
        with redilate(nn.Sequential(grouped), {"0": 2}, dispersed=["0"]):
            pass
    assert "_conv_forward" not in vars(grouped)
    with pytest.raises(ValueError, match="only groups=1"):
        redilated_conv2d(torch.randn(1, 6, 8, 8), grouped.weight, None, 2, groups=2, transform=R)


def test_circular_padding_mode_is_kept():
    c = conv()
    c.padding_mode = "circular"  # what the WebUI's Tiling option does to every conv
    x = torch.randn(1, 6, 20, 20)
    with redilate(nn.Sequential(c), {"0": 3}):
        out = c(x)
    expected = F.conv2d(F.pad(x, (3, 3, 3, 3), mode="circular"), c.weight, c.bias, 1, 0, 3)
    assert torch.equal(out, expected)


def test_chains_to_and_restores_another_instance_override():
    c = conv()
    calls = []

    def other_override(input, weight, bias):
        calls.append(1)
        return F.conv2d(input, weight, bias, c.stride, c.padding)

    c._conv_forward = other_override
    x = torch.randn(1, 6, 12, 12)
    with redilate(nn.Sequential(c), {"0": 2}) as handle:
        c(x)
        assert calls == []  # dilated: ours computes the conv
        handle.clear()
        c(x)
        assert calls == [1]  # inactive: the previous override runs
    assert c._conv_forward is other_override


def test_out_of_order_removal_leaves_a_valid_chain():
    c = conv()
    x = torch.randn(1, 6, 12, 12)
    vanilla = c(x)
    first = RedilationHandle(nn.Sequential(c), ["0"])
    second = RedilationHandle(nn.Sequential(c), ["0"])
    second.set_factors({"0": 2})
    first.remove()  # not the outermost: stays as a pass-through
    assert torch.equal(c(x), F.conv2d(x, c.weight, c.bias, 1, 2, 2))
    second.remove()
    assert torch.equal(c(x), vanilla)
    assert "_conv_forward" not in vars(c)
