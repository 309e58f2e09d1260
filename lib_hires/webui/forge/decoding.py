"""Large outputs in Forge: VAE decodes and encodes of a big latent in tiles with whole-image GroupNorm statistics.

Forge's own VAE path (``backend/patcher/vae.py``) decodes the whole latent in one call. It tiles only after a
CUDA out-of-memory error (``memory_management.OOM_EXCEPTION`` is ``torch.cuda.OutOfMemoryError``; on a CPU an
allocation failure is a plain RuntimeError, or the process is killed) or with the built-in "Never OOM" VAE option
(``VAE_ALWAYS_TILED``), and its tiles (64 latent px, three offset tilings averaged) are each normalised on their
own, so a tile of sky and one of foliage get different GroupNorm statistics. A 4096-px ScaleFusion output then
either fails or comes back with tonal steps that no blending hides. Forge does offer a hook: the VAE patcher's
``model_options["model_vae_decode_wrapper"]`` / ``["model_vae_encode_wrapper"]``, each called as
``wrapper(inner, samples)``. :class:`TiledVae` sets both on a clone of ``forge_objects.vae`` (the object Forge's
``decode_first_stage`` / ``encode_first_stage`` use) and puts the original back in ``remove()``: a latent larger
than one tile runs through :class:`lib_hires.webui.decoding.TiledForward` (the same tiling, GroupNorm sharing and
fallbacks as in the AUTOMATIC1111 WebUI), anything smaller through Forge's own path untouched.

Forge's live previews never run the full VAE (its choices are Approx NN, Approx cheap and TAESD), but TAESD at
4096 px still costs several GB: :class:`SmallPreviews` hands the progress thread's decode a downscaled latent.

Forge's modules are imported inside functions only.
"""
from __future__ import annotations

import torch

from lib_hires.vae import choose_tile, shrink_latent
from lib_hires.webui.decoding import TILE_OPTION, TiledForward, groupnorm_mode
from lib_hires.webui.instance_patch import InstancePatch

DECODE_WRAPPER = "model_vae_decode_wrapper"
ENCODE_WRAPPER = "model_vae_encode_wrapper"


def _element_size(dtype) -> int:
    return torch.finfo(dtype).bits // 8 if getattr(dtype, "is_floating_point", False) else 4


def _free_bytes(device) -> int:
    from backend import memory_management
    return int(memory_management.get_free_memory(device))


def automatic_tile(vae, opts=None, free_bytes=None) -> int:
    """The decode tile in latent px: the user's setting, or 128 (1024 px) shrunk to what ``vae.device`` has free."""
    chosen = int((getattr(opts, "data", None) or {}).get(TILE_OPTION, 0) or 0)
    if chosen > 0:
        return chosen
    free = (free_bytes or _free_bytes)(vae.device)
    conv_in = getattr(getattr(vae.first_stage_model, "decoder", None), "conv_in", None)
    return choose_tile(free, _element_size(vae.vae_dtype), getattr(conv_in, "out_channels", 512))


def _load_vae(vae) -> None:
    from backend import memory_management
    memory_management.load_model_gpu(vae.patcher)


def _sample_posterior(moments: torch.Tensor, regulation):
    from backend.nn.vae import DiagonalGaussianDistribution
    posterior = DiagonalGaussianDistribution(moments)
    return regulation(posterior) if regulation is not None else posterior.sample()


