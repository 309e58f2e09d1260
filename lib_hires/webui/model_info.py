"""What the loaded checkpoint is, in the engine's terms, and whether the extension can work on it."""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

from torch import nn

from lib_hires.scalecrafter import UNetLayout, infer_family, scan_unet, training_size
from lib_hires.scalecrafter.layout import canonical_layout
from lib_hires.settings import TITLE


class UnsupportedModelError(RuntimeError):
    """The loaded model cannot be used with the extension; the message says why and what to do."""


@dataclass(frozen=True)
class ModelInfo:
    family: str          # "sd1" | "sd2" | "sdxl"
    train_size: int      # pixels per side the model was trained at
    unet: nn.Module      # shared.sd_model.model.diffusion_model
    layout: UNetLayout

    @property
    def preset_mismatch(self) -> str | None:
        """Why the family's ScaleCrafter presets do not fit this UNet, or None where they do.

        The presets name levels of the family's published UNet (SDXL: 3 levels); a UNet of the family with
        another depth, as the SDXL refiner (4 levels, 384 channels), would get the factors of other layers.
        """
        expected = canonical_layout(self.family).levels
        if self.layout.levels == expected:
            return None
        conv_in = next((m for m in self.unet.modules() if isinstance(m, nn.Conv2d)), None)
        channels = f", {conv_in.out_channels} channels" if conv_in is not None else ""
        return (f"this {self.family.upper()} UNet has {self.layout.levels} levels{channels}; the ScaleCrafter "
                f"presets of {self.family.upper()} are for its {expected}-level UNet (e.g. the SDXL refiner has "
                f"no preset)")

    @property
    def window(self) -> int:
        """The training size in latent pixels: DemoFusion's view size."""
        return self.train_size // 8


_layouts: "weakref.WeakKeyDictionary[nn.Module, UNetLayout]" = weakref.WeakKeyDictionary()


def _layout(unet: nn.Module) -> UNetLayout:
    if unet not in _layouts:
        _layouts[unet] = scan_unet(unet)
    return _layouts[unet]


def model_name(sd_model) -> str:
    return getattr(getattr(sd_model, "sd_checkpoint_info", None), "name_for_extra", None) or "the loaded model"


def describe(sd_model, native_size: int | None = None) -> ModelInfo:
    """Family, training size and UNet layout of the WebUI's model; refuses SD3 and non-UNet models.

    ``native_size`` (the user's setting) replaces the family's training size, for fine-tunes.
    """
    if getattr(sd_model, "is_sd3", False):
        raise UnsupportedModelError(f"{TITLE}: {model_name(sd_model)} is an SD3 (MMDiT) model; ScaleCrafter and "
                                    f"DemoFusion work on SD1.x, SD2.x and SDXL UNets only. Turn {TITLE} off or load "
                                    f"another checkpoint.")
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    v_prediction = getattr(sd_model, "parameterization", "eps") == "v"
    return describe_unet(sd_model, unet, "model.diffusion_model", v_prediction, native_size)


def describe_unet(sd_model, unet, where: str, v_prediction: bool, native_size: int | None) -> ModelInfo:
    """The part of reading a model both WebUIs share, once each has found its UNet (at ``where``, for the
    message) and its prediction type: the layout, the family (the model's flags, else the UNet's shape)."""
    name = model_name(sd_model)
    if unet is None:
        raise UnsupportedModelError(f"{TITLE}: {name} has no UNet at {where}")
    try:
        layout = _layout(unet)
    except ValueError as error:
        raise UnsupportedModelError(f"{TITLE}: {name}: {error}") from None
    if getattr(sd_model, "is_sdxl", False):
        family = "sdxl"
    elif getattr(sd_model, "is_sd2", False):
        family = "sd2"
    elif getattr(sd_model, "is_sd1", False):
        family = "sd1"
    else:
        family = infer_family(unet)
    return ModelInfo(family, native_size or training_size(family, v_prediction=v_prediction), unet, layout)


@functools.lru_cache(maxsize=1)
def _sd_unet_module():
    from modules import sd_unet
    return sd_unet


def replacement_unet_active() -> str | None:
    """Name of an active ``sd_unet`` replacement (TensorRT, ...), which bypasses the UNet's modules."""
    option = _sd_unet_module().current_unet_option
    return None if _sd_unet_module().current_unet is None else getattr(option, "label", "an sd_unet replacement")
