"""ScaleFusion inside a real stable-diffusion-webui-forge server (CPU, the seeded SD1 fixture)."""
from __future__ import annotations

import numpy as np
import pytest

from lib_hires import ui_layout
from tests.integration_forge.tiny_sdxl import CONTEXT_DIM


def test_the_extension_loads_in_forge(forge):
    status, scripts = forge.get("/sdapi/v1/scripts")
    assert status == 200, scripts
    assert "scalefusion" in scripts["txt2img"] and "scalefusion" in scripts["img2img"], scripts
    assert "Error loading script: scalefusion.py" not in forge.log_tail(10**7)


def test_the_accordion_builds_under_forge_gradio(forge):
    status, config = forge.get("/config")
    assert status == 200, str(config)[:500]
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    for tab in ("txt2img", "img2img"):
        missing = [s for s in ui_layout.elem_suffixes() if f"script_{tab}_scalefusion_{s}" not in ids]
        assert not missing, f"{tab}: the accordion lacks {missing}"
    log = forge.log_tail(10**7)
    assert "unexpected argument for HTML: min_width" not in log  # gradio 4 has no min_width on HTML


def test_the_checkpoint_is_the_seeded_sd1_fixture(forge, sd1_checkpoint):
    status, models = forge.get("/sdapi/v1/sd-models")
    assert status == 200 and [m["model_name"] for m in models] == [sd1_checkpoint.stem], models


def test_a_plain_request_works_and_is_deterministic(forge, fresh_plain):
    again = forge.txt2img()
    assert again.status == 200 and again.size == (128, 128), again
    assert np.array_equal(again.image, fresh_plain.image)
    assert fresh_plain.image.std() > 1, "the random fixture should not decode to a flat image"
    other_seed = forge.txt2img(seed=8)
    assert not np.array_equal(other_seed.image, fresh_plain.image)
    assert "ScaleFusion" not in fresh_plain.infotext


def test_img2img_plain_works(forge):
    result = forge.img2img(steps=2)
    assert result.status == 200 and result.size == (128, 128), result


@pytest.mark.parametrize("args,field", [
    ([{"enabled": True, "dilation_multiplier": 9}], "dilation_multiplier must be a number in [0.1, 4]; got 9"),
    ([{"enabled": True, "method": "Tiled"}], "method must be one of"),
    ([{"enabled": "yes"}], "enabled must be true or false"),
    ([{"enabled": True, "tau": 30}], "unknown key(s) 'tau'"),
])
def test_bad_settings_answer_422_naming_the_field(forge, fresh_plain, args, field):
    result = forge.txt2img(alwayson_scripts={"ScaleFusion": {"args": args}})
    assert result.status == 422 and field in result.detail, result
    after = forge.txt2img()
    assert after.status == 200 and np.array_equal(after.image, fresh_plain.image)


def test_the_tiny_sdxl_unet_is_forges_own(sdxl_unet):
    import torch
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.operations import ForgeOperations

    unet = sdxl_unet(seed=1)
    assert isinstance(unet, IntegratedUNet2DConditionModel)
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m, ForgeOperations.Conv2d) and not m.parameters_manual_cast for m in convs)
    assert len(unet.input_blocks) == 9 and unet.label_emb[0][0].in_features == 16  # SDXL: 3 levels, ADM vector
    inputs = sdxl_unet.inputs(batch=2, latent_hw=(16, 24))
    with torch.no_grad():
        out = unet(**inputs)
        again = sdxl_unet(seed=1)(**inputs)
    assert out.shape == (2, 4, 16, 24) and torch.isfinite(out).all() and out.std() > 0
    assert torch.equal(out, again)  # deterministic from the seed
    assert inputs["context"].shape[-1] == CONTEXT_DIM


def test_the_tiny_sdxl_unet_in_bf16_takes_the_manual_cast_branch(sdxl_unet):
    import torch
    from backend.operations import ForgeOperations

    unet = sdxl_unet(seed=1, storage_dtype=torch.bfloat16, computation_dtype=torch.float32)
    convs = [m for m in unet.modules() if isinstance(m, ForgeOperations.Conv2d)]
    assert convs and all(m.parameters_manual_cast and m.weight.dtype == torch.bfloat16 for m in convs)
    with torch.no_grad():
        out = unet(**sdxl_unet.inputs(batch=1))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_unet_in_bf16_boots_and_generates(forge_bf16):
    result = forge_bf16.txt2img(steps=2)
    assert result.status == 200 and result.size == (128, 128), result
    assert "K-Model Created: {'storage_dtype': torch.bfloat16, 'computation_dtype': torch.float32}" in \
        forge_bf16.log_tail(10**7)
