"""The stage plan: from the base image and a scale factor to the sizes and dilations of every stage.

The official pipeline runs integer stages ×1, ×2, …, ×S of the base (training-size) image, each with
dilation s = its stage index, so every dilated sample has the base size. Here the base is any
``width x height`` (in the WebUI, the user's size: it is the stage-1 image) and the scale ``F`` may
be fractional (1 <= F <= 8, 1.5 to 4 being the useful range):

* **Stages.** ``S = ceil(F)`` stages at factors ``f_k = 1 + (k - 1) (F - 1) / (S - 1)``: evenly spaced
  from ×1 to ×F. This is the fewest stages in which no stage grows by more than one base size (the
  official step), and for integer F it is exactly ×1, ×2, …, ×F. (×1 → ×2 → ×2.5 would spend a
  whole extra pass on a 1.25× step; ×1 → ×2.5 would ask one stage to grow by 1.5 base sizes.)
* **Dilation.** ``s_k`` = the integer nearest to ``f_k`` on a log scale (``s + 1`` once ``f >= sqrt(s (s + 1))``),
  so dilated samples stay between ``sqrt((s-1)/s)`` and ``sqrt((s+1)/s)`` of the base size (0.71–1.22
  at s = 2, 0.82–1.15 at s = 3), near the size the model composed the base image at, which is what
  the dilated path is for. For integer factors ``s_k = f_k`` as officially. One s for both axes, as
  in the official code, so the samples keep the image's aspect ratio.
* **Sizes** (per side, base latent ``L``). The final stage is ``F L`` rounded to a multiple of 8 latent
  px (64 px): the user's target. An intermediate stage is ``f_k L`` rounded to a multiple of ``8 s_k``:
  its size is free, and then its dilated samples are whole multiples of 8 latent px, as the official
  ones are. The final stage's samples are ``ceil(L_F / s)``, which need not be a multiple of 8 for
  fractional F; the WebUI's UNet resizes its skip connections for such sizes.
* Stage 1 is the base itself (plain sampling); its dilation 1 is what an img2img ×1 pass would use.
* **A plan of the user's own** (``factors``, e.g. ``2, 4``): the stages run at those factors instead,
  with the same dilations and size rounding. Fewer stages save their model calls; the limit
  (:func:`check_stage_factors`) is a step of at most ``MAX_STAGE_STEP`` = 2x per side, the largest step
  of the official schedule (x1 -> x2): there a view of the new stage, one window, covers half a
  window of the previous stage per side, which is as coarse a start as the official method asks
  the model to refine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .batching import plan_calls
from .views import VAE_SCALE, dilated_size, grid_size

SCALE_RANGE = (1.0, 8.0)
LATENT_MULTIPLE = 8
MAX_STAGE_STEP = 2.0   # a stage at most doubles the previous one per side (the official x1 -> x2)
FACTOR_TOLERANCE = 1e-6


def parse_stage_factors(text: str) -> tuple[float, ...]:
    """``"2, 4"`` -> ``(2.0, 4.0)``; ``""`` -> ``()`` (the automatic plan). Raises ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string of comma-separated scales; got {text!r}")
    text = text.strip()
    if not text:
        return ()
    factors = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a number (write the scales comma-separated, "
                             f"e.g. \"2, 4\")") from None
        if not math.isfinite(value):
            raise ValueError(f"{part.strip()!r} is not a finite number")
        factors.append(value)
    return tuple(factors)


def check_stage_factors(factors: tuple[float, ...], scale: float) -> None:
    """Stage 2.. factors of a user plan: increasing from above x1, each at most ``MAX_STAGE_STEP`` times
    the one before (stage 1 is x1), the last equal to ``scale``. Raises ValueError saying which rule."""
    if not factors:
        return
    previous = 1.0
    for value in factors:
        if value <= previous + FACTOR_TOLERANCE:
            raise ValueError(f"the scales must increase from above 1 (stage 1 is x1); {value:g} follows "
                             f"x{previous:g}")
        if value > MAX_STAGE_STEP * previous + FACTOR_TOLERANCE:
            raise ValueError(f"each stage may be at most {MAX_STAGE_STEP:g}x the one before (x{previous:g} "
                             f"allows up to x{MAX_STAGE_STEP * previous:g}); got x{value:g}")
        previous = value
    if abs(factors[-1] - scale) > FACTOR_TOLERANCE:
        raise ValueError(f"the last scale must equal Scale ({scale:g}); got {factors[-1]:g}")


def format_stage_factors(factors: tuple[float, ...]) -> str:
    return ", ".join(f"{f:g}" for f in factors)


def stage_factors(scale: float) -> list[float]:
    count = max(1, math.ceil(scale - 1e-9))
    if count == 1:
        return [1.0]
    return [1.0 + k * (scale - 1.0) / (count - 1) for k in range(count)]


