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


class VAEHook:
    """A stand-in of the state Tiled VAE's hook leaves (multidiffusion-upscaler's tilevae.py): an object of a
    class of this name installed as the module's forward, holding the module as ``net``, the module's own forward
    kept as ``original_forward``. It records what it is given and runs the original forward."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x):
        self.calls.append(tuple(x.shape[-2:]))
        return self.net.original_forward(x)


def install_tiled_vae(part):
    if not hasattr(part, "original_forward"):
        part.original_forward = part.forward
    part.forward = VAEHook(part)
    return part.forward


def turn_tiled_vae_off(part):
    """What Tiled VAE does when it is turned off: the hook goes, ``original_forward`` stays."""
    part.forward.net = None
    part.forward = part.original_forward


def forget_tiled_vae(part):
    vars(part).pop("forward", None)
    vars(part).pop("original_forward", None)


@pytest.fixture
def tiled_vae_parts(vae_model):
    parts = (vae_model.first_stage_model.decoder, vae_model.first_stage_model.encoder)
    yield parts
    for part in parts:
        forget_tiled_vae(part)


def test_a_tiled_vae_leftover_with_the_plain_forward_is_tiled_by_us(vae_model, tiled_vae_parts):
    model, (decoder, encoder) = vae_model, tiled_vae_parts
    for part in tiled_vae_parts:
        install_tiled_vae(part)
        turn_tiled_vae_off(part)
    assert hasattr(decoder, "original_forward") and not tiled_vae_active(model)
    notes = []
    latent = torch.randn(1, 4, 24, 16)
    with torch.no_grad():
        expected = tiled_decode(decoder.original_forward, latent, tile=8, overlap=default_overlap(8))
        model.seen.clear()
        guard = LargeOutputGuard(model, State(None), choose=big_latents_get_tiles_of(8), mode=lambda: "per tile",
                                 notice=lambda: notes.append("tiled vae"))
        try:
            torch.testing.assert_close(model.decode_first_stage(latent), expected)
            model.encode_first_stage(torch.randn(1, 3, 192, 128))
        finally:
            guard.remove()
    assert notes == [] and model.seen and max(max(s) for s in model.seen) <= 64  # only tiles, both halves
    # the leftover forward (a bound method on the instance) is back as it was
    assert vars(decoder)["forward"] == decoder.original_forward and not isinstance(decoder.forward, VAEHook)


def test_an_installed_tiled_vae_hook_gets_the_passes_and_is_noted_once(vae_model, tiled_vae_parts, capsys):
    from lib_hires.webui.decoding import INFOTEXT_KEY, TILED_VAE_NOTE, note_tiled_vae

    model, (decoder, encoder) = vae_model, tiled_vae_parts
    install_tiled_vae(decoder)
    turn_tiled_vae_off(decoder)  # a leftover from an earlier job...
    hooks = [install_tiled_vae(part) for part in tiled_vae_parts]  # ...and the hook of this one
    assert tiled_vae_active(model)
    p = SimpleNamespace(extra_generation_params={})
    latent, image = torch.randn(1, 4, 24, 16), torch.randn(1, 3, 192, 128)
    with torch.no_grad():
        init = VaeTiling(model, choose=big_latents_get_tiles_of(8), notice=lambda: note_tiled_vae(p))
        assert init.patches == []
        guard = LargeOutputGuard(model, State(None), choose=big_latents_get_tiles_of(8),
                                 notice=lambda: note_tiled_vae(p))
        try:
            model.decode_first_stage(latent)
            model.encode_first_stage(image)
        finally:
            guard.remove()
    assert hooks[0].calls == [(24, 16)] and hooks[1].calls == [(192, 128)]  # whole inputs, handed to Tiled VAE
    assert decoder.forward is hooks[0] and encoder.forward is hooks[1]  # still installed: it is Tiled VAE's to remove
    assert p.extra_generation_params == {INFOTEXT_KEY: TILED_VAE_NOTE}
    assert capsys.readouterr().out.count("Tiled VAE (multidiffusion-upscaler) is hooked") == 1


def test_a_hook_of_another_class_or_detached_is_not_tiled_vae(vae_model, tiled_vae_parts):
    model, (decoder, _) = vae_model, tiled_vae_parts
    hook = install_tiled_vae(decoder)
    hook.net = None  # detached: Tiled VAE is done with it
    assert not tiled_vae_active(model)
    decoder.forward = lambda x: x  # another extension's forward
    assert not tiled_vae_active(model)


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


class NansException(Exception):
    pass


class WebUINans:
    """``modules.devices``, ``modules.shared`` and ``modules.processing`` as far as a decode's NaN handling goes
    (WebUI v1.10.1): ``test_for_nans`` reads the first element only; ``decode_latent_batch`` tests each decoded
    sample and, with "Automatically revert VAE to 32-bit floats", converts the VAE and decodes it again."""

    def __init__(self, monkeypatch, *, tile=8, groupnorm="per tile", decode_method="Full"):
        import sys
        import types

        self.devices = types.ModuleType("modules.devices")
        self.devices.device, self.devices.cpu = "cpu", torch.device("cpu")
        self.devices.NansException = NansException
        self.devices.dtype_vae = torch.float16
        self.devices.test_for_nans = self.test_for_nans
        self.shared = types.ModuleType("modules.shared")
        self.shared.cmd_opts = SimpleNamespace(disable_nan_check=False)
        self.shared.opts = SimpleNamespace(data={"scalefusion_decode_tile": tile, "scalefusion_vae_groupnorm": groupnorm},
                                           sd_vae_decode_method=decode_method, auto_vae_precision=True)
        self.processing = types.ModuleType("modules.processing")
        self.processing.DecodedSamples = type("DecodedSamples", (list,), {"already_decoded": True})
        self.processing.decode_latent_batch = self.decode_latent_batch
        self.retries = 0
        package = types.ModuleType("modules")
        package.__path__ = []
        for name in ("devices", "shared", "processing"):
            setattr(package, name, getattr(self, name))
            monkeypatch.setitem(sys.modules, f"modules.{name}", getattr(self, name))
        monkeypatch.setitem(sys.modules, "modules", package)

    def test_for_nans(self, x, where):
        if not self.shared.cmd_opts.disable_nan_check and torch.isnan(x[(0,) * x.dim()]):
            raise NansException(f"A tensor with NaNs was produced in {where.upper()}.")

    def decode_latent_batch(self, model, batch, target_device=None, check_for_nans=False):
        samples = self.processing.DecodedSamples()
        for i in range(batch.shape[0]):
            sample = model.decode_first_stage(batch[i:i + 1])[0]
            if check_for_nans:
                try:
                    self.test_for_nans(sample, "vae")
                except NansException:
                    if not self.shared.opts.auto_vae_precision or self.devices.dtype_vae == torch.float32:
                        raise
                    self.devices.dtype_vae = torch.float32
                    self.retries += 1
                    sample = model.decode_first_stage(batch[i:i + 1])[0]
            samples.append(sample.to(target_device) if target_device is not None else sample)
        return samples


@pytest.fixture
def nan_in_third_tile_while_half(vae_model):
    """The decoder's conv_out gives NaNs on its third call (a tile that is neither the first nor covers the
    first pixel) while the fake's VAE dtype is half precision, as an fp16 overflow in one tile would."""
    webui = {"calls": 0}

    def overflow(module, args, output):
        webui["calls"] += 1
        if webui["calls"] == 3 and webui["fake"].devices.dtype_vae == torch.float16:
            return torch.full_like(output, float("nan"))
        return None

    handle = vae_model.first_stage_model.decoder.conv_out.register_forward_hook(overflow)
    yield webui
    handle.remove()


