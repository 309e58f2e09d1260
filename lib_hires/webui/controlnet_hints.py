"""ControlNet hints that follow DemoFusion's stages, local views and dilated samples.

sd-webui-controlnet computes each unit's hint for Width/Height (the first stage) and adds its guided
hint to the UNet input without resizing it, so every UNet call needs a hint of its own size: the
stage's hint (the original one resized), cut like the latent for each view of the call. The hints are
set through ``ControlParams.hint_cond``, whose setter drops ControlNet's per-hint caches, and are put
back when the job ends. There is no public API for this; ``latest_network.control_params`` has been
stable since 2023 (``webui-hooks.md`` §5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

VAE_SCALE = 8


def control_params(p) -> list:
    """The ControlNet units hooked for this job (empty without sd-webui-controlnet or active units)."""
    runner = getattr(p, "scripts", None)
    for script in getattr(runner, "alwayson_scripts", []) or []:
        try:
            is_controlnet = script.title().lower() == "controlnet"
        except Exception:  # noqa: BLE001 - another extension's title() is not ours to trust
            continue
        network = getattr(script, "latest_network", None) if is_controlnet else None
        if network is not None:
            return [param for param in getattr(network, "control_params", None) or []
                    if isinstance(getattr(param, "hint_cond", None), torch.Tensor) and param.hint_cond.ndim == 4]
    return []


class StageHints:
    """Per-call hints for every ControlNet unit; ``restore()`` puts the original hints back."""

    def __init__(self, params: list):
        self.params = params
        self.originals = [param.hint_cond for param in params]
        self.stage_hints = list(self.originals)

    def set_stage(self, latent_size: tuple[int, int]) -> None:
        size = (latent_size[0] * VAE_SCALE, latent_size[1] * VAE_SCALE)
        self.stage_hints = [h if tuple(h.shape[-2:]) == size else
                            F.interpolate(h, size=size, mode="bilinear", align_corners=False)
                            for h in self.originals]
        for param, hint in zip(self.params, self.stage_hints):
            param.hint_cond = hint

    def set_call(self, call) -> None:
        """``FusedDenoiser.before_call``: the hint of each view, for every row of the call, view-major."""
        for param, hint in zip(self.params, self.stage_hints):
            parts = []
            for view in call.views:
                cut = view.cut(hint, VAE_SCALE)
                parts.append(cut.expand(call.rows, *cut.shape[1:]) if cut.shape[0] == 1 else cut)
            param.hint_cond = torch.cat(parts)

    def restore(self) -> None:
        for param, hint in zip(self.params, self.originals):
            param.hint_cond = hint
