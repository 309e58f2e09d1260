"""A ControlNet and a LoRA for the seeded SD1 fixture (fixture_sd1.py), made from a seed at test time.

Forge builds a ControlNet from the state dict it is given (``model_config_from_unet`` on its ``input_blocks``,
``zero_convs``, ``input_hint_block``): this one has the fixture UNet's encoder layout (320 channels at every level,
context 768), so its signals add onto that UNet. Unlike a trained ControlNet's zero-initialised output convs, every
weight is random, so the hint changes the image. The LoRA is kohya-named (``lora_unet_<ldm path>``) on the
cross-attention projections of the fixture's first transformer, so it changes the UNet's output too.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from tests.integration_forge.fixture_sd1 import UNET
from tools import unet_factory

CONTROLNET_NAME = "scalefusion-forge-cn-sd1"
LORA_NAME = "scalefusion-forge-lora-sd1"
HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # ldm's input_hint_block between the 3-channel hint and the UNet width


def _conv(gen, out_ch, in_ch, k, scale=1.0):
    fan_in = in_ch * k * k
    return torch.randn(out_ch, in_ch, k, k, generator=gen) * (scale / math.sqrt(fan_in)), \
        0.05 * torch.randn(out_ch, generator=gen)


def controlnet_state(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    unet = unet_factory.randomize_(unet_factory.UNetModel(UNET), seed)
    state = {k: v for k, v in unet.state_dict().items() if k.startswith(("input_blocks.", "middle_block.",
                                                                           "time_embed."))}
    width = UNET.model_channels
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("input_blocks.")})
    for i in blocks:
        state[f"zero_convs.{i}.0.weight"], state[f"zero_convs.{i}.0.bias"] = _conv(gen, width, width, 1, 0.5)
    state["middle_block_out.0.weight"], state["middle_block_out.0.bias"] = _conv(gen, width, width, 1, 0.5)
    channels = (3, *HINT_CHANNELS, width)
    for index, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
        state[f"input_hint_block.{2 * index}.weight"], state[f"input_hint_block.{2 * index}.bias"] = \
            _conv(gen, c_out, c_in, 3)
    return {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def lora_state(seed: int = 2, rank: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    unet = unet_factory.UNetModel(UNET)
    state = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v", "attn1.to_q")):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.5
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.5
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    assert state, "the fixture UNet has no attention layers to put a LoRA on"
    return {k: v.to(torch.float16).contiguous() for k, v in state.items()}


def ensure(path: Path, make) -> Path:
    from safetensors.torch import save_file

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file(make(), str(partial))
        partial.replace(path)
    return path


def ensure_models(data_dir: Path) -> tuple[Path, Path]:
    """The ControlNet and the LoRA in the data dir's models folders (Forge lists ControlNets at boot)."""
    models = data_dir / "models"
    return (ensure(models / "ControlNet" / f"{CONTROLNET_NAME}.safetensors", controlnet_state),
            ensure(models / "Lora" / f"{LORA_NAME}.safetensors", lora_state))
