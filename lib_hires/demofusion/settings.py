"""DemoFusion's knobs, validated once, and their defaults per model family."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..scalecrafter.layout import training_size


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}; got {value!r}")
    return value


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value > high or value < low or (low_open and value == low):
        raise ValueError(f"{name} must be a number in {'(' if low_open else '['}{low:g}, {high:g}]; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DemoFusionSettings:
    window: int = 64               # local view side in latent px: the model's training latent
    stride: int = 32               # latent px between views; the official default is window / 2
    view_batch: int = 16           # views per model call (each view carries every batch row)
    cosine_scale_1: float = 3.0    # skip-residual decay: larger lets go of the upsampled latent sooner
    cosine_scale_2: float = 1.0    # dilated-path decay: larger gives the local views the lead sooner
    cosine_scale_3: float = 1.0    # blur decay
    sigma: float = 0.8             # Gaussian sigma scale (official README 0.8, signature default 1.0)
    jitter: bool = True            # random view offsets each step

    def __post_init__(self):
        _integer("window", self.window, 8, 1024)
        if self.window % 8:
            raise ValueError(f"window must be a multiple of 8 latent px (the UNet's granularity); got {self.window}")
        _integer("stride", self.stride, 1, self.window)
        _integer("view_batch", self.view_batch, 1, 256)
        for name in ("cosine_scale_1", "cosine_scale_2", "cosine_scale_3"):
            object.__setattr__(self, name, _number(name, getattr(self, name), 0.0, 10.0))
        object.__setattr__(self, "sigma", _number("sigma", self.sigma, 0.0, 10.0, low_open=True))
        if not isinstance(self.jitter, bool):
            raise ValueError(f"jitter must be true or false; got {self.jitter!r}")


def default_settings(family: str, *, v_prediction: bool = False) -> DemoFusionSettings:
    """Window = the training latent (SD1 64, SD2 64 or 96 for the 768-px v model, SDXL 128), stride half of it,
    and the official α = 3/1/1, sigma 0.8, view batch 16, jitter on."""
    window = training_size(family, v_prediction=v_prediction) // 8
    return DemoFusionSettings(window=window, stride=window // 2)
