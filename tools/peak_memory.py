"""Peak resident memory of this process since a reset (Linux), for benchmarks that run one thing per child, and
the compute side's part of it where tiles are parked in the same memory."""
from __future__ import annotations

import ctypes
import resource


def reset_peak_rss() -> bool:
    """Hands freed heap back to the OS and resets this process's RSS high-water mark (Linux >= 4.0)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss(since_reset: bool) -> int:
    """Bytes: the high-water mark since :func:`reset_peak_rss`, or (without one) since the process started."""
    if since_reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


GIB = 2 ** 30


def current_rss() -> int:
    """Bytes resident now (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def free_memory(device: str) -> int:
    """Bytes a benchmark may use on ``device`` now (8 GiB where the host's free memory cannot be read)."""
    import torch
    from lib_hires.vae import available_ram_bytes

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    return available_ram_bytes() or 8 * GIB


def resolve_vae_args(args, cpu_width: float) -> tuple[bool, int, int]:
    """Fills the VAE benchmarks' defaults that depend on the device: fp16 and full width on CUDA, fp32 and
    ``cpu_width`` on a CPU, and the tile the extension would pick here. Returns (CUDA?, bytes per value, the
    decoder's conv_in channels)."""
    import torch
    from lib_hires.vae import choose_tile
    from tools.vae_factory import build_decoder

    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    args.width = args.width if args.width is not None else (1.0 if cuda else cpu_width)
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    channels = build_decoder(args.width).conv_in.out_channels
    args.tile = args.tile or choose_tile(free_memory(args.device), element, channels)
    return cuda, element, channels


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class DevicePeakOnHost:
    """The compute side's peak where device and host are one memory (a CPU run): the process's resident memory
    less what the pass has parked, i.e. what a GPU would have to hold, measured between parking events.

    ``lib_hires.vae.shared_norm_forward(..., monitor=this)`` calls it with the bytes parked right before
    and right after every change to them. At each call the RSS high-water mark of the interval since the last
    call is read and reset (``/proc/self/clear_refs``): an interval holds either only compute (parked bytes
    constant) or one allocation or one free of parked memory, so its peak less the larger of its two parked
    counts is the compute side's peak in it (exact for an allocation, whose peak is at its end, and for a free,
    whose peak is at its start). ``host`` is the largest high-water mark of all intervals: the process's peak.
    Freed memory that the C allocator keeps counts as compute memory (run with ``MALLOC_MMAP_THRESHOLD_``
    low to keep that small), so the figure errs high, never low."""

    def __init__(self):
        self.parked = 0
        self.device = self.host = 0
        if not reset_peak_rss():
            raise OSError("the RSS high-water mark cannot be reset here")

    def __call__(self, parked: int) -> None:
        hwm = _hwm()
        self.host = max(self.host, hwm)
        self.device = max(self.device, hwm - max(self.parked, parked))
        self.parked = parked
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
