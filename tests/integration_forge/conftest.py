"""Runs stable-diffusion-webui-forge as an API server subprocess for integration tests; skipped without one.

    FORGE_DIR=/path/to/stable-diffusion-webui-forge /path/to/forge/venv/bin/python -m pytest tests/integration_forge

Environment:
- ``FORGE_DIR``: the Forge checkout (with its ``repositories/`` and a venv); without it every test here skips.
- ``FORGE_PYTHON``: the interpreter Forge runs under (default ``$FORGE_DIR/venv/bin/python``).
- ``FORGE_DATA_DIR``: Forge's ``--data-dir`` (default: a fresh temporary folder). It gets
  ``extensions/scalefusion`` -> this checkout and the SD1 fixture in ``models/Stable-diffusion`` (made from a
  seed on first use, reused while the generator is unchanged: keep the folder between runs to skip that).
- ``FORGE_PORT``: the server's port (default: a free one). ``FORGE_BOOT_TIMEOUT``: seconds (default 900).

The server runs on the CPU (``--always-cpu``) and never downloads (``--skip-prepare-environment --skip-install``).
Nothing here imports Forge into the test process except the ``sdxl_unet`` fixture family (tiny_sdxl.py), which
puts ``FORGE_DIR`` on ``sys.path`` only when a test asks for it.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

FORGE_DIR = os.environ.get("FORGE_DIR")
REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
         "--skip-python-version-check", "--always-cpu", "--disable-gpu-warning", "--api"]
TITLE = "ScaleFusion"

PLAIN = dict(prompt="a cat", negative_prompt="", steps=3, sampler_name="Euler", scheduler="Automatic", width=128,
             height=128, seed=7, cfg_scale=7, send_images=True, save_images=False)


def pytest_collection_modifyitems(config, items):
    if FORGE_DIR:
        return
    skip = pytest.mark.skip(reason="FORGE_DIR is not set: no stable-diffusion-webui-forge install to test against")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


def forge_root() -> Path:
    root = Path(FORGE_DIR).resolve()
    if not (root / "modules_forge").is_dir() or not (root / "backend" / "nn" / "unet.py").exists():
        pytest.fail(f"FORGE_DIR={FORGE_DIR} is not a stable-diffusion-webui-forge checkout (no modules_forge/, "
                    "backend/nn/unet.py)")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _holds_scalefusion(path: Path) -> bool:
    return (path / "lib_hires").is_dir() and (path / "scripts" / "scalefusion.py").exists()


def prepare_data_dir(root: Path, data: Path) -> Path:
    """Links this checkout as the data dir's only ScaleFusion and writes the SD1 fixture; returns its path."""
    from tests.integration_forge.fixture_sd1 import ensure_fixture

    extensions = data / "extensions"
    extensions.mkdir(parents=True, exist_ok=True)
    link = extensions / "scalefusion"
    if link.is_symlink() and link.resolve() != REPO:
        link.unlink()
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    # Forge loads extensions-builtin/ and <data dir>/extensions/: a second copy there would run instead of (or
    # beside) this checkout, and the test would prove nothing about the code under test.
    others = [p for folder in (extensions, root / "extensions-builtin") if folder.is_dir()
              for p in sorted(folder.iterdir()) if _holds_scalefusion(p) and p.resolve() != REPO]
    if others:
        pytest.fail(f"Forge would load another copy of ScaleFusion: {[str(p) for p in others]} (besides {REPO}); "
                    "remove it or use another FORGE_DATA_DIR")
    if link.resolve() != REPO:
        pytest.fail(f"{link} must point at this checkout ({REPO}), not {link.resolve()}")
    return ensure_fixture(data / "models" / "Stable-diffusion")


