"""DemoFusion: progressive upscaling with skip residual, jittered local views and dilated global sampling.

Pure torch/einops; nothing here imports the WebUI. Data flows settings + plan -> per stage:
upsample -> skip residual on the sampler state -> fused denoiser (views + dilated path) -> anchor.
``sample_stage`` / ``sample_stages`` run it with Euler; the WebUI adapter drives the same pieces
through the WebUI's own sampler (``FusedDenoiser`` as ``CFGDenoiser.inner_model``).
"""
from .batching import ModelCall, plan_calls, repeat_rows
from .blur import blur_kernel_size, gaussian_blur, restandardize, row_stats
from .dilated import blurred_frame, global_prediction, merge_samples, split_samples
from .fused import NEGLIGIBLE_WEIGHT, FusedDenoiser
from .plan import (MAX_STAGE_STEP, Stage, StagePlan, check_stage_factors, format_stage_factors, parse_stage_factors,
                   plan_stages, stage_dilation, stage_factors)
from .schedule import LaterStart, later_stage_start, partial_sigmas, partial_steps, steps_run
from .settings import DemoFusionSettings, default_settings
from .stage import euler, sample_stage, sample_stages, skip_residual, stage_noise, upsample_latent
from ..vae import tiled_decode  # re-exported: the engine API of issue 4
from .views import (DilatedView, LocalView, coverage, dilated_size, dilated_views, grid_size, jitter_range,
                    local_views, view_starts)
from .weights import StepWeights, blur_weight, cosine_factor, fusion_weight, skip_weight, step_weights

__all__ = [
    "DemoFusionSettings", "DilatedView", "FusedDenoiser", "LocalView", "MAX_STAGE_STEP", "ModelCall",
    "NEGLIGIBLE_WEIGHT", "Stage", "StagePlan", "check_stage_factors", "format_stage_factors", "parse_stage_factors",
    "LaterStart", "later_stage_start", "partial_sigmas", "partial_steps", "steps_run",
    "StepWeights", "blur_kernel_size", "blur_weight", "blurred_frame", "coverage", "cosine_factor",
    "default_settings", "dilated_size", "dilated_views", "euler", "fusion_weight", "gaussian_blur",
    "global_prediction", "grid_size", "jitter_range", "local_views", "merge_samples", "plan_calls",
    "plan_stages", "repeat_rows", "restandardize", "row_stats", "sample_stage", "sample_stages", "skip_residual",
    "skip_weight", "split_samples", "stage_dilation", "stage_factors", "stage_noise", "step_weights",
    "tiled_decode", "upsample_latent", "view_starts",
]
