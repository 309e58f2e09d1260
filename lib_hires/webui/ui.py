"""The ScaleFusion accordion: components built from the settings table, plus the live plan summary."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Callable

import gradio as gr

from lib_hires.settings import FIELDS, METHODS, Field, ScaleFusionSettings, SettingsError, ui_rows

from modules.ui_components import FormHTML, InputAccordion

SLIDER_LIMIT = 2048     # the WebUI's Width/Height maximum
RAISED_LIMIT = 4096


@dataclass
class Accordion:
    components: list = field(default_factory=list)     # in FIELDS order: the Script's args
    by_name: dict = field(default_factory=dict)
    header: object = None
    details: object = None
    size_events: bool = False   # the Width/Height events are connected


def _component(f: Field, value, elem_id: Callable[[str], str]):
    common = dict(label=f.label, value=f.to_ui(value), elem_id=elem_id(f.name), info=f.help)
    if f.kind == "bool":
        return gr.Checkbox(**common)
    if f.kind == "choice":
        return gr.Radio(choices=list(f.choices), **common)
    if f.kind == "stages":
        return gr.Textbox(placeholder="automatic", lines=1, **common)
    low = 0 if f.auto else f.low
    return gr.Slider(minimum=low, maximum=f.high, step=f.step or (1 if f.kind == "int" else 0.01), **common)


def build(defaults: ScaleFusionSettings, elem_id: Callable[[str], str]) -> Accordion:
    """Creates the components inside the current gradio Blocks context (called again by the API: no state)."""
    acc = Accordion()

    def rows(method):
        for row in ui_rows(method):
            with gr.Row():
                for f in row:
                    acc.by_name[f.name] = _component(f, getattr(defaults, f.name), elem_id)

    with InputAccordion(defaults.enabled, label="ScaleFusion", elem_id=elem_id("enable")) as enabled:
        with enabled.extra():
            acc.header = FormHTML(value="", min_width=0, elem_id=elem_id("header"), elem_classes=["scalefusion-header"])
        acc.by_name["enabled"] = enabled
        rows(None)
        groups = {}
        for method in METHODS:
            with gr.Group(visible=defaults.method == method, elem_id=elem_id(f"{method.lower()}_settings")) as group:
                groups[method] = group
                rows(method)
        acc.details = gr.HTML(value="", elem_id=elem_id("details"), elem_classes=["scalefusion-details"])
    acc.components = [acc.by_name[f.name] for f in FIELDS]
    acc.by_name["method"].change(fn=lambda m: [gr.update(visible=m == method) for method in METHODS],
                                 inputs=[acc.by_name["method"]], outputs=[groups[m] for m in METHODS],
                                 show_progress=False)
    for component in acc.components:  # so a new default never hides behind a stale ui-config.json value
        component.do_not_save_to_config = True
    return acc


def connect_summary(acc: Accordion, width, height, summarize: Callable[[ScaleFusionSettings, int, int], tuple]):
    """Keeps the header and details in sync with the settings and the image size."""
    inputs = [*acc.components, width, height]

    def update(*values):
        *settings_values, w, h = values
        try:
            settings = ScaleFusionSettings.from_script_args(settings_values)
        except SettingsError as error:
            return html.escape(str(error)), ""
        header, details = summarize(settings, int(w), int(h))
        return header, details

    for component in inputs:
        component.change(fn=update, inputs=inputs, outputs=[acc.header, acc.details], show_progress=False)


def connect_size_limit(enabled, width, height):
    """Raises the Width/Height maximum to 4096 while the extension is on."""
    def update(on, w, h):
        limit = RAISED_LIMIT if on or max(w, h) > SLIDER_LIMIT else SLIDER_LIMIT
        return gr.update(maximum=limit), gr.update(maximum=limit)

    enabled.change(fn=update, inputs=[enabled, width, height], outputs=[width, height], show_progress=False)
