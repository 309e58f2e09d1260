"""Randomly initialised UNets with the module tree of ldm / sgm ``openaimodel.UNetModel``.

ldm and sgm are not installable from the package index, so tests, the demo and the benchmark
build this stand-in. It mirrors what the engine relies on: module paths
(``input_blocks.N.M``, ``middle_block.K``, ``output_blocks.N.M``, ``out.2``), class names
(``TimestepEmbedSequential``, ``ResBlock``, ``Downsample``, ``Upsample``, ``SpatialTransformer``),
the positions of every 3x3 conv (``in_layers.2``, ``out_layers.3``, ``op``, ``conv``), 1x1 skip
convs, the forward signature ``forward(x, timesteps=None, context=None, y=None)`` and the block
loop with strict skip concatenation (a size bug raises instead of being resized away).

The real constructors zero the last conv of every ResBlock, ``proj_out`` and ``out.2``, so a fresh
model predicts zeros; :func:`randomize_` gives every parameter a random value instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int
    channel_mult: tuple[int, ...]
    attention_levels: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_middle: int
    context_dim: int
    head_channels: int
    use_linear_in_transformer: bool
    adm_in_channels: int | None = None  # SDXL's pooled-text + size vector
    num_heads: int | None = None  # SD1 fixes the head count; SD2/SDXL fix the head width
    num_res_blocks: int = 2
    norm_groups: int = 32
    in_channels: int = 4
    out_channels: int = 4


# Full-size architectures (the published SD1.5 / SD2.1 / SDXL-base UNet hyper-parameters).
SD15 = UNetConfig(320, (1, 2, 4, 4), (0, 1, 2), (1, 1, 1, 0), 1, 768, 40, False, num_heads=8)
SD21 = UNetConfig(320, (1, 2, 4, 4), (0, 1, 2), (1, 1, 1, 0), 1, 1024, 64, True)
SDXL = UNetConfig(320, (1, 2, 4), (1, 2), (0, 2, 10), 10, 2048, 64, True, adm_in_channels=2816)

# Tiny widths with the same topology, for CPU tests.
TINY = {
    "sd1": replace(SD15, model_channels=32, context_dim=32, head_channels=8, norm_groups=8, num_heads=4),
    "sd2": replace(SD21, model_channels=32, context_dim=32, head_channels=8, norm_groups=8),
    "sdxl": replace(SDXL, model_channels=32, context_dim=32, head_channels=8, norm_groups=8,
                    transformer_depth=(0, 1, 1), transformer_depth_middle=1, adm_in_channels=16),
}
FULL = {"sd1": SD15, "sd2": SD21, "sdxl": SDXL}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepBlock(nn.Module):
    pass


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(TimestepBlock):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels, self.use_conv = channels, True
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels, self.use_conv = channels, True
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool, groups: int):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels is not None:
            self.num_classes = "sequential"
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))
        else:
            self.num_classes = None

        def attention(ch: int, depth: int) -> SpatialTransformer:
            heads = cfg.num_heads or ch // cfg.head_channels
            return SpatialTransformer(ch, heads, ch // heads, depth, cfg.context_dim,
                                      cfg.use_linear_in_transformer, groups)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch = mc
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups)]
                ch = mult * mc
                if level in cfg.attention_levels and cfg.transformer_depth[level] > 0:
                    layers.append(attention(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups), attention(ch, cfg.transformer_depth_middle), ResBlock(ch, emb_dim, ch, groups))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc, groups)]
                ch = mult * mc
                if level in cfg.attention_levels and cfg.transformer_depth[level] > 0:
                    layers.append(attention(ch, cfg.transformer_depth[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        return self.out(h)


# Layers the real constructors zero (residual-branch outputs). A small random scale keeps them live
# while activations stay bounded through the depth, as in a trained model: unbounded ones underflow
# into denormal floats in SiLU/softmax, which makes CPU math ~10x slower and timings meaningless.
_RESIDUAL_OUTPUTS = ("out_layers.3.", "proj_out.", "out.2.")
_RESIDUAL_SCALE = 0.2


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every parameter a random value (fan-in scaled), so no layer is a silent zero."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            scale = _RESIDUAL_SCALE if any(tag in name + "." for tag in _RESIDUAL_OUTPUTS) else 1.0
            p.copy_(torch.randn(p.shape, generator=gen) * (scale / math.sqrt(fan_in)))
        elif name.endswith("weight"):  # norm scales
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def build_unet(family: str, *, size: str = "tiny", seed: int = 0, device="cpu", dtype=torch.float32) -> UNetModel:
    """A random-weight UNet of the given family ("sd1", "sd2", "sdxl"), "tiny" or "full" width."""
    cfg = (TINY if size == "tiny" else FULL)[family]
    model = UNetModel(cfg)
    randomize_(model, seed)
    return model.to(device=device, dtype=dtype).eval()


def example_inputs(unet: UNetModel, batch: int, latent_hw: tuple[int, int], *, seed: int = 0, tokens: int = 7):
    """x, context and (for SDXL) y tensors of the right shapes for ``unet``."""
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    p = next(unet.parameters())
    x = torch.randn(batch, cfg.in_channels, *latent_hw, generator=gen).to(p)
    context = torch.randn(batch, tokens, cfg.context_dim, generator=gen).to(p)
    y = torch.randn(batch, cfg.adm_in_channels, generator=gen).to(p) if cfg.adm_in_channels else None
    return x, context, y
