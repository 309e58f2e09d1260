"""What Forge's loaded model is, in the engine's terms (the same :class:`ModelInfo` as in AUTOMATIC1111)."""
from __future__ import annotations

from lib_hires.settings import TITLE
from lib_hires.webui.model_info import ModelInfo, UnsupportedModelError, describe_unet, model_name


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
    predictor = getattr(getattr(patcher, "model", None), "predictor", None)
    v_prediction = getattr(predictor, "prediction_type", "epsilon") == "v_prediction"
    return describe_unet(sd_model, unet, "forge_objects.unet.model.diffusion_model", v_prediction, native_size)
