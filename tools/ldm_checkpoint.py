"""Random-weight checkpoint parts in the original LDM / SGM key layout, drawn from this repository's factories.

The WebUI and Forge load checkpoints, LoRAs and ControlNets as state dicts, so the test fixtures of both suites are
made here from a seed at test time (never downloaded, never committed): the UNet from ``tools/unet_factory.py``,
the VAE from ``tools/vae_factory.py``, CLIP text towers (transformers' ``CLIPTextModel`` keys, open_clip's text
tower keys), ControlNets with ldm's ``cldm`` layout and kohya-named LoRAs. Each function draws from its own
generator, so one part's shapes never shift another part's numbers.

:func:`generator_digest` names a fixture by everything that shapes its bytes (the seed, the sources that draw
it, torch's version), so a second run reuses the files and a changed generator makes new ones.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from tools import unet_factory, vae_factory

# ldm's ControlNet ``input_hint_block``: 3x3 convs from the 3-channel hint up to the UNet width, stride 2 after the
# 2nd, 4th and 6th (the hint is 8x the latent).
HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)


def generator_digest(sources: list[Path], **params) -> str:
    """12 hex digits of sha256 over the parameters, torch's version and the source files."""
    described = ";".join(f"{k}={v}" for k, v in params.items())
    digest = hashlib.sha256(f"{described};torch={torch.__version__}".encode())
    for source in sources:
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:12]


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Writes under a temporary name first, so a run killed mid-write leaves no truncated file under the real one."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial), metadata=metadata)
    partial.replace(path)
    return path


def unet_state(cfg: unet_factory.UNetConfig, seed: int, prefix: str = "model.diffusion_model.") -> dict:
    unet = unet_factory.randomize_(unet_factory.UNetModel(cfg), seed)
    return {prefix + k: v for k, v in unet.state_dict().items()}


def vae_state(seed: int, width: float = 1.0, prefix: str = "first_stage_model.") -> dict:
    """``AutoencoderKL`` keys: encoder (seed + 1) and decoder (seed + 2), the 1x1 moment convs at the top level."""
    state = {}
    for part, module in (("encoder", vae_factory.build_encoder(width, seed=seed + 1)),
                         ("decoder", vae_factory.build_decoder(width, seed=seed + 2))):
        for k, v in module.state_dict().items():
            # ldm's AutoencoderKL owns quant_conv / post_quant_conv; the factories keep them inside their halves.
            state[prefix + (k if k.startswith(("quant_conv.", "post_quant_conv.")) else f"{part}.{k}")] = v
    return state