def test_a_nan_in_one_later_tile_takes_the_webuis_32_bit_retry(vae_model, nan_in_third_tile_while_half,
                                                                 monkeypatch):
    from lib_hires.webui.decoding import decode

    webui = nan_in_third_tile_while_half["fake"] = WebUINans(monkeypatch)
    latent = torch.randn(1, 4, 24, 16)
    with torch.no_grad():
        webui.devices.dtype_vae = torch.float32
        clean = tiled_decode(vae_model.first_stage_model.decoder.forward, latent, tile=8,
                             overlap=default_overlap(8))
        webui.devices.dtype_vae, nan_in_third_tile_while_half["calls"] = torch.float16, 0
        images = decode(SimpleNamespace(sd_model=vae_model, extra_generation_params={}), latent, tile=8)
    assert webui.retries == 1  # without the all-NaN answer the first element is fine and no retry happens
    torch.testing.assert_close(images[0], clean[0])


def test_without_the_retry_the_webuis_nan_message_is_raised(vae_model, nan_in_third_tile_while_half, monkeypatch):
    from lib_hires.webui.decoding import decode

    webui = nan_in_third_tile_while_half["fake"] = WebUINans(monkeypatch)
    webui.shared.opts.auto_vae_precision = False
    with torch.no_grad(), pytest.raises(NansException, match="NaNs was produced in VAE"):
        decode(SimpleNamespace(sd_model=vae_model, extra_generation_params={}), torch.randn(1, 4, 24, 16), tile=8)


