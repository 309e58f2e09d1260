"""lib_hires.webui.forge.decoding on Forge's own VAE classes (in-process), with the SD1 fixture's full-size VAE."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lib_hires.webui.forge.decoding import TiledVae

# The GroupNorm setting given, not read from Forge's options: importing Forge's ``modules`` here would parse
# pytest's command line as Forge's.
WHOLE_IMAGE = lambda: "whole image"  # noqa: E731


@pytest.fixture(scope="module")
def forge_vae(forge_backend, forge_root_dir, sd1_checkpoint):
    """``backend.patcher.vae.VAE`` around ``IntegratedAutoencoderKL``, made as Forge's loader makes it."""
    from safetensors.torch import load_file

    from backend import memory_management
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.operations import using_forge_operations
    from backend.patcher.vae import VAE
    from backend.state_dict import load_state_dict

    config = IntegratedAutoencoderKL.load_config(
        str(forge_root_dir / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5" / "vae"))
    with using_forge_operations(device=memory_management.cpu, dtype=memory_management.vae_dtype()):
        model = IntegratedAutoencoderKL.from_config(config)
    prefix = "first_stage_model."
    state = {k[len(prefix):]: v.float() for k, v in load_file(str(sd1_checkpoint)).items() if k.startswith(prefix)}
    load_state_dict(model, state)
    return VAE(model=model)


def decoder_inputs(vae):
    seen = []
    hook = vae.first_stage_model.decoder.conv_in.register_forward_pre_hook(
        lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    return seen, hook


def test_forges_decode_of_a_big_latent_goes_through_tiles_with_whole_image_groupnorm(forge_vae):
    latent = torch.randn(1, 4, 24, 16, generator=torch.Generator().manual_seed(5))
    forge_objects = SimpleNamespace(vae=forge_vae)
    with torch.no_grad():
        whole = forge_vae.decode(latent)  # Forge's own path: one call
        forges_tiles = forge_vae.decode_tiled(latent, tile_x=16, tile_y=16, overlap=4)  # its OOM fallback
        small = forge_vae.decode(latent[..., :16, :16])
        tiling = TiledVae(SimpleNamespace(forge_objects=forge_objects), tile_for=lambda hw: 16, mode=WHOLE_IMAGE)
        seen, hook = decoder_inputs(forge_vae)
        try:
            tiled = forge_objects.vae.decode(latent)
            small_again = forge_objects.vae.decode(latent[..., :16, :16])
        finally:
            hook.remove()
            tiling.remove()
    assert forge_objects.vae is forge_vae and "model_vae_decode_wrapper" not in forge_vae.patcher.model_options
    assert tiled.shape == whole.shape == (1, 192, 128, 3) and tiling.wrappers.tiled_decodes == 1
    assert max(max(s) for s in seen) <= 16 and (16, 16) in seen  # tiles only; the small latent whole
    assert torch.equal(small_again, small)  # what fits one tile is Forge's own decode, bit for bit
    ours, forges = ((x - whole).abs().mean().item() for x in (tiled, forges_tiles))
    print(f"mean |tiled - whole decode|: ScaleFusion {ours:.5f}, Forge's own tiled fallback {forges:.5f}")
    assert ours < forges


def test_forges_encode_of_a_big_image_goes_through_tiles(forge_vae):
    from lib_hires.vae import shared_norm_forward
    from lib_hires.vae import default_overlap

    pixels = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(6))  # Forge: B, H, W, C in [0, 1]
    forge_objects = SimpleNamespace(vae=forge_vae)
    model = forge_vae.first_stage_model
    forge_vae.patcher.model_options["model_vae_regulation"] = lambda posterior: posterior.mode()  # no noise
    seen = []
    hook = model.encoder.conv_in.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    try:
        with torch.no_grad():
            tiling = TiledVae(SimpleNamespace(forge_objects=forge_objects), tile_for=lambda hw: 8,
                              mode=WHOLE_IMAGE)
            try:
                tiled = forge_objects.vae.encode(pixels)
            finally:
                tiling.remove()
            hook.remove()
            image = 2.0 * pixels.movedim(-1, 1) - 1.0
            moments = model.quant_conv(shared_norm_forward(model.encoder, image, tile=8, overlap=default_overlap(8),
                                                           unit=8))
    finally:
        hook.remove()
        del forge_vae.patcher.model_options["model_vae_regulation"]
    assert tiled.shape == (1, 4, 16, 16) and max(max(s) for s in seen) <= 64  # the encoder saw tiles only
    # Forge's quant_conv and posterior (its regulation here) on the moments assembled from the tiles
    torch.testing.assert_close(tiled, moments.chunk(2, dim=1)[0])


def test_a_forge_jobs_big_latent_is_decoded_in_tiles_by_the_server(forge, fresh_plain):
    """Through the API: a ScaleFusion job's decode with a 16-latent-px tile (this request only) goes through
    lib_hires.webui.forge.decoding's tiles; the image is the untiled one's up to the tiles' attention, not equal to it."""
    from tests.integration_forge.conftest import scalefusion

    request = dict(width=256, height=256, steps=2, alwayson_scripts=scalefusion(method="ScaleCrafter"))
    log_start = len(forge.log_tail(10 ** 9))
    whole = forge.txt2img(**request)
    tiled = forge.txt2img(**request, override_settings={"scalefusion_decode_tile": 16},
                          override_settings_restore_afterwards=True)
    assert whole.status == 200 and tiled.status == 200, (whole, tiled)
    assert tiled.size == whole.size == (256, 256)
    difference = abs(tiled.image.astype(int) - whole.image.astype(int))
    assert 0 < difference.mean() < 8, difference.mean()
    again = forge.txt2img(**request)
    assert (again.image == whole.image).all()  # the option was for that request only
    plain = forge.txt2img()
    assert plain.status == 200 and (plain.image == fresh_plain.image).all()  # nothing left installed
    assert "Traceback" not in forge.log_tail(10 ** 9)[log_start:]
