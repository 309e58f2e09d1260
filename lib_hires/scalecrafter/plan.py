"""A ScaleCrafter plan: preset + user settings + UNet layout -> which conv gets which factor at timestep t."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Mapping

from .layout import TRAINING_SIZE, UNetLayout, canonical_layout, check_family, expand
from .presets import DISPERSION_KEYS, Preset, preset_for
from .redilated_conv import MAX_FACTOR
from .schedule import OFFICIAL_STEPS, last_active_timestep, official_step, scheduled_factor
from .settings import ScaleCrafterSettings, SettingsError

SIZE_RANGE = (64, 8192)


def _check_size(name: str, value) -> int:
    low, high = SIZE_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high or value % 8:
        raise SettingsError(f"{name} must be a multiple of 8 from {low} to {high} pixels; got {value!r}")
    return value


@dataclass(frozen=True)
class ScaleCrafterPlan:
    family: str
    width: int
    height: int
    train_size: int
    settings: ScaleCrafterSettings
    preset: Preset
    layout: UNetLayout
    main: Mapping[str, float]            # path -> factor before the time schedule
    tau: float
    progressive: bool
    base: Mapping[str, float] | None     # noise-damped CFG base set (may be empty: vanilla base)
    base_tau: float
    dispersed: frozenset[str]
    notes: tuple[str, ...] = field(default=())

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    @property
    def hooked_paths(self) -> frozenset[str]:
        return frozenset(self.main) | frozenset(self.base or ())

    @property
    def is_noop(self) -> bool:
        return not self.main and self.base is None

    def main_at(self, t: float) -> dict[str, float]:
        return self._scheduled(self.main, self.tau, official_step(t))

    def base_at(self, t: float) -> dict[str, float] | None:
        """Factors of the noise-damped CFG base pass at ``t``; None when noise damping is off at ``t``."""
        step = official_step(t)
        if self.base is None or step >= self.base_tau:
            return None
        return self._scheduled(self.base, self.base_tau, step)

    def dispersed_among(self, factors: Mapping[str, float]) -> frozenset[str]:
        return self.dispersed.intersection(factors)

    def _scheduled(self, factors: Mapping[str, float], tau: float, step: int) -> dict[str, float]:
        out = {}
        for path, d in factors.items():
            f = scheduled_factor(d, step, tau, self.progressive)
            if f > 1.0:
                out[path] = f
        return out

    def describe(self) -> str:
        group_of = {s.path: s.group for s in self.layout.sites}

        def summary(factors: Mapping[str, float]) -> str:
            groups: dict[str, set[float]] = {}
            for path, d in factors.items():
                groups.setdefault(group_of[path], set()).add(round(d, 3))
            ordered = sorted(groups.items(), key=lambda item: _GROUP_ORDER.get(item[0], len(_GROUP_ORDER)))
            return ", ".join(f"{g} {'/'.join(f'{d:g}' for d in sorted(ds))}" for g, ds in ordered) or "none"

        def until(tau: float) -> str:
            t = last_active_timestep(tau)
            return f"while t >= {t}, official steps < {tau:g} of 50" if t is not None else "never active"

        lines = [f"ScaleCrafter plan: {self.family} {self.width}x{self.height} "
                 f"(trained at {self.train_size}px, latent {self.latent_size[1]}x{self.latent_size[0]}) - {self.preset.source}"]
        if not self.main:
            lines.append("  dilation: none")
        else:
            mode = "progressive" if self.progressive else "fixed"
            lines.append(f"  dilation ({mode}, {until(self.tau)}): {summary(self.main)}  [{len(self.main)} convs]")
        if self.base is None:
            lines.append("  noise-damped CFG: off")
        else:
            lines.append(f"  noise-damped CFG base ({until(self.base_tau)}): {summary(self.base)}  [{len(self.base)} convs]")
        lines.append(f"  dispersion: {f'{len(self.dispersed)} convs' if self.dispersed else 'off'}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


_GROUP_ORDER = {g: i for i, g in enumerate(["D0", "D1", "D2", "D3", "M", "U0", "U1", "U2", "U3"])}


def _apply_multiplier(factors: Mapping[str, float], multiplier: float, notes: list[str]) -> dict[str, float]:
    out = {}
    for key, d in factors.items():
        scaled = d * multiplier
        if scaled > MAX_FACTOR:
            notes.append(f"{key} factor {scaled:g} capped at {MAX_FACTOR:g}")
            scaled = MAX_FACTOR
        if scaled > 1.0:
            out[key] = scaled
    return out


def build_plan(family: str, width: int, height: int, settings: ScaleCrafterSettings | None = None, *,
               layout: UNetLayout | None = None, train_size: int | None = None) -> ScaleCrafterPlan:
    """Resolves the preset for ``width`` x ``height`` pixels and applies the user's overrides.

    ``layout`` defaults to the family's published UNet; the WebUI passes the layout scanned from the
    loaded model so non-standard UNets get the factors of the sites they really have.
    """
    check_family(family)
    _check_size("width", width)
    _check_size("height", height)
    if train_size is not None and (isinstance(train_size, bool) or not isinstance(train_size, int)
                                   or not 64 <= train_size <= 4096):
        raise SettingsError(f"train_size must be an integer from 64 to 4096 pixels; got {train_size!r}")
    settings = settings or ScaleCrafterSettings(enabled=True)
    train_size = train_size or TRAINING_SIZE[family]
    layout = layout or canonical_layout(family)
    preset = preset_for(family, width, height, train_size)
    notes: list[str] = []

    main_keys = _apply_multiplier(preset.main, settings.dilation_multiplier, notes)
    tau = preset.tau if settings.stop_at is None else settings.stop_at * OFFICIAL_STEPS
    base_keys, base_tau = None, 0.0
    mode = settings.noise_damped_cfg
    if mode == "auto" and preset.base is not None and preset.base_tau > 0:
        base_keys, base_tau = _apply_multiplier(preset.base, settings.dilation_multiplier, notes), preset.base_tau
    elif mode == "on" and main_keys:
        if preset.base is not None:
            base_keys = _apply_multiplier(preset.base, settings.dilation_multiplier, notes)
            base_tau = preset.base_tau or preset.tau
        else:
            base_keys, base_tau = {}, preset.tau  # the paper's form: base prediction from the vanilla UNet
    if base_keys is not None and settings.stop_at is not None and preset.tau > 0:
        base_tau = base_tau * tau / preset.tau

    main = expand(layout, main_keys)
    base = expand(layout, base_keys) if base_keys is not None else None
    dispersed = frozenset()
    if settings.dispersion:
        dispersed = frozenset(s.path for s in layout.sites if s.key in DISPERSION_KEYS[family]) & (
            frozenset(main) | frozenset(base or ()))
        if not dispersed:
            notes.append("dispersion requested, but none of the dispersion layers is dilated at this size")
    if not main:
        notes.append("nothing is dilated at this size")
    return ScaleCrafterPlan(family, width, height, train_size, settings, preset, layout, main, tau,
                            preset.progressive and bool(main), base, base_tau, dispersed, tuple(notes))


@functools.lru_cache(maxsize=256)
def _default_plan(family: str, width: int, height: int, train_size: int | None) -> ScaleCrafterPlan:
    return build_plan(family, width, height, train_size=train_size)


def resolve_dilations(family: str, width: int, height: int, t: float, *, ndcfg: bool = False,
                      train_size: int | None = None) -> dict[str, float]:
    """{conv path relative to the UNet: effective dilation factor} at timestep ``t`` (0..999).

    The main (guided) pass by default; with ``ndcfg=True`` the noise-damped CFG base pass, which is
    empty when noise damping is not active at ``t``. ``train_size`` defaults to the size the official
    presets were tuned at (sd1 512, sd2 512, sdxl 1024); a 768-px v-prediction SD2 model passes 768.
    """
    plan = _default_plan(family, width, height, train_size)
    if ndcfg:
        return plan.base_at(t) or {}
    return plan.main_at(t)
