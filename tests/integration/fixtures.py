"""The tiny models the real-WebUI suite runs on, made from a seed at test time into the WebUI's models folder.

Random weights with the real layouts at tiny widths, so a CPU runs the WebUI's full pipeline in seconds (images are
noise: the tests compare equal / different, sizes, infotext and errors, never looks):

- ``Stable-diffusion/tiny-sd1`` (+ yaml): ldm's SD1 topology (UNet channel_mult 1,2,4,4, 2 ResBlocks, attention at
  levels 0-2, depth 1) at 32 channels and context 32; AutoencoderKL at ch 32; a 2-layer CLIP text model, width 32.
- ``Stable-diffusion/tiny-sdxl`` (+ yaml): sgm's SDXL topology (3 levels, transformer depth 0,1,2, middle 2) at 32
  channels, context 96 = CLIP-L (32) + OpenCLIP bigG (64), ``vector`` 1600 = pooled 64 + three size embeddings
  of 2 x 256 (the real ones); the WebUI detects it as SDXL.
- ``Lora/tiny``, ``Lora/tiny-sdxl``: kohya-named rank-4 LoRAs on both text encoders and the UNet, conv layers
  included (SD1 in diffusers names on every UNet layer, SDXL in ldm names on the blocks' layers).
- ``ControlNet/control_tiny_sd15_random``: an ldm ControlNet for the tiny SD1 UNet (its encoder's weights, random
  output convs so a hint matters); sd-webui-controlnet must read its width from the weights to load it.
- ``VAE-approx/vaeapprox-sdxl.pt``, unless the WebUI has one: a random stand-in, so an SDXL live preview with the
  approximate method does not try to download the real one.
- ``scalefusion-test-fixtures/``: the CLIP tokenizer folders the yamls name (by absolute path), made from the BPE
  merges open_clip ships in the WebUI's venv, the open_clip architecture of the tiny bigG text tower (open_clip
  looks only in its registry: :func:`register_open_clip_config` adds it in-process) and ``manifest.json``.

The manifest records which files this generator wrote and a digest of everything that shapes them (the seed, this
file and the factories it draws with, torch's version, the models folder the yamls point into): a second run with
the same digest reuses them, a changed generator replaces exactly the files it wrote. A file of the same name that
it did not write is never overwritten (:class:`FixtureConflict`); a link of that name (to another copy of such
fixtures) is replaced by the file, the link's target left untouched.

    python -m tests.integration.fixtures /path/to/webui-or-data-dir/models
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tools import ldm_checkpoint, unet_factory, vae_factory

SEED = 20261207
FOLDER = "scalefusion-test-fixtures"
MANIFEST = "manifest.json"
SD1, SDXL, LORA_SD1, LORA_SDXL = "tiny-sd1", "tiny-sdxl", "tiny", "tiny-sdxl"
CONTROLNET_SD1 = "control_tiny_sd15_random"
OPEN_CLIP_ARCH = "scalefusion-tiny-ViT-bigG-14"
VAE_APPROX_SDXL = "vaeapprox-sdxl.pt"


@dataclass(frozen=True)
class TextTower:
    width: int
    layers: int
    heads: int
    mlp: int
    vocab: int = 49408
    positions: int = 77


SD1_UNET = replace(unet_factory.SD15, model_channels=32, context_dim=32, num_heads=2, head_channels=16)
SD1_CLIP = TextTower(width=32, layers=2, heads=2, mlp=64)
SDXL_CLIP_L = TextTower(width=32, layers=2, heads=2, mlp=128)
SDXL_OPEN_CLIP = TextTower(width=64, layers=2, heads=4, mlp=256)
SDXL_POOLED = 64  # the bigG tower's text_projection width
SDXL_SIZE_EMBED = 256  # per number; original size, crop and target size are two numbers each
SDXL_UNET = replace(unet_factory.SDXL, model_channels=32, context_dim=SDXL_CLIP_L.width + SDXL_OPEN_CLIP.width,
                    head_channels=16, transformer_depth=(0, 1, 2), transformer_depth_middle=2,
                    adm_in_channels=SDXL_POOLED + 3 * 2 * SDXL_SIZE_EMBED)
VAE_WIDTH = 0.25  # ch 32
LINEAR_START, LINEAR_END, TIMESTEPS = 0.00085, 0.012, 1000
LORA_RANK = 4


class FixtureConflict(RuntimeError):
    """A file the fixtures would write exists and was not written by this generator."""


# --- weights ---------------------------------------------------------------------------------------------------

def _betas() -> torch.Tensor:
    return torch.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, TIMESTEPS, dtype=torch.float64) ** 2


def sd1_schedule() -> dict[str, torch.Tensor]:
    """The buffers ldm's ``LatentDiffusion.register_schedule`` derives from the yaml's linear schedule (saved in SD1
    checkpoints; the WebUI loads them with the weights)."""
    betas = _betas()
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, dim=0)
    cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    posterior_variance = betas * (1.0 - cumprod_prev) / (1.0 - cumprod)
    buffers = {
        "betas": betas, "alphas_cumprod": cumprod, "alphas_cumprod_prev": cumprod_prev,
        "sqrt_alphas_cumprod": cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cumprod).log(), "sqrt_recip_alphas_cumprod": (1.0 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / cumprod - 1).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * cumprod_prev.sqrt() / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - cumprod_prev) * alphas.sqrt() / (1.0 - cumprod),
    }
    return {k: v.float() for k, v in buffers.items()}


def sdxl_sigmas() -> torch.Tensor:
    """sgm's ``LegacyDDPMDiscretization`` sigmas of the same schedule (``denoiser.sigmas``)."""
    cumprod = torch.cumprod(1.0 - _betas(), dim=0)
    return ((1.0 - cumprod) / cumprod).sqrt().float()


