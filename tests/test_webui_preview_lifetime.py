"""Live previews stay shrunk from ``p.sample`` until ``postprocess`` (issue 19 §3), through a stand-in of the
WebUI v1.10.1 call order of ``process_images_inner``: ``p.sample`` returns, ``post_sample`` decodes the big latent
in tiles while the progress thread previews ``current_latent``, ``state.nextjob()`` previews it once more when
``show_progress_every_n_steps`` is -1, then ``postprocess``; ``state.end()`` closes the job in any case."""
import copy
import sys
import threading
import types

import pytest
import torch

from lib_hires.settings import SC, ScaleFusionSettings
from lib_hires.vae import PREVIEW_MAX_SIDE
from lib_hires.webui import decoding, job
from tests.conftest import tiny_unet
from tests.webui_fakes import FakeModel, FakeTxt2Img, FakeWebUI

SC_2X = ScaleFusionSettings(enabled=True, method=SC, native_size=128)  # 256 px: the official 2x preset
BIG = (1, 4, 256, 192)            # the latent the progress thread finds in current_latent
SMALL = (1, 4, PREVIEW_MAX_SIDE, 96)


class ProgressState:
    """``shared.state``: ``do_set_current_image`` decodes ``current_latent`` (here: records its shape, per point
    of the call order), ``nextjob`` previews when the setting is -1, ``end`` closes the job."""

    def __init__(self, opts):
        self.opts, self.current_latent, self.at, self.seen, self.ended = opts, None, None, {}, 0

    def do_set_current_image(self):
        self.seen.setdefault(self.at, []).append(tuple(self.current_latent.shape))

    def preview(self, at, *, on_thread=False):
        """The progress thread's preview of a full-size latent, from the calling thread or a real second one."""
        self.at, self.current_latent = at, torch.zeros(BIG)
        if on_thread:
            thread = threading.Thread(target=self.do_set_current_image)
            thread.start()
            thread.join()
        else:
            self.do_set_current_image()

    def nextjob(self):
        self.at, self.current_latent = "nextjob", torch.zeros(BIG)
        if self.opts.live_previews_enable and self.opts.show_progress_every_n_steps == -1:
            self.do_set_current_image()

    def end(self):
        self.ended += 1


@pytest.fixture
def webui(monkeypatch):
    w = FakeWebUI(FakeModel(copy.deepcopy(tiny_unet("sd1")), "base")).install(monkeypatch)
    w.shared.opts.data["scalefusion_decode_tile"] = 8   # the 32 px latent of a 256 px image is decoded in tiles
    w.shared.state = ProgressState(w.shared.opts)
    w.devices.cpu = "cpu"
    processing = types.ModuleType("modules.processing")
    w.failing_decode = False

    def decode_latent_batch(sd_model, latents, target_device=None, check_for_nans=False):
        w.shared.state.preview("post_sample decode", on_thread=True)  # Full previews go on meanwhile
        if w.failing_decode:
            raise RuntimeError("out of memory in the decode")
        return [sd_model.decode_first_stage(latents[i:i + 1])[0] for i in range(latents.shape[0])]

    class DecodedSamples(list):
        already_decoded = True

    processing.decode_latent_batch, processing.DecodedSamples = decode_latent_batch, DecodedSamples
    monkeypatch.setitem(sys.modules, "modules.processing", processing)
    monkeypatch.setattr(w.package, "processing", processing, raising=False)
    return w


def process_images(webui, p, settings):
    """``process_images`` / ``process_images_inner`` for one batch, and the ``state.end()`` of its caller."""
    state = webui.shared.state
    try:
        active = job.begin(p, [settings.to_dict()], lambda: type(settings)())
        p.job = active
        active.write_infotext(p)
        samples = p.sample()
        state.preview("after p.sample", on_thread=True)
        ps = types.SimpleNamespace(samples=samples)
        decoding.post_sample(p, ps)                    # Script.post_sample: the tiled final decode
        assert getattr(ps.samples, "already_decoded", False)
        state.nextjob()
        state.preview("before postprocess", on_thread=True)
        active.finish()                                 # Script.postprocess
        state.preview("after postprocess", on_thread=True)
    finally:
        state.end()                                     # call_queue / the API, after process_images


@pytest.mark.parametrize("every_n_steps", [1, -1])
def test_previews_are_shrunk_at_every_point_until_postprocess(webui, k_diffusion, every_n_steps):
    webui.shared.opts.show_progress_every_n_steps = every_n_steps
    p = FakeTxt2Img(webui, k_diffusion, width=256, height=256, steps=1)
    process_images(webui, p, SC_2X)
    seen = webui.shared.state.seen
    assert seen["after p.sample"] == [SMALL] and seen["post_sample decode"] == [SMALL]
    assert seen["before postprocess"] == [SMALL]
    assert seen.get("nextjob") == ([SMALL] if every_n_steps == -1 else None)
    assert seen["after postprocess"] == [BIG]       # restored: the next job's previews are the WebUI's own
    assert max(max(shape) for shape in p.sd_model.decoded) <= 8 * 8  # the final decode did run in tiles
    assert "do_set_current_image" not in vars(webui.shared.state) and "end" not in vars(webui.shared.state)
    assert not job._live_hooks


def test_a_failed_final_decode_leaves_no_preview_patch(webui, k_diffusion):
    """No postprocess follows an exception in process_images_inner; the state.end() that always does restores."""
    webui.failing_decode = True
    p = FakeTxt2Img(webui, k_diffusion, width=256, height=256, steps=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        process_images(webui, p, SC_2X)
    state = webui.shared.state
    assert state.seen["post_sample decode"] == [SMALL] and state.ended == 1
    assert "do_set_current_image" not in vars(state) and "end" not in vars(state)
    state.preview("after the failure")
    assert state.seen["after the failure"] == [BIG]


def test_a_failed_p_sample_removes_the_preview_patch_at_once(webui, k_diffusion):
    p = FakeTxt2Img(webui, k_diffusion, width=256, height=256, steps=1)
    original = p.sample

    def failing_sample(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("interrupted inside p.sample")

    p.sample = failing_sample
    active = job.begin(p, [SC_2X.to_dict()], lambda: ScaleFusionSettings())
    with pytest.raises(RuntimeError, match="inside p.sample"):
        p.sample()
    state = webui.shared.state
    assert "do_set_current_image" not in vars(state) and "end" not in vars(state)
    assert active.previews is None and not job._live_hooks
