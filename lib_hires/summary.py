"""Short human-readable summaries of what a generation will do, for the accordion header and the console."""
from __future__ import annotations

from dataclasses import dataclass

from .demofusion import plan_stages
from .scalecrafter import UNetLayout, build_plan
from .settings import SettingsError, ScaleFusionSettings

UNET_MULTIPLE = 64  # three stride-2 levels of the SD UNet at a VAE factor of 8


@dataclass(frozen=True)
class Summary:
    header: str       # one line, for the accordion header
    details: str      # several lines, for the accordion body / console
    warnings: tuple[str, ...] = ()


def size_warnings(width: int, height: int) -> list[str]:
    """The UNet only lines up its skip connections exactly at multiples of 64 pixels."""
    out = []
    for name, value in (("width", width), ("height", height)):
        if value % UNET_MULTIPLE:
            out.append(f"{name} {value} is not a multiple of {UNET_MULTIPLE}: allowed without loss are multiples of "
                       f"{UNET_MULTIPLE} (e.g. {value // UNET_MULTIPLE * UNET_MULTIPLE} or "
                       f"{(value // UNET_MULTIPLE + 1) * UNET_MULTIPLE}); other sizes work, but the UNet resizes "
                       "its skip connections, as the WebUI always does")
    return out


def short_source(source: str) -> str:
    """"official sd1.5_2048x2048" -> "sd1.5_2048x2048"; "rule s=3 (long side ...)..." -> "rule s=3"."""
    if source.startswith("official "):
        return source.split(" ")[1]
    return source.split(" (")[0].split(":")[0]


def scalecrafter_summary(family: str, train_size: int, width: int, height: int, settings: ScaleFusionSettings,
                         layout: UNetLayout | None = None) -> Summary:
    try:
        plan = build_plan(family, width, height, settings.scalecrafter(), layout=layout, train_size=train_size)
    except SettingsError as error:
        return Summary(f"{width}×{height}: {error}", str(error), (str(error),))
    dilated = "no dilation at this size" if not plan.main else \
        f"max dilation {max(plan.main.values()):g}" + (", noise-damped CFG" if plan.base is not None else "")
    header = f"{width}×{height} · latent {width // 8}×{height // 8} · {short_source(plan.preset.source)} · {dilated}"
    warnings = tuple(size_warnings(width, height))
    return Summary(header, plan.describe(), warnings)


def demofusion_summary(train_size: int, width: int, height: int, settings: ScaleFusionSettings) -> Summary:
    window = train_size // 8
    stride = settings.stride or window // 2
    try:
        if stride > window:
            raise ValueError(f"stride must be at most the model's window of {window} latent px; got {stride}")
        plan = plan_stages(width // 8 * 8, height // 8 * 8, settings.scale, window=window, stride=stride,
                           factors=settings.stage_factors)
    except ValueError as error:
        return Summary(f"{width}×{height}: {error}", str(error), (str(error),))
    final = plan.final
    factors = " → ".join(f"×{stage.factor:.3g}" for stage in plan.stages)
    header = (f"{width}×{height} → {final.width}×{final.height} · latent {final.width // 8}×{final.height // 8} · "
              f"stages {factors}")
    if settings.stage_strength < 1 or settings.later_steps:
        steps = f"{settings.later_steps} steps" if settings.later_steps else "the first stage's steps"
        header += f" · later stages from strength {settings.stage_strength:g}, {steps}"
    view_batch = 1 if settings.low_vram else settings.view_batch
    return Summary(header, plan.describe(view_batch), tuple(size_warnings(width, height)))
