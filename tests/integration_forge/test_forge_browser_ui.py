"""The accordion in Forge's gradio 4 page, in a real browser (Debian's chromium headless through Playwright).

Skipped without the ``playwright`` package in this interpreter or without /usr/bin/chromium (no browser is
downloaded). Uses the harness's default Forge server, which serves the UI beside the API.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lib_hires import ui_layout
from lib_hires.ui_layout import RAISED_LIMIT, SLIDER_LIMIT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TAB = "txt2img"
ID = ui_layout.ELEM_PREFIX.format(tab=TAB)


@pytest.fixture(scope="module")
def page(forge_servers):
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed in this interpreter")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1600, "height": 1800}).new_page()
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(("pageerror", str(error), error.stack or "")))
        page.on("console", lambda msg: page.errors.append(("console", msg.text, msg.location.get("url", "")))
                if msg.type == "error" else None)
        page.goto(forge_servers.get().url + "/", timeout=180_000)
        page.locator(f"#{ID}{ui_layout.ENABLE}").wait_for(state="visible", timeout=180_000)
        page.locator(f"#{ID}{ui_layout.ENABLE}-visible-checkbox").wait_for(state="attached", timeout=60_000)
        yield page
        browser.close()


def ours(errors):
    return [e for e in errors if re.search(r"scalefusion", " ".join(e), re.I)]


def el(page, suffix):
    return page.locator(f"#{ID}{suffix}")


def test_every_id_once_and_every_hint_in_forge(page, forge):
    ids = page.evaluate("() => Array.from(document.querySelectorAll('[id]'), e => e.id)"
                        ".filter(id => /^script_(txt2img|img2img)_scalefusion_/.test(id))")
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    for tab in ("txt2img", "img2img"):
        prefix = ui_layout.ELEM_PREFIX.format(tab=tab)
        assert {prefix + s for s in ui_layout.elem_suffixes()} <= set(ids), tab
    page.wait_for_function(f"() => document.getElementById('{ID}sigma').title !== ''", timeout=30_000)
    for suffix, hint in ui_layout.hints().items():
        title = el(page, suffix).evaluate("e => (e.querySelector(':scope > .label-wrap') || e).title")
        assert title == hint, suffix
    assert not ours(page.errors), ours(page.errors)


def test_enable_raises_the_size_limit_and_methods_switch_their_controls(page, forge):
    width = page.locator(f"#{TAB}_width input[type=range]")
    assert float(width.get_attribute("max")) == SLIDER_LIMIT
    box = page.locator(f"#{ID}{ui_layout.ENABLE}-visible-checkbox")
    if not box.is_checked():
        el(page, ui_layout.ENABLE).locator(":scope > .label-wrap").click()  # opens and ticks, as a user does
    page.wait_for_function(f"() => document.getElementById('{ID}{ui_layout.ENABLE}-visible-checkbox').checked",
                           timeout=30_000)
    page.wait_for_function(f"() => document.querySelector('#{TAB}_width input[type=range]').max == "
                           f"'{RAISED_LIMIT}'", timeout=60_000)
    assert el(page, "dilation_multiplier").is_visible() and not el(page, "scale").is_visible()
    el(page, "method").get_by_text("DemoFusion", exact=True).click()
    page.wait_for_function(f"() => document.getElementById('{ID}scale').offsetParent !== null", timeout=30_000)
    assert not el(page, "dilation_multiplier").is_visible() and el(page, "stages").is_visible()
    el(page, "method").get_by_text("ScaleCrafter", exact=True).click()
    page.wait_for_function(f"() => document.getElementById('{ID}scale').offsetParent === null", timeout=30_000)
    assert el(page, "dilation_multiplier").is_visible()
    assert not ours(page.errors), ours(page.errors)
    log = forge.log_tail(10 ** 7)
    assert not re.search(r"Traceback[\s\S]{0,2000}scalefusion", log, re.I), log[-3000:]
