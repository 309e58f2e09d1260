"""Where every setting sits in the accordion, its element id and its hover hint, derived from the settings table.

The accordion (its header checkbox is the "enabled" field) holds the first rows, then a closed "Advanced"
accordion, then a closed "Plan" accordion. A field's ``advanced`` and ``row`` attributes place it, so a field
added to ``FIELDS`` lands in a defined place by construction. A row may mix fields of both methods and common
ones: a method's fields are shown only while that method is chosen, and a row holding only one method's fields
hides with them. No gradio here: the WebUI adapter (lib_hires/webui/ui.py) builds the components from this, and
``tools.ui_hints`` writes javascript/scalefusion-hints.js from it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .settings import FIELDS, Field

MAIN, ADVANCED = "main", "advanced"
SECTIONS = (MAIN, ADVANCED)

# Element ids are f"script_{tab}_scalefusion_{suffix}" (the WebUI's Script.elem_id), tab = txt2img | img2img.
ELEM_PREFIX = "script_{tab}_scalefusion_"
ENABLE = "enable"          # the InputAccordion; the WebUI adds "-checkbox" (hidden), "-visible-checkbox", "-extra"
HEADER = "header"          # the one-line summary in the accordion's title bar
PLAN = "plan"              # the closed accordion with the plan text
DETAILS = "details"        # the plan text
ACCORDION_HINTS = {
    ADVANCED: "settings most generations leave as they are",
    PLAN: "what will happen, in detail: every layer group's dilation (ScaleCrafter) or every stage's views "
          "(DemoFusion), for the current Width/Height and model",
}
LABELS = {ADVANCED: "Advanced", PLAN: "Plan"}
SLIDER_LIMIT = 2048     # the WebUI's Width/Height maximum
RAISED_LIMIT = 4096     # while the extension is on


@dataclass(frozen=True)
class Row:
    section: str
    index: int
    fields: tuple[Field, ...]

    @property
    def elem_suffix(self) -> str:
        return f"{self.section}_row_{self.index}"

    @property
    def method(self) -> str | None:
        """The method all its fields belong to (the row hides with them), or None: always shown."""
        methods = {f.method for f in self.fields}
        return methods.pop() if len(methods) == 1 else None


def elem_suffix(f: Field) -> str:
    return ENABLE if f is FIELDS[0] else f.name


def rows(section: str) -> tuple[Row, ...]:
    """The section's rows: numbered rows in order of their numbers, then one row per field without a number."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}; known: {SECTIONS}")
    fields = [f for f in FIELDS[1:] if f.advanced == (section == ADVANCED)]
    numbers = sorted({f.row for f in fields if f.row is not None})
    groups = [tuple(f for f in fields if f.row == n) for n in numbers]
    groups += [(f,) for f in fields if f.row is None]
    return tuple(Row(section, i, group) for i, group in enumerate(groups))


def elem_suffixes() -> list[str]:
    """Every element id suffix the accordion sets, in build order (a test checks they are unique)."""
    out = [ENABLE, HEADER]
    for section in SECTIONS:
        if section == ADVANCED:
            out.append(ADVANCED)
        for row in rows(section):
            out.append(row.elem_suffix)
            out += [elem_suffix(f) for f in row.fields]
    return out + [PLAN, DETAILS]


def hints() -> dict[str, str]:
    """Hover hint per element id suffix: every setting's help string from the table, and the two accordions."""
    return {**{elem_suffix(f): f.help for f in FIELDS}, **ACCORDION_HINTS}
