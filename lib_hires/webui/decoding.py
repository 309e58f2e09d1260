"""Decoding big latents without running out of memory, and saving DemoFusion's intermediate stages.

Above a size set in the settings the latent is decoded in overlapping tiles (``demofusion.tiled_decode``)
through the WebUI's own ``decode_latent_batch``, which keeps its NaN fallback and low-VRAM handling.
When Tiled VAE (multidiffusion-upscaler) has hooked the decoder, the WebUI's normal decode already
tiles, so nothing is done here.
"""
from __future__ import annotations

import numpy as np
import torch

from lib_hires.demofusion import tiled_decode

THRESHOLD_OPTION = "scalefusion_tiled_decode_megapixels"
TILE_OPTION = "scalefusion_decode_tile"
DEFAULT_THRESHOLD_MP = 4.5   # just above 2048 x 2048
DEFAULT_TILE = 96            # latent px (768 px), neighbours overlapping by a quarter of it


def tiled_vae_active(sd_model) -> bool:
    decoder = getattr(getattr(sd_model, "first_stage_model", None), "decoder", None)
    forward = getattr(decoder, "forward", None)
    return hasattr(decoder, "original_forward") or type(forward).__name__ == "VAEHook"


def needs_tiles(sd_model, latent: torch.Tensor, opts) -> bool:
    megapixels = latent.shape[-2] * latent.shape[-1] * 64 / 1e6
    return megapixels > float(opts.data.get(THRESHOLD_OPTION, DEFAULT_THRESHOLD_MP)) and not tiled_vae_active(sd_model)


def decode(p, latents: torch.Tensor) -> list[torch.Tensor]:
    """One ``[3, H, W]`` image in [-1, 1] on the CPU per latent, tiled when the latent is big."""
    from modules import devices, processing, shared

    if not needs_tiles(p.sd_model, latents, shared.opts):
        return list(processing.decode_latent_batch(p.sd_model, latents, target_device=devices.cpu, check_for_nans=True))
    tile = int(shared.opts.data.get(TILE_OPTION, DEFAULT_TILE))

    def decode_tile(z):
        images = processing.decode_latent_batch(p.sd_model, z, target_device=devices.cpu, check_for_nans=True)
        devices.torch_gc()
        return torch.stack(list(images)).float()

    return [tiled_decode(decode_tile, latents[i:i + 1], tile=tile, overlap=max(8, tile // 4),
                         out_device=torch.device("cpu"))[0] for i in range(latents.shape[0])]


def post_sample(p, ps) -> None:
    """``Script.post_sample``: takes over the decode of a big latent."""
    from modules import processing, shared

    samples = ps.samples
    if getattr(samples, "already_decoded", False) or not isinstance(samples, torch.Tensor):
        return
    if needs_tiles(p.sd_model, samples, shared.opts):
        ps.samples = processing.DecodedSamples(decode(p, samples))


def save_stage(p, latents: torch.Tensor, stage_index: int) -> None:
    """Saves the images of a finished intermediate stage next to the final ones ("-stage1", ...)."""
    from PIL import Image
    from modules import images, processing, shared

    for i, image in enumerate(decode(p, latents)):
        array = (torch.clamp((image + 1) / 2, 0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        index = p.iteration * p.batch_size + i
        info = processing.create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, iteration=p.iteration,
                                          position_in_batch=i)
        images.save_image(Image.fromarray(np.ascontiguousarray(array)), p.outpath_samples, "", p.all_seeds[index],
                          p.all_prompts[index], shared.opts.samples_format, info=info, p=p,
                          suffix=f"-stage{stage_index}")
