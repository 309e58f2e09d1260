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

import hashlib
import math
from dataclasses import replace
from pathlib import Path

import torch

from tools import unet_factory, vae_factory

SEED = 20251201
NAME_PREFIX = "scalefusion-forge-sd1"

UNET = replace(unet_factory.SD15, channel_mult=(1, 1, 1, 1), attention_levels=(1, 2), transformer_depth=(0, 1, 1, 0),
               num_res_blocks=1)

# CLIP ViT-L/14's text tower, as Forge's runwayml/stable-diffusion-v1-5/text_encoder/config.json fixes it.
CLIP_L = dict(vocab=49408, positions=77, width=768, layers=12, mlp=3072)


def _generator_sources() -> list[Path]:
    return [Path(__file__), Path(unet_factory.__file__), Path(vae_factory.__file__)]


def fixture_hash(seed: int = SEED) -> str:
    digest = hashlib.sha256(f"seed={seed};torch={torch.__version__}".encode())
    for source in _generator_sources():
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def fixture_name(seed: int = SEED) -> str:
    return f"{NAME_PREFIX}-{fixture_hash(seed)}.safetensors"


def _unet_state(seed: int) -> dict[str, torch.Tensor]:
    unet = unet_factory.randomize_(unet_factory.UNetModel(UNET), seed)
    return {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}


def _vae_state(seed: int) -> dict[str, torch.Tensor]:
    state = {}
    for prefix, part in (("encoder", vae_factory.build_encoder(seed=seed + 1)),
                         ("decoder", vae_factory.build_decoder(seed=seed + 2))):
        for k, v in part.state_dict().items():
            # ldm's AutoencoderKL owns the 1x1 moment convs; the factories keep them inside encoder/decoder.
            key = k if k.startswith(("quant_conv.", "post_quant_conv.")) else f"{prefix}.{k}"
            state[f"first_stage_model.{key}"] = v
    return state


def _clip_state(seed: int) -> dict[str, torch.Tensor]:
    """CLIPTextModel's parameters under the LDM prefix, initialised as transformers does (std 0.02)."""
    gen = torch.Generator().manual_seed(seed + 3)
    width, mlp = CLIP_L["width"], CLIP_L["mlp"]
    root = "cond_stage_model.transformer.text_model."
    state: dict[str, torch.Tensor] = {}

    def normal(key, *shape, std=0.02):
        state[root + key] = torch.randn(shape, generator=gen) * std

    def layer_norm(key):
        state[root + key + ".weight"] = torch.ones(width)
        state[root + key + ".bias"] = torch.zeros(width)

    normal("embeddings.token_embedding.weight", CLIP_L["vocab"], width)
    normal("embeddings.position_embedding.weight", CLIP_L["positions"], width, std=0.01)
    for i in range(CLIP_L["layers"]):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            normal(f"{layer}self_attn.{proj}.weight", width, width, std=0.02 / math.sqrt(2 * CLIP_L["layers"]))
            state[f"{root}{layer}self_attn.{proj}.bias"] = torch.zeros(width)
        normal(f"{layer}mlp.fc1.weight", mlp, width)
        state[f"{root}{layer}mlp.fc1.bias"] = torch.zeros(mlp)
        normal(f"{layer}mlp.fc2.weight", width, mlp, std=0.02 / math.sqrt(2 * CLIP_L["layers"]))
        state[f"{root}{layer}mlp.fc2.bias"] = torch.zeros(width)
        layer_norm(f"{layer}layer_norm1")
        layer_norm(f"{layer}layer_norm2")
    layer_norm("final_layer_norm")
    return state


def build_state_dict(seed: int = SEED) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        state = {**_unet_state(seed), **_vae_state(seed), **_clip_state(seed)}
    return {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def ensure_fixture(folder: Path, seed: int = SEED) -> Path:
    """The fixture's path in ``folder``, written once per generator version; older versions are removed."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / fixture_name(seed)
    if path.exists():
        return path
    for stale in folder.glob(f"{NAME_PREFIX}-*.safetensors"):
        stale.unlink()
    partial = path.with_suffix(".partial")
    save_file(build_state_dict(seed), str(partial), metadata={"generator": "scalefusion tests/integration_forge",
                                                             "seed": str(seed)})
    partial.replace(path)  # a run killed mid-write leaves no truncated checkpoint under the real name
    return path


if __name__ == "__main__":
    import sys

    print(ensure_fixture(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")))
