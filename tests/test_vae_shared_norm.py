"""Tiled VAE passes with whole-image GroupNorm statistics, on the real SD VAE layout (random weights).

The measurements of issue 12: attention's output projection is zeroed so that only normalisation and tile
borders differ between a tiled and a whole pass, on an input whose left half is smooth and right half
textured (the case where per-tile statistics differ most), 128² latent px in tiles of 64.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib_hires.vae import (HostMemoryShort, UnsupportedVAE, last_pass, parked_bytes, program_of,
                                  shared_norm_forward)
from lib_hires.vae import default_overlap, tile_layout, tiled_decode, tiled_encode
from tools.vae_factory import build_decoder, build_encoder

WIDTH = 0.125   # 32 base channels: the narrowest the layout's 32-group GroupNorms allow


def without_attention(module):
    for m in module.modules():
        if hasattr(m, "proj_out"):
            nn.init.zeros_(m.proj_out.weight)
            nn.init.zeros_(m.proj_out.bias)
    return module


def half_smooth(channels, side, seed=0):
    gen = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(1, channels, side // 16 + 1, side // 16 + 1, generator=gen), size=(side, side),
                           mode="bicubic", align_corners=True)
    x = smooth.clone()
    x[..., side // 2:] = torch.randn(1, channels, side, side - side // 2, generator=gen)
    return x


def levels(image):
    """[-1, 1] -> 0..255 levels, as the WebUI saves an image."""
    return (image.clamp(-1, 1) + 1) * 127.5


def psnr(a, b, peak):
    return 10 * math.log10(peak ** 2 / F.mse_loss(a.double(), b.double()).item())


@pytest.fixture(scope="module")
def decoder():
    return without_attention(build_decoder(WIDTH, seed=1))


def test_tiled_decode_matches_the_whole_decode(decoder):
    latent = half_smooth(4, 128)
    with torch.no_grad():
        whole = decoder(latent)
    tiled = tiled_decode(decoder, latent, tile=64, overlap=default_overlap(64))
    assert tiled.shape == whole.shape
    quality = psnr(levels(tiled), levels(whole), 255)
    assert quality >= 40, f"tiled vs whole decode: {quality:.1f} dB"
    # outside attention (zeroed here) tiles whose halos are refreshed from their neighbours at every GroupNorm
    # compute what the whole pass computes, up to rounding (~90 dB); tiles that kept their own borders through
    # the whole decoder reached 40.7 dB here
    assert quality >= 60, f"tiled vs whole decode: {quality:.1f} dB: border errors travel into the tiles"


def test_tiled_encode_mean_matches_the_whole_encode():
    encoder = without_attention(build_encoder(WIDTH, seed=2))
    image = torch.tanh(half_smooth(3, 1024, seed=3))
    with torch.no_grad():
        whole = encoder(image)
    tiled = tiled_encode(encoder, image, tile=64, overlap=default_overlap(64))
    assert tiled.shape == whole.shape == (1, 8, 128, 128)
    mean, whole_mean = tiled[:, :4], whole[:, :4]
    peak = (whole_mean.max() - whole_mean.min()).item()
    quality = psnr(mean, whole_mean, peak)
    assert quality >= 40, f"tiled vs whole encode mean: {quality:.1f} dB of its range"
    # sampled once from the assembled moments with the seed's noise: what the whole encode samples, closely
    noise = torch.randn(whole_mean.shape, generator=torch.Generator().manual_seed(7))
    sample = mean + torch.exp(0.5 * tiled[:, 4:].clamp(-30, 20)) * noise
    whole_sample = whole_mean + torch.exp(0.5 * whole[:, 4:].clamp(-30, 20)) * noise
    assert psnr(sample, whole_sample, peak) >= 40


def smooth_decoder():
    """The real layout with every 3x3 conv a random channel mix of one [1 2 1]² blur: like a trained VAE (and
    unlike random 3x3 filters, which turn nearest-upsampled blocks into edges) it decodes smooth latents into
    smooth images, so that a seam is something to look for."""
    decoder = without_attention(build_decoder(WIDTH, seed=1))
    gen = torch.Generator().manual_seed(0)
    blur = torch.tensor([1.0, 2.0, 1.0])
    blur = blur[:, None] * blur[None, :] / 16
    with torch.no_grad():
        for m in decoder.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                cout, cin = m.weight.shape[:2]
                m.weight.copy_(torch.randn(cout, cin, generator=gen)[..., None, None] / cin ** 0.5 * blur)
    return decoder


def test_a_smooth_gradient_decodes_without_seams():
    """At every seam (the middle of each overlap, both axes) the step to the next pixel is at most the whole
    decode's own step there + 2 levels; tiles normalised each on its own step by far more."""
    decoder = smooth_decoder()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    latent = torch.stack([2 * xx, xx + yy, -xx, 0.5 * yy])[None]
    with torch.no_grad():
        whole = levels(decoder(latent))
    size, starts = tile_layout(64, 32, default_overlap(32))
    assert len(starts) == 3
    seams = [8 * (b + a + size) // 2 - 1 for a, b in zip(starts, starts[1:])]
    excess = {}
    for groupnorm in ("whole image", "per tile"):
        tiled = levels(tiled_decode(decoder, latent, tile=32, overlap=default_overlap(32), groupnorm=groupnorm))
        excess[groupnorm] = 0.0
        for axis in (-1, -2):
            a, b = tiled.transpose(axis, -1), whole.transpose(axis, -1)
            step = (a[..., 1:] - a[..., :-1]).abs()[..., seams]
            own = (b[..., 1:] - b[..., :-1]).abs()[..., seams]
            excess[groupnorm] = max(excess[groupnorm], (step - own).max().item())
    assert excess["whole image"] <= 2, f"a seam steps {excess['whole image']:.1f} levels beyond the gradient's own"
    assert excess["per tile"] > 5, "per-tile statistics show seams here: the measure must see them"


def test_layers_see_one_tile_and_the_rest_waits_parked(decoder):
    seen = {"in": [], "out": []}
    handles = [decoder.conv_in.register_forward_pre_hook(lambda m, a: seen["in"].append(max(a[0].shape[-2:]))),
               decoder.conv_out.register_forward_pre_hook(lambda m, a: seen["out"].append(max(a[0].shape[-2:])))]
    try:
        out = shared_norm_forward(decoder, torch.randn(1, 4, 48, 40), tile=16, overlap=4)
    finally:
        for h in handles:
            h.remove()
    assert out.shape == (1, 3, 384, 320)
    tiles = len(tile_layout(48, 16, 4)[1]) * len(tile_layout(40, 16, 4)[1])
    # + the probe (forward and program, each within one tile) where this decoder's program is not cached yet
    assert last_pass.tiles == tiles and len(seen["in"]) - tiles in (0, 2)
    assert max(seen["in"]) <= 16 and max(seen["out"]) <= 8 * 16
    # the waiting tiles' host memory is known before any work, and refused beyond a budget; only the tiles'
    # cores wait (one image's worth at the widest GroupNorm) plus the halo pieces kept for tiles still to come,
    # not the overlapping windows
    program = program_of(decoder, torch.zeros(1, 4, 16, 16), 1)
    (th, rows), (tw, cols) = tile_layout(48, 16, 4), tile_layout(40, 16, 4)
    estimate = parked_bytes(program, torch.zeros(1, 4, 48, 40), 16, 4)
    image = program.parked_per_px * 48 * 40 * 4
    assert image < last_pass.parked_peak <= estimate <= 1.1 * image
    assert estimate < 0.75 * program.parked_per_px * th * tw * len(rows) * len(cols) * 4
    with pytest.raises(HostMemoryShort, match="tiles waiting between GroupNorms need"):
        shared_norm_forward(decoder, torch.randn(1, 4, 48, 40), tile=16, overlap=4, park_budget=estimate - 1)


class OtherAttention(nn.Module):
    """An attention variant of the kind the WebUI swaps in: same parameters, another forward."""

    def __init__(self, block):
        super().__init__()
        self.norm, self.q, self.k, self.v, self.proj_out = block.norm, block.q, block.k, block.v, block.proj_out

    def forward(self, x, **unused):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
        return x + self.proj_out((weights @ v).transpose(1, 2).reshape(b, c, h, w))


def test_an_attention_variant_is_followed_and_attention_stays_per_tile():
    decoder = build_decoder(WIDTH, seed=4)
    reference = tiled_decode(decoder, torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(1)),
                             tile=24, overlap=6)
    decoder.mid.attn_1 = OtherAttention(decoder.mid.attn_1)
    again = tiled_decode(decoder, torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(1)),
                         tile=24, overlap=6)
    torch.testing.assert_close(again, reference, atol=1e-4, rtol=1e-4)
    kinds = [s.kind for s in program_of(decoder, torch.zeros(1, 4, 16, 16), 1).steps]
    assert kinds.count("attention") == 1 and kinds.count("norm") == 2 * 2 + 2 * 4 * 3 + 1


