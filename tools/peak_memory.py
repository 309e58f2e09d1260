"""Peak resident memory of this process since a reset (Linux), for benchmarks that run one thing per child."""
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
