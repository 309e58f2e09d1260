"""The slice of ldm's ``LatentDiffusion`` that k-diffusion's ``CompVisDenoiser`` drives.

Same attribute path as the WebUI's model (``model.model.diffusion_model`` is the UNet), the SD
scaled-linear noise schedule, and ``apply_model(x, t, cond)`` with SD1/2 (tensor) or SDXL-style
(``{"crossattn", "vector"}``) conditioning.
"""
from __future__ import annotations

import torch
from torch import nn


def scaled_linear_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class TinyLatentDiffusion(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod())

    def apply_model(self, x, t, cond):
        unet = self.model.diffusion_model
        if isinstance(cond, dict):
            return unet(x, timesteps=t, context=cond["crossattn"], y=cond["vector"])
        return unet(x, t, context=cond)
