"""The ScaleFusion accordion: components built from the settings table, plus the live plan summary."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Callable

import gradio as gr

from lib_hires import ui_layout
from lib_hires.settings import FIELDS, TITLE, Field, ScaleFusionSettings, SettingsError

from modules.ui_components import FormHTML, InputAccordion

SLIDER_LIMIT, RAISED_LIMIT = ui_layout.SLIDER_LIMIT, ui_layout.RAISED_LIMIT


@dataclass
class Accordion:
    components: list = field(default_factory=list)     # in FIELDS order: the Script's args
    by_name: dict = field(default_factory=dict)
    header: object = None
    details: object = None
    size_events: bool = False   # the Width/Height events are connected


def component_for(f: Field) -> tuple[type, dict]:
    """The gradio class and its arguments for a field (the accordion and the settings page both use it)."""
    if f.kind == "bool":
        return gr.Checkbox, {}
    if f.kind == "choice":
        return gr.Radio, {"choices": list(f.choices)}
    if f.kind in ("int", "float"):
        low = 0 if f.auto else f.low
        if low is not None and f.high is not None and math.isfinite(low) and math.isfinite(f.high):
            return gr.Slider, {"minimum": low, "maximum": f.high,
                               "step": f.step or (1 if f.kind == "int" else 0.01)}
        return gr.Number, {"precision": 0 if f.kind == "int" else None}
    return gr.Textbox, {"max_lines": 1}


def _component(f: Field, value, elem_id: Callable[[str], str], visible: bool):
    # No ``info`` paragraph: the help is the hover hint (javascript/scalefusion-hints.js), as in the WebUI's own
    # accordions, which keeps every row one control high.
    cls, args = component_for(f)
    return cls(label=f.label, value=f.to_ui(value), elem_id=elem_id(ui_layout.elem_suffix(f)), visible=visible,
               **args)


def _min_width(value: int) -> dict:
    """``min_width`` for an HTML component: gradio 3 (A1111) takes it on every component; gradio 4's HTML (Forge)
    has no such argument (Forge warns and drops it)."""
    return {"min_width": value} if int(gr.__version__.split(".")[0]) < 4 else {}


def build(defaults: ScaleFusionSettings, elem_id: Callable[[str], str]) -> Accordion:
    """Creates the components inside the current gradio Blocks context (called again by the API: no state).

    The layout comes from ``lib_hires.ui_layout``; every element id is ``elem_id(suffix)`` with a suffix from
    ``ui_layout.elem_suffixes()``. gradio 3.41 writes an HTML component's elem_id on two nested elements, so
    the two HTML parts carry none and sit in a column that holds the id.
    """
    acc = Accordion()
    method_rows = []

    def rows(section):
        for row in ui_layout.rows(section):
            shown = row.method in (None, defaults.method)
            with gr.Row(elem_id=elem_id(row.elem_suffix), elem_classes=["scalefusion-row"],
                        visible=shown) as container:
                for f in row.fields:
                    acc.by_name[f.name] = _component(f, getattr(defaults, f.name), elem_id,
                                                     f.method in (None, defaults.method))
            if row.method is not None:
                method_rows.append((row.method, container))

    with InputAccordion(defaults.enabled, label=TITLE, elem_id=elem_id(ui_layout.ENABLE)) as enabled:
        with enabled.extra():
            with gr.Column(min_width=0, elem_id=elem_id(ui_layout.HEADER)):
                acc.header = FormHTML(value="", elem_classes=["scalefusion-header"], **_min_width(0))
        acc.by_name["enabled"] = enabled
        rows(ui_layout.MAIN)
        with gr.Accordion(ui_layout.LABELS[ui_layout.ADVANCED], open=False, elem_id=elem_id(ui_layout.ADVANCED)):
            rows(ui_layout.ADVANCED)
        with gr.Accordion(ui_layout.LABELS[ui_layout.PLAN], open=False, elem_id=elem_id(ui_layout.PLAN)):
            with gr.Column(elem_id=elem_id(ui_layout.DETAILS)):
                acc.details = gr.HTML(value="", elem_classes=["scalefusion-details"])
    acc.components = [acc.by_name[f.name] for f in FIELDS]

    method_fields = [f for f in FIELDS if f.method is not None]
    outputs = [acc.by_name[f.name] for f in method_fields] + [container for _, container in method_rows]

    def show_method(method):
        return [gr.update(visible=f.method == method) for f in method_fields] + \
               [gr.update(visible=m == method) for m, _ in method_rows]

    acc.by_name["method"].change(fn=show_method, inputs=[acc.by_name["method"]], outputs=outputs,
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
