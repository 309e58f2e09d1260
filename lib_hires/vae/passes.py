"""Decoding large latents and encoding large images from tiles, one tile's working memory at a time.

Any ``decode(latent) -> image`` works whose image is an integer multiple (8 for SD VAEs) of the latent in both
sides, with any channel count; tiles are laid out and blended as :mod:`lib_hires.vae.layout` says, and the result
is accumulated on ``out_device``. ``tiled_decode`` and ``tiled_encode`` of a VAE module share GroupNorm statistics
across the tiles (:mod:`lib_hires.vae.shared_norm`); ``tiled_apply`` and an opaque ``decode`` callable normalise
each tile on its own.
"""
from __future__ import annotations

from typing import Callable

import torch

from .layout import Canvas, tile_layout
from .shared_norm import shared_norm_forward


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
    canvas = Canvas(rows, cols, th, tw, height, width, out_device)
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            canvas.add(i, j, fn(x[..., top * unit:(top + th) * unit, left * unit:(left + tw) * unit]))
    return canvas.result()


GROUPNORM_CHOICES = ("whole image", "per tile")


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, *, tile: int = 64,
                 overlap: int = 16, out_device: torch.device | str | None = None,
                 groupnorm: str | None = None) -> torch.Tensor:
    """``decode(latent)`` assembled from tiles of at most ``tile`` latent px overlapping by ``overlap`` or more.

    ``groupnorm``: "whole image" runs a VAE decoder module (:mod:`lib_hires.vae.shared_norm`) layer by layer across
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
    return shared_norm_forward(fn, x, tile=tile, overlap=overlap, unit=unit, out_device=out_device)
