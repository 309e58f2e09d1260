"""The ScaleFusion section of the WebUI settings: defaults for every setting of the accordion."""
from __future__ import annotations

import gradio as gr

from lib_hires.settings import FIELDS, Field, ScaleFusionSettings, SettingsError
from lib_hires.vae_tiles import GROUPNORM_CHOICES

from . import decoding

SECTION = ("scalefusion", "ScaleFusion")


def option_key(f: Field) -> str:
    return f"scalefusion_default_{f.name}"


def _component(f: Field):
    if f.kind == "bool":
        return gr.Checkbox, {}
    if f.kind == "choice":
        return gr.Radio, {"choices": list(f.choices)}
    return gr.Slider, {"minimum": 0 if f.auto else f.low, "maximum": f.high,
                       "step": f.step or (1 if f.kind == "int" else 0.01)}


def register(shared) -> None:
    """``script_callbacks.on_ui_settings`` callback."""
    for f in FIELDS[1:]:  # "enabled" stays a per-generation choice
        component, args = _component(f)
        label = f"Default: {f.label}" + (f" ({f.method})" if f.method else "")
        shared.opts.add_option(option_key(f), shared.OptionInfo(f.to_ui(f.default), label, component, args,
                                                                section=SECTION).info(f.help))
    shared.opts.add_option(decoding.TILE_OPTION, shared.OptionInfo(
        decoding.DEFAULT_TILE, "Decode tile size (latent px, 0 = automatic)", gr.Slider,
        {"minimum": 0, "maximum": 256, "step": 8}, section=SECTION).info(
        "outputs larger than one tile are decoded tile by tile, unless Tiled VAE is on; automatic: 128 (1024 px), "
        "smaller when free memory is short"))
    shared.opts.add_option(decoding.GROUPNORM_OPTION, shared.OptionInfo(
        GROUPNORM_CHOICES[0], "Tiled VAE: GroupNorm statistics", gr.Radio, {"choices": list(GROUPNORM_CHOICES)},
        section=SECTION).info(
        "whole image: tiles are normalised alike, no tonal steps between them, at the cost of host memory for the "
        "tiles waiting between layers (about two full-size 128-channel activations); per tile: the lighter old way"))


def defaults(opts) -> ScaleFusionSettings:
    """The user's defaults; a saved value that is no longer valid falls back to the built-in default."""
    values = {}
    for f in FIELDS[1:]:
        try:
            values[f.name] = f.check(opts.data.get(option_key(f), f.to_ui(f.default)))
        except SettingsError:
            values[f.name] = f.default
    return ScaleFusionSettings(**values)