def _with_final_norm_bias(state: dict, key: str, width: int, seed: int) -> dict:
    """A random bias for a text tower's final LayerNorm (a trained CLIP has one). With transformers' zero init every
    hidden state has mean 0, and the WebUI's prompt emphasis rescales by the ratio of means: 0/0, NaN, for an empty
    prompt."""
    state[key] = 0.1 * torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return state


def _clip(prefix: str, tower: TextTower, seed: int) -> dict:
    state = ldm_checkpoint.clip_text_state(prefix, seed=seed, width=tower.width, layers=tower.layers, mlp=tower.mlp,
                                           vocab=tower.vocab, positions=tower.positions, position_ids=True)
    return _with_final_norm_bias(state, prefix + "final_layer_norm.bias", tower.width, seed + 1000)


def sd1_state(seed: int = SEED) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        state = {**ldm_checkpoint.unet_state(SD1_UNET, seed), **ldm_checkpoint.vae_state(seed, VAE_WIDTH),
                 **_clip("cond_stage_model.transformer.text_model.", SD1_CLIP, seed + 3), **sd1_schedule()}
    return ldm_checkpoint.to_dtype(state, torch.float32)


def sdxl_state(seed: int = SEED + 10) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        state = {**ldm_checkpoint.unet_state(SDXL_UNET, seed), **ldm_checkpoint.vae_state(seed, VAE_WIDTH),
                 **_clip("conditioner.embedders.0.transformer.text_model.", SDXL_CLIP_L, seed + 3),
                 **_with_final_norm_bias(ldm_checkpoint.open_clip_text_state(
                     "conditioner.embedders.1.model.", seed=seed + 4, width=SDXL_OPEN_CLIP.width,
                     layers=SDXL_OPEN_CLIP.layers, mlp=SDXL_OPEN_CLIP.mlp, embed_dim=SDXL_POOLED,
                     vocab=SDXL_OPEN_CLIP.vocab, positions=SDXL_OPEN_CLIP.positions),
                     "conditioner.embedders.1.model.ln_final.bias", SDXL_OPEN_CLIP.width, seed + 1004),
                 "denoiser.sigmas": sdxl_sigmas()}
    return ldm_checkpoint.to_dtype(state, torch.float32)


