"""LoRA under the WebUI's ``lora_functional`` option on a re-dilated UNet.

With ``lora_functional`` the Lora extension merges nothing into the conv weights: ``networks.network_forward``
runs the conv with its own weight (through our re-dilated ``_conv_forward``) and then adds every network
module's ``forward(x, y)``, a *vanilla* conv of the module's delta. On a re-dilated conv the base weight would
see the dilated receptive field and the delta the vanilla one.

So, for the pass, each network module on a hooked conv gets an instance patch: while its conv is re-dilated,
the module's delta (``calc_updown``, exactly what the merged mode adds to the weight) runs through the same
conv hook, and ``conv_d(x, W) + conv_d(x, dW) = conv_d(x, W + dW)``: the image of the merged mode, by
construction, for every network type that has a delta (LoRA, LoHa, LoKr, ...). A delta with a 1x1 kernel
(a LoRA whose down weight is 1x1) has no receptive field to dilate and keeps its own forward, as does every
module while its conv is vanilla (bit-identical to the option without ScaleFusion).
"""
from __future__ import annotations

import sys
from typing import Iterable

from .instance_patch import InstancePatch


def functional_networks() -> list:
    """The networks the Lora extension applies in the forward pass now, or [] where it merges weights."""
    from modules import shared

    networks = sys.modules.get("networks")  # the built-in Lora extension's module (imported by its script)
    if not getattr(shared.opts, "lora_functional", False) or networks is None:
        return []
    return list(getattr(networks, "loaded_networks", None) or [])


class _RedilatedDelta:
    def __init__(self, module, hook):
        self.module, self.hook, self._forward = module, hook, module.forward

    def __call__(self, x, y):
        hook, conv = self.hook, self.module.sd_module
        if hook.factor <= 1.0 or hook.detached:
            return self._forward(x, y)
        updown, ex_bias = self.module.calc_updown(conv.weight)
        if tuple(updown.shape) != tuple(conv.weight.shape):
            return self._forward(x, y)  # a 1x1 delta: pointwise, nothing to dilate
        dtype = y.dtype if y.is_floating_point() else x.dtype
        updown = updown.to(device=x.device, dtype=dtype)
        ex_bias = None if ex_bias is None else ex_bias.to(device=x.device, dtype=dtype)
        return y + hook(x, updown, ex_bias)


class FunctionalLoraDeltas:
    """Instance patches on the network modules of the convs in ``hooks`` (``{path: ConvHook}``)."""

    def __init__(self, hooks: dict, networks: Iterable):
        hook_of = {id(hook.conv): hook for hook in hooks.values() if hook.conv is not None}
        self.patches = []
        for network in networks:
            for module in getattr(network, "modules", {}).values():
                hook = hook_of.get(id(getattr(module, "sd_module", None)))
                if hook is not None and hasattr(module, "calc_updown"):
                    self.patches.append(InstancePatch(module, "forward", _RedilatedDelta(module, hook)))

    def remove(self) -> None:
        while self.patches:
            self.patches.pop().remove()