class Result:
    """One API answer: the status, the JSON, decoded images (RGB uint8 arrays) and the first infotext."""

    def __init__(self, status: int, body: dict):
        self.status, self.json = status, body
        self.images, self.infotext = [], ""
        if status == 200 and "images" in body:
            self.images = [decode_image(b) for b in body["images"]]
            info = json.loads(body.get("info") or "{}")
            self.infotext = (info.get("infotexts") or [""])[0]

    @property
    def image(self) -> np.ndarray:
        return self.images[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]

    @property
    def detail(self) -> str:
        return str(self.json.get("detail", "")) if isinstance(self.json, dict) else ""

    def __repr__(self):
        return f"Result({self.status}, {str(self.json)[:300]})"


def decode_image(b64: str) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png_b64(image) -> str:
    """A PIL image or an HxWx3 uint8 array as the base64 PNG the API takes (init images, ControlNet hints)."""
    from PIL import Image
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def gradient_png(size: int) -> str:
    from PIL import Image
    return png_b64(Image.radial_gradient("L").convert("RGB").resize((size, size)))


def differs(a: np.ndarray, b: np.ndarray, at_least: float = 1.0) -> bool:
    """Same shape and a mean difference of at least ``at_least`` levels; ``at_least=0``: any difference (for faint
    effects of images that the same request reproduces bit for bit)."""
    if a.shape != b.shape:
        return False
    if at_least <= 0:
        return not np.array_equal(a, b)
    return float(np.abs(a.astype(float) - b.astype(float)).mean()) >= at_least


def scalefusion(**settings) -> dict:
    """``alwayson_scripts`` turning ScaleFusion on with the given settings (named, as the API accepts them)."""
    return {TITLE: {"args": [{"enabled": True, **settings}]}}


class ForgeServer:
    """A Forge API server subprocess with its own data dir and port."""

    boots = 0

    def __init__(self, root: Path, data: Path, checkpoint: Path, extra_args: tuple[str, ...] = ()):
        self.root, self.data, self.checkpoint, self.extra_args = root, data, checkpoint, tuple(extra_args)
        self.port = int(os.environ.get("FORGE_PORT") or _free_port())
        self.url = f"http://127.0.0.1:{self.port}"
        suffix = "-".join(a.strip("-") for a in self.extra_args) or "default"
        ForgeServer.boots += 1
        self.log_path = data / f"forge-server-{suffix}-{ForgeServer.boots}.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        python = os.environ.get("FORGE_PYTHON") or str(self.root / "venv" / "bin" / "python")
        # Forge lets gradio serve files only from the data dir by default: with a data dir of its own, its own
        # script.js / javascript/*.js (input accordions, hints) and this checkout's javascript/ would answer 403.
        allowed = [flag for path in (self.root, REPO) for flag in ("--gradio-allowed-path", str(path))]
        return [python, "launch.py", *FLAGS, "--port", str(self.port), "--data-dir", str(self.data), *allowed,
                "--ckpt", str(self.checkpoint), *self.extra_args]

    def start(self, timeout: float) -> "ForgeServer":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # Forge must import its own modules, not this checkout's tests
        env.pop("IGNORE_CMD_ARGS_ERRORS", None)  # set for in-process imports (tiny_sdxl.py): the server is strict
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command(), cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"Forge exited with {self.process.returncode} while booting:\n{self.log_tail()}")
            try:
                status, _ = self.request("GET", "/sdapi/v1/sd-models", timeout=5)
            except OSError:
                status = None
            if status == 200:
                return self._warm_up()
            time.sleep(2)
        self.stop()
        pytest.fail(f"Forge did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def _warm_up(self) -> "ForgeServer":
        """One small plain request first. Forge (dfdcbab6) serving the UI runs the first API request after boot with
        empty default script arguments: a request with ``alwayson_scripts`` arguments then fails in
        ``init_script_args`` (IndexError, HTTP 500) and the built-in scripts log unpacking errors; from the second
        request on the defaults are right. (Plain images are the same either way.)"""
        result = self.txt2img(steps=1, width=64, height=64)
        if result.status != 200:
            self.stop()
            pytest.fail(f"Forge's warm-up request failed: {result}\n{self.log_tail()}")
        return self

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def request(self, method: str, path: str, payload=None, timeout: float = 1800) -> tuple[int, object]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        try:
            return status, json.loads(body or b"null")
        except json.JSONDecodeError:
            return status, {"detail": body.decode(errors="replace")}

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, payload: dict) -> Result:
        return Result(*self.request("POST", path, payload))

    def txt2img(self, **payload) -> Result:
        return self.post("/sdapi/v1/txt2img", {**PLAIN, **payload})

    def img2img(self, **payload) -> Result:
        init = payload.pop("init_images", None) or [gradient_png(payload.get("width", PLAIN["width"]))]
        return self.post("/sdapi/v1/img2img", {**PLAIN, "denoising_strength": 0.6, "init_images": init, **payload})