class VaeWrappers:
    """The decode and encode wrappers of one Forge ``VAE`` (``backend.patcher.vae.VAE``).

    ``tile_for(latent_hw) -> int | None``: the tile for a latent of that size, None for Forge's own path.
    ``previous_decode`` / ``previous_encode``: wrappers that were set before (another extension's), kept outside
    ours. ``load``, ``sample_posterior``: Forge's model loading and posterior (injected in tests).
    """

    def __init__(self, vae, tile_for, mode=lambda: groupnorm_mode(_shared_opts()), previous_decode=None,
                 previous_encode=None, load=_load_vae, sample_posterior=_sample_posterior):
        self.vae, self.tile_for, self.mode = vae, tile_for, mode
        self.previous_decode, self.previous_encode = previous_decode, previous_encode
        self.load, self.sample_posterior = load, sample_posterior
        self.tiled_decodes = self.tiled_encodes = 0  # images decoded / encoded in tiles (for tests and logs)

    def _tiled(self, module, unit: int, tile: int) -> TiledForward:
        return TiledForward(self.vae, module, unit, lambda _model, _layout: tile, self.mode)

    def decode(self, decode_inner, samples_in: torch.Tensor) -> torch.Tensor:
        inner = decode_inner
        tile = self.tile_for(tuple(samples_in.shape[-2:]))
        if tile is not None and max(samples_in.shape[-2:]) > tile:
            inner = lambda samples: self._decode_tiled(samples, tile)  # noqa: E731
        return self.previous_decode(inner, samples_in) if self.previous_decode else inner(samples_in)

    def _decode_tiled(self, samples_in: torch.Tensor, tile: int) -> torch.Tensor:
        """What Forge's ``decode_inner`` returns (B, H, W, 3 in [0, 1] on the output device), one image at a time."""
        vae, model = self.vae, self.vae.first_stage_model
        self.load(vae)
        decoder = self._tiled(model.decoder, 1, tile)
        images = []
        with torch.no_grad():
            for i in range(samples_in.shape[0]):
                z = samples_in[i:i + 1].to(vae.vae_dtype).to(vae.device)
                if getattr(model, "post_quant_conv", None) is not None:
                    z = model.post_quant_conv(z)
                x = decoder(z).to(vae.output_device).float()
                images.append(torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0))
                self.tiled_decodes += 1
        return torch.cat(images).movedim(1, -1)

    def encode(self, encode_inner, pixel_samples: torch.Tensor) -> torch.Tensor:
        inner = encode_inner
        latent_hw = (pixel_samples.shape[1] // 8, pixel_samples.shape[2] // 8)  # Forge passes B, H, W, 3
        tile = self.tile_for(latent_hw)
        if tile is not None and max(latent_hw) > tile:
            inner = lambda pixels: self._encode_tiled(pixels, tile)  # noqa: E731
        return self.previous_encode(inner, pixel_samples) if self.previous_encode else inner(pixel_samples)

    def _encode_tiled(self, pixel_samples: torch.Tensor, tile: int) -> torch.Tensor:
        """What Forge's ``encode_inner`` returns: one posterior sample (or the regulation's) per image."""
        vae, model = self.vae, self.vae.first_stage_model
        self.load(vae)
        regulation = vae.patcher.model_options.get("model_vae_regulation", None)
        encoder = self._tiled(model.encoder, 8, tile)
        pixels = pixel_samples.movedim(-1, 1)
        latents = []
        with torch.no_grad():
            for i in range(pixels.shape[0]):
                x = (2.0 * pixels[i:i + 1] - 1.0).to(vae.vae_dtype).to(vae.device)
                moments = encoder(x)
                if getattr(model, "quant_conv", None) is not None:
                    moments = model.quant_conv(moments)
                latents.append(self.sample_posterior(moments, regulation).to(vae.output_device).float())
                self.tiled_encodes += 1
        return torch.cat(latents)


def _shared_opts():
    from modules import shared
    return shared.opts


class TiledVae:
    """``forge_objects.vae`` replaced by a clone that carries :class:`VaeWrappers`; ``remove()`` puts back the
    object it replaced (unless something replaced ours since). Forge resets ``forge_objects`` for every batch and
    pass, so a clone left behind by a crash is dropped at the next reset, not carried into another job."""

    def __init__(self, sd_model, tile_for=None, **wrapper_args):
        self.forge_objects = sd_model.forge_objects
        self.original = self.forge_objects.vae
        clone = self.original.clone()
        options = clone.patcher.model_options
        if tile_for is None:
            def tile_for(_latent_hw, vae=clone):
                return automatic_tile(vae, _shared_opts())
        self.wrappers = VaeWrappers(clone, tile_for, previous_decode=options.get(DECODE_WRAPPER),
                                    previous_encode=options.get(ENCODE_WRAPPER), **wrapper_args)
        # A new dict on the clone (ModelPatcher.clone deep-copies model_options): the original's stays as it was
        clone.patcher.model_options = {**options, DECODE_WRAPPER: self.wrappers.decode,
                                       ENCODE_WRAPPER: self.wrappers.encode}
        self.vae = clone
        self.forge_objects.vae = clone

    def remove(self) -> None:
        if self.forge_objects.vae is self.vae:
            self.forge_objects.vae = self.original


class SmallPreviews:
    """An instance patch of ``shared.state.do_set_current_image`` that previews a downscaled copy of a large
    latent (the progress thread's decode), removed by ``remove()`` or by ``state.end()``, which ends every job
    even where no script runs after a failure. The sampler's own latent is put back after the preview, unless the
    sampler stored a newer one meanwhile (the preview runs on the progress thread)."""

    def __init__(self, state):
        self.state, self._set = state, state.do_set_current_image
        self.patches = [InstancePatch(state, "do_set_current_image", self)]
        if callable(getattr(state, "end", None)):
            self._end = state.end
            self.patches.append(InstancePatch(state, "end", self._on_end))

    def _on_end(self, *args, **kwargs):
        self.remove()
        return self._end(*args, **kwargs)

    def __call__(self):
        latent = self.state.current_latent
        small = shrink_latent(latent) if isinstance(latent, torch.Tensor) and latent.dim() == 4 else latent
        if small is latent:
            return self._set()
        self.state.current_latent = small
        try:
            return self._set()
        finally:
            if self.state.current_latent is small:
                self.state.current_latent = latent

    def remove(self) -> None:
        for patch in reversed(self.patches):
            patch.remove()
        self.patches = []


def progress_state():
    """``shared.state``, whose ``do_set_current_image`` the progress thread calls for live previews."""
    from modules import shared
    return shared.state


def post_sample(p, ps, tile_for=None) -> None:
    """``Script.post_sample`` for a Forge job: a latent larger than one tile is decoded here, in tiles (returned as
    decoded samples, so Forge skips its own decode); smaller ones are left to Forge."""
    from modules import devices, processing

    samples = ps.samples
    if getattr(samples, "already_decoded", False) or not isinstance(samples, torch.Tensor):
        return
    vae = p.sd_model.forge_objects.vae
    tile = (tile_for or (lambda hw: automatic_tile(vae, _shared_opts())))(tuple(samples.shape[-2:]))
    if tile is None or max(samples.shape[-2:]) <= tile:
        return
    tiling = TiledVae(p.sd_model, tile_for=lambda _hw: tile)
    try:
        decoded = processing.decode_latent_batch(p.sd_model, samples, target_device=devices.cpu, check_for_nans=True)
    finally:
        tiling.remove()
    ps.samples = processing.DecodedSamples(decoded)

