"""Large decodes: tiles equal to the full decode for a smooth decoder, memory set by the tile, tile sizes
from memory, small previews."""
import pytest
import torch
import torch.nn.functional as F

from lib_hires.vae import (MAX_TILE, MIN_TILE, PREFERRED_TILE, choose_tile, decoder_peak_bytes, shrink_latent,
                                 tile_layout, tiled_decode)


class SmoothDecoder:
    """An 8x upsampler with a 3-channel mix and a blur: local, like a VAE decoder, with a zero-padded
    border that a tile's edge gets wrong. Records the largest tensor it receives and returns."""

    def __init__(self):
        self.largest = 0
        self.calls = 0

    def __call__(self, latent):
        mix = torch.tensor([[0.5, 0.2, -0.1, 0.3], [0.1, 0.6, 0.2, -0.2], [-0.3, 0.1, 0.4, 0.5]])
        image = torch.einsum("oc,bchw->bohw", mix, latent)
        image = F.interpolate(image, scale_factor=8, mode="bilinear", align_corners=False)
        image = F.avg_pool2d(F.pad(image, (2, 2, 2, 2)), 5, stride=1)
        self.largest = max(self.largest, latent.numel(), image.numel())
        self.calls += 1
        return image


def smooth_latent(batch, height, width, seed=0):
    coarse = torch.randn(batch, 4, height // 4 + 1, width // 4 + 1, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)


@pytest.mark.parametrize("size,tile,overlap", [((40, 56), 16, 4), ((33, 70), 24, 8), ((20, 12), 16, 6)])
def test_tiles_blend_into_the_full_decode(size, tile, overlap):
    latent = smooth_latent(2, *size)
    full = SmoothDecoder()(latent)
    tiled = tiled_decode(SmoothDecoder(), latent, tile=tile, overlap=overlap)
    assert tiled.shape == full.shape
    error = (tiled - full).abs()
    assert error.max() < 0.025 * full.abs().max()  # plain averaging of the same tiles: 0.19-0.35
    # before the first seam the first tile saw the same context as the full decode
    (_, rows), (_, cols) = tile_layout(size[0], tile, overlap), tile_layout(size[1], tile, overlap)
    inner = error[..., :8 * (rows + [size[0]])[1], :8 * (cols + [size[1]])[1]]
    assert inner.max() < 1e-5


def test_one_tile_is_the_plain_decode():
    latent = smooth_latent(1, 16, 24)
    torch.testing.assert_close(tiled_decode(SmoothDecoder(), latent, tile=32, overlap=8), SmoothDecoder()(latent))


def test_the_decoders_memory_does_not_grow_with_the_image():
    largest = []
    for side in (32, 64, 128):
        decoder = SmoothDecoder()
        out = tiled_decode(decoder, smooth_latent(1, side, side), tile=16, overlap=4, out_device="cpu")
        assert out.shape == (1, 3, 8 * side, 8 * side)
        largest.append(decoder.largest)
        assert decoder.calls == len(tile_layout(side, 16, 4)[1]) ** 2  # one tile at a time
    assert max(largest) <= 3 * (16 * 8) ** 2


def test_a_decoder_that_does_not_scale_evenly_is_refused():
    with pytest.raises(ValueError, match="expected the same integer scale"):
        tiled_decode(lambda z: z[..., :-1, :], torch.zeros(1, 4, 16, 16), tile=8, overlap=2)
    with pytest.raises(ValueError, match="overlap must be from 0 to tile - 1"):
        tiled_decode(SmoothDecoder(), torch.zeros(1, 4, 16, 16), tile=8, overlap=8)


@pytest.mark.parametrize("length,tile,overlap", [(256, 128, 16), (512, 128, 16), (129, 128, 16), (100, 24, 6),
                                                 (37, 16, 4), (1000, 96, 16), (64, 64, 16)])
def test_tiles_are_few_equal_and_overlap_just_enough(length, tile, overlap):
    size, starts = tile_layout(length, tile, overlap)
    assert size <= tile and starts[0] == 0 and starts[-1] + size == length
    shared = [a + size - b for a, b in zip(starts, starts[1:])]
    assert all(s >= overlap for s in shared)
    assert all(s <= overlap + len(starts) for s in shared)  # only rounding beyond the asked overlap
    fewer = len(starts) - 1  # one tile less cannot cover the length with that overlap
    assert fewer == 0 or fewer * tile - (fewer - 1) * overlap < length


def test_a_2048_px_decode_in_128_px_tiles_does_little_extra_work():
    size, starts = tile_layout(256, 128, 16)
    assert (size, len(starts)) == (96, 3)
    assert (len(starts) * size) ** 2 / 256 ** 2 < 1.3  # vs 2.25 for 128-px tiles stepped by 112


def test_seams_are_invisible_on_a_smooth_pattern():
    """A smooth pattern decoded in 3 x 2 tiles stays within one 8-bit level of the full decode, seams included."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 96), torch.linspace(-1, 1, 80), indexing="ij")
    latent = torch.stack([torch.sin(2 * xx + yy), torch.cos(xx - 2 * yy), xx * yy, xx + yy])[None]
    image = tiled_decode(SmoothDecoder(), latent, tile=40, overlap=12)
    full = SmoothDecoder()(latent)
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))  # the zero-padded image border differs anyway
    levels = (image - full)[inner].abs().max() * 255 / 2  # [-1, 1] -> 0..255
    assert levels < 1, f"a seam shows: {levels:.2f} levels off the full decode"
    hard_seams = tiled_decode(SmoothDecoder(), latent, tile=40, overlap=0)  # butted tiles, no blending
    assert (hard_seams - full)[inner].abs().max() * 255 / 2 > 2 * levels


def test_the_tile_fits_the_memory_given():
    gib = 2 ** 30
    small, large = choose_tile(4 * gib, 4), choose_tile(64 * gib, 4)
    assert MIN_TILE <= small < large == PREFERRED_TILE and small % 8 == 0
    assert decoder_peak_bytes(small, small, 4) <= 2 * gib < decoder_peak_bytes(small + 8, small + 8, 4)
    assert choose_tile(4 * gib, 2) > small  # half precision: twice the pixels
    assert choose_tile(4 * gib, 4, channels=128) > small  # a narrower VAE
    assert choose_tile(1, 4) == MIN_TILE and choose_tile(10 ** 15, 2) == PREFERRED_TILE
    assert choose_tile(10 ** 15, 2, preferred=MAX_TILE) == MAX_TILE


def test_the_peak_estimate_covers_a_real_architecture_decode():
    """The estimate is at least the activation memory the real decoder layout allocates at once."""
    from tools.vae_factory import build_decoder

    decoder = build_decoder(width=0.25)
    peak = {"now": 0, "max": 0}

    def track(module, args, output):
        peak["max"] = max(peak["max"], output.numel() * output.element_size() * 3)  # input, temporaries, output

    hooks = [m.register_forward_hook(track) for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            assert decoder(torch.randn(1, 4, 16, 24)).shape == (1, 3, 128, 192)
    finally:
        for h in hooks:
            h.remove()
    assert peak["max"] <= decoder_peak_bytes(16, 24, 4, channels=decoder.conv_in.out_channels)


def test_previews_shrink_only_what_is_too_big():
    small = torch.randn(1, 4, 64, 96)
    assert shrink_latent(small, 128) is small
    big = torch.randn(2, 4, 512, 256, dtype=torch.float16)
    shrunk = shrink_latent(big, 128)
    assert shrunk.shape == (2, 4, 128, 64) and shrunk.dtype == torch.float16
    torch.testing.assert_close(shrunk.float().mean(dim=(-2, -1)), big.float().mean(dim=(-2, -1)), atol=1e-3, rtol=0)
