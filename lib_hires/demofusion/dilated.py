"""The dilated (global) path in denoised space (``demofusion.md`` §4.3).

The official code predicts noise from the blurred samples and steps the *unblurred* ones with it.
In x0 terms that is ``D_global = D(B_sub) + (x̂ - B)_sub``: the prediction for the blurred input,
moved back by what the blur and re-standardisation changed. With the padded latent ``zg`` and
``B = restd(gauss(zg))``, the whole path is ``(zg - B + merge(D(split(B))))`` cropped to the latent.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .blur import blur_kernel_size, gaussian_blur, restandardize, row_stats
from .views import top_left_padding
from .weights import Number


def blurred_frame(x: torch.Tensor, dilation: int, blur_sigma: Number) -> tuple[torch.Tensor, torch.Tensor]:
    """``(zg, B)``: the latent zero-padded at the top-left to a multiple of ``dilation``, and its blur
    re-standardised to ``zg``'s per-row mean and std. ``B is zg`` at dilation 1 (a 1-tap kernel)."""
    pad_top, pad_left = top_left_padding(x.shape[-2], x.shape[-1], dilation)
    zg = F.pad(x, (pad_left, 0, pad_top, 0))
    size = blur_kernel_size(dilation)
    if size == 1:
        return zg, zg
    mean, std = row_stats(zg)
    return zg, restandardize(gaussian_blur(zg, size, blur_sigma), mean, std)


def split_samples(frame: torch.Tensor, dilation: int) -> torch.Tensor:
    """``[s*s*R, C, H/s, W/s]``: sample ``(i, j)`` of every row at batch ``(i*s + j)*R + row`` (view-major)."""
    return rearrange(frame, "r c (h i) (w j) -> (i j r) c h w", i=dilation, j=dilation)


def merge_samples(samples: torch.Tensor, dilation: int) -> torch.Tensor:
    """Inverse of :func:`split_samples`."""
    return rearrange(samples, "(i j r) c h w -> r c (h i) (w j)", i=dilation, j=dilation)


def global_prediction(zg: torch.Tensor, blurred: torch.Tensor, denoised_samples: torch.Tensor,
                      dilation: int, height: int, width: int) -> torch.Tensor:
    """``D_global`` on the unpadded latent from the model's predictions for ``split_samples(blurred)``."""
    frame = zg - blurred + merge_samples(denoised_samples, dilation)
    return frame[..., frame.shape[-2] - height:, frame.shape[-1] - width:]
