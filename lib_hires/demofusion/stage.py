"""Sampling a stage: the skip residual on the sampler state, Euler steps, and the stage loop.

Stage k >= 2 starts from the previous stage's latent upsampled bicubically in latent space
(``z'_0``) and one noise ``eps`` for the whole stage, at ``x = z'_0 + sigma_0 eps`` over the full
schedule. Before each step's model evaluation the state becomes
``x̂ = (1 - c1) x + c1 (z'_0 + sigma eps)`` and the step continues from ``x̂``; with Euler,
``x_next = x̂ + (sigma_next - sigma) (x̂ - D(x̂)) / sigma`` reproduces the official per-view scheduler
steps exactly (``demofusion.md`` §4.3). After the last step each row is moved to the mean and std of
its stage-1 latent (the official "anchor" re-standardisation, per row here).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .blur import restandardize, row_stats
from .fused import Denoiser, FusedDenoiser, ViewCond
from .plan import Stage
from .settings import DemoFusionSettings
from .weights import Number, per_row, skip_weight


def skip_residual(x: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor, sigma: Number, c1: Number) -> torch.Tensor:
    """``(1 - c1) x + c1 (z0 + sigma noise)``; ``sigma`` and ``c1`` are floats or one per row."""
    sigma, c1 = per_row(sigma, x.ndim), per_row(c1, x.ndim)
    return (1 - c1) * x + c1 * (z0 + sigma * noise)


def upsample_latent(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling in latent space, as the official pipeline (not through pixels)."""
    return F.interpolate(z, size=size, mode="bicubic", align_corners=False)


def euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
          callback: Callable[[dict], None] | None = None,
          before_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Deterministic Euler as k-diffusion's ``sample_euler`` (no churn); ``before_step(x, sigma)``
    may replace the state before each model evaluation (the skip residual)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        if before_step is not None:
            x = before_step(x, sigma * s_in)
        denoised = model(x, sigma * s_in, **extra_args)
        d = (x - denoised) / sigma
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigma)
    return x


def sample_stage(denoiser: Denoiser, z_up: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, *,
                 dilation: int, window: int, stride: int, view_batch: int = 16, cosine_scale_1: float = 3.0,
                 cosine_scale_2: float = 1.0, cosine_scale_3: float = 1.0, sigma: float = 0.8,
                 sigma_to_t: Callable[[torch.Tensor], torch.Tensor], jitter: torch.Generator | None = None,
                 extra_args: dict | None = None, view_cond: ViewCond | None = None,
                 before_call: Callable | None = None, callback: Callable[[dict], None] | None = None,
                 fused_denoisers: list | None = None) -> torch.Tensor:
    """One DemoFusion stage with Euler from ``z_up + sigmas[0] noise`` down ``sigmas`` (ending in 0).

    Returns the last latent, before the anchor re-standardisation. ``before_call`` and ``callback``
    are passed to :class:`FusedDenoiser` and called after each step's evaluation (k-diffusion's
    callback dict), respectively.
    """
    fused = FusedDenoiser(denoiser, dilation=dilation, window=window, stride=stride, view_batch=view_batch,
                          cosine_scale_2=cosine_scale_2, cosine_scale_3=cosine_scale_3, sigma=sigma,
                          sigma_to_t=sigma_to_t, jitter=jitter, view_cond=view_cond, before_call=before_call)
    if fused_denoisers is not None:
        fused_denoisers.append(fused)

    def residual(x: torch.Tensor, sigma_rows: torch.Tensor) -> torch.Tensor:
        return skip_residual(x, z_up, noise, sigma_rows, skip_weight(sigma_to_t(sigma_rows), cosine_scale_1))

    return euler(fused, z_up + sigmas[0] * noise, sigmas, extra_args, callback, before_step=residual)


def stage_noise(shape: Sequence[int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Unit noise from ``generator`` (on its own device), moved to ``like``'s device and dtype."""
    return torch.randn(tuple(shape), generator=generator, device=generator.device).to(like)


def sample_stages(denoiser: Denoiser, stages: Sequence[Stage], sigmas: torch.Tensor, noise: torch.Tensor, *,
                  settings: DemoFusionSettings, sigma_to_t: Callable[[torch.Tensor], torch.Tensor],
                  generator: torch.Generator, jitter_generator: torch.Generator | None = None,
                  extra_args: dict | None = None, view_cond: ViewCond | None = None,
                  callback: Callable[[int, dict], None] | None = None,
                  later_sigmas: torch.Tensor | None = None,
                  fused_denoisers: list | None = None) -> list[torch.Tensor]:
    """The whole DemoFusion loop with Euler; returns the final latent of every stage.

    Stage 1 is plain sampling from ``noise * sigmas[0]`` (``noise`` has the stage-1 latent size);
    later stages run ``later_sigmas`` (default ``sigmas``: the official full schedule; a stage
    strength below 1 or other steps come from ``schedule.partial_sigmas``) from ``z' + later_sigmas[0] eps``;
    each later stage draws its noise from ``generator`` and, when ``settings.jitter``, its views from
    ``jitter_generator`` (required then; separate so the noise does not depend on the views).
    ``callback(stage_index, step_dict)`` follows every step. ``fused_denoisers``, if given, receives
    each later stage's :class:`FusedDenoiser` (its call counters).
    """
    if settings.jitter and jitter_generator is None:
        raise ValueError("settings.jitter is on: pass a jitter_generator")
    first, *later = stages
    if tuple(noise.shape[-2:]) != first.latent_size:
        raise ValueError(f"noise is {tuple(noise.shape[-2:])}, stage 1 latent is {first.latent_size}")
    extra_args = extra_args or {}
    later_sigmas = sigmas if later_sigmas is None else later_sigmas

    def step_callback(index: int):
        return None if callback is None else (lambda info: callback(index, info))

    z = euler(denoiser, noise * sigmas[0], sigmas, extra_args, step_callback(first.index))
    results = [z]
    anchor_mean, anchor_std = row_stats(z)
    for stage in later:
        z_up = upsample_latent(z, stage.latent_size)
        eps = stage_noise(z_up.shape, generator, z_up)
        z = sample_stage(denoiser, z_up, eps, later_sigmas, dilation=stage.dilation, window=settings.window,
                         stride=settings.stride, view_batch=settings.view_batch,
                         cosine_scale_1=settings.cosine_scale_1, cosine_scale_2=settings.cosine_scale_2,
                         cosine_scale_3=settings.cosine_scale_3, sigma=settings.sigma, sigma_to_t=sigma_to_t,
                         jitter=jitter_generator if settings.jitter else None, extra_args=extra_args,
                         view_cond=view_cond, callback=step_callback(stage.index), fused_denoisers=fused_denoisers)
        z = restandardize(z, anchor_mean, anchor_std)
        results.append(z)
    return results
