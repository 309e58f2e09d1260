"""Re-dilated 3x3 convolutions, installed per conv instance through ``_conv_forward``.

``nn.Conv2d.forward`` ends in ``self._conv_forward(input, self.weight, self.bias)``. Whatever the
WebUI does before that (LoRA merging into ``weight``, fp8 / manual-cast casting, all patched in at
class level) has already happened when the call reaches an instance-level ``_conv_forward``, so the
``weight`` argument is the kernel to use. Overriding nothing else keeps module trees, parameters and
state-dict keys untouched.

Conv classes whose ``forward`` computes the kernel itself and does not always reach the instance's
``_conv_forward`` (Forge's ``ForgeOperations.Conv2d`` calls ``super()._conv_forward`` outside its manual-cast
branch) get a :class:`ForwardConvHook` instead: it overrides the instance ``forward`` and takes the kernel and
bias from an injected weight getter that computes them as that class's own ``forward`` would (so whatever the
class applies to its weight, LoRA deltas, scales, casts, still applies). Nothing here knows that class.

Dispersed convs never form their 5x5 kernel: ``dispersed_conv2d`` computes the conv with it from the
3x3 ``weight`` and the dispersion transform, so nothing is derived, cached or copied per conv.
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from typing import Callable, Collection, ContextManager, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .dispersion import compute_dtype, dispersed_conv2d, dispersion_transform

MAX_FACTOR = 16.0
_EPS = 1e-9


def integer_dilation(factor: float) -> int:
    """``ceil(d)``, tolerant of float noise (2.0000000001 is 2)."""
    return max(1, math.ceil(factor - _EPS))


def conv_output_size(size: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    """Spatial output size of ``conv`` with its own (vanilla) kernel, padding, dilation and stride."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, p, d, k, s in zip(size, conv.padding, conv.dilation, conv.kernel_size, conv.stride))


