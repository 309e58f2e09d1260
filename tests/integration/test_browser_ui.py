"""The accordion in a real browser: a WebUI server in a subprocess, Debian's chromium driven headless by Playwright.

Skipped without WEBUI_DIR (see conftest.py), without the ``playwright`` package in the WebUI's venv, or without
/usr/bin/chromium (no browser is downloaded). ``SCREENSHOT_DIR`` (optional): where to write the README's
screenshots of the accordion (both methods, Advanced closed and open), palette-quantised PNGs.

    WEBUI_DIR=/path/to/webui WEBUI_DATA_DIR=/path/to/data SCREENSHOT_DIR=docs/images \\
        /path/to/webui/venv/bin/python -m pytest tests/integration/test_browser_ui.py
"""
from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lib_hires import ui_layout
from lib_hires.settings import FIELDS, ScaleFusionSettings
from lib_hires.ui_layout import RAISED_LIMIT, SLIDER_LIMIT
from tests.integration.conftest import FLAGS, REPO, WEBUI_DATA_DIR, prepare_fixtures, webui_dirs

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT = 600
TAB = "txt2img"
ID = ui_layout.ELEM_PREFIX.format(tab=TAB)
MAX_SCREENSHOT_BYTES = 150_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A WebUI serving the UI on 127.0.0.1 with this checkout among its extensions; yields (url, log path)."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed in this interpreter")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    root, data = webui_dirs()
    if any(part.startswith(".") for part in data.parts):
        pytest.fail(f"{data}: the WebUI's /file= route refuses paths with a folder starting with a dot")
    linked = [p.resolve() for p in (data / "extensions").iterdir() if (p / "lib_hires").is_dir()]
    if REPO not in linked:
        pytest.fail(f"{data / 'extensions'} does not hold this checkout ({REPO}); it has {linked}")
    checkpoint = prepare_fixtures(root, data).sd1
    port = _free_port()
    log_path = tmp_path_factory.mktemp("webui") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    data_flags = ["--data-dir", str(data)] if WEBUI_DATA_DIR else []
    command = [sys.executable, "launch.py", *FLAGS, *data_flags, "--ckpt", str(checkpoint), "--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"the WebUI exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the WebUI did not answer within {START_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Page:
    """The txt2img page with the errors it reports."""

    def __init__(self, page):
        self.page = page
        self.errors = []
        page.on("pageerror", lambda error: self.errors.append(("pageerror", str(error), error.stack or "")))
        page.on("console", lambda msg: self.errors.append(("console", msg.text, msg.location.get("url", "")))
                if msg.type == "error" else None)

    def el(self, suffix):
        return self.page.locator(f"#{ID}{suffix}")

    def visible(self, suffix) -> bool:
        return self.el(suffix).is_visible()

    def enabled_box(self):
        return self.page.locator(f"#{ID}{ui_layout.ENABLE}-visible-checkbox")

    def enable(self):
        """Opens the accordion by its title bar, as a user does: that also ticks its box (a click on the box
        alone would tick it without opening)."""
        if not self.enabled_box().is_checked():
            self.el(ui_layout.ENABLE).locator(":scope > .label-wrap").click()
        self.page.wait_for_function(f"() => document.getElementById('{ID}{ui_layout.ENABLE}-visible-checkbox')"
                                    ".checked", timeout=30_000)
        self.el("method").wait_for(state="visible", timeout=30_000)

    def header(self) -> str:
        return self.el(ui_layout.HEADER).inner_text().strip()

    def wait_header(self, predicate, what):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = self.header()
            if predicate(text):
                return text
            time.sleep(0.25)
        raise AssertionError(f"the header never showed {what}; it shows {self.header()!r}")

    def set_size(self, name, value):
        box = self.page.locator(f"#{TAB}_{name} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
        box.blur()

    def size(self, name) -> tuple[float, float]:
        """(value, maximum) of the Width or Height slider as the page holds them."""
        rng = self.page.locator(f"#{TAB}_{name} input[type=range]")
        return float(rng.input_value()), float(rng.get_attribute("max"))

    def choose(self, suffix, choice):
        self.el(suffix).get_by_text(choice, exact=True).click()

    def value(self, f, elem_id=None):
        box = self.page.locator(f"#{elem_id}") if elem_id else self.el(ui_layout.elem_suffix(f))
        if f.name == "enabled":
            return self.enabled_box().is_checked()
        if f.kind == "bool":
            return box.locator("input[type=checkbox]").is_checked()
        if f.kind == "choice":
            checked = box.locator("input[type=radio]:checked")
            return checked.get_attribute("value") if checked.count() else None
        if f.kind in ("int", "float"):
            text = box.locator("input[type=number]").input_value()
            return int(float(text)) if f.kind == "int" else float(text)
        return box.locator("textarea, input").first.input_value()

    def paste(self, infotext):
        self.page.locator(f"#{TAB}_prompt textarea").fill(infotext)
        self.page.locator(f"#{TAB}_tools #paste").click()

    def our_errors(self):
        """Errors whose source or text is the extension's (gradio's own "reading 'props'" on size changes is not)."""
        return [e for e in self.errors if re.search(r"scalefusion", " ".join(e), re.I)]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def ui(server, browser):
    url, _ = server
    context = browser.new_context(viewport={"width": 1600, "height": 1800})
    page = Page(context.new_page())
    page.page.goto(url + "/", timeout=120_000)
    page.el(ui_layout.ENABLE).wait_for(state="visible", timeout=120_000)
    page.enabled_box().wait_for(state="attached", timeout=60_000)  # the WebUI's inputAccordion.js ran
    yield page
    context.close()


def _infotext(settings: ScaleFusionSettings) -> str:
    params = {"Steps": "20", "Sampler": "Euler", "CFG scale": "7", "Seed": "1", "Size": "512x512",
              **settings.to_infotext()}
    return "a cat\n" + ", ".join(f"{k}: {v}" for k, v in params.items())


def _open(ui, suffix, want: bool):
    wrap = ui.el(suffix).locator(":scope > .label-wrap")
    if ("open" in (wrap.get_attribute("class") or "").split()) != want:
        wrap.click()
    ui.page.wait_for_timeout(300)


def test_ids_are_unique_and_every_control_has_its_hint(ui):
    ids = ui.page.evaluate("() => Array.from(document.querySelectorAll('[id]'), e => e.id)"
                           ".filter(id => /^script_(txt2img|img2img)_scalefusion_/.test(id))")
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    for tab in ("txt2img", "img2img"):
        prefix = ui_layout.ELEM_PREFIX.format(tab=tab)
        assert {prefix + s for s in ui_layout.elem_suffixes()} <= set(ids), tab
    scripts = ui.page.evaluate("() => Array.from(document.scripts, s => s.src)")
    assert any(re.search(r"/javascript/scalefusion-hints\.js(\?|$)", src) for src in scripts), scripts
    ui.page.wait_for_function(f"() => document.getElementById('{ID}sigma').title !== ''", timeout=30_000)
    for suffix, hint in ui_layout.hints().items():
        el = ui.el(suffix)
        title = el.evaluate("e => (e.querySelector(':scope > .label-wrap') || e).title")
        assert title == hint, suffix
    # an accordion's hint sits on its title bar only: the controls inside keep their own
    assert ui.el(ui_layout.ADVANCED).get_attribute("title") in (None, "")
    assert not ui.our_errors(), ui.our_errors()


def test_enable_switch_methods_size_header_and_limit(ui, server):
    page = ui.page
    assert not ui.visible("native_size")  # inside "Advanced", closed by default, as "Plan" is
    assert "open" not in ui.el(ui_layout.PLAN).locator(":scope > .label-wrap").get_attribute("class").split()
    assert ui.size("width")[1] == SLIDER_LIMIT
    ui.enable()
    ui.page.wait_for_function(f"() => document.querySelector('#{TAB}_width input[type=range]').max == "
                              f"'{RAISED_LIMIT}'", timeout=60_000)
    assert ui.size("height")[1] == RAISED_LIMIT

    # ScaleCrafter (the default): its controls only
    assert ui.visible("dilation_multiplier") and ui.visible("main_row_1") and not ui.visible("scale")
    assert ui.visible("noise_damped_cfg") and not ui.visible("stage_strength")  # row 1 holds both methods' fields
    ui.set_size("width", 1024)
    ui.set_size("height", 1024)
    header = ui.wait_header(lambda t: t.startswith("1024×1024"), "1024×1024")
    assert "latent 128×128" in header

    ui.choose("method", "DemoFusion")
    page.wait_for_function(f"() => document.getElementById('{ID}scale').offsetParent !== null", timeout=30_000)
    assert not ui.visible("dilation_multiplier") and not ui.visible("noise_damped_cfg")
    assert ui.visible("main_row_1") and ui.visible("stage_strength") and ui.visible("stages")
    _open(ui, ui_layout.ADVANCED, True)
    assert ui.visible("stride") and ui.visible("native_size") and not ui.visible("stop_at")
    ui.wait_header(lambda t: "→ 2048×2048" in t, "DemoFusion's final size")
    ui.set_size("width", 768)
    ui.wait_header(lambda t: t.startswith("768×1024 → 1536×2048"), "the new width")

    ui.choose("method", "ScaleCrafter")
    page.wait_for_function(f"() => document.getElementById('{ID}scale').offsetParent === null", timeout=30_000)
    assert ui.visible("stop_at") and not ui.visible("stride") and ui.visible("native_size")

    # above the WebUI's own maximum: the value sticks (the server-side maximum was raised too)
    ui.set_size("width", 3072)
    ui.wait_header(lambda t: t.startswith("3072×1024"), "3072")
    assert ui.size("width") == (3072, RAISED_LIMIT)
    assert not ui.our_errors(), ui.our_errors()
    _, log_path = server
    log = log_path.read_text()
    # a traceback through the extension's code (the WebUI's "Failed reading extension data from Git" is not)
    assert not re.search(r'File "[^"]*(lib_hires/|scripts/scalefusion\.py)', log), log[-4000:]


@pytest.mark.parametrize("settings", [
    ScaleFusionSettings(enabled=True, method="DemoFusion", native_size=768, scale=2.5, stride=48, view_batch=4,
                        cosine_scale_1=2.5, cosine_scale_2=1.5, cosine_scale_3=0.5, sigma=0.6, jitter=False,
                        save_stages=True, low_vram=True, redilation="global path"),
    ScaleFusionSettings(enabled=True, dilation_multiplier=1.25, stop_at=0.6, noise_damped_cfg="off",
                        dispersion=True, passes="hires"),
], ids=["DemoFusion", "ScaleCrafter"])
def test_paste_back_fills_the_accordion(ui, settings):
    other = "ScaleCrafter" if settings.method == "DemoFusion" else "DemoFusion"
    ui.enable()
    ui.choose("method", other)
    ui.paste(_infotext(settings))
    shown = "scale" if settings.method == "DemoFusion" else "dilation_multiplier"
    ui.page.wait_for_function(f"() => document.getElementById('{ID}{shown}').offsetParent !== null", timeout=30_000)
    ui.page.wait_for_timeout(1000)
    for f in (FIELDS[0], FIELDS[1], *settings.fields_in_use()):
        assert ui.value(f) == f.to_ui(getattr(settings, f.name)), f.name
    # and pasting parameters without ScaleFusion turns the extension off
    ui.paste("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512")
    ui.page.wait_for_function(f"() => !document.getElementById('{ID}{ui_layout.ENABLE}-visible-checkbox').checked",
                              timeout=30_000)
    assert not ui.our_errors(), ui.our_errors()


def test_settings_page_holds_a_default_for_every_setting(ui, server):
    """Settings -> ScaleFusion: one option per setting (but "enabled"), showing the saved value or the default."""
    import json
    config = webui_dirs()[1] / "config.json"
    saved = json.loads(config.read_text()) if config.exists() else {}
    ui.page.locator("#tabs > .tab-nav button", has_text="Settings").click()
    ui.page.locator("#settings .tab-nav button", has_text="ScaleFusion").click()
    section = ui.page.locator("#settings_scalefusion")
    section.wait_for(state="visible", timeout=30_000)
    for f in FIELDS[1:]:
        key = f"scalefusion_default_{f.name}"
        expected = saved.get(key, f.to_ui(f.default))
        assert ui.value(f, elem_id=f"setting_{key}") == expected, key
    out = os.environ.get("SCREENSHOT_DIR")
    if out:
        size = _save_png(section.screenshot(), Path(out) / "settings.png")
        assert size < MAX_SCREENSHOT_BYTES, size
    assert not ui.our_errors(), ui.our_errors()


def _save_png(data: bytes, path: Path):
    from PIL import Image
    image = Image.open(io.BytesIO(data)).convert("RGB")
    for colours in (256, 128, 64):
        buf = io.BytesIO()
        image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buf, "PNG", optimize=True)
        if buf.tell() < MAX_SCREENSHOT_BYTES:
            break
    path.write_bytes(buf.getvalue())
    return buf.tell()


def test_screenshots(ui):
    """The README's screenshots; without SCREENSHOT_DIR it still checks that the accordion is compact."""
    out = os.environ.get("SCREENSHOT_DIR")
    ui.page.set_viewport_size({"width": 1540, "height": 1800})
    ui.enable()
    ui.set_size("width", 1024)
    ui.set_size("height", 1024)
    heights = {}
    for method in ("ScaleCrafter", "DemoFusion"):
        ui.choose("method", method)
        shown = "scale" if method == "DemoFusion" else "dilation_multiplier"
        ui.page.wait_for_function(f"() => document.getElementById('{ID}{shown}').offsetParent !== null",
                                  timeout=30_000)
        ui.wait_header(lambda t: ("→" in t) == (method == "DemoFusion") and t.startswith("1024×1024"), method)
        for advanced in (False, True):
            _open(ui, ui_layout.ADVANCED, advanced)
            ui.page.wait_for_timeout(500)
            box = ui.el(ui_layout.ENABLE)
            heights[method, advanced] = box.bounding_box()["height"]
            if out:
                name = f"accordion-{method.lower()}{'-advanced' if advanced else ''}.png"
                size = _save_png(box.screenshot(), Path(out) / name)
                assert size < MAX_SCREENSHOT_BYTES, (name, size)
        _open(ui, ui_layout.ADVANCED, False)
    # two rows of controls and two closed accordions (issue 14 measured 540 px and 770 px with all shown)
    assert heights["ScaleCrafter", False] < 350 and heights["DemoFusion", False] < 350, heights
    assert not ui.our_errors(), ui.our_errors()
