"""The refiner with ScaleCrafter and with DemoFusion inside a real stable-diffusion-webui-forge (issue 23 §1; CPU,
the seeded SD1 fixture as the base and a second SD1 checkpoint from another seed, made at test time, as the
refiner). Forge's switch reloads the model inside the sampler: these check that the extension follows it there.
Skipped without FORGE_DIR."""
from __future__ import annotations

import numpy as np
import pytest

from tests.integration_forge.conftest import differs, scalefusion
from tests.integration_forge.fixture_sd1 import SEED, ensure_fixture

REFINER_PREFIX = "scalefusion-forge-refiner"   # not matched by the base fixture's stale-file glob


@pytest.fixture(scope="module")
def refiner(forge_servers, sd1_checkpoint) -> str:
    """The second checkpoint's name, listed by the server (made beside the base fixture, then refreshed)."""
    path = ensure_fixture(sd1_checkpoint.parent, seed=SEED + 1, prefix=REFINER_PREFIX)
    server = forge_servers.get()
    server.request("POST", "/sdapi/v1/refresh-checkpoints", {})
    status, listed = server.get("/sdapi/v1/sd-models")
    names = [m["title"] for m in listed or [] if m.get("model_name") == path.stem]
    assert status == 200 and names, listed
    return names[0]



def test_scalecrafter_follows_the_refiner(forge, fresh_plain, refiner):
    payload = dict(width=256, height=256, steps=4, refiner_checkpoint=refiner, refiner_switch_at=0.5)
    followed = forge.txt2img(**payload, alwayson_scripts=scalefusion(method="ScaleCrafter", native_size=128))
    assert followed.status == 200 and followed.size == (256, 256), followed
    assert "Refiner: " in followed.infotext and "ScaleCrafter refiner preset: " in followed.infotext, \
        followed.infotext
    assert "none (" not in followed.infotext.split("ScaleCrafter refiner preset: ")[1].split(",")[0]
    plain = forge.txt2img(**payload)
    assert plain.status == 200 and differs(followed.image, plain.image)
    after = forge.txt2img()
    assert np.array_equal(after.image, fresh_plain.image), "a hook outlived the job"


def test_demofusion_hands_the_final_stage_to_the_refiner(forge, fresh_plain, refiner):
    chosen = scalefusion(method="DemoFusion", scale=2)
    payload = dict(width=256, height=256, steps=2)
    refined = forge.txt2img(**payload, refiner_checkpoint=refiner, refiner_switch_at=0.5, alwayson_scripts=chosen)
    assert refined.status == 200 and refined.size == (512, 512), refined
    assert "Refiner: " in refined.infotext, refined.infotext
    assert "the refiner takes over" in forge.log_tail(10**6)
    base_only = forge.txt2img(**payload, alwayson_scripts=chosen)
    assert base_only.status == 200 and differs(refined.image, base_only.image, 0.2)
    after = forge.txt2img()
    assert np.array_equal(after.image, fresh_plain.image), "a hook outlived the job"


def test_demofusion_global_path_with_the_refiner_is_refused(forge, refiner):
    result = forge.txt2img(width=256, height=256, steps=2, refiner_checkpoint=refiner, refiner_switch_at=0.5,
                           alwayson_scripts=scalefusion(method="DemoFusion", scale=2, redilation="global path"))
    assert result.status == 422 and "cannot follow the refiner" in result.detail, result