def clip_text_state(prefix: str, *, seed: int, width: int, layers: int, mlp: int, vocab: int = 49408,
                    positions: int = 77, position_ids: bool = False) -> dict:
    """transformers' ``CLIPTextModel`` parameters under ``prefix`` (``...text_model.``), initialised as transformers
    does (std 0.02, residual projections scaled down by depth). ``position_ids``: the int64 buffer older
    transformers versions save with the model."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def normal(key, *shape, std=0.02):
        state[prefix + key] = torch.randn(shape, generator=gen) * std

    def layer_norm(key):
        state[prefix + key + ".weight"] = torch.ones(width)
        state[prefix + key + ".bias"] = torch.zeros(width)

    residual_std = 0.02 / math.sqrt(2 * layers)
    normal("embeddings.token_embedding.weight", vocab, width)
    normal("embeddings.position_embedding.weight", positions, width, std=0.01)
    if position_ids:
        state[prefix + "embeddings.position_ids"] = torch.arange(positions)[None]
    for i in range(layers):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            normal(f"{layer}self_attn.{proj}.weight", width, width, std=residual_std)
            state[f"{prefix}{layer}self_attn.{proj}.bias"] = torch.zeros(width)
        normal(f"{layer}mlp.fc1.weight", mlp, width)
        state[f"{prefix}{layer}mlp.fc1.bias"] = torch.zeros(mlp)
        normal(f"{layer}mlp.fc2.weight", width, mlp, std=residual_std)
        state[f"{prefix}{layer}mlp.fc2.bias"] = torch.zeros(width)
        layer_norm(f"{layer}layer_norm1")
        layer_norm(f"{layer}layer_norm2")
    layer_norm("final_layer_norm")
    return state


def open_clip_text_state(prefix: str, *, seed: int, width: int, layers: int, mlp: int, embed_dim: int,
                         vocab: int = 49408, positions: int = 77) -> dict:
    """open_clip's text tower (``CLIP`` less ``visual``) under ``prefix`` (``...model.``), initialised as open_clip
    does: token std 0.02, positions 0.01, attention and MLP scaled by width and depth."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    attn_std, fc_std = width ** -0.5, (2 * width) ** -0.5

    def normal(key, *shape, std):
        state[prefix + key] = torch.randn(shape, generator=gen) * std

    def layer_norm(key, size=width):
        state[prefix + key + ".weight"] = torch.ones(size)
        state[prefix + key + ".bias"] = torch.zeros(size)

    normal("token_embedding.weight", vocab, width, std=0.02)
    normal("positional_embedding", positions, width, std=0.01)
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        normal(f"{block}attn.in_proj_weight", 3 * width, width, std=attn_std)
        state[f"{prefix}{block}attn.in_proj_bias"] = torch.zeros(3 * width)
        normal(f"{block}attn.out_proj.weight", width, width, std=proj_std)
        state[f"{prefix}{block}attn.out_proj.bias"] = torch.zeros(width)
        layer_norm(f"{block}ln_1")
        layer_norm(f"{block}ln_2")
        normal(f"{block}mlp.c_fc.weight", mlp, width, std=fc_std)
        state[f"{prefix}{block}mlp.c_fc.bias"] = torch.zeros(mlp)
        normal(f"{block}mlp.c_proj.weight", width, mlp, std=proj_std)
        state[f"{prefix}{block}mlp.c_proj.bias"] = torch.zeros(width)
    layer_norm("ln_final")
    normal("text_projection", width, embed_dim, std=width ** -0.5)
    state[prefix + "logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return state


def _conv(gen, out_ch, in_ch, k, scale=1.0):
    fan_in = in_ch * k * k
    return torch.randn(out_ch, in_ch, k, k, generator=gen) * (scale / math.sqrt(fan_in)), \
        0.05 * torch.randn(out_ch, generator=gen)


def controlnet_state(cfg: unet_factory.UNetConfig, *, seed: int, unet_seed: int | None = None) -> dict:
    """ldm's ``ControlNet`` keys (no prefix): the UNet encoder (``time_embed``, ``input_blocks``, ``middle_block``)
    of ``cfg`` drawn with ``unet_seed`` (default ``seed``: the checkpoint's seed gives the weights a ControlNet is
    trained from), and, unlike a trained ControlNet's zero-initialised output convs, random ``zero_convs``,
    ``middle_block_out`` and ``input_hint_block``, so a hint changes the image."""
    gen = torch.Generator().manual_seed(seed)
    unet = unet_factory.randomize_(unet_factory.UNetModel(cfg), seed if unet_seed is None else unet_seed)
    state = {k: v for k, v in unet.state_dict().items() if k.startswith(("input_blocks.", "middle_block.",
                                                                           "time_embed."))}
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("input_blocks.")})
    skip_channels = {i: state[_block_output_key(state, i)].shape[0] for i in blocks}
    for i in blocks:
        width = skip_channels[i]
        state[f"zero_convs.{i}.0.weight"], state[f"zero_convs.{i}.0.bias"] = _conv(gen, width, width, 1, 0.5)
    middle = skip_channels[blocks[-1]]
    state["middle_block_out.0.weight"], state["middle_block_out.0.bias"] = _conv(gen, middle, middle, 1, 0.5)
    channels = (3, *HINT_CHANNELS, cfg.model_channels)
    for index, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
        state[f"input_hint_block.{2 * index}.weight"], state[f"input_hint_block.{2 * index}.bias"] = \
            _conv(gen, c_out, c_in, 3)
    return state


def _block_output_key(state: dict, block: int) -> str:
    """The weight whose first dimension is an input block's output width: its last conv's (ResBlock ``out_layers.3``,
    ``Downsample.op``, the first conv) — a transformer keeps the width."""
    for suffix in ("0.out_layers.3.weight", "0.op.weight", "0.weight"):
        key = f"input_blocks.{block}.{suffix}"
        if key in state:
            return key
    raise KeyError(f"input_blocks.{block} has no conv to read its width from")


def lora_pair(gen: torch.Generator, weight_shape: torch.Size, rank: int, std: float) -> tuple:
    """kohya's ``lora_down`` / ``lora_up`` for a Linear (out, in) or Conv2d (out, in, k, k) weight: down keeps the
    kernel, up is 1x1."""
    out_ch, in_ch, *kernel = weight_shape
    down = torch.randn(rank, in_ch, *kernel, generator=gen) * std
    up = torch.randn(out_ch, rank, *([1, 1] if kernel else []), generator=gen) * std
    return down, up


def lora_state(targets: dict[str, torch.Size], *, seed: int, rank: int = 4, std: float = 0.05,
               alpha: float | None = None) -> dict:
    """A LoRA on ``targets`` (kohya name without suffix -> the target layer's weight shape), in the given order."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in targets.items():
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = lora_pair(gen, shape, rank, std)
        state[f"{name}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    return state


def to_dtype(state: dict, dtype: torch.dtype) -> dict:
    """Floating tensors in ``dtype`` (integer buffers stay), contiguous, ready for safetensors."""
    return {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous() for k, v in state.items()}
