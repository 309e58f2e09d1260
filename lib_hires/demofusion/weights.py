"""The three cosine-decayed weights of DemoFusion, as functions of the model timestep.

``cf(t) = 0.5 (1 + cos(pi (T - t) / T))`` with ``T = 1000`` falls from 1 at the noisiest timestep
to 0 at t = 0. The skip residual uses ``c1 = cf^a1``, the global/local fusion ``c2 = cf^a2`` and the
Gaussian blur ``c3 = 0.99 cf^a3 + 0.01``. Everything is a function of t, the timestep the UNet
receives, never of a step index: a sampler's step index means a different noise level for every
step count, schedule and partial (img2img) run, the timestep does not (the official code switched
from the index to the timestep on 2023-11-30).

``t`` may be a float or a tensor (one timestep per batch row); the weights follow its type.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

TRAIN_TIMESTEPS = 1000  # num_train_timesteps of every SD-family schedule

Number = Union[float, torch.Tensor]


def per_row(value: Number, ndim: int) -> Number:
    """A one-per-row tensor shaped to broadcast over ``[R, C, H, W]``; floats and 0-d tensors as they are."""
    if isinstance(value, torch.Tensor) and value.ndim == 1:
        return value.reshape(-1, *([1] * (ndim - 1)))
    return value


def cosine_factor(t: Number) -> Number:
    """``0.5 (1 + cos(pi (1000 - t) / 1000))``, clamped to [0, 1] against rounding at t = 0 and 1000."""
    angle = math.pi * (TRAIN_TIMESTEPS - t) / TRAIN_TIMESTEPS
    if isinstance(t, torch.Tensor):
        return (0.5 * (1.0 + torch.cos(angle))).clamp(0.0, 1.0)
    return min(max(0.5 * (1.0 + math.cos(angle)), 0.0), 1.0)


def skip_weight(t: Number, cosine_scale_1: float) -> Number:
    """c1: how much of the noised upsampled latent replaces the sampler state."""
    return cosine_factor(t) ** cosine_scale_1


def fusion_weight(t: Number, cosine_scale_2: float) -> Number:
    """c2: the share of the dilated (global) prediction in the fused one."""
    return cosine_factor(t) ** cosine_scale_2


def blur_weight(t: Number, cosine_scale_3: float) -> Number:
    """c3: scales the Gaussian's sigma; the 0.01 floor keeps the kernel a proper (near-delta) Gaussian."""
    return 0.99 * cosine_factor(t) ** cosine_scale_3 + 0.01


@dataclass(frozen=True)
class StepWeights:
    c1: Number
    c2: Number
    c3: Number


def step_weights(t: Number, cosine_scale_1: float = 3.0, cosine_scale_2: float = 1.0,
                 cosine_scale_3: float = 1.0) -> StepWeights:
    return StepWeights(skip_weight(t, cosine_scale_1), fusion_weight(t, cosine_scale_2),
                       blur_weight(t, cosine_scale_3))
