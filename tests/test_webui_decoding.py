"""The WebUI side of large outputs, on stand-ins: the preview and decode patches, the tile choice."""
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import pytest

from lib_hires.vae import PREVIEW_MAX_SIDE, default_overlap, tiled_decode, tiled_encode
from lib_hires.webui.decoding import (LargeOutputGuard, LivePreviewShrink, VaeTiling, decode_element_size, groupnorm_mode, tile_size,
                                      tiled_vae_active)
from tools.vae_factory import build_decoder, build_encoder


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


def test_previews_of_a_big_latent_are_decoded_small_while_the_shrink_is_on():
    state, model = State(torch.randn(1, 4, 512, 384)), Model()
    previews = LivePreviewShrink(state)
    guard = LargeOutputGuard(model, state, choose=big_latents_get_tiles_of(64))
    state.do_set_current_image()
    state.current_latent = torch.randn(1, 4, 64, 64)
    guard.remove()   # p.sample has returned: the previews stay small until postprocess
    state.do_set_current_image()
    previews.remove()
    state.current_latent = torch.randn(1, 4, 512, 384)
    state.do_set_current_image()
    assert state.decoded_shapes == [(1, 4, PREVIEW_MAX_SIDE, 96), (1, 4, 64, 64), (1, 4, 512, 384)]
    assert "do_set_current_image" not in vars(state) and "decode_first_stage" not in vars(model)


class VaeModel:
    """The WebUI model's VAE path on the real layout (tiny random weights): decode_first_stage runs
    first_stage_model.decoder, encode_first_stage the encoder (its moments) and one sample from them."""

    def __init__(self):
        self.first_stage_model = torch.nn.Module()
        self.first_stage_model.decoder = build_decoder(0.125, seed=8)
        self.first_stage_model.encoder = build_encoder(0.125, seed=9)
        self.seen = []
        for part in (self.first_stage_model.decoder, self.first_stage_model.encoder):
            part.conv_in.register_forward_pre_hook(lambda m, a: self.seen.append(tuple(a[0].shape[-2:])))

    def decode_first_stage(self, z):
        return self.first_stage_model.decoder(z)

    def encode_first_stage(self, x, seed=3):
        moments = self.first_stage_model.encoder(x)
        mean, logvar = moments.chunk(2, dim=1)
        return mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vae_model():
    return VaeModel()


def test_big_decodes_and_encodes_are_tiled_and_small_ones_untouched(vae_model):
    model = vae_model
    vae = model.first_stage_model
    with torch.no_grad():
        small_latent, small_image = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 64, 64)
        expected = model.decode_first_stage(small_latent), model.encode_first_stage(small_image)
        latent, image = torch.randn(1, 4, 24, 16), torch.randn(1, 3, 192, 128)
        tiled_image = tiled_decode(vae.decoder, latent, tile=8, overlap=default_overlap(8))
        moments = tiled_encode(vae.encoder, image, tile=8, overlap=default_overlap(8))
        mean, logvar = moments.chunk(2, dim=1)
        tiled_latent = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape,
                                                                    generator=torch.Generator().manual_seed(3))
        model.seen.clear()
        guard = LargeOutputGuard(model, State(None), choose=big_latents_get_tiles_of(8), mode=lambda: "whole image")
        try:
            torch.testing.assert_close(model.decode_first_stage(small_latent), expected[0])
            torch.testing.assert_close(model.encode_first_stage(small_image), expected[1])
            assert model.seen == [(8, 8), (64, 64)]
            torch.testing.assert_close(model.decode_first_stage(latent), tiled_image)
            # one sample, drawn by the model's own code from the assembled moments, as for a whole encode
            torch.testing.assert_close(model.encode_first_stage(image), tiled_latent)
            assert max(max(s) for s in model.seen[2:]) <= 64  # neither half ever saw more than one tile
        finally:
            guard.remove()
        assert "forward" not in vars(vae.decoder) and "forward" not in vars(vae.encoder)
        model.seen.clear()
        assert model.decode_first_stage(latent).shape == (1, 3, 192, 128) and model.seen == [(24, 16)]


def test_per_tile_normalisation_is_the_setting_or_the_fallback(vae_model, capsys):
    model, latent = vae_model, torch.randn(1, 4, 24, 16)
    with torch.no_grad():
        per_tile = tiled_decode(model.decode_first_stage, latent, tile=8, overlap=default_overlap(8))
        tiling = VaeTiling(model, choose=big_latents_get_tiles_of(8), mode=lambda: "per tile")
        try:
            torch.testing.assert_close(model.decode_first_stage(latent), per_tile)
        finally:
            tiling.remove()
        decoder = model.first_stage_model.decoder
        original = decoder.mid.block_1.forward
        decoder.mid.block_1.forward = lambda x, temb=None: original(x) * 0.5  # a block the structure does not tell
        tiling = VaeTiling(model, choose=big_latents_get_tiles_of(8), mode=lambda: "whole image")
        try:
            fallback = model.decode_first_stage(latent)
            reference = tiled_decode(model.decode_first_stage, latent, tile=8, overlap=default_overlap(8))
        finally:
            tiling.remove()
            del decoder.mid.block_1.forward
        torch.testing.assert_close(fallback, reference)
    assert "GroupNorm statistics are not possible for this VAE" in capsys.readouterr().out
    assert groupnorm_mode(SimpleNamespace(data={})) == "whole image"
    assert groupnorm_mode(SimpleNamespace(data={"scalefusion_vae_groupnorm": "per tile"})) == "per tile"
    assert groupnorm_mode(SimpleNamespace(data={"scalefusion_vae_groupnorm": "bogus"})) == "whole image"


def test_tiled_vae_leaves_nothing_to_patch(vae_model):
    model = vae_model
    model.first_stage_model.encoder.original_forward = model.first_stage_model.encoder.forward
    try:
        assert tiled_vae_active(model)
        assert VaeTiling(model, choose=big_latents_get_tiles_of(16), mode=lambda: "whole image").patches == []
    finally:
        del model.first_stage_model.encoder.original_forward


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