def test_disable_nan_check_keeps_the_tiles_as_decoded(vae_model, nan_in_third_tile_while_half, monkeypatch):
    from lib_hires.webui.decoding import decode

    webui = nan_in_third_tile_while_half["fake"] = WebUINans(monkeypatch)
    webui.shared.cmd_opts.disable_nan_check = True
    with torch.no_grad():
        image = decode(SimpleNamespace(sd_model=vae_model, extra_generation_params={}), torch.randn(1, 4, 24, 16),
                       tile=8)[0]
    assert torch.isnan(image).any() and not torch.isnan(image).all() and webui.retries == 0


@pytest.mark.parametrize("groupnorm", ["per tile", "whole image"])
def test_a_nan_in_a_later_tile_of_an_encode_raises_the_webuis_nan_exception(vae_model, monkeypatch, groupnorm):
    WebUINans(monkeypatch, groupnorm=groupnorm)
    image = torch.randn(1, 3, 192, 128)
    image[..., 150:160, 100:110] = float("nan")  # far from the first pixel, inside later tiles only
    tiling = VaeTiling(vae_model, choose=big_latents_get_tiles_of(8), mode=lambda: groupnorm)
    try:
        with torch.no_grad(), pytest.raises(NansException, match="VAE"):
            vae_model.encode_first_stage(image)
    finally:
        tiling.remove()


def test_scalefusions_final_decode_replaces_the_webuis_vae_decoder_key(vae_model, monkeypatch):
    from lib_hires.webui.decoding import INFOTEXT_KEY, post_sample

    WebUINans(monkeypatch)
    latent = torch.randn(1, 4, 24, 16)
    p = SimpleNamespace(sd_model=vae_model, extra_generation_params={"VAE Decoder": "TAESD", "Steps": 3})
    ps = SimpleNamespace(samples=latent)
    with torch.no_grad():
        post_sample(p, ps)
    assert ps.samples.already_decoded and ps.samples[0].shape == (3, 192, 128)
    assert p.extra_generation_params == {"Steps": 3,
                                         INFOTEXT_KEY: "ScaleFusion tiled decode (64 px tiles; per tile)"}


def test_a_decode_the_full_vae_does_not_make_is_left_to_the_webui(vae_model, tiled_vae_parts, monkeypatch):
    from lib_hires.webui.decoding import INFOTEXT_KEY, TILED_VAE_NOTE, post_sample

    webui = WebUINans(monkeypatch, decode_method="TAESD")
    latent = torch.randn(1, 4, 24, 16)
    p = SimpleNamespace(sd_model=vae_model, extra_generation_params={})
    ps = SimpleNamespace(samples=latent)
    post_sample(p, ps)  # TAESD decodes: its own key is the WebUI's to write
    assert ps.samples is latent and p.extra_generation_params == {}
    webui.shared.opts.sd_vae_decode_method = "Full"
    install_tiled_vae(tiled_vae_parts[0])
    post_sample(p, ps)  # Tiled VAE's hook decodes
    assert ps.samples is latent and p.extra_generation_params == {INFOTEXT_KEY: TILED_VAE_NOTE}
