"""The ScaleFusion section of the WebUI settings: defaults for every setting of the accordion."""
from __future__ import annotations

from typing import Any, Mapping

from lib_hires.settings import FIELDS, TITLE, Field, ScaleFusionSettings, SettingsError
from lib_hires.vae import GROUPNORM_CHOICES

from . import decoding

SECTION = ("scalefusion", "ScaleFusion")


def option_key(f: Field) -> str:
    return f"scalefusion_default_{f.name}"


def register(shared) -> None:
    """``script_callbacks.on_ui_settings`` callback."""
    import gradio as gr

    from . import ui  # gradio and the WebUI's components: only where the settings page is built
    for f in FIELDS[1:]:  # "enabled" stays a per-generation choice
        component, args = ui.component_for(f)
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


def defaults(opts, override_settings: Mapping[str, Any] | None = None) -> ScaleFusionSettings:
    """The user's defaults, with a request's ``override_settings`` of ours applied over them.

    A saved value that is no longer valid falls back to the built-in default; an invalid override is an
    error naming it (the request asked for it explicitly).
    """
    values = {}
    for f in FIELDS[1:]:
        try:
            values[f.name] = f.check(opts.data.get(option_key(f), f.to_ui(f.default)))
        except SettingsError:
            values[f.name] = f.default
        key = option_key(f)
        if override_settings and key in override_settings:
            try:
                values[f.name] = f.check(override_settings[key])
            except SettingsError as error:
                raise SettingsError(f"{TITLE}: override_settings[{key!r}]: "
                                    f"{str(error).removeprefix(TITLE + ': ')}") from None
    return ScaleFusionSettings(**values)
