"""Boots a real AUTOMATIC1111 WebUI in-process for integration tests; skipped without one.

Run with the WebUI's own interpreter (it carries ldm, sgm, the LoRA extension and k-diffusion):

    WEBUI_DIR=/path/to/stable-diffusion-webui /path/to/stable-diffusion-webui/venv/bin/python -m pytest tests/integration

The WebUI needs the tiny checkpoints and LoRAs of ../shared/fixtures/webui/models in its models folder.
"""
import os
import signal
import sys
from pathlib import Path

import pytest

WEBUI_DIR = os.environ.get("WEBUI_DIR")
FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
         "--use-cpu", "all", "--no-half", "--precision", "full", "--disable-safe-unpickle",
         "--skip-load-model-at-start"]


def pytest_collection_modifyitems(config, items):
    if WEBUI_DIR:
        return
    skip = pytest.mark.skip(reason="WEBUI_DIR is not set: no WebUI install to test against")
    for item in items:
        if "integration" in item.nodeid:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def webui():
    root = Path(WEBUI_DIR).resolve()
    if not (root / "modules" / "processing.py").exists():
        pytest.fail(f"WEBUI_DIR={WEBUI_DIR} is not a stable-diffusion-webui checkout")
    checkpoint = root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors"
    if not checkpoint.exists():
        pytest.skip(f"{checkpoint} is missing: link ../shared/fixtures/webui/models into the WebUI")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.chdir(root)  # the tiny yamls name their tokenizers relative to the WebUI root
    sys.path.insert(0, str(root))
    saved_argv = sys.argv
    sys.argv = [str(root / "webui.py"), *FLAGS, "--ckpt", str(checkpoint)]
    try:
        try:
            from modules import initialize
        except ImportError as error:
            pytest.skip(f"the WebUI's modules do not import with {sys.executable} ({error}); use its venv")
        initialize.imports()
        initialize.initialize()
        from modules import script_callbacks
        script_callbacks.before_ui_callback()  # registers the Lora extra network, as the API server does
    finally:
        sys.argv = saved_argv
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from modules import sd_hijack, sd_models, shared
    sd_models.load_model()
    if sd_hijack.current_optimizer is None:
        sd_hijack.apply_optimizations()
    return shared


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