_RESNET_LAYERS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                  "skip_connection": "conv_shortcut"}
_TOP_LAYERS = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.2": "conv_out"}


def diffusers_unet_name(name: str, cfg: unet_factory.UNetConfig) -> str:
    """The diffusers name of an ldm UNet layer (``input_blocks.4.1.proj_in`` -> ``down_blocks.1.attentions.0.proj_in``),
    as SD1 LoRAs trained with kohya's scripts name them; the Lora extension maps them back."""
    if name in _TOP_LAYERS:
        return _TOP_LAYERS[name]
    parts = name.split(".")
    per_level = cfg.num_res_blocks + 1  # a level's input blocks: its ResBlocks and a Downsample; output: one more
    if parts[0] == "middle_block":
        block, layer, rest = int(parts[1]), int(parts[1]), ".".join(parts[2:])
        base = ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")[block]
    else:
        block, layer, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
        if parts[0] == "input_blocks":
            level, index = divmod(block - 1, per_level)
            if rest == "op":
                return f"down_blocks.{level}.downsamplers.0.conv"
            side = "down_blocks"
        elif parts[0] == "output_blocks":
            level, index = divmod(block, per_level)
            if rest == "conv":
                return f"up_blocks.{level}.upsamplers.0.conv"
            side = "up_blocks"
        else:
            raise ValueError(f"{name} is no layer of an ldm UNet")
        base = f"{side}.{level}.{'resnets' if layer == 0 else 'attentions'}.{index}"
    if base.split(".")[-2] == "resnets":
        rest = _RESNET_LAYERS[rest]
    return f"{base}.{rest}"


def _unet_layers(cfg: unet_factory.UNetConfig, blocks_only: bool):
    """(ldm name, weight shape) of every Linear and Conv2d; ``blocks_only``: only those inside the blocks'
    ResBlocks, transformers, Down- and Upsamplers (kohya's SDXL targets), not the stem, embeddings or head."""
    unet = unet_factory.UNetModel(cfg)
    block_types = (unet_factory.ResBlock, unet_factory.SpatialTransformer, unet_factory.Downsample,
                   unet_factory.Upsample)
    inside = set()
    for name, module in unet.named_modules():
        if isinstance(module, block_types):
            inside.update(f"{name}.{sub}" if sub else name for sub, _ in module.named_modules())
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and (name in inside or not blocks_only):
            yield name, module.weight.shape


def _text_lora_targets(prefix: str, tower: TextTower) -> dict[str, tuple]:
    targets = {}
    for i in range(tower.layers):
        layer = f"{prefix}_text_model_encoder_layers_{i}_"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            targets[f"{layer}self_attn_{proj}"] = (tower.width, tower.width)
        targets[f"{layer}mlp_fc1"] = (tower.mlp, tower.width)
        targets[f"{layer}mlp_fc2"] = (tower.width, tower.mlp)
    return targets


def sd1_lora_state(seed: int = SEED + 20) -> dict[str, torch.Tensor]:
    targets = _text_lora_targets("lora_te", SD1_CLIP)
    for name, shape in _unet_layers(SD1_UNET, blocks_only=False):
        targets["lora_unet_" + diffusers_unet_name(name, SD1_UNET).replace(".", "_")] = shape
    return ldm_checkpoint.to_dtype(ldm_checkpoint.lora_state(targets, seed=seed, rank=LORA_RANK), torch.float32)


def sdxl_lora_state(seed: int = SEED + 21) -> dict[str, torch.Tensor]:
    targets = {**_text_lora_targets("lora_te1", SDXL_CLIP_L), **_text_lora_targets("lora_te2", SDXL_OPEN_CLIP)}
    for name, shape in _unet_layers(SDXL_UNET, blocks_only=True):
        targets["lora_unet_" + name.replace(".", "_")] = shape
    return ldm_checkpoint.to_dtype(ldm_checkpoint.lora_state(targets, seed=seed, rank=LORA_RANK), torch.float32)


