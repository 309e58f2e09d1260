"""Large outputs in the WebUI: tiled VAE decodes and encodes, small live previews, saving DemoFusion's stages.

While a ScaleFusion job runs, the VAE's ``decoder`` and ``encoder`` carry an instance patch of their
``forward`` (:class:`VaeTiling`) that runs an input larger than one tile in tiles, layer by layer with
whole-image GroupNorm statistics (``lib_hires.vae``; per tile where the setting says so or the
VAE's structure is not recognised). The patch sits inside the WebUI's own decode and encode, so its NaN
fallback (retry with the VAE in 32-bit floats), low-VRAM moves, scale factors and the encoder's one
sample from the assembled moments stay the WebUI's. It is on for ``p.init`` (img2img's init images are
encoded there), for ``p.sample`` (the Hires. fix encode after a pixel upscaler, the first pass's decode)
and for the final decode in ``post_sample`` (returned as decoded samples, so the WebUI skips its own).
The tile is 1024 px, smaller where the device's free memory is short (``choose_tile``), or the user's
setting. When Tiled VAE (multidiffusion-upscaler) has its hook installed as the VAE's forward now, it
already tiles: the decode and encode are left to it, and the console and the infotext say so once per job.
Tiled VAE keeps an ``original_forward`` attribute on the modules after it is turned off; that leftover says
nothing, only the installed hook counts.

A NaN anywhere in a tiled pass reaches the WebUI's own NaN handling (``modules.devices.test_for_nans``, which
reads one element): a decode comes back all NaN, so ``decode_latent_batch`` retries in 32-bit floats or gives
its message; an encode raises its ``NansException``. When the final decode is ScaleFusion's, the infotext
names it instead of the WebUI's "VAE Decoder" key.

Live previews are decoded by the progress thread from ``shared.state.current_latent``; while the job
runs, that decode is handed a downscaled copy of a large latent.
"""
from __future__ import annotations

import numpy as np
import torch

from lib_hires.settings import TITLE
from lib_hires.vae import HostMemoryShort, UnsupportedVAE, shared_norm_forward
from lib_hires.vae import (GROUPNORM_CHOICES, available_ram_bytes, choose_tile, default_overlap, shrink_latent,
                                 tiled_apply)

from .instance_patch import InstancePatch

TILE_OPTION = "scalefusion_decode_tile"
DEFAULT_TILE = 0          # automatic
GROUPNORM_OPTION = "scalefusion_vae_groupnorm"
FALLBACK_FREE_BYTES = 8 * 2 ** 30  # where free memory cannot be read
VAE_PARTS = (("decoder", 1), ("encoder", 8))  # (module, input px per latent px)
TILED_VAE_HOOK = "VAEHook"  # the class multidiffusion-upscaler's Tiled VAE installs as a VAE half's forward
INFOTEXT_KEY = f"{TITLE} VAE"  # starts with the title: fresh_infotext drops it from a reused p
WEBUI_DECODER_KEY = "VAE Decoder"
TILED_VAE_NOTE = "left to Tiled VAE"


def tiled_vae_hook(part):
    """The Tiled VAE hook installed as ``part.forward`` now, or None. Judged by the forward itself, not by
    ``original_forward``, which Tiled VAE leaves behind when turned off; it detaches a hook it removes
    (``net = None``), so a hook whose ``net`` is another module is not installed on this one."""
    forward = getattr(part, "forward", None)
    if type(forward).__name__ == TILED_VAE_HOOK and getattr(forward, "net", part) is part:
        return forward
    return None


def tiled_vae_active(sd_model) -> bool:
    vae = getattr(sd_model, "first_stage_model", None)
    return any(tiled_vae_hook(getattr(vae, name, None)) is not None for name, _ in VAE_PARTS)


