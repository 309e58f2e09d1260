"""The fused DemoFusion denoiser: local jittered views plus the dilated global path, in x0 space.

``FusedDenoiser(denoiser, ...)`` has the signature of the denoiser it wraps,
``fused(x, sigma, **extra_args) -> x0``, for any k-diffusion-style denoiser; in the WebUI it takes
the place of ``CFGDenoiser.inner_model`` and so sees every row of the CFG batch (the cond rows of
each image, then the uncond rows); attributes it lacks (``sigmas``, ``get_sigmas``, ...) are read from
the wrapped denoiser, so it can replace that object outright. Per evaluation at noise level ``sigma`` (timestep ``t``):

    D_local  = average over local views v of D(pad0(x)[v])        (the zero band cropped away)
    D_global = D(B_sub) + (x - B)_sub for the s^2 dilated samples   (see ``dilated.py``)
    D        = (1 - c2) D_local + c2 D_global,  c2 = cf(t)^a2, blur sigma = sigma * c3(t)

``x`` must already carry the skip residual (``stage.skip_residual``): the caller owns the sampler
state. Views of equal size share model calls of up to ``view_batch`` views each (local views first,
then dilated samples, so at the official integer stages both kinds go into the same calls).

Hooks, both optional, run in this order for each model call:

* ``before_call(call: ModelCall)``: for side effects, e.g. raising an interrupt, counting progress, or
  cropping ControlNet hints to ``call.views`` (``call.cut(hint, scale=8)``; every ``LocalView`` has its
  box in the zero-padded frame and the pad, every ``DilatedView`` its offsets, ``s`` and top-left pad);
* ``view_cond(extra_args, crops) -> extra_args`` for the call, ``crops`` being the (top, left) pixel
  crop of each view, stacked view-major (SDXL crop conditioning). Without it every batch-aligned
  tensor in ``extra_args`` is repeated view-major (``batching.repeat_rows``), and the hook can use
  that function too before editing its result. The ``ModelCall`` given to ``before_call`` just before
  is the one ``view_cond`` serves, if it needs more than the crops.

Exact savings: where a path's weight is at most ``NEGLIGIBLE_WEIGHT`` (half float32's epsilon) for every
row, the model calls holding only that path's views are skipped and their predictions count as zero (a
call shared with the other path runs whole: a smaller batch would change the rounding of the rest): the
local views where ``1 - c2`` is that small (near t = 1000, or ``cosine_scale_2 = 0``), the dilated
samples where ``c2`` is (t = 0, the last step of schedules that end at the model's smallest sigma, and
the last steps when ``cosine_scale_2 > 1``). What is dropped is
``w * D_path`` with ``w <= 2^-24``: below what float32 resolves in a result of the path's size, and
nothing at all where ``w`` is exactly 0. The views are still drawn, so later steps see the same jitter.
``skipped_calls`` / ``skipped_views`` count what was saved.

Jitter is drawn once per noise level and latent size: calls repeating the last sigma (the WebUI
splits cond and uncond rows into separate calls when ``batch_cond_uncond`` is off) reuse the views,
so cond and uncond rows always see the same windows.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .batching import ModelCall, plan_calls, repeat_rows
from .dilated import blurred_frame, global_prediction, split_samples
from .views import LocalView, coverage, dilated_size, dilated_views, jitter_range, local_views
from .weights import blur_weight, fusion_weight, per_row

Denoiser = Callable[..., torch.Tensor]
NEGLIGIBLE_WEIGHT = torch.finfo(torch.float32).eps / 2  # 2^-24
ViewCond = Callable[[dict, Sequence[tuple[int, int]]], dict]


def check_geometry(dilation: int, window: int, stride: int) -> None:
    for name, value in (("dilation", dilation), ("window", window), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if stride > window:
        raise ValueError(f"stride {stride} exceeds window {window}: the local views would leave gaps")


class FusedDenoiser:
    def __init__(self, denoiser: Denoiser, *, dilation: int, window: int, stride: int, view_batch: int = 16,
                 cosine_scale_2: float = 1.0, cosine_scale_3: float = 1.0, sigma: float = 0.8,
                 sigma_to_t: Callable[[torch.Tensor], torch.Tensor], jitter: torch.Generator | None = None,
                 view_cond: ViewCond | None = None, before_call: Callable[[ModelCall], None] | None = None):
        check_geometry(dilation, window, stride)
        if isinstance(view_batch, bool) or not isinstance(view_batch, int) or view_batch < 1:
            raise ValueError(f"view_batch must be a positive integer; got {view_batch!r}")
        self.denoiser = denoiser
        self.dilation, self.window, self.stride, self.view_batch = dilation, window, stride, view_batch
        self.cosine_scale_2, self.cosine_scale_3, self.sigma = cosine_scale_2, cosine_scale_3, sigma
        self.sigma_to_t = sigma_to_t
        self.jitter = jitter
        self.view_cond = view_cond
        self.before_call = before_call
        self.evaluations = 0   # fused calls
        self.model_calls = 0   # calls of the wrapped denoiser
        self.model_views = 0   # views passed to it (each stands for every row)
        self.skipped_calls = 0  # calls a path of negligible weight did not need (exact savings)
        self.skipped_views = 0
        self._views_key: tuple | None = None
        self._views: list[LocalView] = []

    @classmethod
    def from_settings(cls, denoiser: Denoiser, settings, *, dilation: int, sigma_to_t, jitter=None,
                      view_cond=None, before_call=None) -> "FusedDenoiser":
        """From a :class:`~lib_hires.demofusion.settings.DemoFusionSettings`; jitter only where it is on."""
        return cls(denoiser, dilation=dilation, window=settings.window, stride=settings.stride,
                   view_batch=settings.view_batch, cosine_scale_2=settings.cosine_scale_2,
                   cosine_scale_3=settings.cosine_scale_3, sigma=settings.sigma, sigma_to_t=sigma_to_t,
                   jitter=jitter if settings.jitter else None, view_cond=view_cond, before_call=before_call)

    def __getattr__(self, name: str):
        # Anything else is the wrapped denoiser's, so the fused one can replace the WebUI's inner model
        # object, whose sigmas, sigma_to_t, get_sigmas... the sampler reads.
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)

    def views_for(self, sigma: torch.Tensor, height: int, width: int) -> list[LocalView]:
        """The local views at this noise level; drawn anew when sigma or the size changes."""
        key = (height, width, float(torch.as_tensor(sigma).max()))
        if key != self._views_key:
            self._views = local_views(height, width, self.window, self.stride, self.jitter)
            self._views_key = key
        return self._views

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        rows, _, height, width = x.shape
        s = self.dilation
        work = torch.promote_types(x.dtype, torch.float32)  # accumulate and blur at least in fp32
        xw = x.to(work)
        sigma_t = torch.as_tensor(sigma, device=x.device)
        t = self.sigma_to_t(sigma_t)
        c2 = per_row(fusion_weight(t, self.cosine_scale_2), x.ndim)
        blur_sigma = self.sigma * blur_weight(t, self.cosine_scale_3)

        views = self.views_for(sigma_t, height, width)
        count = coverage(views, height, width).to(device=x.device, dtype=work)
        if count.min() < 1:  # cannot happen for stride <= window; a hard check, as a gap would divide by 0
            raise RuntimeError(f"local views leave latent pixels uncovered ({height}x{width}, window "
                               f"{self.window}, stride {self.stride})")
        samples_of = dilated_views(height, width, s)
        every = [*views, *samples_of]
        sizes = [v.size for v in views] + [dilated_size(height, width, s)] * len(samples_of)
        calls = plan_calls(sizes, self.view_batch)
        n_local = len(views)
        negligible_local = bool(torch.all(1 - c2 <= NEGLIGIBLE_WEIGHT))
        negligible_global = bool(torch.all(torch.as_tensor(c2) <= NEGLIGIBLE_WEIGHT)) and not negligible_local

        def needed(members: list[int]) -> bool:
            # Whole calls only: a smaller batch would change the rounding of the views left in it.
            return not all(negligible_local if i < n_local else negligible_global for i in members)

        kept = [members for members in calls if needed(members)]
        self.skipped_calls += len(calls) - len(kept)
        self.skipped_views += sum(map(len, calls)) - sum(map(len, kept))
        use_global = any(i >= n_local for members in kept for i in members)

        pad = jitter_range(self.window, self.stride)
        padded = F.pad(xw, (pad, pad, pad, pad))
        if use_global:
            zg, blurred = blurred_frame(xw, s, blur_sigma)
            samples = split_samples(blurred, s)
            denoised_samples = torch.zeros_like(samples)  # a skipped sample's prediction counts as zero
        local_sum = torch.zeros_like(padded)

        def model_input(i: int) -> torch.Tensor:
            if i < n_local:
                v = views[i]
                return padded[..., v.h0:v.h1, v.w0:v.w1]
            j = i - n_local
            return samples[j * rows:(j + 1) * rows]

        for index, members in enumerate(kept):
            call = ModelCall(index, len(kept), tuple(every[i] for i in members), rows, sizes[members[0]], sigma_t)
            if self.before_call is not None:
                self.before_call(call)
            inputs = torch.cat([model_input(i) for i in members]).to(x.dtype)
            args = (self.view_cond(extra_args, call.crops) if self.view_cond is not None
                    else repeat_rows(extra_args, rows, len(members)))
            out = self.denoiser(inputs, repeat_rows(sigma, rows, len(members)), **args).to(work)
            self.model_calls += 1
            self.model_views += len(members)
            for i, part in zip(members, out.split(rows)):
                if i < n_local:
                    v = views[i]
                    local_sum[..., v.h0:v.h1, v.w0:v.w1] += part
                else:
                    j = i - n_local
                    denoised_samples[j * rows:(j + 1) * rows] = part
        self.evaluations += 1

        # A skipped path counts as zero, so the formula (and its rounding) is the same as with it.
        local = local_sum[..., pad:pad + height, pad:pad + width] / count
        global_ = global_prediction(zg, blurred, denoised_samples, s, height, width) if use_global \
            else torch.zeros_like(local)
        return ((1 - c2) * local + c2 * global_).to(x.dtype)
