"""Tiled VAE passes whose GroupNorms use the whole image's statistics, with one tile's working memory.

A decoder (or encoder) normalised tile by tile normalises a tile of sky and a tile of foliage
differently: tonal steps between tiles that no seam blending hides. Here the module runs as a program of
steps derived from its own structure, one step at a time across all tiles: every GroupNorm is a barrier
where each tile contributes the mean and variance of its own core (the part of the tile nearest to it,
so that the cores partition the image and every pixel counts once), combined exactly in float64
(Chan's parallel update), and then every tile is normalised with the whole image's statistics. Between
barriers the core of a tile's state (its activation and the residuals its ResnetBlock still has to add) waits
in ``park`` memory (the host by default), so the compute device holds one tile at a time; each step rebuilds
a tile's window from its neighbours' cores, so halos are refreshed at every barrier (see
:func:`shared_norm_forward`). Attention stays per tile: it is normalised with the shared statistics, but
attends within its tile, and its outputs are blended across the overlaps.

The program is derived, not listed: a small probe through the module's own ``forward`` records which
top-level blocks it calls, in order; each block is recognised by what it holds (a ResnetBlock: ``norm1``,
``conv1``, ``norm2``, ``conv2`` and a shortcut where the channels change; an attention block: a ``norm``
that its forward applies first, whatever attention the WebUI swapped in; a block without GroupNorm, such
as an up/downsample or a conv: applied per tile as is; a top-level GroupNorm: the ldm/sgm ``norm_out``
followed by swish). The derived program is then checked against ``forward`` on the probe, so ldm's and
sgm's VAEs work, and a structure this module does not recognise is refused with :class:`UnsupportedVAE`
instead of being run wrong.
"""
from __future__ import annotations

import threading
import types
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layout import Canvas, tile_layout

PROBE = 16  # layout px (latent px) of the probe that derives and checks a program


class UnsupportedVAE(ValueError):
    """The module's structure is not one whose GroupNorms this module can share across tiles."""


@dataclass(frozen=True)
class Step:
    kind: str            # "local", "norm", "swish", "push", "shortcut", "add", "attention", "tanh"
    module: nn.Module | None = None

    @property
    def barrier(self) -> GroupNormLike | None:
        """The GroupNorm whose whole-image statistics this step needs first, if any."""
        if self.kind == "norm":
            return self.module
        if self.kind == "attention":
            return self.module.norm
        return None


GroupNormLike = nn.GroupNorm


@dataclass(frozen=True)
class Program:
    steps: tuple[Step, ...]
    factor: float        # output side / input side: 8 for a decoder, 1/8 for an encoder
    parked_per_px: float = 0.0  # values a tile holds at its largest barrier, per layout px (latent px) of tile


class HostMemoryShort(MemoryError):
    """The tiles waiting between GroupNorms would not fit the host memory given."""


def _has_groupnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.GroupNorm) for m in module.modules())


