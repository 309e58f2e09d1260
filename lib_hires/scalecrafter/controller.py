"""Drives a UNet's re-dilation from a plan, per call, keyed on the timestep the UNet receives."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .plan import ScaleCrafterPlan
from .redilated_conv import RedilationHandle, WeightGetter


class ScaleCrafterController:
    """Installs conv hooks for ``plan`` plus a forward pre-hook on the UNet that sets their factors.

    Each UNet call reads its timestep ``t`` (positional or ``timesteps=``) and latent size. A call
    whose latent size is not the plan's (another pass, a ControlNet, a tile) runs vanilla. Inside
    ``base_pass()`` calls use the noise-damped CFG base set. ``remove()`` (or leaving the ``with``
    block) restores the UNet exactly, also after an exception. ``weights``: see :class:`RedilationHandle`.
    """

    def __init__(self, unet: nn.Module, plan: ScaleCrafterPlan, weights: WeightGetter | None = None):
        self.plan = plan
        self.handle = RedilationHandle(unet, plan.hooked_paths, weights)
        try:
            self._pre_hook = unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
        except BaseException:
            self.handle.remove()
            raise
        self._base_mode = False
        self.last_call: tuple[float, bool, dict[str, float]] | None = None

    def _on_unet_call(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        t = args[1] if len(args) > 1 else kwargs.get("timesteps")
        if x is None or t is None or tuple(x.shape[-2:]) != self.plan.latent_size:
            self.handle.clear()
            self.last_call = None
            return None
        t = float(t.max()) if isinstance(t, torch.Tensor) else float(t)
        factors = (self.plan.base_at(t) or {}) if self._base_mode else self.plan.main_at(t)
        self.handle.set_factors(factors, self.plan.dispersed_among(factors))
        self.last_call = (t, self._base_mode, factors)
        return None

    @contextmanager
    def base_pass(self) -> Iterator[None]:
        self._base_mode = True
        try:
            yield
        finally:
            self._base_mode = False

    def remove(self) -> None:
        self._pre_hook.remove()
        self.handle.remove()

    def __enter__(self) -> "ScaleCrafterController":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
