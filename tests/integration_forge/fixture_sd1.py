"""The SD1 checkpoint the Forge tests load, made from a seed at test time (never committed).

Forge builds an SD1 model only from a checkpoint its guess (huggingface_guess) classifies as SD1.5: a UNet
with 320 channels at ``input_blocks.0.0`` and cross-attention context 768. The text encoder and the VAE come
from fixed JSON configs (full-size CLIP-L and the SD VAE), so those two must be full size; only the UNet can
shrink. The guess reads the UNet's depth from the state dict, so this one keeps the 4 levels the ScaleCrafter
SD1 presets name (D0..D3, M, U0..U3) with one ResBlock per level, every level at 320 channels, and
transformers only where they are cheap on a CPU (levels 1 and 2 and the middle: none on the 64x64 level 0).

Weights are random (fan-in scaled, residual outputs damped) and the file is saved in the original LDM key
layout (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``)
as fp16 safetensors. The name carries a hash of everything that shapes the bytes (seed, this file, the
factories, torch's version), so a second run reuses the file and a changed generator makes a new one.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from tools import ldm_checkpoint, unet_factory, vae_factory

SEED = 20251201
NAME_PREFIX = "scalefusion-forge-sd1"

UNET = replace(unet_factory.SD15, channel_mult=(1, 1, 1, 1), attention_levels=(1, 2), transformer_depth=(0, 1, 1, 0),
               num_res_blocks=1)

# CLIP ViT-L/14's text tower, as Forge's runwayml/stable-diffusion-v1-5/text_encoder/config.json fixes it.
CLIP_L = dict(vocab=49408, positions=77, width=768, layers=12, mlp=3072)


def _generator_sources() -> list[Path]:
    return [Path(__file__), Path(ldm_checkpoint.__file__), Path(unet_factory.__file__), Path(vae_factory.__file__)]


def fixture_hash(seed: int = SEED) -> str:
    return ldm_checkpoint.generator_digest(_generator_sources(), seed=seed)


def fixture_name(seed: int = SEED) -> str:
    return f"{NAME_PREFIX}-{fixture_hash(seed)}.safetensors"


def build_state_dict(seed: int = SEED) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        state = {**ldm_checkpoint.unet_state(UNET, seed), **ldm_checkpoint.vae_state(seed),
                 **ldm_checkpoint.clip_text_state("cond_stage_model.transformer.text_model.", seed=seed + 3,
                                                  width=CLIP_L["width"], layers=CLIP_L["layers"], mlp=CLIP_L["mlp"],
                                                  vocab=CLIP_L["vocab"], positions=CLIP_L["positions"])}
    return ldm_checkpoint.to_dtype(state, torch.float16)


def ensure_fixture(folder: Path, seed: int = SEED) -> Path:
    """The fixture's path in ``folder``, written once per generator version; older versions are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / fixture_name(seed)
    if path.exists():
        return path
    for stale in folder.glob(f"{NAME_PREFIX}-*.safetensors"):
        stale.unlink()
    return ldm_checkpoint.save_safetensors(build_state_dict(seed), path, metadata={
        "generator": "scalefusion tests/integration_forge", "seed": str(seed)})


if __name__ == "__main__":
    import sys

    print(ensure_fixture(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")))
