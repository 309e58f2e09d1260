"""DemoFusion on a variance-preserving state with an ε-predicting model (the WebUI's DDIM, DDIM CFG++, PLMS, UniPC).

Those samplers hold ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε`` and call ``model(x_t, t) -> ε``. Dividing by
``sqrt(ᾱ_t)`` gives the k-diffusion state ``x = x0 + σ ε`` with ``σ = sqrt((1 - ᾱ_t) / ᾱ_t)``, the form every
engine piece is written in. So each piece gets its VP form from that one change of variables, not by hand:

* skip residual: ``(1-c1) x_t + c1 (sqrt(ᾱ) z' + sqrt(1-ᾱ) ε_stage)`` is ``sqrt(ᾱ)`` times the k-form
  ``(1-c1) x + c1 (z' + σ ε_stage)`` (:meth:`VPSchedule.skip_residual`, the same ``skip_residual``);
* fused prediction: :class:`EpsFusion` runs the unchanged :class:`~lib_hires.demofusion.FusedDenoiser` on
  ``x_t / sqrt(ᾱ)`` over a k-diffusion view of the ε model (``D(x, σ) = x - σ ε(sqrt(ᾱ) x, t)``, as k-diffusion's
  ``CompVisDenoiser``) and hands the sampler the ε of the fused x0, ``(x_t - sqrt(ᾱ) D) / sqrt(1-ᾱ)``: whatever
  the sampler computes as its x0 is the fused x0 of the k-diffusion path at the same state. Local views and the
  dilated path are averaged in x0, which for a fixed state is affine in ε, so this is also the official pipeline's
  average of per-view DDIM steps (eta 0: ``x_prev`` is affine in ε too);
* blur and std matching of the dilated path: a Gaussian blur is linear and the re-standardisation matches the
  frame's own mean and std, so both commute with the positive scale ``sqrt(ᾱ)``: blurring ``x_t / sqrt(ᾱ)`` is
  blurring the state as the sampler holds it, scaled.

Timesteps are integers for DDIM and PLMS, where ``ᾱ_t`` is the model's table; a fractional timestep reads
``log ᾱ`` interpolated linearly, as the WebUI's DPM-Solver/UniPC noise schedule does.
"""
from __future__ import annotations

from typing import Callable

import torch

from .stage import skip_residual
from .weights import per_row, skip_weight

EpsModel = Callable[..., torch.Tensor]


def _float_timesteps(t, device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    return t if t.is_floating_point() else t.to(torch.float32)


class VPSchedule:
    """``ᾱ_t`` of a model's ``alphas_cumprod`` at (possibly fractional) timesteps, and the VP forms built on it."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.log_alphas = torch.as_tensor(alphas_cumprod).detach().to(torch.float64).log()

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """``ᾱ`` per element of ``t`` (float64 internally, returned in float32 or ``t``'s wider dtype)."""
        t = torch.as_tensor(t)
        table = self.log_alphas.to(t.device)
        pos = t.to(torch.float64).clamp(0, len(table) - 1)
        low = pos.floor().to(torch.long).clamp(max=len(table) - 2)
        frac = pos - low
        value = (table[low] * (1 - frac) + table[low + 1] * frac).exp()
        return value.to(torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32)

    def scales(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(ᾱ_t), sqrt(1 - ᾱ_t))``: the weights of x0 and ε in the state at ``t``."""
        a = self.alpha_bar(t)
        return a.sqrt(), (1 - a).sqrt()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The k-diffusion noise level of timestep ``t``: ``sqrt((1 - ᾱ) / ᾱ)``."""
        a = self.alpha_bar(t)
        return ((1 - a) / a).sqrt()

    def skip_residual(self, x: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                      cosine_scale_1: float) -> torch.Tensor:
        """``(1-c1) x + c1 (sqrt(ᾱ_t) z0 + sqrt(1-ᾱ_t) noise)`` on a VP state, ``c1`` read at the timestep ``t``."""
        t = _float_timesteps(t, x.device)
        signal, noise_scale = self.scales(t)
        c1 = skip_weight(t, cosine_scale_1)
        return skip_residual(x, per_row(signal, x.ndim).to(x.dtype) * z0, noise, noise_scale.to(x.dtype), c1)


class _KDiffusionView:
    """The ε model as a k-diffusion denoiser ``D(x, σ) = x - σ ε(sqrt(ᾱ) x, t)`` for the :class:`FusedDenoiser`.

    The timestep of each row is the one :class:`EpsFusion` was called with (looked up by the row's σ, which the
    fused denoiser repeats view-major), so the UNet sees the sampler's own timestep, never a rounded inverse."""

    def __init__(self, eps_model: EpsModel, schedule: VPSchedule):
        self.eps_model, self.schedule = eps_model, schedule
        self.call_sigmas: torch.Tensor | None = None
        self.call_timesteps: torch.Tensor | None = None

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=self.call_sigmas.device)
        flat = sigma.reshape(-1)
        match = flat[:, None] == self.call_sigmas[None, :].to(flat.dtype)
        if not bool(match.any(dim=1).all()):
            raise RuntimeError("DemoFusion: a view was evaluated at a noise level its sampler call did not have")
        return self.call_timesteps[match.to(torch.int8).argmax(dim=1)].reshape(sigma.shape)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        t = self.sigma_to_t(sigma)
        signal, _ = self.schedule.scales(t)
        signal = per_row(signal, x.ndim).to(x.dtype)
        eps = self.eps_model(x * signal, t, **kwargs)
        return x - per_row(torch.as_tensor(sigma, device=x.device), x.ndim).to(x.dtype) * eps.to(x.dtype)


class EpsFusion:
    """``inner_model.forward(x_t, t, **kwargs) -> ε`` for a VP sampler, from the k-diffusion path's fused x0.

    ``fused_for(denoiser, sigma_to_t)`` builds the :class:`FusedDenoiser` around the k-diffusion view of
    ``eps_model`` (the inner model's own ``forward``: v-prediction models convert to ε there). Attributes the
    fused denoiser has (call counters) are read through."""

    def __init__(self, eps_model: EpsModel, schedule: VPSchedule, fused_for):
        self.schedule = schedule
        self.view = _KDiffusionView(eps_model, schedule)
        self.fused = fused_for(self.view, self.view.sigma_to_t)

    def __getattr__(self, name: str):
        if name in ("fused", "view", "schedule"):
            raise AttributeError(name)
        return getattr(self.fused, name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        t = _float_timesteps(t, x.device).reshape(-1).expand(x.shape[0])
        sigma = self.schedule.sigma(t).to(torch.float32)
        self.view.call_sigmas, self.view.call_timesteps = sigma, t
        signal, noise_scale = (per_row(s, x.ndim) for s in self.schedule.scales(t))
        work = torch.promote_types(x.dtype, torch.float32)
        x_k = (x.to(work) / signal.to(work)).to(x.dtype)
        denoised = self.fused(x_k, sigma, **kwargs).to(work)
        return ((x.to(work) - signal.to(work) * denoised) / noise_scale.to(work)).to(x.dtype)
