"""Where the tiles of a large latent or image go, and how their outputs are blended into one.

Along each axis the latent is covered by equal tiles of at most ``tile`` latent px, spaced evenly so that
neighbours share at least ``overlap`` px and no more than rounding needs (a 256-px latent with tile 128 and
overlap 16 takes 3 tiles of 96, not 3 of 128: the decode does 1.27x the full decode's pixels instead of 2.25x).
Across each shared band a tile's weight ramps linearly from ~0 at its edge to 1, so a decoder's border artefacts
fade out instead of forming seams. The weights of a tile are a product of one ramp per axis and tiles form a grid,
so the sum of all weights is the product of per-axis sums: normalising needs two vectors, not a second image.
"""
from __future__ import annotations

import math

import torch

MIN_TILE = 32          # latent px; below it the decoder's border effects dominate a tile
MAX_TILE = 256         # latent px; the largest tile a user may set
PREFERRED_TILE = 128   # latent px (1024 px, SDXL's training size): a decode's cost is then ~all convolution
                       # (the attention over 128² latent px is ~5% of it), so tiling a bigger latent costs
                       # little more than decoding it whole (1.07x the work at 2048², less at 4096², where
                       # whole-image attention is as costly as all the convs) at the memory of a 1024² decode


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


class Canvas:
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


def default_overlap(tile: int) -> int:
    """16 latent px (128 px: the decoder's reach across a seam), a quarter of a small tile."""
    return max(2, min(16, tile // 4))
