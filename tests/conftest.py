import functools
import json
from pathlib import Path

import pytest
import torch

from tools.kdiffusion_compat import load_k_diffusion
from tools.tiny_ldm import TinyLatentDiffusion
from tools.unet_factory import build_unet

# The official ScaleCrafter tables, carried by the repository (tests/data/README.md says where they come from).
PRESETS_JSON = Path(__file__).resolve().parent / "data" / "scalecrafter-presets.json"

# Random weights can push SiLU/softmax into denormal floats, which CPUs process ~100x slower.
torch.set_flush_denormal(True)


@functools.lru_cache(maxsize=None)
def _k_diffusion():
    return load_k_diffusion()


def pytest_report_header(config):
    try:
        return _k_diffusion().describe()
    except ImportError as error:  # e.g. under the WebUI's interpreter before it has booted
        return f"k-diffusion: not importable yet ({error})"


@pytest.fixture(scope="session")
def k_diffusion():
    return _k_diffusion()


@pytest.fixture(scope="session")
def official_presets():
    if not PRESETS_JSON.exists():
        pytest.fail(f"{PRESETS_JSON} is missing from the checkout")
    return json.loads(PRESETS_JSON.read_text())


@pytest.fixture(scope="session", params=["sd1", "sd2", "sdxl"])
def family(request):
    return request.param


_UNETS = {}


def tiny_unet(family: str, seed: int = 0):
    key = (family, seed)
    if key not in _UNETS:
        _UNETS[key] = build_unet(family, seed=seed)
    return _UNETS[key]


@pytest.fixture
def sd1_unet():
    return tiny_unet("sd1")


@pytest.fixture
def sdxl_unet():
    return tiny_unet("sdxl")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    with torch.no_grad():
        yield


def ldm(family: str) -> TinyLatentDiffusion:
    return TinyLatentDiffusion(tiny_unet(family))