def _block_steps(module: nn.Module) -> list[Step]:
    """The steps of one block that ``forward`` calls at the top level."""
    if isinstance(module, nn.GroupNorm):
        return [Step("norm", module), Step("swish")]   # ldm / sgm ``norm_out``; the probe checks the swish
    if isinstance(module, nn.Sequential):
        return [s for child in module for s in _block_steps(child)]
    names = dict(module.named_children())
    if all(isinstance(names.get(n), nn.GroupNorm) for n in ("norm1", "norm2")) and \
            all(isinstance(names.get(n), nn.Conv2d) for n in ("conv1", "conv2")):
        changes = getattr(module, "in_channels", None) != getattr(module, "out_channels", None)
        shortcut = None
        if changes:
            shortcut = names.get("conv_shortcut") if getattr(module, "use_conv_shortcut", False) \
                else names.get("nin_shortcut")
            if shortcut is None:
                raise UnsupportedVAE(f"{type(module).__name__} changes channels without a shortcut conv")
        dropout = names.get("dropout")
        # the shortcut runs on the residual as soon as its tile is back after norm1, so that what waits through
        # norm2 is the narrower shortcut(x), not x (a third less parked memory in the decoder's first 128-ch block)
        early = [Step("shortcut", shortcut)] if shortcut is not None else []
        return [Step("push"), Step("norm", module.norm1)] + early + [Step("swish"), Step("local", module.conv1),
                Step("norm", module.norm2), Step("swish")] + ([Step("local", dropout)] if dropout is not None else []) \
            + [Step("local", module.conv2), Step("add")]
    if isinstance(names.get("norm"), nn.GroupNorm) and sum(isinstance(m, nn.GroupNorm) for m in module.modules()) == 1:
        return [Step("attention", module)]
    if not _has_groupnorm(module):
        return [Step("local", module)]
    raise UnsupportedVAE(f"{type(module).__name__} holds GroupNorms in a structure that is not a ResnetBlock or an "
                         "attention block")


def _top_level_calls(module: nn.Module, forward, x: torch.Tensor) -> tuple[list[nn.Module], torch.Tensor]:
    calls, depth = [], [0]
    # the hooks sit on modules another thread may run meanwhile (a live preview): they see only this thread
    me = threading.get_ident()

    def before(m, args):
        if threading.get_ident() != me:
            return
        if depth[0] == 0:
            calls.append(m)
        depth[0] += 1

    def after(m, args, out):
        if threading.get_ident() == me:
            depth[0] -= 1

    handles = []
    for m in module.modules():
        if m is not module and not isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    try:
        out = forward(x)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor):
        raise UnsupportedVAE(f"{type(module).__name__}.forward returns {type(out).__name__}, not a tensor")
    return calls, out


_programs: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Program]]" = weakref.WeakKeyDictionary()


def _signature(module: nn.Module) -> tuple:
    """What a program depends on besides the weights: every submodule and the forward it runs."""
    return tuple((id(m), type(m), vars(m).get("forward")) for m in list(module.modules())[1:])


