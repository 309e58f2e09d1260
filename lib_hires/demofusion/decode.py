"""Decoding a large latent in overlapping tiles, one at a time, with linearly blended seams.

Any ``decode(latent) -> image`` works whose image is an integer multiple (8 for SD VAEs) of the
latent in both sides, with any channel count. Tiles are ``tile`` latent px (the last row and column
are shifted back to end at the edge) and neighbours share at least ``overlap`` px; across each shared
band a tile's weight ramps linearly from ~0 at its edge to 1, so a decoder's border artefacts fade out
instead of forming seams. Only one tile is decoded at a time and the result is accumulated on
``out_device``: the decoder's working memory is that of one tile whatever the image size.

The weights of a tile are a product of one ramp per axis and tiles form a grid, so the sum of all
weights is the product of per-axis sums: normalising needs two vectors, not a second image.
"""
from __future__ import annotations

from typing import Callable

import torch

from .views import view_starts


def _ramps(starts: list[int], span: int, scale: int) -> list[torch.Tensor]:
    """Per-tile weights along one axis, in output pixels."""
    out = []
    for k, a in enumerate(starts):
        b = a + span
        before = starts[k - 1] + span - a if k > 0 else 0   # latent px shared with the previous tile
        after = b - starts[k + 1] if k + 1 < len(starts) else 0
        p = torch.arange(span * scale, dtype=torch.float64) + 0.5
        w = torch.ones_like(p)
        if before > 0:
            w = torch.minimum(w, p / (before * scale))
        if after > 0:
            w = torch.minimum(w, (span * scale - p) / (after * scale))
        out.append(w)
    return out


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, *, tile: int = 64,
                 overlap: int = 16, out_device: torch.device | str | None = None) -> torch.Tensor:
    """``decode(latent)`` assembled from tiles of ``tile`` latent px overlapping by ``overlap`` or more."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be from 0 to tile - 1 = {tile - 1}; got {overlap}")
    height, width = latent.shape[-2:]
    out_device = latent.device if out_device is None else torch.device(out_device)
    rows = view_starts(height, tile, tile - overlap)
    cols = view_starts(width, tile, tile - overlap)
    th, tw = min(tile, height), min(tile, width)

    image = weight_h = weight_w = None
    scale = 0
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            part = decode(latent[..., top:top + th, left:left + tw])
            if image is None:
                scale = part.shape[-1] // tw
                if part.shape[-2:] != (th * scale, tw * scale) or scale < 1:
                    raise ValueError(f"decode turned a {th}x{tw} latent into {tuple(part.shape[-2:])}: "
                                     "expected the same integer scale on both sides")
                image = torch.zeros(*part.shape[:-2], height * scale, width * scale, dtype=torch.float32,
                                    device=out_device)
                ramps_h = _ramps(rows, th, scale)
                ramps_w = _ramps(cols, tw, scale)
                weight_h = torch.zeros(height * scale, dtype=torch.float64)
                weight_w = torch.zeros(width * scale, dtype=torch.float64)
                for a, r in zip(rows, ramps_h):
                    weight_h[a * scale:(a + th) * scale] += r
                for a, r in zip(cols, ramps_w):
                    weight_w[a * scale:(a + tw) * scale] += r
            w = (ramps_h[i][:, None] * ramps_w[j][None, :]).to(device=out_device, dtype=torch.float32)
            image[..., top * scale:(top + th) * scale, left * scale:(left + tw) * scale] += \
                part.to(device=out_device, dtype=torch.float32) * w
            dtype = part.dtype
    image /= weight_h.to(device=out_device, dtype=torch.float32)[:, None]
    image /= weight_w.to(device=out_device, dtype=torch.float32)[None, :]
    return image.to(dtype)