def stage_dilation(factor: float) -> int:
    """The integer nearest to ``factor`` on a log scale (at least 1)."""
    s = max(1, math.floor(factor + 1e-9))
    return s + 1 if factor * factor >= s * (s + 1) - 1e-9 else s


def _round_to(value: float, multiple: int) -> int:
    return multiple * max(1, math.floor(value / multiple + 0.5))


@dataclass(frozen=True)
class Stage:
    index: int      # 1-based; stage 1 is the base image
    factor: float   # nominal scale against the base
    width: int      # pixels
    height: int
    dilation: int   # s of the dilated path (1 for stage 1)

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // VAE_SCALE, self.width // VAE_SCALE

    @property
    def sample_size(self) -> tuple[int, int]:
        """Latent size of each dilated sample."""
        return dilated_size(*self.latent_size, self.dilation)

    def local_grid(self, window: int, stride: int) -> tuple[int, int]:
        return grid_size(*self.latent_size, window, stride)

    def views_per_step(self, window: int, stride: int) -> int:
        """Model inputs per step and row: local views + s² dilated samples (1 for the plain stage 1)."""
        if self.index == 1:
            return 1
        n_h, n_w = self.local_grid(window, stride)
        return n_h * n_w + self.dilation ** 2

    def model_calls_per_step(self, window: int, stride: int, view_batch: int) -> int:
        if self.index == 1:
            return 1
        n_h, n_w = self.local_grid(window, stride)
        h, w = self.latent_size
        local = (min(window, h), min(window, w))
        return len(plan_calls([local] * (n_h * n_w) + [self.sample_size] * self.dilation ** 2, view_batch))


@dataclass(frozen=True)
class StagePlan:
    base_width: int
    base_height: int
    scale: float
    window: int
    stride: int
    stages: tuple[Stage, ...]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def describe(self, view_batch: int = 16) -> str:
        f = self.final
        lines = [f"DemoFusion plan: {self.base_width}x{self.base_height} x{self.scale:g} -> {f.width}x{f.height} "
                 f"(window {self.window}, stride {self.stride} latent px, view batch {view_batch})",
                 "  stage  factor  pixels       latent    s  sample   local views  views/step  calls/step"]
        for st in self.stages:
            h, w = st.latent_size
            if st.index == 1:
                detail = f"{'-':>2} {'-':<8} {'-':<12} {1:>10}  {1:>10}  (plain sampling)"
            else:
                n_h, n_w = st.local_grid(self.window, self.stride)
                sh, sw = st.sample_size
                detail = (f"{st.dilation:>2} {f'{sw}x{sh}':<8} {f'{n_w}x{n_h}={n_h * n_w}':<12} "
                          f"{st.views_per_step(self.window, self.stride):>10}  "
                          f"{st.model_calls_per_step(self.window, self.stride, view_batch):>10}")
            lines.append(f"  {st.index:>5}  {st.factor:6.3g}  {f'{st.width}x{st.height}':<12} {f'{w}x{h}':<9} {detail}")
        return "\n".join(lines)


def plan_stages(width: int, height: int, scale: float, *, window: int, stride: int | None = None,
                factors: tuple[float, ...] = ()) -> StagePlan:
    """Stages from a ``width x height`` base (pixels, multiples of 8) to ``scale`` times it; ``factors``
    (stages 2.., checked by :func:`check_stage_factors`) replace the automatic ones when given."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < VAE_SCALE or value % VAE_SCALE:
            raise ValueError(f"{name} must be a positive multiple of {VAE_SCALE} pixels; got {value!r}")
    low, high = SCALE_RANGE
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not low <= scale <= high:
        raise ValueError(f"scale must be a number from {low:g} to {high:g}; got {scale!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer (latent px); got {window!r}")
    stride = window // 2 if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window:
        raise ValueError(f"stride must be an integer from 1 to the window {window}; got {stride!r}")

    base_h, base_w = height // VAE_SCALE, width // VAE_SCALE
    check_stage_factors(tuple(factors), float(scale))
    factors = [1.0, *factors[:-1], float(scale)] if factors else stage_factors(float(scale))
    stages = [Stage(1, 1.0, width, height, 1)]
    for index, factor in enumerate(factors[1:], start=2):
        s = stage_dilation(factor)
        multiple = LATENT_MULTIPLE if index == len(factors) else LATENT_MULTIPLE * s
        h, w = _round_to(factor * base_h, multiple), _round_to(factor * base_w, multiple)
        stages.append(Stage(index, factor, VAE_SCALE * w, VAE_SCALE * h, s))
    return StagePlan(width, height, float(scale), window, stride, tuple(stages))