def _lora_metadata(name: str, base: str) -> dict[str, str]:
    return {"ss_output_name": name, "ss_base_model_version": base, "ss_network_module": "networks.lora",
            "ss_network_dim": str(LORA_RANK), "ss_network_alpha": str(LORA_RANK)}


def controlnet_sd1_state(seed: int = SEED) -> dict[str, torch.Tensor]:
    """Seeded like the SD1 checkpoint, so its encoder starts from the UNet's weights as a trained ControlNet does."""
    return ldm_checkpoint.to_dtype(ldm_checkpoint.controlnet_state(SD1_UNET, seed=seed + 30, unet_seed=seed),
                                   torch.float32)


# The WebUI's VAEApprox: eight convs from the 4 latent channels to RGB (kernel 7, 5, then 3).
VAE_APPROX_CONVS = ((4, 8, 7), (8, 16, 5), (16, 32, 3), (32, 64, 3), (64, 32, 3), (32, 16, 3), (16, 8, 3), (8, 3, 3))


def vae_approx_state(seed: int = SEED + 40) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, (c_in, c_out, k) in enumerate(VAE_APPROX_CONVS, start=1):
        state[f"conv{i}.weight"] = torch.randn(c_out, c_in, k, k, generator=gen) / math.sqrt(c_in * k * k)
        state[f"conv{i}.bias"] = 0.05 * torch.randn(c_out, generator=gen)
    return state


# --- configs and tokenizers ------------------------------------------------------------------------------------

def _attention_resolutions(cfg: unet_factory.UNetConfig) -> list[int]:
    return [2 ** level for level in cfg.attention_levels if cfg.transformer_depth[level] > 0]


def _first_stage_ddconfig() -> dict:
    return dict(double_z=True, z_channels=vae_factory.LATENT_CHANNELS, resolution=256, in_channels=3, out_ch=3,
                ch=vae_factory.base_channels(VAE_WIDTH), ch_mult=list(vae_factory.LEVEL_MULT),
                num_res_blocks=vae_factory.NUM_RES_BLOCKS, attn_resolutions=[], dropout=0.0)


