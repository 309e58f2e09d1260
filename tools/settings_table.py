"""Prints the README's table of ScaleFusion settings, generated from lib_hires.settings.FIELDS.

    python -m tools.settings_table          # the Markdown table (tests check the README holds it)
"""
from __future__ import annotations

import sys

from lib_hires.settings import FIELDS, Field


def _type(f: Field) -> str:
    if f.kind == "choice":
        return "string: " + " / ".join(f'`"{c}"`' for c in f.choices)
    if f.kind == "bool":
        return "bool"
    if f.kind == "stages":
        return 'string of comma-separated scales (increasing, each <= 2x the one before, the last = `scale`), or `""` = automatic'
    bracket = "(" if f.low_open else "["
    text = f"{'int' if f.kind == 'int' else 'number'} {bracket}{f.low:g}, {f.high:g}]"
    return text + (f", or `null`/`0` = {f.auto}" if f.auto else "")


def _default(f: Field) -> str:
    if f.default is None:
        return f"`null` ({f.auto})"
    if isinstance(f.default, bool):
        return f"`{str(f.default).lower()}`"
    if isinstance(f.default, str):
        return f'`"{f.default}"`'
    return f"`{f.default:g}`"


def table() -> str:
    rows = ["| # | key | type and range | default | infotext key | what it does |",
            "|---|---|---|---|---|---|"]
    for i, f in enumerate(FIELDS):
        scope = f"{f.method}: " if f.method else ""
        rows.append(f"| {i} | `{f.name}` | {_type(f)} | {_default(f)} | `{f.infotext}` | {scope}{f.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
