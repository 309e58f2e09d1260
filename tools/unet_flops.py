"""FLOPs of one UNet call per top-level block, counted from its layers at a given latent size.

The UNet is built on the ``meta`` device (shapes only: no weights, no arithmetic, any size in milliseconds)
and run once with forward hooks that count, from each layer's actual input and output shapes:
conv (2 * outputs * in-channels/groups * kernel area; a dilation moves taps, it adds none), linear
(2 * outputs * in-features) and attention's two matmuls (QK^T and AV: 4 * batch * queries * keys * inner
width). Norms, activations and additions are memory-bound and left out (a few % of the total).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from lib_hires.scalecrafter.shared_prefix import execution_order
from tools.unet_factory import FULL, TINY, UNetModel


def _block_of(name: str, order: list[str]) -> str:
    for block in order:
        if name == block or name.startswith(block + "."):
            return block
    return "(forward)"


def block_flops(family: str, latent_hw: tuple[int, int], *, size: str = "full", tokens: int = 77) -> dict[str, int]:
    """FLOPs per top-level block (``execution_order`` names) of one batch-1 call of the family's UNet."""
    cfg = (FULL if size == "full" else TINY)[family]
    with torch.device("meta"):
        unet = UNetModel(cfg)
    order = execution_order(unet)
    flops: dict[str, int] = defaultdict(int)
    handles = []

    def count(name):
        def hook(module, args, kwargs, out):
            block = _block_of(name, order)
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                flops[block] += 2 * out.numel() * (module.in_channels // module.groups) * k
            elif isinstance(module, nn.Linear):
                flops[block] += 2 * out.numel() * module.in_features
            else:  # attention: the layers' own linears are counted above; here QK^T and AV
                x = args[0]
                context = kwargs.get("context", args[1] if len(args) > 1 else None)
                keys = (x if context is None else context).shape[1]
                flops[block] += 4 * x.shape[0] * x.shape[1] * keys * module.to_q.out_features
        return hook

    for name, module in unet.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) or all(hasattr(module, a) for a in ("to_q", "to_k", "to_v")):
            handles.append(module.register_forward_hook(count(name), with_kwargs=True))
    try:
        x = torch.zeros(1, cfg.in_channels, *latent_hw, device="meta")
        context = torch.zeros(1, tokens, cfg.context_dim, device="meta")
        y = torch.zeros(1, cfg.adm_in_channels, device="meta") if cfg.adm_in_channels else None
        unet(x, torch.zeros(1, device="meta"), context=context, y=y)
    finally:
        for h in handles:
            h.remove()
    return dict(flops)


def shared_fraction(flops: dict[str, int], prefix: list[str]) -> float:
    """The fraction of a call's FLOPs in the ``prefix`` blocks."""
    return sum(flops.get(b, 0) for b in prefix) / sum(flops.values())