def note_tiled_vae(p) -> None:
    """Says once per job (the key is the flag; each job starts without it) that Tiled VAE does the VAE passes."""
    params = p.extra_generation_params
    if params.get(INFOTEXT_KEY) != TILED_VAE_NOTE:
        params[INFOTEXT_KEY] = TILED_VAE_NOTE
        _log("Tiled VAE (multidiffusion-upscaler) is hooked into the VAE: its decodes and encodes are left to it")


def webui_nans(output: torch.Tensor, part: str) -> torch.Tensor:
    """What a tiled pass with a NaN somewhere gives the WebUI: its NaN test reads the first element only, and a
    NaN in one tile of a per-tile pass stays in that tile. A decode comes back all NaN, so that
    ``decode_latent_batch``'s own test sees it (retry in 32-bit floats, or its message); the WebUI does not test
    encodes, so an encode raises its ``NansException`` here. ``--disable-nan-check`` keeps the output as it is."""
    from modules import devices, shared

    if getattr(shared.cmd_opts, "disable_nan_check", False):
        return output
    poisoned = torch.full_like(output, float("nan"))
    if part == "encoder":
        devices.test_for_nans(poisoned, "vae")
    return poisoned


def free_bytes(device: torch.device) -> int:
    """Memory a decode on ``device`` can use now, counting what torch's caching allocator holds unused."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps" and hasattr(torch, "mps") and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
    available = available_ram_bytes()
    return FALLBACK_FREE_BYTES if available is None else available


def decode_element_size(sd_model) -> int:
    """Bytes per value of the decode. The SDXL VAE overflows in half precision and the WebUI then retries
    in 32-bit floats, so an SDXL tile must fit at 4 bytes."""
    if getattr(sd_model, "is_sdxl", False):
        return 4
    dtype = getattr(getattr(sd_model, "first_stage_model", None), "dtype", torch.float32)
    return torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4


def tile_size(sd_model, opts, device: torch.device) -> int:
    """Decode tile in latent px: the user's setting, or 128 (1024 px) shrunk to what the free memory allows."""
    chosen = int(opts.data.get(TILE_OPTION, DEFAULT_TILE) or 0)
    if chosen > 0:
        return chosen
    conv_in = getattr(getattr(getattr(sd_model, "first_stage_model", None), "decoder", None), "conv_in", None)
    channels = getattr(conv_in, "out_channels", 512)
    return choose_tile(free_bytes(device), decode_element_size(sd_model), channels)


def tile_for(sd_model, latent: torch.Tensor) -> int | None:
    """The tile to decode ``latent`` with, or None where one plain decode is right."""
    from modules import devices, shared

    if tiled_vae_active(sd_model):
        return None
    tile = tile_size(sd_model, shared.opts, torch.device(devices.device))
    return tile if max(latent.shape[-2:]) > tile else None


def groupnorm_mode(opts) -> str:
    chosen = opts.data.get(GROUPNORM_OPTION, GROUPNORM_CHOICES[0])
    return chosen if chosen in GROUPNORM_CHOICES else GROUPNORM_CHOICES[0]


def _log(message: str) -> None:
    print(f"[{TITLE}] {message}")


