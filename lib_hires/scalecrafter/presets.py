"""ScaleCrafter presets: the 16 official configurations and the rules for every other size.

A preset gives a dilation factor per site key (``"D2.res"``, ``"D2.down"``, ``"U0.up"``, ...; see
``layout.py``), so one table serves any UNet of the family. Sizes are taken relative to the training
size: ``r_long``/``r_short`` are the long/short side divided by it.

Official anchors (ratios; the SD tables were tuned on 512-px models, SDXL on 1024 px):

* (2, 2) and (2.5, 2.5): one factor on every level except the outermost (SD) or on M + U0 (SDXL);
* (4, 4) and the 2:1 panorama (4, 2): factors graded by depth (4 innermost, 2 outermost), progressive
  decay over time and a noise-damped CFG base set.

The SDXL official files also name ``down_blocks.3.*``, ``down_blocks.2.downsamplers`` and
``up_blocks.2.upsamplers``, which do not exist in SDXL and were ignored by the official code; the
tables below hold only what actually ran.

Any other size (``rule_preset``): scale ``s = min(r_long, 2 r_short)``. The long side decides, as in the
official 2:1 panoramas, which reuse the 4x-per-side factors; the cap keeps the dilated receptive field
within twice the short side for thin strips. Between the square anchors at s = 1 (vanilla), 2, 2.5 and 4
every factor and tau is interpolated linearly (fractional factors); above 4 the 4x factors are scaled
by s/4. Progressive decay and noise-damped CFG switch on from s^2 = 8, the area ratio of the smallest
official size that used them (the 2:1 panoramas; for squares s^2 is the area ratio).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from .layout import KINDS, TRAINING_SIZE, check_family


@dataclass(frozen=True)
class Preset:
    main: Mapping[str, float]              # site key -> factor for the guided (cond + uncond) pass
    tau: float                             # active while official step < tau
    progressive: bool
    base: Mapping[str, float] | None = None  # noise-damped CFG base set; None: plain CFG
    base_tau: float = 0.0
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "main", MappingProxyType(dict(self.main)))
        if self.base is not None:
            object.__setattr__(self, "base", MappingProxyType(dict(self.base)))


def _groups(factor: float, *groups: str) -> dict[str, float]:
    return {f"{g}.{kind}": float(factor) for g in groups for kind in KINDS}


def _graded(**groups: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, factor in groups.items():
        group, _, kind = name.partition("_")
        out.update({f"{group}.{kind}": float(factor)} if kind else _groups(factor, group))
    return out


_SD_INNER = ("D1", "D2", "D3", "M", "U0", "U1", "U2")
_SD_16X = _graded(D1=2, D2=3, D3=4, M=4, U0=4, U1=3, U2=2)
_SD_16X_BASE = _graded(D2=3, D3=4, M=4, U0=4, U1=3)
_SD2_16X = _graded(D2_res=3, D2_down=4, D3=4, M=4, U0=4, U1=4, U2=3, U3=2)
_SD2_16X_BASE = _graded(D2_res=3, D2_down=4, D3=4, M=4, U0=4, U1=4, U2=3)
_SDXL_BASE = _groups(2, "M", "U0")

# (family, r_long, r_short) -> preset. Sizes are orientation-free: dilation is isotropic.
OFFICIAL: dict[tuple[str, float, float], Preset] = {
    ("sd1", 2.0, 2.0): Preset(_groups(2, *_SD_INNER), 30, False, source="official sd1.5_1024x1024"),
    ("sd1", 2.5, 2.5): Preset(_groups(2.5, *_SD_INNER), 35, False, source="official sd1.5_1280x1280"),
    ("sd1", 4.0, 2.0): Preset(_SD_16X, 35, True, _SD_16X_BASE, 35, source="official sd1.5_2048x1024"),
    ("sd1", 4.0, 4.0): Preset(_SD_16X, 35, True, _SD_16X_BASE, 35, source="official sd1.5_2048x2048"),
    ("sd2", 2.0, 2.0): Preset(_groups(2, *_SD_INNER), 20, False, source="official sd2.1_1024x1024"),
    ("sd2", 2.5, 2.5): Preset(_groups(2.5, *_SD_INNER), 30, False, source="official sd2.1_1280x1280"),
    # Ships an ndcfg file but ndcfg_tau 0: the base set never runs.
    ("sd2", 4.0, 2.0): Preset(_SD_16X, 37, True, _SD2_16X_BASE, 0, source="official sd2.1_2048x1024"),
    ("sd2", 4.0, 4.0): Preset(_SD2_16X, 37, True, _SD2_16X_BASE, 37, source="official sd2.1_2048x2048"),
    ("sdxl", 2.0, 2.0): Preset(_groups(2, "M", "U0"), 30, False, source="official sdxl_2048x2048"),
    ("sdxl", 2.5, 2.5): Preset(_groups(2.5, "M", "U0"), 30, False, source="official sdxl_2560x2560"),
    ("sdxl", 4.0, 2.0): Preset(_graded(D2=3, M=4, U0=4, U1=3, U2=2), 35, True, _SDXL_BASE, 35,
                               source="official sdxl_4096x2048"),
    ("sdxl", 4.0, 4.0): Preset(_graded(D2=4, M=4, U0=4, U1=3, U2=2), 35, True, _SDXL_BASE, 35,
                               source="official sdxl_4096x4096"),
}

# Convs the official *_disperse configs disperse (only 16x sizes have one); used at every size when
# the user turns dispersion on, restricted to convs dilated at that moment.
DISPERSION_KEYS = {
    "sd1": frozenset({"D2.down"} | set(_groups(1, "D3", "M", "U0", "U1"))),
    "sd2": frozenset({"D2.down"} | set(_groups(1, "D3", "M", "U0", "U1"))),
    "sdxl": frozenset(_groups(1, "D2", "M", "U0")),
}

LARGE_SCALE = 8.0 ** 0.5  # s from which progressive decay and noise-damped CFG apply
_SQUARE_ANCHORS = (2.0, 2.5, 4.0)
_RATIO_TOLERANCE = 1e-6


def size_ratios(width: int, height: int, train_size: int) -> tuple[float, float]:
    return max(width, height) / train_size, min(width, height) / train_size


def rule_scale(r_long: float, r_short: float) -> float:
    return min(r_long, 2.0 * r_short)


def official_preset(family: str, r_long: float, r_short: float) -> Preset | None:
    for (fam, long_, short), preset in OFFICIAL.items():
        if fam == family and abs(long_ - r_long) < _RATIO_TOLERANCE and abs(short - r_short) < _RATIO_TOLERANCE:
            return preset
    return None


def _lerp_sets(a: Mapping[str, float], b: Mapping[str, float], u: float) -> dict[str, float]:
    keys = sorted(set(a) | set(b))
    mixed = {k: a.get(k, 1.0) + (b.get(k, 1.0) - a.get(k, 1.0)) * u for k in keys}
    return {k: v for k, v in mixed.items() if v > 1.0}


def _scaled(factors: Mapping[str, float], scale: float) -> dict[str, float]:
    return {k: v * scale for k, v in factors.items()}


def rule_preset(family: str, r_long: float, r_short: float) -> Preset:
    """The preset for a size that is not one of the official ones (see the module docstring)."""
    s = rule_scale(r_long, r_short)
    large = s >= LARGE_SCALE - _RATIO_TOLERANCE
    label = f"rule s={s:.3g} (long side {r_long:.3g}x, short side {r_short:.3g}x)"
    if s <= 1.0 + _RATIO_TOLERANCE:
        return Preset({}, 0, False, source=f"{label}: at or below the training size, no dilation")
    anchors = {a: OFFICIAL[(family, a, a)] for a in _SQUARE_ANCHORS}
    top = anchors[_SQUARE_ANCHORS[-1]]
    if s >= _SQUARE_ANCHORS[-1]:
        k = s / _SQUARE_ANCHORS[-1]
        return Preset(_scaled(top.main, k), top.tau, True, _scaled(top.base, k), top.base_tau,
                      source=f"{label}: 4x-per-side factors scaled by {k:.3g}")
    lower, upper = 1.0, _SQUARE_ANCHORS[0]
    for a, b in zip(_SQUARE_ANCHORS, _SQUARE_ANCHORS[1:]):
        if a <= s <= b:
            lower, upper = a, b
    u = (s - lower) / (upper - lower)
    hi = anchors[upper]
    lo = anchors[lower] if lower > 1.0 else Preset({}, hi.tau, False)
    main = _lerp_sets(lo.main, hi.main, u)
    tau = lo.tau + (hi.tau - lo.tau) * u
    base = base_tau = None
    if large:
        # An anchor without a base set behaves as base == main (noise damping then changes nothing),
        # so blending towards the next anchor's base set is continuous in s.
        lo_base = lo.base if lo.base is not None else lo.main
        hi_base = hi.base if hi.base is not None else hi.main
        base = _lerp_sets(lo_base, hi_base, u)
        lo_tau = lo.base_tau if lo.base is not None else lo.tau
        hi_tau = hi.base_tau if hi.base is not None else hi.tau
        base_tau = lo_tau + (hi_tau - lo_tau) * u
    return Preset(main, tau, large, base, base_tau or 0.0,
                  source=f"{label}: interpolated {u:.2f} of the way from {lower:g}x to {upper:g}x")


def preset_for(family: str, width: int, height: int, train_size: int | None = None) -> Preset:
    """Official preset when the size ratio matches one, else the rule-based preset."""
    check_family(family)
    train_size = train_size or TRAINING_SIZE[family]
    r_long, r_short = size_ratios(width, height, train_size)
    official = official_preset(family, r_long, r_short)
    if official is not None:
        if train_size != TRAINING_SIZE[family]:
            return replace(official, source=f"{official.source} (same ratio to a {train_size}-px model)")
        return official
    return rule_preset(family, r_long, r_short)
