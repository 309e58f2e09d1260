"""Boots a real AUTOMATIC1111 WebUI in-process for integration tests; skipped without one.

Run with the WebUI's own interpreter (it carries ldm, sgm, open_clip, the LoRA extension and k-diffusion), with
this checkout in the WebUI's extensions folder:

    WEBUI_DIR=/path/to/stable-diffusion-webui /path/to/stable-diffusion-webui/venv/bin/python -m pytest tests/integration

The tiny checkpoints, LoRAs, ControlNet and tokenizers are made from a seed before the WebUI boots
(``fixtures.py``), into the WebUI's ``models/``, once: later runs reuse them while the generator is unchanged.
``WEBUI_DATA_DIR`` (optional) is passed as ``--data-dir``: a folder with its own ``models/`` (where the fixtures then
go) and ``extensions/``, so several checkouts can each be tested against one WebUI install.
"""
import base64
import io
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

WEBUI_DIR = os.environ.get("WEBUI_DIR")
WEBUI_DATA_DIR = os.environ.get("WEBUI_DATA_DIR")
REPO = Path(__file__).resolve().parents[2]
FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
         "--use-cpu", "all", "--no-half", "--precision", "full", "--disable-safe-unpickle",
         "--skip-load-model-at-start", "--opt-sdp-attention"]


def pytest_configure(config):
    config.addinivalue_line("markers", "runs_last: leaves the WebUI's model slightly changed (a WebUI round trip "
                                       "such as fp8 storage on and off): run after every other test")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("runs_last") is not None)  # stable: the rest keep order
    if WEBUI_DIR:
        return
    skip = pytest.mark.skip(reason="WEBUI_DIR is not set: no WebUI install to test against")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:  # not tests/integration_forge: FORGE_DIR gates those
            item.add_marker(skip)


def webui_dirs() -> tuple[Path, Path]:
    """The WebUI checkout and its data dir (the checkout itself without WEBUI_DATA_DIR)."""
    root = Path(WEBUI_DIR).resolve()
    if not (root / "modules" / "processing.py").exists():
        pytest.fail(f"WEBUI_DIR={WEBUI_DIR} is not a stable-diffusion-webui checkout")
    return root, Path(WEBUI_DATA_DIR).resolve() if WEBUI_DATA_DIR else root


def prepare_fixtures(root: Path, data: Path):
    """The seeded fixtures in the data dir's models folder (made on first use); skips where this interpreter is
    not the WebUI's, fails where a file of theirs is in the way."""
    from tests.integration import fixtures

    try:
        return fixtures.ensure_fixtures(data / "models", webui_root=root)
    except fixtures.FixtureConflict as error:
        pytest.fail(str(error))
    except FileNotFoundError as error:
        pytest.skip(f"{error} (the fixtures' tokenizers are made from open_clip's CLIP merges)")


@pytest.fixture(scope="session")
def webui():
    root, data = webui_dirs()
    made = prepare_fixtures(root, data)
    checkpoint = made.sd1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.chdir(root)  # the WebUI finds parts of itself (configs, repositories) relative to the working directory
    sys.path.insert(0, str(root))
    saved_argv = sys.argv
    data_flags = ["--data-dir", str(data)] if WEBUI_DATA_DIR else []
    sys.argv = [str(root / "webui.py"), *FLAGS, *data_flags, "--ckpt", str(checkpoint)]
    try:
        try:
            from modules import initialize
        except ImportError as error:
            pytest.skip(f"the WebUI's modules do not import with {sys.executable} ({error}); use its venv")
        initialize.imports()
        from tests.integration import fixtures
        fixtures.register_open_clip_config(made)  # before any SDXL checkpoint is built
        initialize.initialize()
        from modules import script_callbacks
        script_callbacks.before_ui_callback()  # registers the Lora extra network, as the API server does
    finally:
        sys.argv = saved_argv
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _check_this_checkout_is_loaded()
    from modules import sd_hijack, sd_models, shared
    sd_models.load_model()
    if sd_hijack.current_optimizer is None:
        sd_hijack.apply_optimizations()
    return shared


