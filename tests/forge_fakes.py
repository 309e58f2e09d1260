"""Stand-ins for the pieces of Forge (main @ dfdcbab6) that ScaleFusion's Forge adapters meet, without Forge.

``operations`` mirrors ``backend/operations.py``: ``get_weight_and_bias`` (``scale_weight``, then the online LoRA
patches, here a plain additive delta in ``forge_online_loras``), ``weights_manual_cast`` (cast to the input's device
and dtype) and ``main_stream_worker`` (records that it is held). ``ForgeConv2d.forward`` is
``ForgeOperations.Conv2d.forward``: the instance ``_conv_forward`` in the manual-cast branch,
``super()._conv_forward`` otherwise. ``FakeBackend`` installs them as ``backend.operations`` for one test.
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch
from torch import nn

EVENTS: list[str] = []   # what main_stream_worker and the convs did, in order


def get_weight_and_bias(layer, weight_args=None, bias_args=None, weight_fn=None, bias_fn=None):
    scale_weight = getattr(layer, "scale_weight", None)
    patches = getattr(layer, "forge_online_loras", None)
    weight = layer.weight
    if weight_args is not None:
        weight = weight.to(**weight_args)
    if scale_weight is not None:
        weight = weight * scale_weight.to(device=weight.device, dtype=weight.dtype)
    if patches is not None and "weight" in patches:
        weight = weight + patches["weight"].to(weight)
    bias = layer.bias
    if bias is not None:
        if bias_args is not None:
            bias = bias.to(**bias_args)
        if patches is not None and "bias" in patches:
            bias = bias + patches["bias"].to(bias)
    return weight, bias


def weights_manual_cast(layer, x, skip_weight_dtype=False, skip_bias_dtype=False, weight_fn=None, bias_fn=None):
    args = dict(device=x.device, dtype=x.dtype, non_blocking=True)
    weight, bias = get_weight_and_bias(layer, args, args)
    return weight, bias, "signal"


@contextlib.contextmanager
def main_stream_worker(weight, bias, signal):
    EVENTS.append(f"worker enter {signal}")
    try:
        yield
    finally:
        EVENTS.append("worker exit")


operations = types.SimpleNamespace(get_weight_and_bias=get_weight_and_bias, weights_manual_cast=weights_manual_cast,
                                   main_stream_worker=main_stream_worker)


class ForgeConv2d(nn.Conv2d):
    """``ForgeOperations.Conv2d``'s forward, over the fake operations."""

    def forward(self, x):
        if self.parameters_manual_cast:
            weight, bias, signal = weights_manual_cast(self, x)
            with main_stream_worker(weight, bias, signal):
                return self._conv_forward(x, weight, bias)
        weight, bias = get_weight_and_bias(self)
        return super()._conv_forward(x, weight, bias)


def make_forge_conv(conv: nn.Conv2d, *, manual_cast: bool = False, scale: float | None = None,
                    online_delta: bool = False, seed: int = 0) -> nn.Conv2d:
    """Turns a ``nn.Conv2d`` into a Forge conv in place (as Forge builds every UNet conv), with a ``scale_weight``
    and an online LoRA delta where asked."""
    conv.__class__ = ForgeConv2d
    conv.parameters_manual_cast = manual_cast
    conv.scale_weight = None if scale is None else nn.Parameter(torch.tensor(scale), requires_grad=False)
    if online_delta:
        gen = torch.Generator().manual_seed(seed)
        conv.forge_online_loras = {"weight": 0.1 * torch.randn(conv.weight.shape, generator=gen)}
    return conv


def final_weights(conv) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel and bias the Forge conv computes with (in float32)."""
    weight, bias = get_weight_and_bias(conv, dict(dtype=torch.float32), dict(dtype=torch.float32))
    return weight, bias


class FakeBackend:
    """``backend.operations`` in ``sys.modules`` for one ``with`` block."""

    def __enter__(self):
        self.saved = {name: sys.modules.get(name) for name in ("backend", "backend.operations")}
        backend = types.ModuleType("backend")
        module = types.ModuleType("backend.operations")
        for name in ("get_weight_and_bias", "weights_manual_cast", "main_stream_worker"):
            setattr(module, name, getattr(operations, name))
        backend.operations = module
        sys.modules["backend"], sys.modules["backend.operations"] = backend, module
        EVENTS.clear()
        return self

    def __exit__(self, *exc):
        for name, module in self.saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
