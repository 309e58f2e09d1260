"""Live previews of big latents: decoded from a small copy, since a preview only has to show the picture."""
from __future__ import annotations

import torch
import torch.nn.functional as F

PREVIEW_MAX_SIDE = 128  # latent px: live previews of bigger latents are decoded from a downscaled copy


def shrink_latent(latent: torch.Tensor, max_side: int = PREVIEW_MAX_SIDE) -> torch.Tensor:
    """``latent`` downscaled (area average) so that its longer side is at most ``max_side``; as is if it fits."""
    height, width = latent.shape[-2:]
    if max(height, width) <= max_side:
        return latent
    scale = max_side / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(latent.float(), size=size, mode="area").to(latent.dtype)
