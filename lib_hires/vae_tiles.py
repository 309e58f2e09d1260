"""Decoding large latents and encoding large images: tiles with blended seams, a tile size from the available
memory, small previews.

Any ``decode(latent) -> image`` works whose image is an integer multiple (8 for SD VAEs) of the
latent in both sides, with any channel count. Along each axis the latent is covered by equal tiles of
at most ``tile`` latent px, spaced evenly so that neighbours share at least ``overlap`` px and no more
than rounding needs (a 256-px latent with tile 128 and overlap 16 takes 3 tiles of 96, not 3 of 128:
the decode does 1.27x the full decode's pixels instead of 2.25x). Across each shared band a tile's
weight ramps linearly from ~0 at its edge to 1, so a decoder's border artefacts fade out instead of
forming seams. One tile is decoded at a time and the result accumulated on ``out_device``: the
decoder's working memory is one tile's whatever the image size.

The weights of a tile are a product of one ramp per axis and tiles form a grid, so the sum of all
weights is the product of per-axis sums: normalising needs two vectors, not a second image.
``tiled_decode`` and ``tiled_encode`` of a VAE module share GroupNorm statistics across the tiles
(``lib_hires.vae_layers``); ``tiled_apply`` and an opaque ``decode`` callable normalise each tile on its own.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

MIN_TILE = 32          # latent px; below it the decoder's border effects dominate a tile
MAX_TILE = 256         # latent px; the largest tile a user may set
PREFERRED_TILE = 128   # latent px (1024 px, SDXL's training size): a decode's cost is then ~all convolution
                       # (the attention over 128² latent px is ~5% of it), so tiling a bigger latent costs
                       # little more than decoding it whole (1.07x the work at 2048², less at 4096², where
                       # whole-image attention is as costly as all the convs) at the memory of a 1024² decode
PREVIEW_MAX_SIDE = 128  # latent px: live previews of bigger latents are decoded from a downscaled copy

# Peak working memory of the SD / SDXL VAE decoder per output pixel, in elements per channel of its
# middle block (512 in every released SD VAE): measured 2.3 on the real architecture (tools.vae_factory, fp32,
# 384-512 px decodes; more below that, where fixed overheads count); 2.5 keeps a margin.
ELEMENTS_PER_PIXEL_PER_CHANNEL = 2.5


def tile_layout(length: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """(tile size, starts) of the fewest equal tiles of at most ``tile`` px covering ``length`` px with
    neighbours sharing at least ``overlap`` px."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be from 0 to tile - 1 = {tile - 1}; got {overlap}")
    if length <= tile:
        return length, [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)
    while True:  # integer starts: the widest gap must still leave the overlap
        starts = [k * (length - size) // (count - 1) for k in range(count)]
        if all(a + size - b >= overlap for a, b in zip(starts, starts[1:])):
            return size, starts
        size += 1


def _ramps(starts: list[int], span: int, scale: int) -> list[torch.Tensor]:
    """Per-tile weights along one axis, in output pixels."""
    out = []
    for k, a in enumerate(starts):
        before = starts[k - 1] + span - a if k > 0 else 0   # latent px shared with the previous tile
        after = a + span - starts[k + 1] if k + 1 < len(starts) else 0
        p = torch.arange(span * scale, dtype=torch.float64) + 0.5
        w = torch.ones_like(p)
        if before > 0:
            w = torch.minimum(w, p / (before * scale))
        if after > 0:
            w = torch.minimum(w, (span * scale - p) / (after * scale))
        out.append(w)
    return out


class _Canvas:
    """Tiles of a ``rows`` x ``cols`` grid (latent px) blended into one image with the per-axis ramps."""

    def __init__(self, rows: list[int], cols: list[int], th: int, tw: int, height: int, width: int, out_device):
        self.rows, self.cols, self.th, self.tw, self.height, self.width = rows, cols, th, tw, height, width
        self.out_device = out_device
        self.image = self.dtype = None

    def add(self, i: int, j: int, part: torch.Tensor) -> None:
        th, tw = self.th, self.tw
        if self.image is None:
            scale = self.scale = part.shape[-1] // tw
            if part.shape[-2:] != (th * scale, tw * scale) or scale < 1:
                raise ValueError(f"decode turned a {th}x{tw} latent into {tuple(part.shape[-2:])}: "
                                 "expected the same integer scale on both sides")
            self.image = torch.zeros(*part.shape[:-2], self.height * scale, self.width * scale, dtype=torch.float32,
                                     device=self.out_device)
            self.ramps_h, self.ramps_w = _ramps(self.rows, th, scale), _ramps(self.cols, tw, scale)
            self.weight_h = torch.zeros(self.height * scale, dtype=torch.float64)
            self.weight_w = torch.zeros(self.width * scale, dtype=torch.float64)
            for a, r in zip(self.rows, self.ramps_h):
                self.weight_h[a * scale:(a + th) * scale] += r
            for a, r in zip(self.cols, self.ramps_w):
                self.weight_w[a * scale:(a + tw) * scale] += r
        scale, top, left = self.scale, self.rows[i], self.cols[j]
        w = (self.ramps_h[i][:, None] * self.ramps_w[j][None, :]).to(device=self.out_device, dtype=torch.float32)
        self.image[..., top * scale:(top + th) * scale, left * scale:(left + tw) * scale] += \
            part.to(device=self.out_device, dtype=torch.float32) * w
        self.dtype = part.dtype

    def result(self) -> torch.Tensor:
        image = self.image
        image /= self.weight_h.to(device=self.out_device, dtype=torch.float32)[:, None]
        image /= self.weight_w.to(device=self.out_device, dtype=torch.float32)[None, :]
        return image.to(self.dtype)


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, tile: int, overlap: int,
                unit: int = 1, out_device: torch.device | str | None = None) -> torch.Tensor:
    """``fn(x)`` assembled from ``fn`` of overlapping tiles, one at a time, each normalising on its own.

    ``x``'s sides are ``unit`` times the layout's (8 for an image into a VAE encoder, 1 for a latent into a
    decoder); tiles are laid out, and ``fn``'s output blended, in layout px."""
    height, width = x.shape[-2] // unit, x.shape[-1] // unit
    th, rows = tile_layout(height, tile, overlap)
    tw, cols = tile_layout(width, tile, overlap)
    out_device = x.device if out_device is None else torch.device(out_device)
    if len(rows) == len(cols) == 1:
        return fn(x).to(out_device)
    canvas = _Canvas(rows, cols, th, tw, height, width, out_device)
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            canvas.add(i, j, fn(x[..., top * unit:(top + th) * unit, left * unit:(left + tw) * unit]))
    return canvas.result()


