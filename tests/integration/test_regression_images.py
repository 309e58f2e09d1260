"""Images of the default paths through the real WebUI, fingerprinted: changes not meant to alter images keep them.

Recorded from the extension before the configuration work of issue 11 (tiny random fixtures, CPU, fp32). On the
kernel set the fingerprints were recorded on, the PNG pixels must be bit-identical; elsewhere the 32x32 thumbnails
must agree to within 1 level on average (another CPU's kernels sum in another order). Re-record on purpose only:
``REGRESSION_RECORD=1`` with the usual WEBUI_DIR command, then say why in the commit.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.test_api_scalecrafter import scalefusion

INDEX = Path(__file__).resolve().parent / "regression_images.json"
RECORD = os.environ.get("REGRESSION_RECORD") == "1"

CASES = {
    "plain-sd1-euler": dict(width=256, height=256),
    "scalecrafter-sd1-euler": dict(width=256, height=256, alwayson_scripts=scalefusion(native_size=128)),
    "scalecrafter-sd1-dpmpp2m": dict(width=512, height=512, sampler_name="DPM++ 2M",
                                     alwayson_scripts=scalefusion(native_size=128)),
    "demofusion-sd1-euler": dict(width=256, height=256, alwayson_scripts=scalefusion(
        method="DemoFusion", native_size=128, scale=2)),
    "demofusion-sd1-dpmpp2m": dict(width=192, height=256, sampler_name="DPM++ 2M", alwayson_scripts=scalefusion(
        method="DemoFusion", native_size=128, scale=2)),
}


def kernel_set() -> str:
    return f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}"


def thumbnail(image: np.ndarray) -> list:
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR)).astype(int).tolist()


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_path_images_are_unchanged(txt2img, name):
    result = txt2img(**CASES[name])
    assert result.status == 200, result.json
    digest = hashlib.sha256(np.ascontiguousarray(result.image).tobytes()).hexdigest()
    index = json.loads(INDEX.read_text()) if INDEX.exists() else {}
    if RECORD:
        index[name] = {"sha256": digest, "recorded_on": kernel_set(), "thumbnail": thumbnail(result.image)}
        INDEX.write_text(json.dumps(index, sort_keys=True) + "\n")
        return
    assert name in index, f"no reference image fingerprint for {name}: record it (see the module docstring)"
    if index[name]["recorded_on"] == kernel_set():
        assert digest == index[name]["sha256"], f"{name}: the image is no longer bit-identical to its reference"
    else:
        diff = np.abs(np.asarray(thumbnail(result.image)) - np.asarray(index[name]["thumbnail"]))
        assert diff.mean() <= 1.0, f"{name}: the image moved by {diff.mean():.2f} levels on average"
