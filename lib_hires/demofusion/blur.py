"""The Gaussian blur and the per-row re-standardisation of the dilated path (``demofusion.md`` §1.6).

Statistics are per batch row (over channels and pixels): the official pipeline runs one image
(batch 1), where per-row statistics are its global scalars; with several images, or the cond and
uncond rows the WebUI stacks, global statistics would let rows leak into each other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .weights import Number


def blur_kernel_size(dilation: int) -> int:
    """``2s - 1`` as in the official code (the paper says ``4s - 3``)."""
    return 2 * dilation - 1


def gaussian_kernel_1d(size: int, sigma: torch.Tensor) -> torch.Tensor:
    """``[rows, size]`` normalised Gaussians, one per sigma in the 1-D tensor ``sigma``."""
    x = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - (size - 1) / 2
    k = torch.exp(-x[None] ** 2 / (2 * sigma[:, None] ** 2))
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, size: int, sigma: Number) -> torch.Tensor:
    """Depthwise blur of ``[R, C, H, W]`` with zero padding ``size // 2``; ``sigma`` is a float or one per row."""
    if size == 1:
        return x  # a 1-tap normalised kernel is the identity
    rows, channels, height, width = x.shape
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(rows)
    k1 = gaussian_kernel_1d(size, sigma)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(channels, dim=0)[:, None]
    # Rows x channels as groups: one conv call serves every row with its own kernel.
    out = F.conv2d(x.reshape(1, rows * channels, height, width), k2, padding=size // 2, groups=rows * channels)
    return out.reshape(rows, channels, height, width)


def row_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and (unbiased, as torch's default) std, shaped ``[R, 1, 1, 1]`` for broadcasting."""
    flat = x.reshape(x.shape[0], -1)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return flat.mean(dim=1).reshape(shape), flat.std(dim=1).reshape(shape)


def restandardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``x`` with each row moved to the given mean and std; a constant row becomes the mean."""
    x_mean, x_std = row_stats(x)
    return (x - x_mean) / x_std.clamp_min(torch.finfo(x.dtype).tiny) * std + mean
