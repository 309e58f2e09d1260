"""X/Y/Z plot axes for every ScaleFusion setting.

An axis value lands in ``p.scalefusion_overrides``; the Script applies it over the accordion's values.
A value on any axis other than "Enabled" turns the extension on for that cell.
"""
from __future__ import annotations

from lib_hires.settings import FIELDS, Field, SettingsError

OVERRIDES_ATTR = "scalefusion_overrides"


def _apply(f: Field):
    def apply(p, x, xs):
        overrides = dict(getattr(p, OVERRIDES_ATTR, None) or {})
        overrides[f.name] = f.from_text(x) if isinstance(x, str) else f.check(x)
        setattr(p, OVERRIDES_ATTR, overrides)
    return apply


def _confirm(f: Field):
    def confirm(p, xs):
        for x in xs:
            try:
                f.from_text(x) if isinstance(x, str) else f.check(x)
            except SettingsError as error:
                raise ValueError(f"[ScaleFusion] {f.label}: {error}") from None
    return confirm


def axis_options(xyz_grid) -> list:
    axes = []
    for f in FIELDS:
        if f.kind in ("bool", "choice"):
            choices = (lambda: ["True", "False"]) if f.kind == "bool" else (lambda f=f: list(f.choices))
            value_type = str
        elif f.kind == "stages":  # X/Y/Z reads its values as CSV: quote each plan, e.g. "2, 4", auto
            choices, value_type = None, str
        else:
            choices, value_type = None, int if f.kind == "int" else float
        label = "[ScaleFusion] Enabled" if f.name == "enabled" else \
            f"[ScaleFusion] {f.method + ' ' if f.method else ''}{f.label}"
        axes.append(xyz_grid.AxisOption(label, value_type, _apply(f), confirm=_confirm(f), choices=choices))
    return axes


def overrides_of(p) -> dict:
    overrides = dict(getattr(p, OVERRIDES_ATTR, None) or {})
    if overrides and "enabled" not in overrides:
        overrides["enabled"] = True
    return overrides


def register(scripts_data) -> None:
    """``script_callbacks.on_before_ui`` callback: adds the axes once the XYZ script is loaded."""
    modules = [x.module for x in scripts_data if x.script_class.__module__ == "xyz_grid.py"]
    if not modules:
        return
    xyz_grid = modules[0]
    known = {a.label for a in xyz_grid.axis_options}
    xyz_grid.axis_options.extend(a for a in axis_options(xyz_grid) if a.label not in known)