def program_of(module: nn.Module, x: torch.Tensor, unit: int, forward=None, probe: int = PROBE) -> Program:
    """The steps of ``module`` (cached per module), derived and checked on a random probe shaped like ``x``,
    whose sides are ``unit`` px per layout px (8: an image into an encoder, 1: a latent into a decoder).

    ``forward``: the module's own forward where ``module.forward`` is patched to call this; ``probe``: the
    probe's side in layout px (at most a tile, so that no layer ever sees more than one)."""
    signature = _signature(module)
    cached = _programs.get(module)
    if cached is not None and cached[0] == signature:
        return cached[1]
    if module.training:
        raise UnsupportedVAE(f"{type(module).__name__} is in training mode")
    forward = forward or module.forward
    side = probe * unit
    # random, not a crop of x: a flat crop (sky, a plain background) has near-zero variance, which GroupNorm's
    # eps turns into a 1000x gain on rounding noise, and the check below would refuse a sound program
    probe = torch.randn(1, x.shape[1], side, side, generator=torch.Generator().manual_seed(0)).to(x.device, x.dtype)
    with torch.no_grad():
        calls, expected = _top_level_calls(module, forward, probe)
        steps = tuple(s for m in calls for s in _block_steps(m))
        if getattr(module, "tanh_out", False):
            steps += (Step("tanh"),)
        factor = expected.shape[-1] / probe.shape[-1]
        if expected.shape[-2] / probe.shape[-2] != factor or factor != (1 / 8 if unit == 8 else 8):
            raise UnsupportedVAE(f"{type(module).__name__} maps {tuple(probe.shape[-2:])} to "
                                 f"{tuple(expected.shape[-2:])}, not a VAE's 8x up or down")
        program = Program(steps, factor)
        held = []
        got = _run_one(program, probe, held)
        layout_px = (probe.shape[-2] // unit) * (probe.shape[-1] // unit)
        program = Program(steps, factor, max(held, default=0) / layout_px)
    if torch.isfinite(expected).all():
        error = (got.float() - expected.float()).abs().max().item()
        scale = expected.float().abs().max().item() + 1e-6
        tolerance = 1e-3 if expected.dtype in (torch.float32, torch.float64) else 3e-2
        if not error <= tolerance * scale:
            raise UnsupportedVAE(f"{type(module).__name__}: its layers run one by one differ from its forward "
                                 f"({error:.3g} of {scale:.3g}); its structure is not the ldm/sgm VAE's")
        _programs[module] = (signature, program)   # unchecked (overflowing half-precision probe) programs are not kept
    return program


def _run_one(program: Program, x: torch.Tensor, held: list | None = None) -> torch.Tensor:
    """The program on one tile, normalising with that tile's own statistics (the module's forward);
    ``held`` gets the values the tile's state holds at each barrier (what a tiled pass parks)."""
    stack: list[torch.Tensor] = []
    h = x
    for step in program.steps:
        barrier = step.barrier
        stats = _Stats(barrier.num_groups) if barrier is not None else None
        if stats is not None:
            stats.add(h)
            if held is not None:
                held.append(sum({id(t): t[:1].numel() for t in [h] + stack}.values()))
        h = _apply(step, h, stack, stats)
    return h


class _Stats:
    """Mean and variance per sample and group, accumulated over tile cores in float64."""

    def __init__(self, groups: int):
        self.groups = groups
        self.count = 0
        self.mean = self.m2 = None
        self.cached_key = self.cached = None

    def add(self, core: torch.Tensor) -> None:
        b, c = core.shape[:2]
        per = c // self.groups
        values = core if core.dtype in (torch.float32, torch.float64) else core.float()
        # per channel first (no copy of a strided core), then per group, both exact combinations
        var, mean = torch.var_mean(values, dim=(-2, -1), unbiased=False)
        pixels = core.shape[-2] * core.shape[-1]
        mean, var = mean.double().cpu().reshape(b, self.groups, per), var.double().cpu().reshape(b, self.groups, per)
        group_mean = mean.mean(dim=-1)
        m2 = (var * pixels + (mean - group_mean[..., None]) ** 2 * pixels).sum(dim=-1)
        n = pixels * per
        if self.mean is None:
            self.count, self.mean, self.m2 = n, group_mean, m2
            return
        total = self.count + n
        delta = group_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    def affine(self, norm: nn.GroupNorm, channels: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per sample and channel: the norm is then ``x * scale + shift``."""
        rstd = (self.m2 / self.count + norm.eps).rsqrt()
        per = channels // self.groups
        rstd, mean = rstd.repeat_interleave(per, dim=1), self.mean.repeat_interleave(per, dim=1)
        weight = norm.weight.detach().double().cpu() if norm.weight is not None else torch.ones(channels, dtype=torch.float64)
        bias = norm.bias.detach().double().cpu() if norm.bias is not None else torch.zeros(channels, dtype=torch.float64)
        scale = rstd * weight
        shift = bias - mean * scale
        return (scale.float().to(device)[..., None, None], shift.float().to(device)[..., None, None])


def _normalise(h: torch.Tensor, norm: nn.GroupNorm, stats: _Stats) -> torch.Tensor:
    key = (id(norm), h.device)
    if stats.cached_key != key:  # the same for every tile of a barrier: computed once
        stats.cached_key, stats.cached = key, stats.affine(norm, h.shape[1], h.device)
    scale, shift = stats.cached
    return torch.addcmul(shift, h, scale).to(h.dtype)


class _SharedNorm(nn.Module):
    """Stands in for an attention block's ``norm`` in this pass's stand-in of the block (:func:`_attention_with`)."""

    def __init__(self, norm: nn.GroupNorm, stats: _Stats):
        super().__init__()
        self.norm, self.stats = norm, stats
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return _normalise(x, self.norm, self.stats)


def _attention_with(block: nn.Module, h: torch.Tensor, stats: _Stats) -> torch.Tensor:
    """``block(h)`` with its ``norm`` normalising with ``stats``, the block itself untouched.

    The progress thread may decode a preview through the same decoder while this pass runs (issue 19 §3), so
    nothing another thread can see may change: the block runs as a stand-in of its own class that shares its
    parameters, hooks and submodules, except for its own ``norm`` (the WebUI swaps ``AttnBlock.forward`` on the
    class, which the stand-in runs as it is). A forward bound to the block itself is rebound to the stand-in; one
    that does not reach its norm through the stand-in (a closure over the block) is refused, not run per tile."""
    shared = _SharedNorm(block._modules["norm"], stats)
    stand_in = object.__new__(type(block))
    stand_in.__dict__.update(vars(block))
    stand_in.__dict__["_modules"] = {**block._modules, "norm": shared}
    own_forward = vars(block).get("forward")
    if getattr(own_forward, "__self__", None) is block:
        stand_in.__dict__["forward"] = types.MethodType(own_forward.__func__, stand_in)
    out = stand_in(h)
    if shared.calls != 1:
        raise UnsupportedVAE(f"{type(block).__name__}'s forward applied its norm {shared.calls} times through "
                             "the block, not once")
    return out


def _apply(step: Step, h: torch.Tensor, stack: list[torch.Tensor], stats: _Stats | None) -> torch.Tensor:
    kind = step.kind
    if kind == "local":
        return step.module(h)
    if kind == "norm":
        return _normalise(h, step.module, stats)
    if kind == "swish":
        return F.silu(h, inplace=True)   # h is always the fresh output of a norm
    if kind == "push":
        stack.append(h)
        return h
    if kind == "shortcut":
        stack[-1] = step.module(stack[-1])
        return h
    if kind == "add":
        return h.add_(stack.pop())
    if kind == "attention":
        return _attention_with(step.module, h, stats)
    if kind == "tanh":
        return torch.tanh(h)
    raise AssertionError(kind)


@dataclass(frozen=True)
class _Grid:
    """The tiles of one pass, in layout px: each tile's window (what it computes on) and core (the part of the
    image it owns; the cores partition the image)."""
    rows: list[int]
    cols: list[int]
    th: int
    tw: int
    height: int
    width: int

    @property
    def tiles(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(len(self.rows)) for j in range(len(self.cols))]

    def window(self, t) -> tuple[int, int, int, int]:
        i, j = t
        return self.rows[i], self.rows[i] + self.th, self.cols[j], self.cols[j] + self.tw

    def core(self, t) -> tuple[int, int, int, int]:
        i, j = t
        (r0, r1), (c0, c1) = _cores(self.rows, self.th)[i], _cores(self.cols, self.tw)[j]
        return self.rows[i] + r0, self.rows[i] + r1, self.cols[j] + c0, self.cols[j] + c1

    def sources(self, u) -> list[tuple[tuple[int, int], tuple[int, int, int, int]]]:
        """The tiles whose cores make up ``u``'s window, each with the part of the window it gives."""
        return [(t, part) for t in self.tiles if (part := _intersect(self.core(t), self.window(u))) is not None]

    def piece_area_peak(self) -> int:
        """Layout px of the pieces a pass keeps at most while it walks the tiles once: the parts of processed
        tiles' old cores that tiles still to come need as their halo."""
        order = self.tiles
        kept, peak = {}, 0
        for k, u in enumerate(order):
            kept = {key: a for key, a in kept.items() if key[1] != u}
            for v in order[k + 1:]:
                part = _intersect(self.core(u), self.window(v))
                if part is not None:
                    kept[(u, v)] = (part[1] - part[0]) * (part[3] - part[2])
            peak = max(peak, sum(kept.values()))
        return peak


def _intersect(a, b):
    top, bottom, left, right = max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3])
    return (top, bottom, left, right) if top < bottom and left < right else None


