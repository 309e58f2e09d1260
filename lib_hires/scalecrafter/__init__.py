"""ScaleCrafter: re-dilated convolutions, dispersion and noise-damped CFG for higher resolutions.

Pure torch; nothing here imports the WebUI. Data flows settings -> plan -> controller/hooks -> sampler.
"""
from .controller import ScaleCrafterController
from .dispersion import dispersed_conv2d, dispersion_transform, disperse_weight
from .guidance import NoiseDampedCFG, guided_combine
from .layout import (FAMILIES, ConvSite, UNetLayout, UnsupportedUNetError, canonical_layout, infer_family,
                     scan_unet, training_size)
from .plan import ScaleCrafterPlan, build_plan, resolve_dilations
from .presets import OFFICIAL, Preset, preset_for
from .redilated_conv import RedilationHandle, redilate, redilated_conv2d
from .schedule import official_step, official_timestep, scheduled_factor
from .shared_prefix import SharedPrefix
from .settings import ScaleCrafterSettings, SettingsError

__all__ = [
    "FAMILIES", "OFFICIAL", "ConvSite", "NoiseDampedCFG", "Preset", "RedilationHandle", "ScaleCrafterController",
    "ScaleCrafterPlan", "ScaleCrafterSettings", "SettingsError", "SharedPrefix", "UNetLayout", "UnsupportedUNetError", "build_plan",
    "canonical_layout", "disperse_weight", "dispersed_conv2d", "dispersion_transform", "guided_combine",
    "infer_family", "official_step", "official_timestep", "preset_for", "redilate", "redilated_conv2d",
    "resolve_dilations", "scan_unet", "scheduled_factor", "training_size",
]