GROUPNORM_CHOICES = ("whole image", "per tile")


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, *, tile: int = 64,
                 overlap: int = 16, out_device: torch.device | str | None = None,
                 groupnorm: str | None = None) -> torch.Tensor:
    """``decode(latent)`` assembled from tiles of at most ``tile`` latent px overlapping by ``overlap`` or more.

    ``groupnorm``: "whole image" runs a VAE decoder module (``lib_hires.vae_layers``) layer by layer across
    the tiles so that every GroupNorm uses the whole image's statistics; "per tile" calls ``decode`` on each
    tile. The default is "whole image" for a module and "per tile" for any other callable, whose norms
    cannot be reached."""
    return _tiled(decode, latent, tile, overlap, 1, out_device, groupnorm)


def tiled_encode(encode: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, *, tile: int = 64,
                 overlap: int = 16, out_device: torch.device | str | None = None,
                 groupnorm: str | None = None) -> torch.Tensor:
    """``encode(image)`` (a VAE encoder's moments: mean and log-variance, 1/8 the size) assembled from tiles
    of at most ``tile`` latent px (8 ``tile`` image px); ``groupnorm`` as in :func:`tiled_decode`. Sampling
    from the assembled moments is left to the caller, once for the whole image."""
    if image.shape[-2] % 8 or image.shape[-1] % 8:
        raise ValueError(f"a tiled encode needs sides that are multiples of 8; got {tuple(image.shape[-2:])}")
    return _tiled(encode, image, tile, overlap, 8, out_device, groupnorm)


def _tiled(fn, x, tile, overlap, unit, out_device, groupnorm):
    if groupnorm is None:
        groupnorm = GROUPNORM_CHOICES[0] if isinstance(fn, torch.nn.Module) else GROUPNORM_CHOICES[1]
    if groupnorm not in GROUPNORM_CHOICES:
        raise ValueError(f"groupnorm must be one of {GROUPNORM_CHOICES}; got {groupnorm!r}")
    if groupnorm == GROUPNORM_CHOICES[1]:
        return tiled_apply(fn, x, tile=tile, overlap=overlap, unit=unit, out_device=out_device)
    if not isinstance(fn, torch.nn.Module):
        raise TypeError("whole-image GroupNorm statistics need the VAE module itself, not a function")
    from .vae_layers import shared_norm_forward

    return shared_norm_forward(fn, x, tile=tile, overlap=overlap, unit=unit, out_device=out_device)


def default_overlap(tile: int) -> int:
    """16 latent px (128 px: the decoder's reach across a seam), a quarter of a small tile."""
    return max(2, min(16, tile // 4))


def decoder_peak_bytes(height: int, width: int, element_size: int, channels: int = 512) -> int:
    """Working memory of one SD-VAE decode of a ``height`` x ``width`` latent, conservatively.

    Activations grow with the output pixels; the middle block's attention scores are counted as
    materialised twice, scores and their softmax, as torch's CPU attention does (measured: a 1536² decode
    at 1/4 width peaks at 11.8 GiB, 10.9 of them attention). Memory-efficient attention avoids that, but a
    tile size must not rely on it.
    """
    pixels = 64 * height * width
    return int(ELEMENTS_PER_PIXEL_PER_CHANNEL * channels * pixels * element_size
               + 2 * (height * width) ** 2 * element_size)


def choose_tile(free_bytes: int, element_size: int, channels: int = 512, *, preferred: int = PREFERRED_TILE,
                share: float = 0.5) -> int:
    """``preferred``, or the largest square tile below it (latent px, multiple of 8, at least ``MIN_TILE``)
    whose decode needs at most ``share`` of ``free_bytes``; the rest is left for the accumulated image, the
    WebUI's 32-bit retry and other work."""
    budget = free_bytes * share
    tile = preferred
    while tile > MIN_TILE and decoder_peak_bytes(tile, tile, element_size, channels) > budget:
        tile -= 8
    return tile


def available_ram_bytes() -> int | None:
    """Memory the OS can still hand out (Linux ``MemAvailable``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def shrink_latent(latent: torch.Tensor, max_side: int = PREVIEW_MAX_SIDE) -> torch.Tensor:
    """``latent`` downscaled (area average) so that its longer side is at most ``max_side``; as is if it fits."""
    height, width = latent.shape[-2:]
    if max(height, width) <= max_side:
        return latent
    scale = max_side / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(latent.float(), size=size, mode="area").to(latent.dtype)
