"""Where the re-dilatable 3x3 convs of an ldm / sgm ``UNetModel`` are, found by structure.

Groups follow the ScaleCrafter shorthand: ``D0..D3`` (down levels, outermost first, each with its
downsampler), ``M`` (middle), ``U0..U3`` (up levels, innermost first, each with its upsampler).
Within a group a conv is a ``res`` (ResBlock ``in_layers.2`` / ``out_layers.3``), ``down``
(``Downsample.op``, stride 2) or ``up`` (``Upsample.conv``). ``input_blocks.0.0`` (conv_in), ``out.2``
(conv_out), 1x1 skip convs and attention are never sites.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

FAMILIES = ("sd1", "sd2", "sdxl")
KINDS = ("res", "down", "up")

# Sizes the families were trained at; SD2 has a 512-px base model and a 768-px v-prediction model.
TRAINING_SIZE = {"sd1": 512, "sd2": 512, "sdxl": 1024}


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    return family


def training_size(family: str, *, v_prediction: bool = False) -> int:
    """Native resolution: SD1 512, SD2 768 for the v-prediction model else 512, SDXL 1024."""
    check_family(family)
    return 768 if family == "sd2" and v_prediction else TRAINING_SIZE[family]


@dataclass(frozen=True)
class ConvSite:
    path: str    # module path relative to the UNet, e.g. "input_blocks.4.0.in_layers.2"
    group: str   # "D0".."D3", "M", "U0".."U3"
    kind: str    # "res" | "down" | "up"

    @property
    def key(self) -> str:
        """The preset key this conv takes its factor from, e.g. "D2.down"."""
        return f"{self.group}.{self.kind}"


@dataclass(frozen=True)
class UNetLayout:
    levels: int
    sites: tuple[ConvSite, ...]

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(s.path for s in self.sites)

    def site(self, path: str) -> ConvSite:
        for s in self.sites:
            if s.path == path:
                return s
        raise KeyError(f"{path!r} is not a re-dilatable 3x3 conv of this UNet")


class UnsupportedUNetError(ValueError):
    pass


def _conv3x3(module, stride: int) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.stride == (stride, stride)
            and module.dilation == (1, 1) and module.padding == (1, 1) and module.groups == 1)


def _resblock_convs(layer) -> tuple[str, str] | None:
    in_layers, out_layers = getattr(layer, "in_layers", None), getattr(layer, "out_layers", None)
    if not (isinstance(in_layers, nn.Sequential) and isinstance(out_layers, nn.Sequential)):
        return None
    if len(in_layers) < 3 or len(out_layers) < 4:
        return None
    if not (_conv3x3(in_layers[2], 1) and _conv3x3(out_layers[3], 1)):
        return None
    return "in_layers.2", "out_layers.3"


def _is_downsample(layer) -> bool:
    return _conv3x3(getattr(layer, "op", None), 2)


def _is_upsample(layer) -> bool:
    return type(layer).__name__ == "Upsample" and _conv3x3(getattr(layer, "conv", None), 1)


def scan_unet(unet: nn.Module) -> UNetLayout:
    """Finds the sites of an ldm/sgm UNet by walking its blocks in forward order."""
    for attr in ("input_blocks", "middle_block", "output_blocks"):
        if not isinstance(getattr(unet, attr, None), (nn.ModuleList, nn.Sequential)):
            raise UnsupportedUNetError(
                f"not an ldm/sgm UNetModel: it has no {attr} (SD3 / MMDiT and TensorRT UNets are not supported)")
    sites: list[ConvSite] = []

    def add_layer(prefix: str, layer, group: str) -> str | None:
        res = _resblock_convs(layer)
        if res:
            sites.extend(ConvSite(f"{prefix}.{name}", group, "res") for name in res)
            return "res"
        if _is_downsample(layer):
            sites.append(ConvSite(f"{prefix}.op", group, "down"))
            return "down"
        if _is_upsample(layer):
            sites.append(ConvSite(f"{prefix}.conv", group, "up"))
            return "up"
        return None

    level = 0
    for i, block in enumerate(unet.input_blocks):
        if i == 0:  # conv_in
            continue
        kinds = [add_layer(f"input_blocks.{i}.{j}", layer, f"D{level}") for j, layer in enumerate(block)]
        if "down" in kinds:
            level += 1
    levels = level + 1
    for j, layer in enumerate(unet.middle_block):
        add_layer(f"middle_block.{j}", layer, "M")
    up = 0
    for i, block in enumerate(unet.output_blocks):
        kinds = [add_layer(f"output_blocks.{i}.{j}", layer, f"U{up}") for j, layer in enumerate(block)]
        if "up" in kinds:
            up += 1
    if up != levels - 1:
        raise UnsupportedUNetError(f"UNet has {levels} down levels but {up + 1} up levels")
    if not sites:
        raise UnsupportedUNetError("no ResBlock / Downsample / Upsample 3x3 convs found")
    return UNetLayout(levels, tuple(sites))


def canonical_layout(family: str) -> UNetLayout:
    """The layout of the published UNet of a family, without building it.

    SD1.x and SD2.x: 4 levels, attention on levels 0-2; SDXL: 3 levels, attention on levels 1-2. The
    upsampler sits after the attention block when its level has one (``output_blocks.N.2.conv``).
    """
    check_family(family)
    levels, attention = (3, {1, 2}) if family == "sdxl" else (4, {0, 1, 2})
    res_blocks = 2
    sites: list[ConvSite] = []

    def resblock(prefix: str, group: str) -> None:
        sites.append(ConvSite(f"{prefix}.in_layers.2", group, "res"))
        sites.append(ConvSite(f"{prefix}.out_layers.3", group, "res"))

    block = 1
    for level in range(levels):
        for _ in range(res_blocks):
            resblock(f"input_blocks.{block}.0", f"D{level}")
            block += 1
        if level < levels - 1:
            sites.append(ConvSite(f"input_blocks.{block}.0.op", f"D{level}", "down"))
            block += 1
    resblock("middle_block.0", "M")
    resblock("middle_block.2", "M")
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        for r in range(res_blocks + 1):
            resblock(f"output_blocks.{block}.0", f"U{up}")
            if level > 0 and r == res_blocks:
                sites.append(ConvSite(f"output_blocks.{block}.{2 if level in attention else 1}.conv", f"U{up}", "up"))
            block += 1
    return UNetLayout(levels, tuple(sites))


def infer_family(unet: nn.Module) -> str:
    """Best guess from structure alone (the WebUI adapter uses the model's own flags instead)."""
    layout = scan_unet(unet)
    if layout.levels == 3:
        return "sdxl"
    context_dims = {m.in_features for name, m in unet.named_modules()
                    if name.endswith("attn2.to_k") and isinstance(m, nn.Linear)}
    return "sd2" if 1024 in context_dims else "sd1"


def expand(layout: UNetLayout, factors_by_key: dict[str, float]) -> dict[str, float]:
    """Per-path factors from per-key factors ("D2.res": 3.0) for this layout's sites."""
    return {s.path: factors_by_key[s.key] for s in layout.sites if s.key in factors_by_key}


def keys_of(layout: UNetLayout) -> frozenset[str]:
    return frozenset(s.key for s in layout.sites)


def paths_for_keys(layout: UNetLayout, keys: Iterable[str]) -> frozenset[str]:
    keys = set(keys)
    return frozenset(s.path for s in layout.sites if s.key in keys)
