"""``lora_functional``: network deltas on re-dilated convs give the merged-weights image.

The stand-in follows ``extensions-builtin/Lora/networks.py`` ``network_forward``: the conv's own forward, then
each network module's ``forward(x, y)``, which adds a vanilla conv of the module's delta (``network.py``
``NetworkModule.forward``; LoRA's ``up(down(x))`` is the same product). The merged mode adds ``calc_updown`` to
the weight instead.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib_hires.scalecrafter.redilated_conv import RedilationHandle
from lib_hires.webui.lora_functional import FunctionalLoraDeltas


class NetworkModule:
    def __init__(self, conv: nn.Conv2d, delta: torch.Tensor, ex_bias=None):
        self.sd_module, self.delta, self.ex_bias = conv, delta, ex_bias

    def calc_updown(self, orig_weight):
        return self.delta.to(orig_weight.dtype), self.ex_bias

    def forward(self, x, y):
        padding = self.sd_module.padding if self.delta.shape[-1] > 1 else 0
        return y + F.conv2d(x, self.delta, self.ex_bias, self.sd_module.stride, padding)


class Network:
    def __init__(self, modules):
        self.modules = modules


def network_forward(conv, x, networks):
    y = conv(x)  # originals.Conv2d_forward: through the instance _conv_forward
    for network in networks:
        for module in network.modules.values():
            if module.sd_module is conv:
                y = module.forward(x, y)
    return y


@pytest.mark.parametrize("factor,dispersed", [(2.0, False), (2.5, False), (4.0, True), (3.0, True)])
@pytest.mark.parametrize("stride", [1, 2])
def test_functional_deltas_on_a_redilated_conv_equal_the_merged_weight(factor, dispersed, stride):
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=stride, padding=1)
    delta = 0.3 * torch.randn(5, 6, 3, 3, generator=gen)
    ex_bias = 0.1 * torch.randn(5, generator=gen)
    networks = [Network({"lora_unet_x": NetworkModule(conv, delta, ex_bias)})]
    x = torch.randn(2, 6, 19, 22, generator=gen)
    model = nn.Sequential(conv)
    handle = RedilationHandle(model, ["0"])
    deltas = FunctionalLoraDeltas(handle.hooks, networks)
    try:
        handle.set_factors({"0": factor}, ["0"] if dispersed else [])
        functional = network_forward(conv, x, networks)
        original_weight, original_bias = conv.weight.detach().clone(), conv.bias.detach().clone()
        with torch.no_grad():
            conv.weight += delta
            conv.bias += ex_bias
        merged = conv(x)
        with torch.no_grad():
            conv.weight.copy_(original_weight)
            conv.bias.copy_(original_bias)
        torch.testing.assert_close(functional, merged, atol=1e-5, rtol=1e-5)
        handle.set_factors({})  # a vanilla conv: the network's own forward, bit for bit
        vanilla_functional = network_forward(conv, x, networks)
    finally:
        deltas.remove()
        handle.remove()
    assert torch.equal(vanilla_functional, network_forward(conv, x, networks))
    assert "forward" not in vars(networks[0].modules["lora_unet_x"])


def test_a_pointwise_delta_keeps_its_own_forward():
    """A LoRA with a 1x1 down weight on a 3x3 conv: a pointwise delta, which dilation does not change."""
    conv = nn.Conv2d(4, 4, 3, padding=1)
    module = NetworkModule(conv, torch.randn(4, 4, 1, 1))
    handle = RedilationHandle(nn.Sequential(conv), ["0"])
    deltas = FunctionalLoraDeltas(handle.hooks, [Network({"m": module})])
    try:
        handle.set_factors({"0": 2.0})
        x, y = torch.randn(1, 4, 10, 10), torch.randn(1, 4, 10, 10)
        assert torch.equal(module.forward(x, y), NetworkModule.forward(module, x, y))
    finally:
        deltas.remove()
        handle.remove()