def _check_this_checkout_is_loaded():
    """The WebUI must run this checkout's code, not another copy of the extension."""
    from modules import extensions
    extensions.list_extensions()
    paths = [Path(e.path).resolve() for e in extensions.extensions if (Path(e.path) / "lib_hires").is_dir()]
    if REPO not in paths:
        pytest.fail(f"the WebUI's extensions folder does not hold this checkout ({REPO}); it has {paths}: "
                    "link it there (or use WEBUI_DATA_DIR with an extensions/ folder that links it)")


@pytest.fixture
def load_checkpoint(webui):
    from modules import sd_models

    def load(name):
        info = sd_models.get_closet_checkpoint_match(name)
        if webui.sd_model.sd_checkpoint_info.title != info.title:
            sd_models.reload_model_weights(info=info)
        return webui.sd_model

    yield load
    load("tiny-sd1")


@pytest.fixture(scope="session")
def api(webui):
    """The WebUI's REST API in-process: HTTP semantics (status codes, the Script's argument handling,
    infotext) plus access to the model for checks no HTTP answer shows."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from modules.api.api import Api
    from modules.call_queue import queue_lock

    app = FastAPI()
    Api(app, queue_lock)  # builds the script UIs as the API-only server does
    return TestClient(app)


class Result:
    def __init__(self, response):
        self.status = response.status_code
        self.json = response.json()
        self.images, self.infotext = [], ""
        if self.status == 200:
            self.images = [np.asarray(_png(b)) for b in self.json["images"]]
            self.infotext = json.loads(self.json["info"])["infotexts"][0]

    @property
    def image(self):
        return self.images[0]

    @property
    def size(self):
        return self.image.shape[1], self.image.shape[0]

    def params(self):
        from modules import infotext_utils
        return infotext_utils.parse_generation_parameters(self.infotext)


def _png(b64):
    from PIL import Image
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def gradient_png(size: int) -> str:
    """A radial gradient, base64 PNG: an init image or a ControlNet hint."""
    from PIL import Image
    return png_b64(Image.radial_gradient("L").convert("RGB").resize((size, size)))


PLAIN = dict(prompt="a cat", negative_prompt="", steps=4, sampler_name="Euler", width=256, height=256, seed=7,
             cfg_scale=7, send_images=True, save_images=False)


@pytest.fixture(scope="session")
def txt2img(api):
    def run(**payload):
        return Result(api.post("/sdapi/v1/txt2img", json={**PLAIN, **payload}))
    return run


@pytest.fixture(scope="session")
def img2img(api):
    def run(**payload):
        return Result(api.post("/sdapi/v1/img2img", json={**PLAIN, **payload}))
    return run


@pytest.fixture(scope="session")
def fresh_plain(txt2img):
    """A plain request on a server that has not run the extension yet: later plain requests must equal it."""
    result = txt2img()
    assert result.status == 200
    return result


@pytest.fixture
def perturbed_checkpoint(webui, request):
    """A second SD1 checkpoint made from the fixture for this test: the UNet weights perturbed, saved beside
    ``tiny-sd1`` (with its yaml) under a name unique to the test, removed afterwards. Yields its name."""
    import re
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from modules import sd_models

    source = Path(sd_models.get_closet_checkpoint_match("tiny-sd1").filename)
    name = "tiny-sd1-perturbed-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:60]
    target, yaml = source.with_name(f"{name}.safetensors"), source.with_name(f"{name}.yaml")
    gen = torch.Generator().manual_seed(11)
    weights = {k: v + 0.2 * v.float().std().nan_to_num().to(v.dtype) * torch.randn(v.shape, generator=gen).to(v.dtype)
               if k.startswith("model.diffusion_model.") and v.is_floating_point() else v
               for k, v in load_file(str(source)).items()}
    save_file(weights, str(target))
    shutil.copy(source.with_suffix(".yaml"), yaml)
    sd_models.list_models()
    try:
        yield name
    finally:
        for model in list(sd_models.model_data.loaded_sd_models):  # never leave it loaded behind the next test
            if Path(model.sd_checkpoint_info.filename) == target and model is not webui.sd_model:
                sd_models.model_data.loaded_sd_models.remove(model)
                sd_models.send_model_to_trash(model)
        if Path(webui.sd_model.sd_checkpoint_info.filename) == target:
            sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("tiny-sd1"))
        target.unlink(missing_ok=True)
        yaml.unlink(missing_ok=True)
        sd_models.list_models()