class TiledForward:
    """``forward`` of one VAE half while patched: inputs larger than one tile run in tiles. ``nans(output, part)``
    is what a tiled output with a NaN anywhere becomes (default :func:`webui_nans`)."""

    def __init__(self, sd_model, module, unit: int, choose, mode, part: str = "decoder", nans=None):
        self.sd_model, self.module, self.unit, self.choose, self.mode = sd_model, module, unit, choose, mode
        self.part, self.nans = part, nans or webui_nans
        self.original = module.forward
        self.tiled_passes: list[str] = []  # how each tiled pass ran, for the infotext

    def __call__(self, x, *args, **kwargs):
        if not (isinstance(x, torch.Tensor) and x.dim() == 4):
            return self.original(x, *args, **kwargs)
        layout = torch.empty(*x.shape[:-2], x.shape[-2] // self.unit, x.shape[-1] // self.unit, device="meta")
        tile = self.choose(self.sd_model, layout)
        if tile is None:
            return self.original(x, *args, **kwargs)  # one whole pass: the WebUI's own, NaN test included
        # An image side that is no multiple of 8 loses its last < 8 px, as the encoder's stride-2 convs drop them
        x = x[..., :layout.shape[-2] * self.unit, :layout.shape[-1] * self.unit]
        output, how = self._tiled(x, tile, *args, **kwargs)
        self.tiled_passes.append(f"{tile * 8} px tiles; {how}")
        if torch.isnan(output).any():
            output = self.nans(output, self.part)
        return output

    def _tiled(self, x, tile: int, *args, **kwargs):
        overlap = default_overlap(tile)
        mode = self.mode()
        if mode == GROUPNORM_CHOICES[0] and not args and not kwargs:
            budget = available_ram_bytes()
            try:
                if budget is None:  # neither psutil nor /proc/meminfo: parking tiles unchecked could exhaust it
                    raise HostMemoryShort("the free host memory cannot be read (no psutil, no /proc/meminfo)")
                return shared_norm_forward(self.module, x, tile=tile, overlap=overlap, unit=self.unit,
                                           forward=self.original, park=torch.device("cpu"),
                                           park_budget=int(0.7 * budget)), mode
            except UnsupportedVAE as error:
                _log(f"warning: whole-image GroupNorm statistics are not possible for this VAE ({error}); "
                     "its tiles are normalised each on its own")
            except HostMemoryShort as error:
                _log(f"warning: {error}: this {tuple(x.shape[-2:])} VAE pass normalises its tiles each on its own "
                     "(lower the size, or free host memory, for whole-image GroupNorm statistics)")
        return tiled_apply(lambda part: self.original(part, *args, **kwargs), x, tile=tile, overlap=overlap,
                           unit=self.unit), GROUPNORM_CHOICES[1]


class VaeTiling:
    """Instance patches of the VAE's ``decoder.forward`` and ``encoder.forward`` (:class:`TiledForward`),
    undone by ``remove()``. Where one is already patched by us (a decode inside a guarded ``p.sample``),
    that patch is left to do the work; with a Tiled VAE hook installed, nothing is patched and ``notice()``
    (the job's :func:`note_tiled_vae`) is called."""

    def __init__(self, sd_model, choose=None, mode=None, notice=None, nans=None):
        self.patches = []
        self.forwards: dict[str, TiledForward] = {}  # the patches made here, by VAE half
        if tiled_vae_active(sd_model):
            if notice is not None:
                notice()
            return
        choose = choose or tile_for
        mode = mode or (lambda: groupnorm_mode(_shared_opts()))
        vae = getattr(sd_model, "first_stage_model", None)
        for name, unit in VAE_PARTS:
            module = getattr(vae, name, None)
            if isinstance(module, torch.nn.Module) and not isinstance(vars(module).get("forward"), TiledForward):
                forward = TiledForward(sd_model, module, unit, choose, mode, name, nans)
                self.forwards[name] = forward
                self.patches.append(InstancePatch(module, "forward", forward))

    def remove(self) -> None:
        for patch in reversed(self.patches):
            patch.remove()
        self.patches = []


def _shared_opts():
    from modules import shared
    return shared.opts


def decode(p, latents: torch.Tensor, tile: int | None = None, passes: list | None = None) -> list[torch.Tensor]:
    """One ``[3, H, W]`` image in [-1, 1] on the CPU per latent, in tiles of ``tile`` (default: ``tile_for``),
    through the WebUI's ``decode_latent_batch`` (its NaN test and 32-bit retry). ``passes`` gets how each tiled
    decoder pass ran."""
    from modules import devices, processing

    tile = tile or tile_for(p.sd_model, latents)
    tiling = VaeTiling(p.sd_model, choose=(lambda model, z: tile if max(z.shape[-2:]) > tile else None) if tile
                       else (lambda model, z: None), notice=lambda: note_tiled_vae(p))
    try:
        return list(processing.decode_latent_batch(p.sd_model, latents, target_device=devices.cpu, check_for_nans=True))
    finally:
        tiling.remove()
        if passes is not None and "decoder" in tiling.forwards:
            passes.extend(tiling.forwards["decoder"].tiled_passes)


def post_sample(p, ps) -> None:
    """``Script.post_sample``: takes over the decode of a big latent where the full VAE would decode it (the
    WebUI's "VAE type for decode" is Full; TAESD's decode is no VAE pass to tile) and no Tiled VAE hook does;
    the infotext then names the tiled decode instead of the WebUI's "VAE Decoder"."""
    from modules import processing, shared

    samples = ps.samples
    if getattr(samples, "already_decoded", False) or not isinstance(samples, torch.Tensor):
        return
    if tiled_vae_active(p.sd_model):
        note_tiled_vae(p)
        return
    if getattr(shared.opts, "sd_vae_decode_method", "Full") != "Full":
        return
    tile = tile_for(p.sd_model, samples)
    if tile is None:
        return
    passes: list[str] = []
    ps.samples = processing.DecodedSamples(decode(p, samples, tile, passes))
    if passes:
        p.extra_generation_params.pop(WEBUI_DECODER_KEY, None)
        p.extra_generation_params[INFOTEXT_KEY] = f"{TITLE} tiled decode ({passes[-1]})"


class LivePreviewShrink:
    """Instance patches of ``shared.state`` from the start of a job's first ``p.sample`` until ``postprocess``: the
    progress thread's preview decode (``do_set_current_image``) gets a downscaled copy of a large latent.

    Not only during ``p.sample``: the final tiled decode in ``post_sample`` runs after it, while the progress thread
    still previews ``current_latent`` (Full previews would decode it whole, through the same decoder, at the same
    time), and with ``show_progress_every_n_steps = -1`` ``state.nextjob()`` previews it after every batch's decode
    (issue 19 §3). The WebUI calls no script when a generation fails between ``p.sample`` and ``postprocess``, but
    it always ends the job with ``state.end()`` (``call_queue``, the API): that call removes the patches too."""

    def __init__(self, state):
        self.state = state
        self._set_preview = state.do_set_current_image
        self.patches = [InstancePatch(state, "do_set_current_image", self._preview)]
        if callable(getattr(state, "end", None)):
            self._end = state.end
            self.patches.append(InstancePatch(state, "end", self._on_end))

    def _preview(self):
        latent = self.state.current_latent
        if isinstance(latent, torch.Tensor) and latent.dim() == 4:
            self.state.current_latent = shrink_latent(latent)
        return self._set_preview()

    def _on_end(self, *args, **kwargs):
        self.remove()
        return self._end(*args, **kwargs)

    @property
    def installed(self) -> bool:
        return bool(self.patches)

    def remove(self) -> None:
        for patch in reversed(self.patches):
            patch.remove()
        self.patches = []


class LargeOutputGuard:
    """Installed for the duration of ``p.sample``: tiled decodes and encodes of big inputs, small in-step previews
    (the progress thread's previews are :class:`LivePreviewShrink`'s, which lasts until ``postprocess``).

    Instance patches, undone by ``remove()``, on every model the job samples with — the model ``p.sample`` starts with, and each one a
    hires checkpoint or a refiner switches to (``attach``), since the hires pass decodes its result inside
    ``p.sample`` on its own model — ``decode_first_stage`` and the VAE halves' ``forward`` (:class:`VaeTiling`).
    A decode asked for inside a denoiser step (``in_step``, see :class:`StepPreviews`) is the live preview that
    ``--medvram`` / ``--lowvram`` make there instead of in the progress thread: it is shrunk, so that it fits one
    tile.
    """

    def __init__(self, sd_model, state, choose=tile_for, mode=None, notice=None):
        self.state, self.choose = state, choose
        self.in_step = False
        self.mode, self.notice = mode, notice
        self.models: list = []
        self.tilings: list[VaeTiling] = []
        self.patches = []
        self.attach(sd_model)

    def attach(self, sd_model) -> None:
        """Guards the decodes and encodes of ``sd_model`` too (idempotent per model object)."""
        if any(model is sd_model for model in self.models):
            return
        original = sd_model.decode_first_stage

        def decode_first_stage(z, *args, **kwargs):
            return self._decode(original, z, *args, **kwargs)

        self.models.append(sd_model)
        self.patches.append(InstancePatch(sd_model, "decode_first_stage", decode_first_stage))
        self.tilings.append(VaeTiling(sd_model, self.choose, self.mode, self.notice))

    def _decode(self, decode_first_stage, z, *args, **kwargs):
        if self.in_step and isinstance(z, torch.Tensor) and z.dim() == 4:
            z = shrink_latent(z)
        return decode_first_stage(z, *args, **kwargs)

    def remove(self) -> None:
        for tiling in reversed(self.tilings):
            tiling.remove()
        for patch in reversed(self.patches):
            patch.remove()


class SmallPreviewDecoder:
    """An instance patch on a preview decoder module (TAESD's, the Approx NN) that shrinks the latents given it
    inside a step.

    With ``--medvram`` / ``--lowvram`` the WebUI decodes the live preview inside the denoiser step
    (``sd_samplers_common.store_latent``); with the TAESD or Approx NN preview method that decode goes through
    ``sd_vae_taesd.decoder_model()`` / ``sd_vae_approx.model()``, not through ``decode_first_stage``, and a
    4096-px latent would cost several GB there.
    """

    def __init__(self, decoder, guard: LargeOutputGuard):
        self.decoder, self._forward, self.guard = decoder, decoder.forward, guard
        self.patch = InstancePatch(decoder, "forward", self)

    def __call__(self, z, *args, **kwargs):
        if self.guard.in_step and isinstance(z, torch.Tensor) and z.dim() == 4:
            z = shrink_latent(z)
        return self._forward(z, *args, **kwargs)

    def remove(self) -> None:
        self.patch.remove()


def step_preview_decoder(opts, shared, lowvram, sd_vae_taesd, sd_vae_approx):
    """The preview decoder module the in-step preview will use (TAESD's or the Approx NN), or None where no
    in-step preview runs or it goes through ``decode_first_stage`` (guarded by ``LargeOutputGuard``).

    The same conditions as ``store_latent`` and ``samples_to_images_tensor``: previews on, no parallel
    preview thread (``--medvram``/``--lowvram``), the method, with "Full" becoming "Approx NN" under
    ``--lowvram``. Getting the module is what that preview does anyway (it loads it once per model kind).
    """
    if not (opts.live_previews_enable and opts.show_progress_every_n_steps > 0) or shared.parallel_processing_allowed:
        return None
    method = opts.show_progress_type
    if method == "Full" and lowvram.is_enabled(shared.sd_model) and not opts.live_preview_allow_lowvram_full:
        method = "Approx NN"
    if method == "TAESD":
        return sd_vae_taesd.decoder_model()
    if method == "Approx NN":
        return sd_vae_approx.model()
    return None


class StepPreviews:
    """One pass's instance patch on its ``CFGDenoiser``: marks the guard ``in_step`` during each step."""

    def __init__(self, cfg_denoiser, guard: LargeOutputGuard):
        self._forward, self.guard = cfg_denoiser.forward, guard
        self.patch = InstancePatch(cfg_denoiser, "forward", self)

    def __call__(self, *args, **kwargs):
        self.guard.in_step = True
        try:
            return self._forward(*args, **kwargs)
        finally:
            self.guard.in_step = False

    def remove(self) -> None:
        self.patch.remove()


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
