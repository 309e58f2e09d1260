"""A ControlNet and a LoRA for the seeded SD1 fixture (fixture_sd1.py), made from a seed at test time.

Forge builds a ControlNet from the state dict it is given (``model_config_from_unet`` on its ``input_blocks``,
``zero_convs``, ``input_hint_block``): this one has the fixture UNet's encoder layout (320 channels at every level,
context 768), so its signals add onto that UNet. Unlike a trained ControlNet's zero-initialised output convs, every
weight is random, so the hint changes the image. The LoRA is kohya-named (``lora_unet_<ldm path>``) on the
cross-attention projections of the fixture's first transformer, so it changes the UNet's output too.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tests.integration_forge.fixture_sd1 import UNET
from tools import ldm_checkpoint, unet_factory

CONTROLNET_NAME = "scalefusion-forge-cn-sd1"
LORA_NAME = "scalefusion-forge-lora-sd1"


def controlnet_state(seed: int = 1) -> dict[str, torch.Tensor]:
    return ldm_checkpoint.to_dtype(ldm_checkpoint.controlnet_state(UNET, seed=seed), torch.float16)


def lora_state(seed: int = 2, rank: int = 4) -> dict[str, torch.Tensor]:
    targets = {"lora_unet_" + name.replace(".", "_"): module.weight.shape
               for name, module in unet_factory.UNetModel(UNET).named_modules()
               if name.endswith(("attn2.to_k", "attn2.to_v", "attn1.to_q"))}
    assert targets, "the fixture UNet has no attention layers to put a LoRA on"
    return ldm_checkpoint.to_dtype(ldm_checkpoint.lora_state(targets, seed=seed, rank=rank, std=0.5), torch.float16)


def ensure(path: Path, make) -> Path:
    return path if path.exists() else ldm_checkpoint.save_safetensors(make(), path)


def ensure_models(data_dir: Path) -> tuple[Path, Path]:
    """The ControlNet and the LoRA in the data dir's models folders (Forge lists ControlNets at boot)."""
    models = data_dir / "models"
    return (ensure(models / "ControlNet" / f"{CONTROLNET_NAME}.safetensors", controlnet_state),
            ensure(models / "Lora" / f"{LORA_NAME}.safetensors", lora_state))
