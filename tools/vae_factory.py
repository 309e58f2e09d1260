"""A randomly initialised decoder with the layout of the SD / SDXL VAE (ldm ``AutoencoderKL`` decoder).

SD1.x, SD2.x and SDXL share this decoder: ``post_quant_conv`` (1x1, 4 channels), ``conv_in`` to 512
channels, a middle of ResnetBlock, single-head self-attention over every latent pixel and ResnetBlock,
four up levels of three ResnetBlocks (512, 512, 256, 128 channels, from the latent's size up) with a
nearest x2 upsample and 3x3 conv after each of the first three, then GroupNorm, swish and a 3x3 conv to
RGB. ``width`` scales every channel count (the tiny fixtures use 1/4), so a slow machine can measure the
same structure; the memory of a decode is what the benchmark and the tile-size rule care about.

Attention runs through ``scaled_dot_product_attention`` as the WebUI's SDP optimisation does; swish is
``x * sigmoid(x)`` as ldm writes it (two temporaries, which the peak memory includes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVEL_MULT = (1, 2, 4, 4)
BASE_CHANNELS = 128


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
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
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """``decode(latent) -> image``: 4 latent channels in, RGB at 8x the size out."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        base = max(32, int(round(BASE_CHANNELS * width / 32)) * 32)  # GroupNorm needs 32 groups
        top = base * LEVEL_MULT[-1]
        self.post_quant_conv = nn.Conv2d(4, 4, 1)
        self.conv_in = nn.Conv2d(4, top, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(top, top), AttnBlock(top), ResnetBlock(top, top))
        levels, cin = [], top
        for i in reversed(range(len(LEVEL_MULT))):
            cout = base * LEVEL_MULT[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout) for j in range(3)]
            if i > 0:
                blocks.append(Upsample(cout))
            levels.append(nn.Sequential(*blocks))
            cin = cout
        self.up = nn.Sequential(*levels)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.up(self.mid(self.conv_in(self.post_quant_conv(z))))
        return self.conv_out(_swish(self.norm_out(h)))


def build_decoder(width: float = 1.0, *, seed: int = 0, device="cpu", dtype=torch.float32) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(width).to(device=device, dtype=dtype).eval().requires_grad_(False)
