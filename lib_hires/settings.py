"""What the user asks of the extension: one typed object for the UI, the API and the infotext.

Every setting is declared once in ``FIELDS`` (name, type, range, default, infotext key, help). The
order of ``FIELDS`` is the order of the WebUI components, hence of the positional API arguments. The
same :class:`ScaleFusionSettings` object is built from positional UI/API values, from an API dict, or
from a pasted infotext, and validation happens only in its ``__post_init__``: a bad value raises a
:class:`SettingsError` whose message names the field and what it accepts.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .demofusion.plan import check_stage_factors, format_stage_factors, parse_stage_factors
from .scalecrafter.settings import MULTIPLIER_RANGE, NDCFG_MODES, ScaleCrafterSettings, SettingsError

TITLE = "ScaleFusion"
METHODS = ("ScaleCrafter", "DemoFusion")
PASSES = ("both", "first", "hires")
DEMOFUSION_REDILATION = ("off", "first stage", "global path", "both")
SCALE_RANGE = (1.5, 4.0)

__all__ = ["FIELDS", "Field", "METHODS", "ScaleFusionSettings", "SettingsError", "TITLE", "pasted_ui_value"]


@dataclass(frozen=True)
class Field:
    name: str                       # API key, dataclass field
    label: str                      # UI label
    infotext: str                   # infotext key
    kind: str                       # "bool" | "choice" | "float" | "int" | "stages" (scales as text)
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    method: str | None = None       # the method it belongs to; None: common to both
    auto: str | None = None         # the meaning of None ("preset", "auto"); the UI sends 0 for it
    low_open: bool = False
    step: float | None = None       # UI slider step
    help: str = ""
    # Place in the accordion (lib_hires/ui_layout.py): the first rows, or the closed "Advanced" accordion;
    # fields with the same place and row sit side by side in FIELDS order, a field without a row gets a row
    # of its own after the numbered ones. A new field lands in Advanced unless it says otherwise.
    advanced: bool = True
    row: int | None = None

    def allowed(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if self.kind == "stages":
            return ('a string of comma-separated stage scales, e.g. "2, 4": increasing, each at most 2x the one '
                    'before (stage 1 is x1), the last equal to scale; or "" for automatic')
        bracket = "(" if self.low_open else "["
        what = "an integer" if self.kind == "int" else "a number"
        text = f"{what} in {bracket}{self.low:g}, {self.high:g}]"
        return text + (f", or 0 / null for {self.auto}" if self.auto else "")

    def check(self, value: Any) -> Any:
        """The normalised value, or a SettingsError naming this field."""
        def fail():
            return SettingsError(f"{TITLE}: {self.name} must be {self.allowed()}; got {value!r}")

        if self.kind == "stages":  # "" (or null, or "auto" as the infotext writes it) is the automatic plan
            if value is None or (isinstance(value, str) and value.strip().lower() == self.auto):
                return ""
            try:
                return format_stage_factors(parse_stage_factors(value))
            except ValueError as error:
                raise SettingsError(f"{TITLE}: {self.name} must be {self.allowed()}; got {value!r}: {error}") from None
        if self.auto and (value is None or (_is_number(value) and value == 0)):
            return None
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise fail()
            return value
        if self.kind == "choice":
            if isinstance(value, str):
                for choice in self.choices:
                    if value.strip().lower() == choice.lower():
                        return choice
            raise fail()
        if not _is_number(value):
            raise fail()
        if self.kind == "int":
            if value != int(value):
                raise fail()
            value = int(value)
        if value > self.high or value < self.low or (self.low_open and value == self.low):
            raise fail()
        return value if self.kind == "int" else float(value)

    def to_ui(self, value: Any) -> Any:
        """The component value; its Python type matters (the API casts pasted values to it)."""
        if self.kind == "stages":
            return value or ""
        if value is None and self.auto:
            return 0 if self.kind == "int" else 0.0
        return value

    def to_text(self, value: Any) -> str:
        if value is None or (self.kind == "stages" and value == ""):
            return self.auto
        return f"{value:g}" if isinstance(value, float) else str(value)

    def from_text(self, text: Any) -> Any:
        """Infotext values arrive as strings; a malformed one raises a SettingsError."""
        if not isinstance(text, str):
            return self.check(text)
        text = text.strip()
        if self.kind == "stages":
            return self.check(text)
        if self.auto and text.lower() == self.auto:
            return None
        if self.kind == "bool":
            if text.lower() not in ("true", "false"):
                raise SettingsError(f"{TITLE}: infotext {self.infotext!r} must be True or False; got {text!r}")
            return text.lower() == "true"
        if self.kind == "choice":
            return self.check(text)
        try:
            number = float(text)
        except ValueError:
            raise SettingsError(f"{TITLE}: infotext {self.infotext!r} must be a number; got {text!r}") from None
        return self.check(number)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


SC, DF = METHODS
FIELDS: tuple[Field, ...] = (
    Field("enabled", "ScaleFusion", TITLE, "bool", False,
          help="turn the extension on for this generation"),
    Field("method", "Method", TITLE, "choice", SC, choices=METHODS,
          help="ScaleCrafter: one pass at the full size with re-dilated convolutions; DemoFusion: progressive "
               "upscaling from the set size, with local views and dilated global sampling", advanced=False, row=0),
    Field("native_size", "Native size (px, 0 = from the model)", "ScaleFusion native size", "int", None, 128, 2048,
          auto="auto", step=64,
          help="the resolution the checkpoint was trained at: sizes are planned relative to it (SD1 512, SD2 512 or "
               "768, SDXL 1024); set it for fine-tunes trained at another size", row=0),
    # ScaleCrafter
    Field("dilation_multiplier", "Dilation multiplier", "ScaleCrafter multiplier", "float", 1.0,
          *MULTIPLIER_RANGE, method=SC, step=0.05,
          help="multiplies every dilation factor of the preset; a layer at or below 1 stays vanilla",
          advanced=False, row=0),
    Field("stop_at", "Stop at (0 = preset)", "ScaleCrafter stop at", "float", None, 0.0, 1.0, method=SC,
          auto="preset", low_open=True, step=0.01,
          help="fraction of the noise schedule after which every convolution is vanilla again", row=0),
    Field("noise_damped_cfg", "Noise-damped CFG", "ScaleCrafter noise-damped CFG", "choice", "auto",
          choices=NDCFG_MODES, method=SC,
          help="auto: where the preset uses it (large sizes); on: always; off: plain CFG", advanced=False, row=1),
    Field("dispersion", "Dispersion (5x5 kernels)", "ScaleCrafter dispersion", "bool", False, method=SC,
          help="dispersed 5x5 kernels on the official dispersion layers while they are dilated", advanced=False, row=1),
    Field("passes", "With Hires. fix, apply to", "ScaleCrafter passes", "choice", "both", choices=PASSES,
          method=SC, help="which pass gets ScaleCrafter when Hires. fix is on; each pass gets its own plan",
          advanced=False, row=1),
    # DemoFusion
    Field("scale", "Scale", "DemoFusion scale", "float", 2.0, *SCALE_RANGE, method=DF, step=0.05,
          help="final size = Width/Height x scale; Width/Height are the first stage", advanced=False, row=0),
    Field("stride", "Stride (latent px, 0 = window/2)", "DemoFusion stride", "int", None, 8, 256, method=DF,
          auto="auto", step=8, help="distance between local views; must not exceed the model's window", row=0),
    Field("view_batch", "View batch", "DemoFusion view batch", "int", 16, 1, 64, method=DF, step=1,
          help="views per UNet call (each counts cond + uncond rows)", row=0),
    Field("cosine_scale_1", "Cosine scale 1 (skip residual)", "DemoFusion c1", "float", 3.0, 0.0, 10.0, method=DF,
          step=0.1, help="decay of the skip residual; lower keeps closer to the previous stage", row=1),
    Field("cosine_scale_2", "Cosine scale 2 (dilated sampling)", "DemoFusion c2", "float", 1.0, 0.0, 10.0,
          method=DF, step=0.1, help="decay of the dilated global path; lower: less repetition, more grain", row=1),
    Field("cosine_scale_3", "Cosine scale 3 (Gaussian blur)", "DemoFusion c3", "float", 1.0, 0.0, 10.0,
          method=DF, step=0.1, help="decay of the blur of the global path; lower: less grain, smoother", row=1),
    Field("sigma", "Blur sigma", "DemoFusion sigma", "float", 0.8, 0.01, 2.0, method=DF, step=0.01,
          help="standard deviation of the Gaussian blur at the start of sampling", row=2),
    Field("jitter", "Random jitter of views", "DemoFusion jitter", "bool", True, method=DF,
          help="shift local views randomly every step (reproducibly: the same settings give the same views)", row=3),
    Field("save_stages", "Save every stage", "DemoFusion save stages", "bool", False, method=DF,
          help="also save the image of every intermediate stage", row=3),
    Field("low_vram", "Low VRAM (same image)", "DemoFusion low VRAM", "bool", False, method=DF,
          help="one view per UNet call: slower, much less memory, identical result", row=3),
    Field("redilation", "ScaleCrafter inside DemoFusion", "DemoFusion re-dilation", "choice", "off",
          choices=DEMOFUSION_REDILATION, method=DF,
          help="re-dilate the UNet (ScaleCrafter preset) in the first stage and/or the global path", row=2),
    # DemoFusion speed levers (appended: earlier positional API calls keep their meaning)
    Field("stage_strength", "Stage strength", "DemoFusion stage strength", "float", 1.0, 0.0, 1.0, method=DF,
          low_open=True, step=0.01,
          help="each later stage starts at the noise level of this denoising strength, as the Hires. fix pass "
               "does (1 = the official full schedule); in img2img the lower of this and Denoising strength",
          advanced=False, row=1),
    Field("stages", "Stage plan (scales, empty = automatic)", "DemoFusion stages", "stages", "", method=DF,
          auto="auto",
          help='the scales of the later stages, e.g. "2, 4" or "1.5, 2.5, 3.2": increasing, each at most 2x the '
               "one before, the last equal to Scale; fewer stages, fewer UNet calls",
          advanced=False, row=1),
    Field("later_steps", "Steps of later stages (0 = same)", "DemoFusion later steps", "int", 0, 0, 150,
          method=DF, step=1,
          help="sampling steps of every later stage, as Hires steps (0 = the first stage's steps); with stage "
               "strength d, d x steps runs the official schedule's last steps only",
          advanced=False, row=1),
)
FIELD_BY_NAME = {f.name: f for f in FIELDS}


@dataclass(frozen=True)
class ScaleFusionSettings:
    enabled: bool = False
    method: str = SC
    native_size: int | None = None
    dilation_multiplier: float = 1.0
    stop_at: float | None = None
    noise_damped_cfg: str = "auto"
    dispersion: bool = False
    passes: str = "both"
    scale: float = 2.0
    stride: int | None = None
    view_batch: int = 16
    cosine_scale_1: float = 3.0
    cosine_scale_2: float = 1.0
    cosine_scale_3: float = 1.0
    sigma: float = 0.8
    jitter: bool = True
    save_stages: bool = False
    low_vram: bool = False
    redilation: str = "off"
    stage_strength: float = 1.0
    stages: str = ""
    later_steps: int = 0

    def __post_init__(self):
        for f in FIELDS:
            object.__setattr__(self, f.name, f.check(getattr(self, f.name)))
        if self.method == DF:
            try:
                check_stage_factors(self.stage_factors, self.scale)
            except ValueError as error:
                raise SettingsError(f"{TITLE}: stages must be {FIELD_BY_NAME['stages'].allowed()}; got "
                                    f"{self.stages!r}: {error}") from None

    @property
    def stage_factors(self) -> tuple[float, ...]:
        """The user's stage plan (stages 2..), ``()`` for the automatic one."""
        return parse_stage_factors(self.stages)

    # construction -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], defaults: "ScaleFusionSettings | None" = None) -> "ScaleFusionSettings":
        """The API's dict form; keys missing from ``data`` keep ``defaults``."""
        unknown = sorted(set(data) - FIELD_BY_NAME.keys())
        if unknown:
            raise SettingsError(f"{TITLE}: unknown key(s) {', '.join(map(repr, unknown))}; "
                                f"known keys: {', '.join(FIELD_BY_NAME)}")
        return dataclasses.replace(defaults or cls(), **data)

    @classmethod
    def from_script_args(cls, args: Sequence[Any], defaults: "ScaleFusionSettings | None" = None
                         ) -> "ScaleFusionSettings":
        """The Script's ``*args``: a dict in ``args[0]`` (API), or the positional values in UI order."""
        if args and isinstance(args[0], Mapping):
            return cls.from_dict(args[0], defaults)
        if len(args) > len(FIELDS):
            raise SettingsError(f"{TITLE}: expected at most {len(FIELDS)} positional arguments "
                                f"({', '.join(FIELD_BY_NAME)}); got {len(args)}")
        values = {}
        for position, (f, value) in enumerate(zip(FIELDS, args)):
            try:
                values[f.name] = f.check(value)
            except SettingsError as error:
                raise SettingsError(f"{error} (positional argument {position})") from None
        return dataclasses.replace(defaults or cls(), **values)

    @classmethod
    def from_infotext(cls, params: Mapping[str, Any]) -> "ScaleFusionSettings":
        """Settings from pasted generation parameters; without our key the extension is off."""
        method = params.get(TITLE)
        if method is None:
            return cls(enabled=False)
        values = {"enabled": True, "method": FIELD_BY_NAME["method"].from_text(method)}
        for f in FIELDS[2:]:
            if f.infotext in params:
                values[f.name] = f.from_text(params[f.infotext])
        return cls(**values)

    def replace(self, **changes: Any) -> "ScaleFusionSettings":
        return dataclasses.replace(self, **changes)

    # serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def ui_values(self) -> list[Any]:
        return [f.to_ui(getattr(self, f.name)) for f in FIELDS]

    def fields_in_use(self) -> tuple[Field, ...]:
        """The settings after "enabled" and "method" that matter for the chosen method."""
        return tuple(f for f in FIELDS[2:] if f.method in (None, self.method))

    def to_infotext(self) -> dict[str, str]:
        """Generation parameters: the method under ``ScaleFusion`` plus that method's settings."""
        if not self.enabled:
            return {}
        out = {TITLE: self.method}
        out.update({f.infotext: f.to_text(getattr(self, f.name)) for f in self.fields_in_use()})
        return out

    # what the engines take ----------------------------------------------------------------------
    def scalecrafter(self) -> ScaleCrafterSettings:
        return ScaleCrafterSettings(enabled=True, dilation_multiplier=self.dilation_multiplier,
                                    stop_at=self.stop_at, noise_damped_cfg=self.noise_damped_cfg,
                                    dispersion=self.dispersion)

    def applies_to_pass(self, is_hires_pass: bool) -> bool:
        return self.passes == "both" or self.passes == ("hires" if is_hires_pass else "first")


def pasted_ui_value(field: Field, params: Mapping[str, Any]) -> Any:
    """The value a pasted infotext gives ``field``'s component, or None to leave the component as it is.

    With our key present, every setting the infotext of that method carries gets a value, read or default: the
    writer (``to_infotext``) records all of them, so one that is missing did not exist when the infotext was
    written (``stage_strength``, ``stages``, ``later_steps``, and any setting added later) and the image was made
    with its default. The other method's settings are never written, so their absence says nothing and they
    keep the UI's values; without our key only "enabled" changes (off). Raises :class:`SettingsError` for a bad
    pasted value."""
    if field.name == "enabled":
        return TITLE in params
    if TITLE not in params:
        return None
    settings = ScaleFusionSettings.from_infotext(params)
    if field.name != "method" and field not in settings.fields_in_use() and field.infotext not in params:
        return None
    return field.to_ui(getattr(settings, field.name))
