"""How much memory a VAE pass needs and how much the machine can give: the tile size follows from them."""
from __future__ import annotations

from .layout import MIN_TILE, PREFERRED_TILE

# Peak working memory of the SD / SDXL VAE decoder per output pixel, in elements per channel of its
# middle block (512 in every released SD VAE): measured 2.3 on the real architecture (tools.vae_factory, fp32,
# 384-512 px decodes; more below that, where fixed overheads count); 2.5 keeps a margin.
ELEMENTS_PER_PIXEL_PER_CHANNEL = 2.5


def decoder_peak_bytes(height: int, width: int, element_size: int, channels: int = 512) -> int:
    """Working memory of one SD-VAE decode of a ``height`` x ``width`` latent, conservatively.

    Activations grow with the output pixels; the middle block's attention scores are counted as
    materialised twice, scores and their softmax, as torch's CPU attention does (measured: a 1536² decode
    at 1/4 width peaks at 11.8 GiB, 10.9 of them attention). Memory-efficient attention avoids that, but a
    tile size must not rely on it.
    """
    pixels = 64 * height * width
    return int(ELEMENTS_PER_PIXEL_PER_CHANNEL * channels * pixels * element_size
               + 2 * (height * width) ** 2 * element_size)


def choose_tile(free_bytes: int, element_size: int, channels: int = 512, *, preferred: int = PREFERRED_TILE,
                share: float = 0.5) -> int:
    """``preferred``, or the largest square tile below it (latent px, multiple of 8, at least ``MIN_TILE``)
    whose decode needs at most ``share`` of ``free_bytes``; the rest is left for the accumulated image, the
    WebUI's 32-bit retry and other work."""
    budget = free_bytes * share
    tile = preferred
    while tile > MIN_TILE and decoder_peak_bytes(tile, tile, element_size, channels) > budget:
        tile -= 8
    return tile


def available_ram_bytes() -> int | None:
    """Memory the OS can still hand out, or None where it cannot be read: psutil's ``available`` where psutil
    imports (the WebUI ships it; Windows and macOS have no ``/proc/meminfo``), else Linux ``MemAvailable``."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001 - a sandbox that hides the counters: try /proc/meminfo
            pass
    return _meminfo_available()


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