def redilated_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, factor: float, *,
                     stride=(1, 1), groups: int = 1, padding_mode: str = "zeros",
                     out_size: tuple[int, int] | None = None, transform: torch.Tensor | None = None) -> torch.Tensor:
    """A convolution whose receptive field is scaled by ``factor``.

    Integer ``d``: ``conv2d(x, w, b, stride, padding=d*(k-1)/2, dilation=d)``. Fractional ``d``: with
    ``D = ceil(d)`` the input is bilinearly resized by ``D/d`` (align_corners=False), convolved with
    dilation ``D`` and resized back, so the receptive field is ``D / (D/d) = d`` in input pixels. The
    result always has ``out_size`` (default: the size of a stride-``stride`` 3x3 "same" conv), so skip
    connections line up also for stride-2 convs and odd sizes.

    With ``transform`` (a dispersion transform ``R``, ``L*L x k*k``) the conv uses the dispersed ``L x L``
    kernels of ``weight`` (padding ``D*(L-1)/2``), computed by ``dispersed_conv2d`` without forming them;
    ``groups`` must then be 1.

    Everything runs in the dtype the vanilla conv would compute in (``compute_dtype``: autocast's, else the
    input's), also the resizes, and the result has that dtype; in float32 without autocast nothing is cast.
    """
    dtype = compute_dtype(x)
    x = x.to(dtype)
    dilation = integer_dilation(factor)
    height, width = x.shape[-2:]
    stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride, stride)
    if out_size is None:
        out_size = ((height - 1) // stride[0] + 1, (width - 1) // stride[1] + 1)
    if dilation != factor:
        scale = dilation / factor
        x = F.interpolate(x, size=(round(height * scale), round(width * scale)), mode="bilinear", align_corners=False)
    kernel_size = weight.shape[-1] if transform is None else math.isqrt(transform.shape[0])
    pad = dilation * (kernel_size - 1) // 2
    if padding_mode != "zeros":
        x = F.pad(x, (pad, pad, pad, pad), mode=padding_mode)
    conv_pad = pad if padding_mode == "zeros" else 0
    if transform is None:
        y = F.conv2d(x, weight, bias, stride, conv_pad, dilation, groups)
    else:
        y = dispersed_conv2d(x, weight, bias, transform, stride=stride, padding=conv_pad, dilation=dilation,
                             groups=groups)
    if tuple(y.shape[-2:]) != tuple(out_size):
        y = F.interpolate(y, size=tuple(out_size), mode="bilinear", align_corners=False)
    return y.to(dtype)  # a CPU autocast may run resizes in float32


def check_factor(where: str, factor) -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1.0 <= factor <= MAX_FACTOR:
        raise ValueError(f"{where}: dilation factor must be a number from 1 to {MAX_FACTOR:g}; got {factor!r}")
    return float(factor)


class _Transform:
    """The dispersion transform R (25x9), with a copy per device and dtype it is used on (225 numbers each),
    so no conv call pays for a host-to-device copy."""

    __slots__ = ("_r", "_copies")

    def __init__(self, r: torch.Tensor):
        self._r = r
        self._copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def on(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, compute_dtype(like))
        r = self._copies.get(key)
        if r is None:
            r = self._copies[key] = self._r.to(device=key[0], dtype=key[1])
        return r


class _InstanceHook:
    """One conv's instance attribute ``ATTR`` while it is hooked: vanilla (the previous value) until given a
    factor > 1; ``uninstall`` puts back exactly what the instance had, also when hooks come off out of order."""

    ATTR = ""
    __slots__ = ("path", "_conv", "_inner", "_previous", "_had_own", "_transform", "factor", "dispersed",
                 "detached", "__weakref__")

    def __init__(self, conv: nn.Conv2d, path: str, transform: "_Transform"):
        self.path = path
        self._conv = weakref.ref(conv)
        self._had_own = self.ATTR in conv.__dict__
        self._previous = conv.__dict__.get(self.ATTR)
        self._inner = getattr(conv, self.ATTR)  # another extension's override, or the bound class method
        self._transform = transform
        self.factor = 1.0
        self.dispersed = False
        self.detached = False

    @property
    def conv(self) -> nn.Conv2d | None:
        return self._conv()

    def _redilated(self, conv: nn.Conv2d, input: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
        factor, transform = self.factor, None
        if self.dispersed:
            transform = self._transform.on(input)
            factor = factor / 2  # the 5x5 dispersed kernel already spans twice the 3x3 one
        return redilated_conv2d(input, weight, bias, factor, stride=conv.stride, groups=conv.groups,
                                padding_mode=conv.padding_mode, out_size=conv_output_size(input.shape[-2:], conv),
                                transform=transform)

    def install(self) -> None:
        conv = self._conv()
        setattr(conv, self.ATTR, self)

    def uninstall(self) -> None:
        conv = self._conv()
        self.detached = True
        if conv is None or conv.__dict__.get(self.ATTR) is not self:
            # Someone wrapped us afterwards; staying in their chain as a pass-through keeps it valid.
            return
        previous, had_own = self._previous, self._had_own
        while isinstance(previous, _InstanceHook) and previous.detached:  # skip hooks removed out of order
            previous, had_own = previous._previous, previous._had_own
        if had_own:
            setattr(conv, self.ATTR, previous)
        else:
            delattr(conv, self.ATTR)


class ConvHook(_InstanceHook):
    """The ``_conv_forward`` of one conv while it is hooked: the kernel is the ``weight`` argument, as the
    conv's own ``forward`` computed it."""

    ATTR = "_conv_forward"
    __slots__ = ()

    def __call__(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        conv = self._conv()
        if self.factor <= 1.0 or self.detached or conv is None:
            return self._inner(input, weight, bias)
        return self._redilated(conv, input, weight, bias)


WeightGetter = Callable[[nn.Conv2d, torch.Tensor], ContextManager[tuple[torch.Tensor, "torch.Tensor | None"]]]


class ForwardConvHook(_InstanceHook):
    """The ``forward`` of one conv while it is hooked, for conv classes whose ``forward`` does not always reach
    the instance's ``_conv_forward``. ``weights(conv, input)`` is a context manager giving the final kernel and
    bias for this input, as the class's ``forward`` computes them, and holding for the conv whatever that
    computation needs held (a copy stream's event, say); while vanilla, the previous ``forward`` runs."""

    ATTR = "forward"
    __slots__ = ("_weights",)

    def __init__(self, conv: nn.Conv2d, path: str, transform: "_Transform", weights: WeightGetter):
        super().__init__(conv, path, transform)
        self._weights = weights

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        conv = self._conv()
        if self.factor <= 1.0 or self.detached or conv is None:
            return self._inner(input)
        with self._weights(conv, input) as (weight, bias):
            return self._redilated(conv, input, weight, bias)


def _resolve_convs(unet: nn.Module, paths: Collection[str]) -> dict[str, nn.Conv2d]:
    convs = {}
    for path in paths:
        try:
            module = unet.get_submodule(path)
        except AttributeError:
            raise KeyError(f"{path!r}: no such module in this UNet") from None
        if not isinstance(module, nn.Conv2d) or module.kernel_size != (3, 3) or module.dilation != (1, 1) \
                or module.padding != (1, 1):
            raise ValueError(f"{path!r}: only 3x3 convs with padding 1 and no dilation can be re-dilated")
        convs[path] = module
    return convs


class RedilationHandle:
    """Hooks on a set of convs whose factors can be changed between UNet calls; undone by ``remove``.

    Until ``set_factors`` gives a conv a factor above 1 it runs exactly as before, so a handle can stay
    installed for a whole job and be driven per call. Without ``weights`` the convs' ``_conv_forward`` is
    hooked; with a weight getter, their ``forward`` (:class:`ForwardConvHook`).
    """

    def __init__(self, unet: nn.Module, paths: Collection[str], weights: WeightGetter | None = None):
        convs = _resolve_convs(unet, paths)  # validate every path before touching any module
        self.transform = _Transform(dispersion_transform())
        if weights is None:
            self.hooks = {path: ConvHook(conv, path, self.transform) for path, conv in convs.items()}
        else:
            self.hooks = {path: ForwardConvHook(conv, path, self.transform, weights) for path, conv in convs.items()}
        for hook in self.hooks.values():
            hook.install()
        self.removed = False

    def set_factors(self, factors: Mapping[str, float], dispersed: Collection[str] = ()) -> None:
        for path, hook in self.hooks.items():
            hook.factor = factors.get(path, 1.0)
            hook.dispersed = path in dispersed

    def clear(self) -> None:
        for hook in self.hooks.values():
            hook.factor, hook.dispersed = 1.0, False

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        for hook in self.hooks.values():
            hook.uninstall()

    def __enter__(self) -> "RedilationHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextmanager
def redilate(unet: nn.Module, dilations: Mapping[str, float], *,
             dispersed: Collection[str] = ()) -> Iterator[RedilationHandle]:
    """Runs the convs named in ``dilations`` re-dilated for the duration of the block.

    ``dilations`` maps module paths relative to ``unet`` to effective receptive-field factors (1 to 16;
    fractional allowed). Paths also in ``dispersed`` use the dispersed 5x5 kernel at half the factor
    (computed without forming it, see ``dispersed_conv2d``).
    On exit, also through an exception, every conv is exactly as before.
    """
    checked = {path: check_factor(f"dilations[{path!r}]", factor) for path, factor in dilations.items()}
    dispersed = frozenset(dispersed)
    stray = sorted(dispersed - checked.keys())
    if stray:
        raise ValueError(f"dispersed: {stray} are not in dilations (only re-dilated convs can be dispersed)")
    handle = RedilationHandle(unet, checked.keys())
    try:
        grouped = sorted(p for p in dispersed if unet.get_submodule(p).groups != 1)
        if grouped:
            raise ValueError(f"dispersed: {grouped} are grouped convs (only groups=1 convs can be dispersed)")
        handle.set_factors(checked, dispersed)
        yield handle
    finally:
        handle.remove()
