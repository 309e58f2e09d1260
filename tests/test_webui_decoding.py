"""The WebUI side of large outputs, on stand-ins: the preview and decode patches, the tile choice."""
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from lib_hires.vae_tiles import PREVIEW_MAX_SIDE, default_overlap, tiled_decode
from lib_hires.webui.decoding import LargeOutputGuard, decode_element_size, tile_size, tiled_vae_active


class State:
    """Like the WebUI's shared.state: the progress thread calls do_set_current_image on it."""

    def __init__(self, latent):
        self.current_latent = latent
        self.decoded_shapes = []

    def do_set_current_image(self):
        self.decoded_shapes.append(tuple(self.current_latent.shape))


class Model:
    """decode_first_stage as the model's own method: a local 8x upsampler that records what it is given."""

    def __init__(self):
        self.first_stage_model = SimpleNamespace(dtype=torch.float16, decoder=SimpleNamespace(
            conv_in=SimpleNamespace(out_channels=128)))
        self.seen = []

    def decode_first_stage(self, z):
        self.seen.append(tuple(z.shape[-2:]))
        image = F.interpolate(z[:, :3], scale_factor=8, mode="bilinear", align_corners=False)
        return F.avg_pool2d(F.pad(image, (2, 2, 2, 2), mode="replicate"), 5, stride=1)


def big_latents_get_tiles_of(tile):
    return lambda model, z: tile if max(z.shape[-2:]) > tile else None


def test_previews_of_a_big_latent_are_decoded_small_while_the_guard_is_on():
    state, model = State(torch.randn(1, 4, 512, 384)), Model()
    guard = LargeOutputGuard(model, state, choose=big_latents_get_tiles_of(64))
    state.do_set_current_image()
    state.current_latent = torch.randn(1, 4, 64, 64)
    state.do_set_current_image()
    guard.remove()
    state.current_latent = torch.randn(1, 4, 512, 384)
    state.do_set_current_image()
    assert state.decoded_shapes == [(1, 4, PREVIEW_MAX_SIDE, 96), (1, 4, 64, 64), (1, 4, 512, 384)]
    assert "do_set_current_image" not in vars(state) and "decode_first_stage" not in vars(model)


def test_big_decodes_are_tiled_and_small_ones_untouched():
    model = Model()
    expected_small = model.decode_first_stage(torch.ones(1, 4, 24, 24))
    latent = torch.randn(1, 4, 80, 56)
    expected_tiled = tiled_decode(model.decode_first_stage, latent, tile=32, overlap=default_overlap(32))
    model.seen.clear()
    guard = LargeOutputGuard(model, State(None), choose=big_latents_get_tiles_of(32))
    try:
        torch.testing.assert_close(model.decode_first_stage(torch.ones(1, 4, 24, 24)), expected_small)
        assert model.seen == [(24, 24)]
        torch.testing.assert_close(model.decode_first_stage(latent), expected_tiled)
        assert len(model.seen) > 2 and max(max(s) for s in model.seen[1:]) <= 32  # the model never saw it whole
    finally:
        guard.remove()
    model.seen.clear()
    assert model.decode_first_stage(latent).shape == (1, 3, 640, 448) and model.seen == [(80, 56)]


def test_a_second_patch_on_top_survives_the_guards_removal():
    model, state = Model(), State(None)
    guard = LargeOutputGuard(model, state, choose=big_latents_get_tiles_of(32))
    other = lambda z: "theirs"  # noqa: E731 - another extension patching after us
    model.decode_first_stage = other
    guard.remove()
    assert model.decode_first_stage is other


def test_the_tile_is_the_setting_or_fits_the_memory():
    model = Model()
    opts = SimpleNamespace(data={"scalefusion_decode_tile": 96})
    assert tile_size(model, opts, torch.device("cpu")) == 96
    opts.data["scalefusion_decode_tile"] = 0
    auto = tile_size(model, opts, torch.device("cpu"))
    assert 32 <= auto <= 256 and auto % 8 == 0


def test_sdxl_tiles_are_sized_for_the_32_bit_retry():
    model = Model()
    assert decode_element_size(model) == 2
    model.is_sdxl = True
    assert decode_element_size(model) == 4


def test_tiled_vae_is_recognised():
    model = Model()
    assert not tiled_vae_active(model)
    model.first_stage_model.decoder.original_forward = lambda x: x
    assert tiled_vae_active(model)


def test_a_decode_inside_a_denoiser_step_is_a_preview_and_shrunk():
    """--medvram/--lowvram decode the live preview inside the step, through decode_first_stage."""
    from lib_hires.webui.decoding import StepPreviews

    model, state = Model(), State(None)
    guard = LargeOutputGuard(model, state, choose=big_latents_get_tiles_of(512))
    big = torch.randn(1, 4, 256, 192)

    class CFGDenoiser:
        def forward(self, x):
            return model.decode_first_stage(big)  # store_latent's preview decode

    cfg = CFGDenoiser()
    watch = StepPreviews(cfg, guard)
    try:
        assert cfg.forward(None).shape[-2:] == (8 * PREVIEW_MAX_SIDE, 8 * 96)
        assert model.decode_first_stage(big).shape[-2:] == (2048, 1536)  # outside a step: the real decode
        assert model.seen == [(PREVIEW_MAX_SIDE, 96), (256, 192)]
    finally:
        watch.remove()
        guard.remove()
    assert "forward" not in vars(cfg) and not guard.in_step
