"""The ScaleCrafter engine's settings (the WebUI-facing object is ``lib_hires.settings.ScaleFusionSettings``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

NDCFG_MODES = ("auto", "on", "off")
MULTIPLIER_RANGE = (0.1, 4.0)


class SettingsError(ValueError):
    """A setting is out of range; the message names the field and what is allowed."""


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingsError(f"{name} must be a number; got {value!r}")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise SettingsError(f"{name} must be in {bracket}{low:g}, {high:g}]; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ScaleCrafterSettings:
    enabled: bool = False
    dilation_multiplier: float = 1.0   # scales every preset factor; a layer at or below 1 stays vanilla
    stop_at: float | None = None       # fraction of the noise schedule after which convs are vanilla; None: preset
    noise_damped_cfg: str = "auto"     # "auto": where the preset has it; "on": always (vanilla base if none); "off"
    dispersion: bool = False           # 5x5 dispersed kernels on the preset's dispersion layers

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise SettingsError(f"enabled must be true or false; got {self.enabled!r}")
        _number("dilation_multiplier", self.dilation_multiplier, *MULTIPLIER_RANGE)
        if self.stop_at is not None:
            _number("stop_at", self.stop_at, 0.0, 1.0, low_open=True)
        if self.noise_damped_cfg not in NDCFG_MODES:
            raise SettingsError(f"noise_damped_cfg must be one of {', '.join(NDCFG_MODES)}; got {self.noise_damped_cfg!r}")
        if not isinstance(self.dispersion, bool):
            raise SettingsError(f"dispersion must be true or false; got {self.dispersion!r}")
        object.__setattr__(self, "dilation_multiplier", float(self.dilation_multiplier))
        if self.stop_at is not None:
            object.__setattr__(self, "stop_at", float(self.stop_at))