def sd1_config(tokenizer: Path) -> dict:
    cfg = SD1_UNET
    depths = {cfg.transformer_depth[level] for level in cfg.attention_levels} | {cfg.transformer_depth_middle}
    assert len(depths) == 1, "ldm's SD1 UNet takes one transformer depth for every level and the middle"
    unet = dict(image_size=32, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                model_channels=cfg.model_channels, attention_resolutions=_attention_resolutions(cfg),
                num_res_blocks=cfg.num_res_blocks, channel_mult=list(cfg.channel_mult), num_heads=cfg.num_heads,
                use_spatial_transformer=True, transformer_depth=depths.pop(), context_dim=cfg.context_dim,
                use_checkpoint=False, legacy=False)
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": dict(
        linear_start=LINEAR_START, linear_end=LINEAR_END, num_timesteps_cond=1, log_every_t=200, timesteps=TIMESTEPS,
        first_stage_key="jpg", cond_stage_key="txt", image_size=64, channels=vae_factory.LATENT_CHANNELS,
        cond_stage_trainable=False, conditioning_key="crossattn", monitor="val/loss_simple_ema",
        scale_factor=0.18215, use_ema=False,
        unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL", "params": dict(
            embed_dim=vae_factory.LATENT_CHANNELS, monitor="val/rec_loss", ddconfig=_first_stage_ddconfig(),
            lossconfig={"target": "torch.nn.Identity"})},
        cond_stage_config={"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                           "params": {"version": str(tokenizer)}})}}


def sdxl_config(tokenizer: Path) -> dict:
    cfg = SDXL_UNET
    assert cfg.transformer_depth_middle == cfg.transformer_depth[-1], "sgm's middle block takes the last depth"
    size_embedder = {"target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                     "params": {"outdim": SDXL_SIZE_EMBED}}
    unet = dict(adm_in_channels=cfg.adm_in_channels, num_classes="sequential", use_checkpoint=True,
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
                attention_resolutions=_attention_resolutions(cfg), num_res_blocks=cfg.num_res_blocks,
                channel_mult=list(cfg.channel_mult), num_head_channels=cfg.head_channels,
                use_spatial_transformer=True, use_linear_in_transformer=cfg.use_linear_in_transformer,
                transformer_depth=list(cfg.transformer_depth), context_dim=cfg.context_dim,
                spatial_transformer_attn_type="softmax-xformers", legacy=False)
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": dict(
        scale_factor=0.13025, disable_first_stage_autocast=True,
        denoiser_config={"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": dict(
            num_idx=TIMESTEPS,
            weighting_config={"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
            scaling_config={"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
            discretization_config={"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"})},
        network_config={"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        conditioner_config={"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
             "params": {"version": str(tokenizer), "layer": "hidden", "layer_idx": SDXL_CLIP_L.layers - 1}},
            {"is_trainable": False, "input_key": "txt",
             "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
             "params": {"arch": OPEN_CLIP_ARCH, "version": None, "freeze": True, "layer": "penultimate",
                        "always_return_pooled": True, "legacy": False}},
            {"is_trainable": False, "input_key": "original_size_as_tuple", **size_embedder},
            {"is_trainable": False, "input_key": "crop_coords_top_left", **size_embedder},
            {"is_trainable": False, "input_key": "target_size_as_tuple", **size_embedder}]}},
        first_stage_config={"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": dict(
            embed_dim=vae_factory.LATENT_CHANNELS, monitor="val/rec_loss",
            ddconfig={"attn_type": "vanilla-xformers", **_first_stage_ddconfig()},
            lossconfig={"target": "torch.nn.Identity"})})}}


def _has_containers(items: list) -> bool:
    return any(isinstance(item, (dict, list)) for item in items)


def _yaml_scalar(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa if '.' in mantissa else mantissa + '.0'}{e}{exponent}"  # YAML 1.1 floats need the dot
    if isinstance(value, list) and not _has_containers(value):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    if isinstance(value, dict) and not value:
        return "{}"
    return json.dumps(value)  # ints, and strings double-quoted (YAML reads JSON strings as they are)


def to_yaml(value, indent: int = 0) -> str:
    """Block-style YAML of the configs' dicts, lists and scalars (no YAML package in the test environment)."""
    pad, lines = " " * indent, []
    if isinstance(value, dict):
        for key, item in value.items():
            nested = bool(item) and (isinstance(item, dict) or isinstance(item, list) and _has_containers(item))
            lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 2)}" if nested else f"{pad}{key}: {_yaml_scalar(item)}")
    else:
        lines.extend(f"{pad}- {to_yaml(item, indent + 2).lstrip()}" for item in value)
    return "\n".join(lines)


def open_clip_config() -> dict:
    """The tiny bigG: its text tower is the checkpoint's; open_clip also builds a vision tower, which sgm drops."""
    tower = SDXL_OPEN_CLIP
    return {"embed_dim": SDXL_POOLED,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": tower.positions, "vocab_size": tower.vocab, "width": tower.width,
                         "heads": tower.heads, "layers": tower.layers}}


def clip_text_config(tower: TextTower) -> dict:
    """transformers' ``CLIPTextConfig`` of a tower (the WebUI builds the text model from it, weights from the
    checkpoint)."""
    return {"attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu",
            "hidden_size": tower.width, "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": tower.mlp, "layer_norm_eps": 1e-05, "max_position_embeddings": tower.positions,
            "model_type": "clip_text_model", "num_attention_heads": tower.heads,
            "num_hidden_layers": tower.layers, "pad_token_id": 1, "projection_dim": tower.width,
            "vocab_size": tower.vocab}


BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def tokenizer_configs(positions: int) -> dict[str, dict]:
    """``CLIPTokenizer``'s own files beside vocab.json and merges.txt: CLIP's special tokens (end of text pads)."""
    added = {name: {"__type": "AddedToken", **_special(token)}
             for name, token in (("bos_token", BOS), ("eos_token", EOS), ("unk_token", EOS))}
    return {"tokenizer_config.json": {**added, "clean_up_tokenization_spaces": True, "errors": "replace",
                                      "model_max_length": positions, "pad_token": EOS,
                                      "tokenizer_class": "CLIPTokenizer"},
            "special_tokens_map.json": {"bos_token": _special(BOS), "eos_token": _special(EOS), "pad_token": EOS,
                                        "unk_token": _special(EOS)}}


def byte_symbols() -> list[str]:
    """The byte-level BPE alphabet in CLIP's order: the 188 printable Latin-1 bytes stand for themselves, then every
    other byte, in byte order, for the next unused code point from 256 on."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def clip_bpe_file() -> Path:
    """The CLIP BPE merges open_clip ships (found without importing open_clip, which imports torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed in this interpreter: run with the WebUI's venv")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: open_clip ships CLIP's BPE merges there")
    return path


def clip_vocab_and_merges(bpe_file: Path, vocab_size: int = 49408) -> tuple[dict[str, int], list[str]]:
    """CLIP's tokenizer from its BPE merges: the vocabulary is the byte symbols, the same with the end-of-word mark,
    every merge joined, then the two special tokens; CLIP uses as many merges as fill ``vocab_size``."""
    lines = gzip.decompress(bpe_file.read_bytes()).decode("utf-8").split("\n")
    symbols = byte_symbols()
    merges = lines[1:1 + vocab_size - 2 * len(symbols) - 2]  # line 0 is a version header
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    if len(tokens) != vocab_size or len(set(tokens)) != vocab_size:
        raise ValueError(f"{bpe_file} does not give CLIP's {vocab_size}-token vocabulary")
    return {token: i for i, token in enumerate(tokens)}, merges


def tokenizer_files(tower: TextTower, vocab: dict[str, int], merges: list[str]) -> dict[str, str]:
    """A ``CLIPTokenizer`` / ``CLIPTextConfig`` folder's files, as transformers writes them."""
    configs = {**tokenizer_configs(tower.positions), "config.json": clip_text_config(tower)}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False, indent=2, sort_keys=True) + "\n",
            "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
            **{name: json.dumps(content, indent=2, sort_keys=True) + "\n" for name, content in configs.items()}}


# --- the fixture set -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fixtures:
    models: Path

    @property
    def folder(self) -> Path:
        return self.models / FOLDER

    @property
    def sd1(self) -> Path:
        return self.models / "Stable-diffusion" / f"{SD1}.safetensors"

    @property
    def sdxl(self) -> Path:
        return self.models / "Stable-diffusion" / f"{SDXL}.safetensors"

    @property
    def open_clip_config(self) -> Path:
        return self.folder / "open_clip" / f"{OPEN_CLIP_ARCH}.json"


def generator_digest(models: Path) -> str:
    sources = [Path(__file__), Path(ldm_checkpoint.__file__), Path(unet_factory.__file__), Path(vae_factory.__file__)]
    return ldm_checkpoint.generator_digest(sources, seed=SEED, models=str(models))