def _grid(x: torch.Tensor, tile: int, overlap: int, unit: int) -> _Grid:
    height, width = x.shape[-2] // unit, x.shape[-1] // unit
    th, rows = tile_layout(height, tile, overlap)
    tw, cols = tile_layout(width, tile, overlap)
    return _Grid(rows, cols, th, tw, height, width)


def parked_bytes(program: Program, x: torch.Tensor, tile: int, overlap: int, unit: int = 1) -> int:
    """Host memory the waiting tiles of one pass over ``x`` take at most: the cores of every tile (one image's
    worth) plus the halo pieces kept for the tiles still to come, at the program's widest barrier."""
    grid = _grid(x, tile, overlap, unit)
    layout_px = grid.height * grid.width + grid.piece_area_peak()
    return int(program.parked_per_px * layout_px * x.shape[0] * x.element_size())


def _cores(starts: list[int], size: int) -> list[tuple[int, int]]:
    """Per tile, the [from, to) of its own part, in its own layout px: the cores partition the length."""
    bounds = [0] + [(b + a + size) // 2 for a, b in zip(starts, starts[1:])] + [starts[-1] + size]
    return [(lo - a, hi - a) for a, lo, hi in zip(starts, bounds, bounds[1:])]


@dataclass
class PassStats:
    """What the last pass held: the largest state parked at once (bytes) and the tile count."""
    parked_peak: int = 0
    tiles: int = 0


last_pass = PassStats()


class _Parking:
    """The tiles' parked states and the halo pieces kept for tiles still to come, with a running byte count.

    ``monitor`` (benchmarks) is called with the bytes parked right before and right after every change, so that
    between two calls either nothing is parked or freed, or exactly one thing is: the memory the compute device
    uses is then what the process holds less the larger of the two counts."""

    def __init__(self, park: torch.device, monitor=None, device: torch.device | None = None):
        self.park, self.monitor = park, monitor
        self.pinned = pins(device, park) if device is not None else False
        self.bytes = self.peak = 0

    def _mark(self):
        if self.monitor is not None:
            self.monitor(self.bytes)

    def keep(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Contiguous copies of ``tensors`` (crops of a tile's state) in park memory, counted."""
        self._mark()
        kept = [park_copy(t, self.park, self.pinned) for t in tensors]
        self.bytes += sum(t.numel() * t.element_size() for t in kept)
        self.peak = max(self.peak, self.bytes)
        self._mark()
        return kept

    def count(self, nbytes: int) -> None:
        """Counts ``nbytes`` about to be allocated in park memory (negative: just freed)."""
        self._mark()
        self.bytes += nbytes
        self.peak = max(self.peak, self.bytes)
        self._mark()

    def drop(self, tensors: list[torch.Tensor]) -> None:
        """Frees ``tensors`` (the list is emptied; the caller holds no other reference)."""
        self._mark()
        self.bytes -= sum(t.numel() * t.element_size() for t in tensors)
        tensors.clear()
        self._mark()


def pins(device: torch.device, park: torch.device) -> bool:
    """Whether tiles computed on ``device`` park in pinned host memory with non-blocking copies: from CUDA to the
    host only (page-locked memory lets the copies overlap the next tile's work; elsewhere there is nothing to gain
    and the CPU path stays as it was)."""
    return device.type == "cuda" and park.type == "cpu"


def park_copy(t: torch.Tensor, park: torch.device, pinned: bool) -> torch.Tensor:
    """A contiguous copy of ``t`` in park memory; pinned, and copied without waiting, where ``pinned`` and ``t`` is
    on CUDA. Nothing on the host reads a parked tile before the device does: it only goes back to the device on
    the same stream, which orders the copies, and torch keeps a pinned block until the copies using it are done."""
    if pinned and t.device.type == "cuda":
        kept = torch.empty(t.shape, dtype=t.dtype, device=park, pin_memory=True)
        kept.copy_(t, non_blocking=True)
        return kept
    return t.to(park, copy=True, memory_format=torch.contiguous_format)


def _crop(t: torch.Tensor, box, origin, scale: int) -> torch.Tensor:
    """The part ``box`` (layout px) of ``t``, a tile state whose top left is at layout px ``origin``."""
    top, bottom, left, right = box
    return t[..., (top - origin[0]) * scale:(bottom - origin[0]) * scale,
             (left - origin[1]) * scale:(right - origin[1]) * scale]


def _segments(program: Program) -> list[list[Step]]:
    """The program cut before every barrier; a segment's first step is the one whose statistics it waits for."""
    segments, current = [], []
    for step in program.steps:
        if step.barrier is not None and current:
            segments.append(current)
            current = []
        current.append(step)
    segments.append(current)
    if segments[0][0].barrier is not None:
        segments.insert(0, [])  # the input itself is normalised first: its statistics come from an empty step
    return segments


def _distinct(state: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """The distinct tensors of a tile state [activation, *residuals], and which of them each position is."""
    index: dict[int, int] = {}
    alias = [index.setdefault(id(t), len(index)) for t in state]
    tensors = {i: t for t, i in zip(state, alias)}
    return [tensors[i] for i in range(len(index))], alias


def shared_norm_forward(module: nn.Module, x: torch.Tensor, *, tile: int, overlap: int, unit: int = 1,
                        forward=None, park: torch.device | str = "cpu", out_device: torch.device | str | None = None,
                        park_budget: int | None = None, monitor=None) -> torch.Tensor:
    """``module(x)`` from tiles of at most ``tile`` layout px (latent px), GroupNorms with whole-image statistics.

    ``x`` is a latent for a decoder (``unit`` 1), an image for an encoder (``unit`` 8); ``park_budget``: bytes
    the waiting tiles may take, :class:`HostMemoryShort` before any work where they would take more;
    ``monitor``: see :class:`_Parking`.

    Between two GroupNorms a tile parks only its core; the next step rebuilds its window from the cores of the
    tiles it overlaps (their outputs of the same step, kept for it where they have moved on). Every tile's halo
    is thus refreshed with its neighbours' values at every GroupNorm, and a tile's border errors cannot travel
    inward beyond the few px of one step's convolutions, which the halo absorbs: outside attention the tiles
    compute what the whole pass computes, and the host holds one image's worth of each waiting activation, not
    the overlaps twice. Attention attends within its tile, so tiles disagree after it everywhere: its outputs
    are blended across the overlaps with the linear ramps of :mod:`lib_hires.vae.layout` (at its
    resolution, the latent's: a small image), so that one tile's attention fades into the next instead of
    meeting it at a core's edge. The output is then the tiles' cores put together."""
    grid = _grid(x, tile, overlap, unit)
    out_device = x.device if out_device is None else torch.device(out_device)
    if len(grid.rows) == len(grid.cols) == 1:
        return (forward or module)(x).to(out_device)
    th, tw = grid.th, grid.tw
    program = program_of(module, x, unit, forward, probe=min(PROBE, th, tw))
    estimate = parked_bytes(program, x, tile, overlap, unit)
    if park_budget is not None and estimate > park_budget:
        raise HostMemoryShort(f"the tiles waiting between GroupNorms need about {estimate / 2 ** 20:.0f} MiB of "
                              f"host memory; {park_budget / 2 ** 20:.0f} MiB can be given")
    device, park = x.device, torch.device(park)
    parking = _Parking(park, monitor, device)
    tiles = grid.tiles
    sources = {u: grid.sources(u) for u in tiles}
    cores = {t: grid.core(t) for t in tiles}
    origins = {t: grid.window(t)[::2] for t in tiles}

    def scale_of(t, tensor):   # px per layout px of a parked core
        return tensor.shape[-2] // (cores[t][1] - cores[t][0])

    # per tile: the cores of the distinct tensors of its state; ``alias``: which of them each position is
    states = {t: parking.keep([_crop(x, cores[t], (0, 0), unit)]) for t in tiles}
    alias = [0]
    segments = _segments(program)
    image = None
    stats = None
    with torch.no_grad():
        for k, segment in enumerate(segments):
            following = segments[k + 1][0].barrier if k + 1 < len(segments) else None
            gathered = _Stats(following.num_groups) if following is not None else None
            blend = [] if any(step.kind == "attention" for step in segment) and following is not None else None
            kept: dict[tuple, list[torch.Tensor]] = {}   # (from tile, for tile): parts of an old core
            done: set = set()
            for n, u in enumerate(tiles):
                windows = []
                for d, own in enumerate(states[u]):
                    s = scale_of(u, own)
                    window = torch.empty(*own.shape[:-2], th * s, tw * s, dtype=own.dtype, device=device)
                    for t, part in sources[u]:
                        src = kept[(t, u)][d] if t in done else _crop(states[t][d], part, cores[t][::2], s)
                        _crop(window, part, origins[u], s).copy_(src, non_blocking=parking.pinned)
                    windows.append(window)
                for t, _ in sources[u]:
                    if t in done:
                        parking.drop(kept.pop((t, u)))
                for v in tiles[n + 1:]:   # what the tiles still to come need of this tile's old core
                    part = _intersect(cores[u], grid.window(v))
                    if part is not None:
                        kept[(u, v)] = parking.keep([_crop(c, part, cores[u][::2], scale_of(u, c)) for c in states[u]])
                parking.drop(states.pop(u))
                h, *stack = [windows[d] for d in alias]
                del windows
                for step in segment:
                    h = _apply(step, h, stack, stats)
                done.add(u)
                s = h.shape[-2] // th
                if h.shape[-2:] != (s * th, s * tw):
                    raise UnsupportedVAE(f"a {th}x{tw} tile became {tuple(h.shape[-2:])} inside the VAE")
                if gathered is None:   # the output: the cores put together
                    if image is None:
                        image = torch.empty(*h.shape[:-2], grid.height * s, grid.width * s, dtype=h.dtype,
                                            device=out_device)
                    _crop(image, cores[u], (0, 0), s).copy_(_crop(h, cores[u], origins[u], s))
                    del h, stack
                    continue
                tensors, next_alias = _distinct([h] + stack)
                del h, stack
                if blend is not None:
                    if not blend:
                        for t in tensors:
                            parking.count(t[..., :1, :1].numel() * 4 * grid.height * grid.width * s * s)
                            blend.append(Canvas(grid.rows, grid.cols, th, tw, grid.height, grid.width, park))
                    for canvas, t in zip(blend, tensors):
                        canvas.add(*u, t)
                    continue
                gathered.add(_crop(tensors[0], cores[u], origins[u], s))
                states[u] = parking.keep([_crop(t, cores[u], origins[u], t.shape[-2] // th)
                                          for t in tensors])
                del tensors
            assert not kept, "every kept halo piece was used"
            if blend:   # the blended attention outputs become the tiles' cores
                blended = [canvas.result() for canvas in blend]
                for t in tiles:
                    states[t] = parking.keep([_crop(b, cores[t], (0, 0), b.shape[-2] // grid.height)
                                              for b in blended])
                    gathered.add(states[t][0])
                nbytes = sum(canvas.image.numel() * 4 for canvas in blend)
                del blended, blend
                parking.count(-nbytes)
            alias = next_alias if gathered is not None else alias
            stats = gathered
    last_pass.parked_peak, last_pass.tiles = parking.peak, len(tiles)
    return image
