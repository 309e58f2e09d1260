"""Where the model looks: jittered local windows and the strided samples of the dilated path.

Local views follow the official ``get_views`` (``demofusion.md`` §1.5), in latent pixels:

* per axis ``n = int((L - window) / stride - 1e-6) + 2`` windows if ``L > window`` else 1; window ``i``
  starts at ``i * stride`` and a window running past the end is shifted back to end at the edge;
* the latent is always zero-padded by ``pad = (window - stride) // 4`` on every side, jitter on or
  off, and boxes are given in that padded frame (so an unjittered box starts at ``pad``);
* with jitter, an interior window moves by U{-pad..pad} per axis, one touching only the start edge by
  U{-pad..0}, only the end edge by U{0..pad}, both edges not at all: edge windows may reach into the
  zero band but never leave the padded frame, and coverage stays complete because
  ``2 * pad <= window - stride``.

Where the official code breaks, this generalises: an axis shorter than the window gets one view of
exactly that axis (the official code slices past the tensor and cannot batch such views), so every
view has the same size ``(min(window, H), min(window, W))``.

Jitter comes from a ``torch.Generator``: one ``torch.rand((views, 2), float64)`` per draw, in view
order, (h, w) per view, mapped to ``lo + floor(u * (hi - lo + 1))``. The official code uses the
unseeded Python ``random``; a generator makes runs reproducible and the draw count independent of
the geometry.

Dilated samples: the latent is zero-padded at the top and left to a multiple of the dilation ``s``
and sample ``(i, j)`` is ``padded[..., i::s, j::s]``, ``i, j`` in ``range(s)``, i-major.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

VAE_SCALE = 8  # pixels per latent pixel: crops are reported in pixels, as SDXL's crop conditioning wants


def jitter_range(window: int, stride: int) -> int:
    """The zero band around the latent and the largest jitter: ``(window - stride) // 4``."""
    return (window - stride) // 4


def view_starts(length: int, window: int, stride: int) -> list[int]:
    """Unjittered starts along one axis; each view spans ``min(window, length)``."""
    if length <= window:
        return [0]
    count = int((length - window) / stride - 1e-6) + 2
    return [min(i * stride, length - window) for i in range(count)]


def grid_size(height: int, width: int, window: int, stride: int) -> tuple[int, int]:
    """Local views per step along (height, width)."""
    return len(view_starts(height, window, stride)), len(view_starts(width, window, stride))


@dataclass(frozen=True)
class LocalView:
    """A window of the zero-padded latent: rows ``h0:h1``, columns ``w0:w1`` of the padded frame."""
    h0: int
    h1: int
    w0: int
    w1: int
    pad: int  # zero band on every side of the latent in that frame
    kind: ClassVar[str] = "local"

    @property
    def size(self) -> tuple[int, int]:
        return self.h1 - self.h0, self.w1 - self.w0

    @property
    def crop(self) -> tuple[int, int]:
        """(top, left) in pixels, in the padded frame: the official SDXL crop conditioning of this view."""
        return VAE_SCALE * self.h0, VAE_SCALE * self.w0

    def cut(self, frame: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """This view of a ``[..., scale*H, scale*W]`` tensor of the unpadded frame, zero where it overhangs.

        ``scale=1`` cuts latent-sized tensors (exactly the model input for the latent itself);
        ``scale=8`` cuts pixel-space ones such as ControlNet hints.
        """
        p = scale * self.pad
        padded = F.pad(frame, (p, p, p, p))
        return padded[..., scale * self.h0:scale * self.h1, scale * self.w0:scale * self.w1]


@dataclass(frozen=True)
class DilatedView:
    """Sample ``(offset_h, offset_w)`` of the dilated path: every ``dilation``-th latent pixel."""
    offset_h: int
    offset_w: int
    dilation: int
    pad_top: int   # zero rows added above the latent to reach a multiple of the dilation
    pad_left: int
    kind: ClassVar[str] = "global"

    @property
    def crop(self) -> tuple[int, int]:
        return 0, 0  # the official SDXL crop conditioning of every dilated sample

    def cut(self, frame: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """This sample of a ``[..., scale*H, scale*W]`` tensor of the unpadded frame.

        ``scale=1`` is exactly ``top_left_pad(frame)[..., offset_h::s, offset_w::s]``. For ``scale > 1``
        sub-pixel ``r`` comes from padded pixel ``scale * offset + s * r``: the frame downsampled by
        ``s`` with the sample's phase, as the official ControlNet pipeline's ``[..., 8h::s, 8w::s]``;
        rows that would run past the frame repeat its last row so every sample has the same size.
        """
        s = self.dilation
        padded = F.pad(frame, (scale * self.pad_left, 0, scale * self.pad_top, 0))
        out = padded
        for dim, offset in ((-2, self.offset_h), (-1, self.offset_w)):
            length = padded.shape[dim]
            n = scale * (length // scale // s)
            index = (scale * offset + s * torch.arange(n, device=frame.device)).clamp(max=length - 1)
            out = out.index_select(dim, index)
        return out


View = LocalView | DilatedView


def _jitter(start: int, end: int, length: int, pad: int, u: float) -> int:
    # A window on an edge may only move outwards, into the zero band: the edge stays covered.
    lo = -pad if end < length else 0
    hi = pad if start > 0 else 0
    return lo + min(math.floor(u * (hi - lo + 1)), hi - lo)


def local_views(height: int, width: int, window: int, stride: int,
                generator: torch.Generator | None = None) -> list[LocalView]:
    """The local views of a ``height x width`` latent in row-major order, jittered when a generator is given."""
    pad = jitter_range(window, stride)
    eh, ew = min(window, height), min(window, width)
    boxes = [(h, w) for h in view_starts(height, window, stride) for w in view_starts(width, window, stride)]
    if generator is None:
        draws = [(0.5, 0.5)] * len(boxes)
        pad_for_jitter = 0
    else:
        draws = torch.rand((len(boxes), 2), generator=generator, dtype=torch.float64,
                           device=generator.device).tolist()
        pad_for_jitter = pad
    views = []
    for (h, w), (uh, uw) in zip(boxes, draws):
        dh = _jitter(h, h + eh, height, pad_for_jitter, uh)
        dw = _jitter(w, w + ew, width, pad_for_jitter, uw)
        top, left = h + dh + pad, w + dw + pad
        views.append(LocalView(top, top + eh, left, left + ew, pad))
    return views


def top_left_padding(height: int, width: int, dilation: int) -> tuple[int, int]:
    return (-height) % dilation, (-width) % dilation


def dilated_views(height: int, width: int, dilation: int) -> list[DilatedView]:
    pad_top, pad_left = top_left_padding(height, width, dilation)
    return [DilatedView(i, j, dilation, pad_top, pad_left) for i in range(dilation) for j in range(dilation)]


def dilated_size(height: int, width: int, dilation: int) -> tuple[int, int]:
    """Spatial size of every dilated sample."""
    return -(-height // dilation), -(-width // dilation)


def coverage(views: Sequence[LocalView], height: int, width: int) -> torch.Tensor:
    """How many views cover each latent pixel (unpadded frame, ``[height, width]``)."""
    if not views:
        return torch.zeros(height, width)
    pad = views[0].pad
    count = torch.zeros(height + 2 * pad, width + 2 * pad)
    for v in views:
        count[v.h0:v.h1, v.w0:v.w1] += 1
    return count[pad:pad + height, pad:pad + width]