class Unknown(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.a, self.b = nn.GroupNorm(32, channels), nn.GroupNorm(32, channels)

    def forward(self, x, *args):
        return self.b(self.a(x))


def test_an_unknown_structure_is_refused_and_a_wrong_guess_caught():
    decoder = build_decoder(WIDTH, seed=5)
    decoder.mid.block_2 = Unknown(decoder.conv_in.out_channels)
    with pytest.raises(UnsupportedVAE, match="Unknown holds GroupNorms"):
        tiled_decode(decoder, torch.randn(1, 4, 40, 40), tile=24, overlap=6)
    other = build_decoder(WIDTH, seed=6)
    original = other.mid.block_1.forward
    other.mid.block_1.forward = lambda x, temb=None: original(x) * 0.5  # not the ResnetBlock its parts say
    with pytest.raises(UnsupportedVAE, match="differ from its forward"):
        tiled_decode(other, torch.randn(1, 4, 40, 40), tile=24, overlap=6)
    with pytest.raises(TypeError, match="need the VAE module itself"):
        tiled_decode(lambda z: z, torch.randn(1, 4, 40, 40), tile=24, overlap=6, groupnorm="whole image")
    with pytest.raises(ValueError, match="multiples of 8"):
        tiled_encode(build_encoder(WIDTH), torch.randn(1, 3, 100, 96), tile=8, overlap=2)
