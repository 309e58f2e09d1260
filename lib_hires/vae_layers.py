"""Tiled VAE passes whose GroupNorms use the whole image's statistics, with one tile's working memory.

A decoder (or encoder) normalised tile by tile normalises a tile of sky and a tile of foliage
differently: tonal steps between tiles that no seam blending hides. Here the module runs as a program of
steps derived from its own structure, one step at a time across all tiles: every GroupNorm is a barrier
where each tile contributes the mean and variance of its own core (the part of the tile nearest to it,
so that the cores partition the image and every pixel counts once), combined exactly in float64
(Chan's parallel update), and then every tile is normalised with the whole image's statistics. Between
barriers a tile's state (its activation and the residuals its ResnetBlock still has to add) waits in
``park`` memory (the host by default), so the compute device holds one tile at a time. Attention stays
per tile: it is normalised with the shared statistics, but attends within its tile.

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

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .vae_tiles import _Canvas, tile_layout

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

    def before(m, args):
        if depth[0] == 0:
            calls.append(m)
        depth[0] += 1

    def after(m, args, out):
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
    """Stands in for an attention block's ``norm`` while the block runs on one tile of this thread's pass."""

    def __init__(self, norm: nn.GroupNorm, stats: _Stats):
        super().__init__()
        self.norm, self.stats = norm, stats

    def forward(self, x):
        return _normalise(x, self.norm, self.stats)


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
        block = step.module
        norm = block._modules["norm"]
        block._modules["norm"] = _SharedNorm(norm, stats)
        try:
            return block(h)
        finally:
            block._modules["norm"] = norm
    if kind == "tanh":
        return torch.tanh(h)
    raise AssertionError(kind)


def parked_bytes(program: Program, x: torch.Tensor, covered_px: int) -> int:
    """Host memory the waiting tiles of one pass take at most: ``covered_px`` layout px of tiles in all."""
    return int(program.parked_per_px * covered_px * x.shape[0] * x.element_size())


def _cores(starts: list[int], size: int) -> list[tuple[int, int]]:
    """Per tile, the [from, to) of its own part, in its own layout px: the cores partition the length."""
    bounds = [0] + [(b + a + size) // 2 for a, b in zip(starts, starts[1:])] + [starts[-1] + size]
    return [(lo - a, hi - a) for a, lo, hi in zip(starts, bounds, bounds[1:])]


def _to(tensors: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Moves a tile's state, once per distinct tensor (the residual just pushed is the activation itself)."""
    moved: dict[int, torch.Tensor] = {}
    return [moved.setdefault(id(t), t.to(device)) for t in tensors]


@dataclass
class PassStats:
    """What the last pass held: the largest state parked at once (bytes) and the tile count."""
    parked_peak: int = 0
    tiles: int = 0


last_pass = PassStats()


def shared_norm_forward(module: nn.Module, x: torch.Tensor, *, tile: int, overlap: int, unit: int = 1,
                        forward=None, park: torch.device | str = "cpu", out_device: torch.device | str | None = None,
                        park_budget: int | None = None) -> torch.Tensor:
    """``module(x)`` from tiles of at most ``tile`` layout px (latent px), GroupNorms with whole-image statistics.

    ``x`` is a latent for a decoder (``unit`` 1), an image for an encoder (``unit`` 8); ``park_budget``: bytes
    the waiting tiles may take, :class:`HostMemoryShort` before any work where they would take more. The output is blended
    from the tiles' outputs with the same ramps as :func:`lib_hires.vae_tiles.tiled_decode`."""
    height, width = x.shape[-2] // unit, x.shape[-1] // unit
    th, rows = tile_layout(height, tile, overlap)
    tw, cols = tile_layout(width, tile, overlap)
    out_device = x.device if out_device is None else torch.device(out_device)
    if len(rows) == len(cols) == 1:
        return (forward or module)(x).to(out_device)
    program = program_of(module, x, unit, forward, probe=min(PROBE, th, tw))
    parked = parked_bytes(program, x, th * tw * len(rows) * len(cols))
    if park_budget is not None and parked > park_budget:
        raise HostMemoryShort(f"the tiles waiting between GroupNorms need about {parked / 2 ** 20:.0f} MiB of host "
                              f"memory; {park_budget / 2 ** 20:.0f} MiB can be given")
    device, park = x.device, torch.device(park)
    tiles = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    cores_h, cores_w = _cores(rows, th), _cores(cols, tw)
    states = {(i, j): [x[..., rows[i] * unit:(rows[i] + th) * unit, cols[j] * unit:(cols[j] + tw) * unit].to(park)]
              for i, j in tiles}  # per tile: [activation, *residuals]
    segments, current = [], []
    for step in program.steps:
        if step.barrier is not None and current:
            segments.append(current)
            current = []
        current.append(step)
    segments.append(current)
    if segments[0][0].barrier is not None:
        segments.insert(0, [])  # the input itself is normalised first: its statistics come from an empty step

    canvas = _Canvas(rows, cols, th, tw, height, width, out_device)
    stats = None
    peak = 0
    with torch.no_grad():
        for k, segment in enumerate(segments):
            following = segments[k + 1][0].barrier if k + 1 < len(segments) else None
            gathered = _Stats(following.num_groups) if following is not None else None
            parked = 0
            for i, j in tiles:
                h, *stack = _to(states.pop((i, j)), device)
                for step in segment:
                    h = _apply(step, h, stack, stats)
                if gathered is None:
                    canvas.add(i, j, h)
                    continue
                s = h.shape[-2] // th
                if h.shape[-2:] != (s * th, s * tw):
                    raise UnsupportedVAE(f"a {th}x{tw} tile became {tuple(h.shape[-2:])} inside the VAE")
                (r0, r1), (c0, c1) = cores_h[i], cores_w[j]
                gathered.add(h[..., r0 * s:r1 * s, c0 * s:c1 * s])
                states[(i, j)] = _to([h] + stack, park)
                parked += sum({id(t): t.numel() * t.element_size() for t in states[(i, j)]}.values())
                del h, stack
            peak = max(peak, parked)
            stats = gathered
    last_pass.parked_peak, last_pass.tiles = peak, len(tiles)
    return canvas.result()