class ForgeServers:
    """One server at a time (the CPU box has little memory): asking for other flags stops the running one."""

    def __init__(self, root: Path, data: Path, checkpoint: Path, timeout: float):
        self.root, self.data, self.checkpoint, self.timeout = root, data, checkpoint, timeout
        self.current: ForgeServer | None = None

    def get(self, *extra_args: str) -> ForgeServer:
        if self.current is not None and self.current.extra_args == tuple(extra_args):
            if self.current.process is not None and self.current.process.poll() is None:
                return self.current
            pytest.fail(f"the Forge server died:\n{self.current.log_tail()}")
        self.stop()
        self.current = ForgeServer(self.root, self.data, self.checkpoint, extra_args).start(self.timeout)
        return self.current

    def stop(self):
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture(scope="session")
def forge_root_dir() -> Path:
    return forge_root()


@pytest.fixture(scope="session")
def forge_data_dir(tmp_path_factory) -> Path:
    given = os.environ.get("FORGE_DATA_DIR")
    return Path(given).resolve() if given else tmp_path_factory.mktemp("forge-data")


@pytest.fixture(scope="session")
def sd1_checkpoint(forge_root_dir, forge_data_dir) -> Path:
    return prepare_data_dir(forge_root_dir, forge_data_dir)


@pytest.fixture(scope="session")
def forge_servers(forge_root_dir, forge_data_dir, sd1_checkpoint):
    servers = ForgeServers(forge_root_dir, forge_data_dir, sd1_checkpoint,
                           float(os.environ.get("FORGE_BOOT_TIMEOUT", "900")))
    yield servers
    servers.stop()


# Function-scoped: each test gets the server running its flags now (one runs at a time, so a server object kept
# from an earlier test may have been stopped, and with FORGE_PORT fixed another server would answer on its port).
# A fixture of a wider scope asks ``forge_servers.get(...)`` itself.
@pytest.fixture
def forge(forge_servers) -> ForgeServer:
    """The default server: fp32 UNet on the CPU."""
    return forge_servers.get()


@pytest.fixture
def forge_bf16(forge_servers) -> ForgeServer:
    """A server with ``--unet-in-bf16``: the UNet is stored in bf16 and computed in fp32, so Forge's convs take
    their manual-cast branch. Requesting it stops the default server (and vice versa): group such tests."""
    return forge_servers.get("--unet-in-bf16")


@pytest.fixture
def txt2img(forge):
    return forge.txt2img


@pytest.fixture
def img2img(forge):
    return forge.img2img


@pytest.fixture(scope="session")
def fresh_plain(forge_servers):
    """A plain request on the default server before it has run ScaleFusion: later plain requests must equal it
    (also on a restarted default server: plain images are the same across boots). Request it before any
    ScaleFusion test in a session (a session fixture is made once, on first use)."""
    result = forge_servers.get().txt2img()
    assert result.status == 200, result
    return result


# The tiny SDXL UNet built from Forge's own backend (tiny_sdxl.py), for in-process tests.
from tests.integration_forge.tiny_sdxl import sdxl_unet, forge_backend  # noqa: E402,F401
