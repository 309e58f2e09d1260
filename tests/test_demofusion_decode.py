"""Tiled decode: equal to the full decode for a smooth decoder, with the decoder's memory set by the tile."""
import pytest
import torch
import torch.nn.functional as F

from lib_hires.demofusion import tiled_decode


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
    # away from every seam the tile saw the same context as the full decode
    inner = error[..., 8 * tile // 2 - 8:8 * tile // 2 + 8, :8 * tile // 2]
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
        assert decoder.calls == (int((side - 16) / 12 - 1e-6) + 2) ** 2  # one tile at a time
    assert largest[0] == largest[1] == largest[2] == 3 * (16 * 8) ** 2


def test_a_decoder_that_does_not_scale_evenly_is_refused():
    with pytest.raises(ValueError, match="expected the same integer scale"):
        tiled_decode(lambda z: z[..., :-1, :], torch.zeros(1, 4, 16, 16), tile=8, overlap=2)
    with pytest.raises(ValueError, match="overlap must be from 0 to tile - 1"):
        tiled_decode(SmoothDecoder(), torch.zeros(1, 4, 16, 16), tile=8, overlap=8)
