"""The accordion's layout, element ids and hover hints, all derived from the settings table."""
import json
import re
from pathlib import Path

import pytest

from lib_hires import ui_layout
from lib_hires.settings import DF, FIELDS, METHODS, SC, Field
from lib_hires.ui_layout import ADVANCED, MAIN, rows
from tools import ui_hints

ROOT = Path(__file__).resolve().parents[1]


def names(section, method=None):
    """The fields a user sees in a section with ``method`` chosen (all of them for None)."""
    return [[f.name for f in row.fields if method is None or f.method in (None, method)] for row in rows(section)]


def test_every_field_is_placed_exactly_once():
    placed = ["enabled"]  # the accordion's own checkbox
    for section in (MAIN, ADVANCED):
        placed += [name for row in names(section) for name in row]
    assert sorted(placed) == sorted(f.name for f in FIELDS) and len(placed) == len(set(placed))


def test_first_rows_hold_what_every_generation_needs_and_advanced_the_rest():
    main = {name for row in names(MAIN) for name in row}
    assert {"method", "dilation_multiplier", "noise_damped_cfg", "dispersion", "passes", "scale"} <= main
    advanced = {name for row in names(ADVANCED) for name in row}
    assert {"native_size", "stop_at", "stride", "view_batch", "cosine_scale_1", "cosine_scale_2", "cosine_scale_3",
            "sigma", "jitter", "save_stages", "low_vram", "redilation"} <= advanced
    assert names(MAIN)[0][0] == "method"
    for method in METHODS:  # compact: at most two rows of at most three controls before "Advanced"
        shown = [row for row in names(MAIN, method) if row]
        assert len(shown) <= 2 and all(len(row) <= 3 for row in shown), (method, shown)


def test_rows_of_one_method_hide_with_it_and_mixed_rows_stay():
    for section in (MAIN, ADVANCED):
        for row in rows(section):
            methods = {f.method for f in row.fields}
            assert row.method == (methods.pop() if len(methods) == 1 else None)
    assert rows(MAIN)[0].method is None  # "Method" sits in the first row for both methods
    # the second row mixes both methods' first-row controls; each shows with its own method only
    assert names(MAIN, SC)[1] == ["noise_damped_cfg", "dispersion", "passes"]
    assert names(MAIN, DF)[1] == ["stage_strength", "stages", "later_steps"]
    assert all(row.method == DF for row in rows(ADVANCED)[1:])


def test_a_new_field_lands_where_its_attributes_say(monkeypatch):
    extra = [Field("placed", "Placed", "DemoFusion placed", "float", 1.0, 0.0, 1.0, method=DF, help="h",
                   advanced=False, row=1),
             Field("unplaced", "Unplaced", "x", "bool", False, method=SC, help="h")]
    monkeypatch.setattr(ui_layout, "FIELDS", FIELDS + tuple(extra))
    assert names(MAIN, DF)[1] == ["stage_strength", "stages", "later_steps", "placed"]  # in table order
    assert names(MAIN, SC)[1] == ["noise_damped_cfg", "dispersion", "passes"]
    # without placement attributes: a row of its own at the end of Advanced
    assert names(ADVANCED)[-1] == ["unplaced"] and rows(ADVANCED)[-1].method == SC
    assert len(set(ui_layout.elem_suffixes())) == len(ui_layout.elem_suffixes())


def test_element_ids_are_unique_and_name_every_field():
    suffixes = ui_layout.elem_suffixes()
    assert len(suffixes) == len(set(suffixes))
    assert {ui_layout.elem_suffix(f) for f in FIELDS} <= set(suffixes)
    # the ids the WebUI derives from the accordion's own id must not collide either
    derived = {f"{ui_layout.ENABLE}-{part}" for part in ("checkbox", "visible-checkbox", "extra")}
    assert not derived & set(suffixes)
    assert all(re.fullmatch(r"[a-z0-9_]+", s) for s in suffixes)


def test_hints_cover_every_control_with_the_settings_help():
    hints = ui_layout.hints()
    for f in FIELDS:
        assert hints[ui_layout.elem_suffix(f)] == f.help
    assert set(hints) <= set(ui_layout.elem_suffixes())
    assert hints[ADVANCED] and hints[ui_layout.PLAN]


def test_hints_script_is_in_sync_with_the_settings_table():
    path = ROOT / "javascript" / "scalefusion-hints.js"
    text = path.read_text()
    assert text == ui_hints.script(), "run `python -m tools.ui_hints` to regenerate javascript/scalefusion-hints.js"
    # read the table back from the JavaScript itself, not from the generator
    table = json.loads(re.search(r"const hints = (\{.*?\n    \});", text, re.S).group(1))
    assert table == {**{ui_layout.elem_suffix(f): f.help for f in FIELDS}, **ui_layout.ACCORDION_HINTS}
    assert "`script_${tab}_scalefusion_${suffix}`" in text and '["txt2img", "img2img"]' in text


def test_unknown_section_is_refused():
    with pytest.raises(ValueError, match="unknown section 'top'"):
        rows("top")


def test_placement_attributes_default_to_advanced():
    plain = Field("x", "X", "x", "bool", False)
    assert plain.advanced and plain.row is None