def _writers(fixtures: Fixtures, vae_approx: bool) -> dict[str, callable]:
    """Each file (relative to the models folder) with the function that writes it."""
    models, folder = fixtures.models, fixtures.folder
    clip_sd1, clip_sdxl = folder / f"{SD1}-clip", folder / f"{SDXL}-clip-l"
    tokenizer: dict = {}

    def text(content: str):
        return lambda path: path.write_text(content, encoding="utf-8")

    def safetensors(make, metadata=None):
        return lambda path: ldm_checkpoint.save_safetensors(make(), path, metadata)

    def tokenizer_file(tower: TextTower, name: str):
        def write(path):
            if not tokenizer:  # read once for all the tokenizer files
                tokenizer["vocab"], tokenizer["merges"] = clip_vocab_and_merges(clip_bpe_file())
            path.write_text(tokenizer_files(tower, tokenizer["vocab"], tokenizer["merges"])[name], encoding="utf-8")
        return write

    writers = {
        f"Stable-diffusion/{SD1}.safetensors": safetensors(sd1_state),
        f"Stable-diffusion/{SD1}.yaml": text(to_yaml(sd1_config(clip_sd1)) + "\n"),
        f"Stable-diffusion/{SDXL}.safetensors": safetensors(sdxl_state),
        f"Stable-diffusion/{SDXL}.yaml": text(to_yaml(sdxl_config(clip_sdxl)) + "\n"),
        f"Lora/{LORA_SD1}.safetensors": safetensors(sd1_lora_state, _lora_metadata(LORA_SD1, "sd_v1")),
        f"Lora/{LORA_SDXL}.safetensors": safetensors(sdxl_lora_state, _lora_metadata(LORA_SDXL, "sdxl_base_v1-0")),
        f"ControlNet/{CONTROLNET_SD1}.safetensors": safetensors(controlnet_sd1_state),
        str(fixtures.open_clip_config.relative_to(models)): text(json.dumps(open_clip_config(), indent=4) + "\n"),
    }
    for tower_folder, tower in ((clip_sd1, SD1_CLIP), (clip_sdxl, SDXL_CLIP_L)):
        for name in tokenizer_files(tower, {}, []):
            writers[str((tower_folder / name).relative_to(models))] = tokenizer_file(tower, name)
    if vae_approx:
        writers[f"VAE-approx/{VAE_APPROX_SDXL}"] = lambda path: torch.save(vae_approx_state(), path)
    return writers


def ensure_fixtures(models: Path, *, webui_root: Path | None = None) -> Fixtures:
    """The fixture set in ``models`` (the WebUI's models folder, or its data dir's), written once per generator
    version. ``webui_root``: the WebUI checkout, where the WebUI also looks for ``VAE-approx`` models."""
    models = Path(models).resolve()
    fixtures = Fixtures(models)
    manifest_path = fixtures.folder / MANIFEST
    digest = generator_digest(models)
    recorded = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    written = recorded.get("files", [])
    if recorded.get("generator") == digest and all((models / f).exists() for f in written):
        return fixtures
    for name in written:  # an older generator's files (or an interrupted run's): replaced, nothing else is
        (models / name).unlink(missing_ok=True)
    manifest_path.unlink(missing_ok=True)
    has_vae_approx = any((root / "VAE-approx" / VAE_APPROX_SDXL).exists()
                         for root in (models, *([Path(webui_root) / "models"] if webui_root else [])))
    writers = _writers(fixtures, vae_approx=not has_vae_approx)
    foreign = [name for name in writers if (models / name).exists() and not (models / name).is_symlink()]
    if foreign:
        raise FixtureConflict(f"{models} already has {', '.join(foreign)}, not written by {__name__}: remove them "
                              "(or test with a WEBUI_DATA_DIR of its own) so the seeded fixtures can be made there")
    for name in writers:  # a link (to another copy of such fixtures) goes; what it points to is left as it is
        if (models / name).is_symlink():
            (models / name).unlink()
    # Listed before any file is written, so a run killed half-way leaves files the next run knows are its own.
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps({"generator": None, "seed": SEED, "files": sorted(writers)}, indent=1))
    for name, write in writers.items():
        path = models / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    manifest_path.write_text(json.dumps({"generator": digest, "seed": SEED, "files": sorted(writers)}, indent=1))
    return fixtures


def register_open_clip_config(fixtures: Fixtures) -> None:
    """open_clip builds architectures only from its registry; this adds the tiny bigG to it (in this process)."""
    import open_clip

    open_clip.add_model_config(fixtures.open_clip_config)


if __name__ == "__main__":
    import sys

    print(ensure_fixtures(Path(sys.argv[1])).models)
