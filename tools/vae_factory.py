"""Randomly initialised SD / SDXL VAE halves with the layout of ldm's ``Decoder`` and ``Encoder``.

SD1.x, SD2.x and SDXL share this VAE. The decoder: ``post_quant_conv`` (1x1, 4 channels; in ldm it belongs
to ``AutoencoderKL``, here to the decoder so that ``decoder(latent)`` is a whole decode), ``conv_in`` to 512
channels, ``mid.block_1`` / ``mid.attn_1`` (single-head self-attention over every latent pixel) /
``mid.block_2``, four ``up`` levels of three ResnetBlocks (512, 512, 256, 128 channels, from the latent's
size up) with a nearest x2 ``upsample`` and 3x3 conv after each but the last, then ``norm_out``, swish and
``conv_out`` to RGB. The encoder mirrors it: ``conv_in`` to 128 channels, four ``down`` levels of two
ResnetBlocks (128, 256, 512, 512) with a stride-2 ``downsample`` (zero pad right and bottom) after each but
the last, the same middle, ``norm_out``, swish, ``conv_out`` to 8 channels and ``quant_conv`` (1x1): the
moments, mean and log-variance of the 4 latent channels. Module names and attributes (``num_resolutions``,
``num_res_blocks``, ``up[i].block``, ``down[i].attn``, ``give_pre_end``, ...) are ldm's, so code that walks
the real VAE walks these too; parameters are created in ldm's order.

``width`` scales every channel count (the tiny fixtures use 1/4), so a slow machine can measure the same
structure (below 1/8 the narrowest norms have fewer than 32 groups, one per channel). Attention runs through ``scaled_dot_product_attention`` as the WebUI's SDP optimisation does;
swish is ``x * sigmoid(x)`` as ldm writes it (two temporaries, which the peak memory includes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVEL_MULT = (1, 2, 4, 4)
BASE_CHANNELS = 128
NUM_RES_BLOCKS = 2
LATENT_CHANNELS = 4


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


GROUPS = 32


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(GROUPS, channels), channels, eps=1e-6)


def base_channels(width: float) -> int:
    """128 channels at full width, in steps of 32 so that each GroupNorm keeps its 32 groups, at least 32 (which
    1/4 and 1/8 both give). Below 1/8 (benchmarks that must run big images on a CPU) the base is 128 * width
    rounded, at least 4, and a norm over fewer than 32 channels has one group per channel, as the 32-channel
    level of the 32-channel base has."""
    if width < 0.125:
        return max(4, int(round(BASE_CHANNELS * width)))
    return max(32, int(round(BASE_CHANNELS * width / 32)) * 32)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.in_channels, self.out_channels, self.use_conv_shortcut = cin, cout, False
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb=None):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return (x if self.in_channels == self.out_channels else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.in_channels = channels
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.with_conv = True
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.with_conv = True
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _middle(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), \
        ResnetBlock(channels, channels)
    return mid


class Decoder(nn.Module):
    """``decode(latent) -> image``: 4 latent channels in, RGB at 8x the size out."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        base = base_channels(width)
        self.num_resolutions, self.num_res_blocks = len(LEVEL_MULT), NUM_RES_BLOCKS
        self.give_pre_end, self.tanh_out = False, False
        block_in = base * LEVEL_MULT[-1]
        self.post_quant_conv = nn.Conv2d(LATENT_CHANNELS, LATENT_CHANNELS, 1)
        self.conv_in = nn.Conv2d(LATENT_CHANNELS, block_in, 3, padding=1)
        self.mid = _middle(block_in)
        self.up = nn.ModuleList()
        for i in reversed(range(self.num_resolutions)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(self.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, base * LEVEL_MULT[i]))
                block_in = base * LEVEL_MULT[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            self.up.insert(0, level)
        self.norm_out, self.conv_out = _norm(block_in), nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, None)), None)
        for i in reversed(range(self.num_resolutions)):
            for j in range(self.num_res_blocks + 1):
                h = self.up[i].block[j](h, None)
                if len(self.up[i].attn) > 0:
                    h = self.up[i].attn[j](h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Encoder(nn.Module):
    """``encode(image) -> moments``: RGB in, mean and log-variance of 4 latent channels at 1/8 the size out."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        base = base_channels(width)
        self.num_resolutions, self.num_res_blocks = len(LEVEL_MULT), NUM_RES_BLOCKS
        self.conv_in = nn.Conv2d(3, base, 3, padding=1)
        block_in = base
        self.down = nn.ModuleList()
        for i in range(self.num_resolutions):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(self.num_res_blocks):
                level.block.append(ResnetBlock(block_in, base * LEVEL_MULT[i]))
                block_in = base * LEVEL_MULT[i]
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _middle(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * LATENT_CHANNELS, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * LATENT_CHANNELS, 2 * LATENT_CHANNELS, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i in range(self.num_resolutions):
            for j in range(self.num_res_blocks):
                h = self.down[i].block[j](h, None)
                if len(self.down[i].attn) > 0:
                    h = self.down[i].attn[j](h)
            if i != self.num_resolutions - 1:
                h = self.down[i].downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, None)), None)
        return self.quant_conv(self.conv_out(_swish(self.norm_out(h))))


def _ready(module: nn.Module, device, dtype) -> nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_decoder(width: float = 1.0, *, seed: int = 0, device="cpu", dtype=torch.float32) -> Decoder:
    torch.manual_seed(seed)
    return _ready(Decoder(width), device, dtype)


def build_encoder(width: float = 1.0, *, seed: int = 0, device="cpu", dtype=torch.float32) -> Encoder:
    torch.manual_seed(seed)
    return _ready(Encoder(width), device, dtype)
