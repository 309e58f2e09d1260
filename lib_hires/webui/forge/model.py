"""What Forge's loaded model is, in the engine's terms (the same :class:`ModelInfo` as in AUTOMATIC1111)."""
from __future__ import annotations

import weakref

from torch import nn

from lib_hires.scalecrafter import UNetLayout, infer_family, scan_unet, training_size
from lib_hires.settings import TITLE
from lib_hires.webui.model_info import ModelInfo, UnsupportedModelError

_layouts: "weakref.WeakKeyDictionary[nn.Module, UNetLayout]" = weakref.WeakKeyDictionary()


def _layout(unet: nn.Module) -> UNetLayout:
    if unet not in _layouts:
        _layouts[unet] = scan_unet(unet)
    return _layouts[unet]


def model_name(sd_model) -> str:
    return getattr(getattr(sd_model, "sd_checkpoint_info", None), "name_for_extra", None) or "the loaded model"


def unet_patcher(sd_model):
    """The ``UnetPatcher`` Forge samples with now (``forge_objects`` is replaced before every pass)."""
    objects = getattr(sd_model, "forge_objects", None)
    if objects is None:
        raise UnsupportedModelError(f"{TITLE}: no checkpoint is loaded yet (Forge loads it with the first "
                                    f"generation)")
    return objects.unet


def describe(sd_model, native_size: int | None = None) -> ModelInfo:
    """Family, training size and UNet layout of Forge's model; refuses Flux, SD3, Chroma and other non-UNets.

    ``native_size`` (the user's setting) replaces the family's training size, for fine-tunes.
    """
    name = model_name(sd_model)
    patcher = unet_patcher(sd_model)
    legacy = getattr(sd_model, "is_webui_legacy_model", None)
    if getattr(sd_model, "is_sd3", False) or (callable(legacy) and not legacy()):
        raise UnsupportedModelError(f"{TITLE}: {name} is not an SD1.x, SD2.x or SDXL UNet model (Flux, SD3 and "
                                    f"Chroma are transformers); ScaleCrafter and DemoFusion work on those UNets only. "
                                    f"Turn {TITLE} off or load another checkpoint.")
    unet = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    if unet is None:
        raise UnsupportedModelError(f"{TITLE}: {name} has no UNet at forge_objects.unet.model.diffusion_model")
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
    predictor = getattr(patcher.model, "predictor", None)
    v_prediction = getattr(predictor, "prediction_type", "epsilon") == "v_prediction"
    return ModelInfo(family, native_size or training_size(family, v_prediction=v_prediction), unet, layout)
