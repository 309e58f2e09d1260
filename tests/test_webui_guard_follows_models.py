"""The decode/encode guard of a job follows every model object that can encode or decode inside ``p.sample``
(issue 19 §2), through stand-ins of the WebUI's call order (``tests/webui_fakes.py``).

The Hires. fix encode after a pixel upscaler and the ``inpainting_mask_weight`` decode run on the hires model
after the switch and before ``process_before_every_sampling``, so no pass hook has seen that model yet; the
refiner is loaded inside a denoiser step. Each is guarded from the moment it is loaded (the model-loaded
callback) or, where the WebUI keeps it loaded and a switch fires no callback, from the start of ``p.sample``.
"""
import copy

import pytest

from lib_hires.settings import SC, ScaleFusionSettings
from lib_hires.vae import shrink_latent
from lib_hires.webui import decoding, job
from tests.conftest import tiny_unet
from tests.webui_fakes import FakeModel, FakeTxt2Img, FakeWebUI, perturbed, run_job

SC_HIRES = ScaleFusionSettings(enabled=True, method=SC, native_size=128, passes="hires")
TILE = 16  # latent px: the encoder's tiles are 128 px


@pytest.fixture
def webui(monkeypatch):
    w = FakeWebUI(FakeModel(copy.deepcopy(tiny_unet("sd1")), "base")).install(monkeypatch)
    w.shared.opts.data["scalefusion_decode_tile"] = TILE
    return w


def assert_unpatched(*models):
    for m in models:
        assert "decode_first_stage" not in vars(m)
        assert "forward" not in vars(m.first_stage_model.decoder) and "forward" not in vars(m.first_stage_model.encoder)
    assert not job._live_hooks and job._current.job is None


def hires_job(webui, k_diffusion, settings, **kwargs):
    p = FakeTxt2Img(webui, k_diffusion, width=64, height=64, steps=1, enable_hr=True, hr_scale=4, **kwargs)
    return p, run_job(p, settings)


@pytest.mark.parametrize("switch", ["loaded", "already loaded", "into the same object"])
def test_the_hires_encode_after_a_pixel_upscaler_is_tiled_on_the_hires_model(webui, k_diffusion, switch):
    base = webui.sd_model
    other = perturbed(base, "other")
    if switch == "already loaded":  # sd_checkpoints_limit >= 2: the switch loads nothing and says nothing
        webui.loaded.append(other)
    p, _ = hires_job(webui, k_diffusion, SC_HIRES, hr_checkpoint=other, hr_same_object=switch == "into the same object",
                     hr_upscaler="R-ESRGAN 4x+")
    hires_model = base if switch == "into the same object" else other
    assert hires_model.encoded and max(map(max, hires_model.encoded)) <= 8 * TILE  # 256 px: only tiles
    assert p.extra_generation_params["ScaleCrafter hires preset"] == "sd1.5_1024x1024"
    assert_unpatched(base, other)


def test_without_the_extension_the_hires_encode_is_one_pass(webui, k_diffusion):
    other = perturbed(webui.sd_model, "other")
    hires_job(webui, k_diffusion, ScaleFusionSettings(), hr_checkpoint=other, hr_upscaler="R-ESRGAN 4x+")
    assert other.encoded == [(256, 256)]  # what the guarded runs above are compared with


def test_the_inpainting_mask_weight_decode_is_tiled_on_the_hires_model(webui, k_diffusion):
    base = webui.sd_model
    other = perturbed(base, "other")
    hires_job(webui, k_diffusion, SC_HIRES, hr_checkpoint=other, inpainting_mask_weight=0.5)
    conditioning_decode = other.decoded[:4]  # the 32x32 upscaled latent, before the hires pass samples
    assert conditioning_decode and max(map(max, conditioning_decode)) <= TILE
    assert max(map(max, other.decoded)) <= TILE
    assert_unpatched(base, other)


def test_a_model_loaded_outside_a_job_or_after_it_is_left_alone(webui, k_diffusion):
    base = webui.sd_model
    stranger = perturbed(base, "stranger")
    job.on_model_loaded(stranger)   # no job samples: nothing to guard
    assert_unpatched(stranger)
    other = perturbed(base, "other")
    hires_job(webui, k_diffusion, SC_HIRES, hr_checkpoint=other, hr_upscaler="R-ESRGAN 4x+")
    assert_unpatched(base, other, stranger)
    job.on_model_loaded(other)      # after the job: still nothing
    assert_unpatched(other)
    webui.shared.sd_model = base
    other.first_stage_model.encoder.seen.clear()
    hires_job(webui, k_diffusion, ScaleFusionSettings(), hr_checkpoint=other, hr_upscaler="R-ESRGAN 4x+")
    assert other.encoded == [(256, 256)]  # the next job, without ScaleFusion, is the WebUI's own


def test_a_refiner_loaded_inside_an_unarmed_pass_gets_small_in_step_previews(webui, k_diffusion, monkeypatch):
    """As in DemoFusion's later stages, no ScaleCrafter pass is armed when the refiner loads (here: a first pass
    that passes=hires leaves alone); under --medvram with Full previews its in-step preview decodes on the
    refiner, which must be shrunk as on the base model."""
    monkeypatch.setattr(decoding, "shrink_latent", lambda z: shrink_latent(z, max_side=8))  # 16 px latents here
    webui.shared.parallel_processing_allowed = False  # what --medvram sets
    base = webui.sd_model
    refiner = perturbed(base, "refiner")
    webui.refiner = (1, refiner, False)  # loads at the second of the first pass's two steps
    p = FakeTxt2Img(webui, k_diffusion, width=128, height=128, steps=2, enable_hr=True, hr_scale=2)
    run_job(p, SC_HIRES)
    assert base.decoded[:1] == [(8, 8)]
    assert refiner.decoded[:1] == [(8, 8)]  # the first pass's second step, on the refiner: shrunk
    assert_unpatched(base, refiner)


def test_demofusions_refiner_in_the_final_stage_gets_small_in_step_previews(webui, k_diffusion, monkeypatch):
    """DemoFusion's final stage as its run drives it: a fresh sampler, ``process_before_every_sampling`` (nothing
    armed: re-dilation off), then the refiner loads inside a denoiser step; --medvram with Full previews."""
    from types import SimpleNamespace

    from lib_hires.settings import DF
    from tests.webui_fakes import FakeSampler

    monkeypatch.setattr(decoding, "shrink_latent", lambda z: shrink_latent(z, max_side=8))
    monkeypatch.setattr(job.Job, "_check_request", lambda self, p: None)  # the run's checks need the real WebUI

    class FinalStage:
        def __init__(self, p, active, original_sample):
            self.p, self.stage = p, SimpleNamespace(index=2)

        def __call__(self, *args, **kwargs):
            p = self.p
            p.sampler = FakeSampler(p.webui, p.k_diffusion)
            p.process_before_every_sampling(p.noise)
            return p.sampler.sample(p, p.noise, p.steps)

    monkeypatch.setattr(job, "DemoFusionRun", FinalStage)
    webui.shared.parallel_processing_allowed = False
    base = webui.sd_model
    refiner = perturbed(base, "refiner")
    webui.refiner = (1, refiner, False)
    p = FakeTxt2Img(webui, k_diffusion, width=128, height=128, steps=3)
    run_job(p, ScaleFusionSettings(enabled=True, method=DF, native_size=128))
    assert base.decoded == [(8, 8)] and refiner.decoded == [(8, 8), (8, 8)]
    assert_unpatched(base, refiner)
