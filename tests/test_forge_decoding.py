"""Forge's side of large outputs, on stand-ins of backend/patcher/vae.py's VAE (no Forge needed)."""
from types import SimpleNamespace

import pytest
import torch

from lib_hires.webui.forge.decoding import (DECODE_WRAPPER, ENCODE_WRAPPER, SmallPreviews, TiledVae, VaeWrappers,
                                      automatic_tile)
from lib_hires.vae import shared_norm_forward
from lib_hires.vae import PREVIEW_MAX_SIDE, default_overlap, tiled_apply
from tests.forge_fakes import FakeForgeVae as ForgeVae, MeanPosterior, tiny_first_stage


def mean_of(moments, regulation):
    return MeanPosterior(moments).sample()


@pytest.fixture(scope="module")
def first_stage():
    return tiny_first_stage()


def wrappers_for(vae, tile, **kwargs):
    kwargs.setdefault("mode", lambda: "whole image")
    return VaeWrappers(vae, lambda hw: tile, load=lambda v: None, sample_posterior=mean_of, **kwargs)


def test_small_latents_take_forges_own_path_unchanged(first_stage):
    vae = ForgeVae(first_stage)
    latent = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        expected = vae.decode(latent)
        wrappers = wrappers_for(vae, 16)
        vae.patcher.model_options[DECODE_WRAPPER] = wrappers.decode
        assert torch.equal(vae.decode(latent), expected)
    assert wrappers.tiled_decodes == 0 and vae.inner_calls == [("decode", (16, 16))] * 2


def to_forge_image(x):
    return torch.clamp((x + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1)


def test_big_latents_are_decoded_in_tiles_with_whole_image_groupnorm(first_stage):
    vae = ForgeVae(first_stage)
    latents = torch.randn(2, 4, 24, 16)
    wrappers = wrappers_for(vae, 16)
    vae.patcher.model_options[DECODE_WRAPPER] = wrappers.decode
    seen = []
    hook = first_stage.decoder.conv_in.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    try:
        with torch.no_grad():
            images = vae.decode(latents)
    finally:
        hook.remove()
    assert images.shape == (2, 192, 128, 3) and vae.inner_calls == [] and wrappers.tiled_decodes == 2
    assert seen and max(max(s) for s in seen) <= 16  # the decoder never saw more than one tile
    with torch.no_grad():
        second = shared_norm_forward(first_stage.decoder, latents[1:2], tile=16, overlap=default_overlap(16))
        whole = first_stage.decoder(latents[:1])
        per_tile = wrappers_for(vae, 16, mode=lambda: "per tile").decode(vae.decode_inner, latents[:1])
        per_tile_reference = tiled_apply(first_stage.decoder, latents[:1], tile=16, overlap=default_overlap(16))
    torch.testing.assert_close(images[1:], to_forge_image(second))  # each image of the batch on its own
    torch.testing.assert_close(per_tile, to_forge_image(per_tile_reference))  # the "per tile" setting
    # Whole-image statistics are what make the tiles agree: nearer one whole decode than tiles normalised alone
    # (attention still attends within a tile, so not equal to it).
    error, per_tile_error = ((x - to_forge_image(whole)).abs().mean() for x in (images[:1], per_tile))
    assert error < 0.8 * per_tile_error, (error, per_tile_error)


def test_big_images_are_encoded_in_tiles(first_stage):
    vae = ForgeVae(first_stage)
    pixels = torch.rand(1, 192, 128, 3)  # Forge's layout: B, H, W, C in [0, 1]
    with torch.no_grad():
        small = torch.rand(1, 64, 64, 3)
        wrappers = wrappers_for(vae, 16)
        assert torch.equal(wrappers.encode(vae.encode_inner, small), vae.encode_inner(small))
        latent = wrappers.encode(vae.encode_inner, pixels)
        moments = shared_norm_forward(first_stage.encoder, 2.0 * pixels.movedim(-1, 1) - 1.0, tile=16,
                                      overlap=default_overlap(16), unit=8)
    assert latent.shape == (1, 4, 24, 16)
    torch.testing.assert_close(latent, mean_of(moments, None))
    assert vae.inner_calls == [("encode", (64, 64))] * 2  # the big image never reached Forge's whole encode


def test_another_extensions_wrapper_stays_outside_ours(first_stage):
    vae = ForgeVae(first_stage)
    calls = []

    def theirs(inner, samples):
        calls.append(tuple(samples.shape[-2:]))
        return inner(samples) * 0.5

    vae.patcher.model_options[DECODE_WRAPPER] = theirs
    forge_objects = SimpleNamespace(vae=vae)
    tiling = TiledVae(SimpleNamespace(forge_objects=forge_objects), tile_for=lambda hw: 16, load=lambda v: None,
                      mode=lambda: "per tile")
    with torch.no_grad():
        out = forge_objects.vae.decode(torch.randn(1, 4, 24, 16))
    tiling.remove()
    assert calls == [(24, 16)] and tiling.wrappers.tiled_decodes == 1 and out.max() <= 0.5
    assert vae.inner_calls == []


def test_tiled_vae_swaps_a_clone_in_and_puts_the_original_back(first_stage):
    vae = ForgeVae(first_stage)
    forge_objects = SimpleNamespace(vae=vae)
    tiling = TiledVae(SimpleNamespace(forge_objects=forge_objects), tile_for=lambda hw: 16)
    assert forge_objects.vae is tiling.vae and tiling.vae is not vae
    assert set(tiling.vae.patcher.model_options) == {DECODE_WRAPPER, ENCODE_WRAPPER}
    assert vae.patcher.model_options == {}  # the original patcher is untouched
    tiling.remove()
    assert forge_objects.vae is vae
    again = TiledVae(SimpleNamespace(forge_objects=forge_objects), tile_for=lambda hw: 16)
    newer = ForgeVae(first_stage)
    forge_objects.vae = newer  # Forge's reset (or another extension) replaced ours: leave theirs alone
    again.remove()
    assert forge_objects.vae is newer


def test_previews_of_big_latents_are_shrunk_until_removed():
    class State:
        def __init__(self):
            self.current_latent, self.shapes = None, []

        def do_set_current_image(self):
            self.shapes.append(tuple(self.current_latent.shape))

    state = State()
    previews = SmallPreviews(state)
    for shape in ((1, 4, 512, 384), (1, 4, 64, 64)):
        latent = state.current_latent = torch.randn(shape)
        state.do_set_current_image()
        assert state.current_latent is latent  # the sampler's own latent, not the preview's copy
    previews.remove()
    state.current_latent = torch.randn(1, 4, 512, 384)
    state.do_set_current_image()
    assert state.shapes == [(1, 4, PREVIEW_MAX_SIDE, 96), (1, 4, 64, 64), (1, 4, 512, 384)]
    assert "do_set_current_image" not in vars(state)


def test_the_tile_is_the_setting_or_fits_the_free_memory(first_stage):
    vae = ForgeVae(first_stage)
    assert automatic_tile(vae, SimpleNamespace(data={"scalefusion_decode_tile": 48}), free_bytes=lambda d: 0) == 48
    roomy = automatic_tile(vae, SimpleNamespace(data={}), free_bytes=lambda d: 64 * 2 ** 30)
    tight = automatic_tile(vae, SimpleNamespace(data={}), free_bytes=lambda d: 2 ** 30)
    assert roomy == 128 and 32 <= tight < roomy and tight % 8 == 0
