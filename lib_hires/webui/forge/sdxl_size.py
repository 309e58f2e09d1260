"""SDXL micro-conditioning in Forge: the size columns of the ``y`` rows a UNet call receives.

Forge's SDXL engine (``backend/diffusion_engine/sdxl.py``) builds ``vector`` as the pooled text embedding
followed by six 256-wide ``Timestep`` embeddings: original height, width, crop top, left, target height,
width. The layout is fixed by that code (not read from a conditioner as in A1111), so the columns are
counted from the end and embedded with the engine's own ``sd_model.embedder``. As in A1111
(``lib_hires/webui/sdxl_conditioning.py``): every stage says "part of a final-size image", every local
view its crop in the zero-padded frame, every dilated sample crop (0, 0).
"""
from __future__ import annotations

from typing import Sequence

import torch

FIELDS = ("original", "crop", "target")  # each two embeddings (height/top, width/left)


class ForgeSizeConditioning:
    def __init__(self, sd_model, final_width: int, final_height: int):
        self.embedder = getattr(sd_model, "embedder", None)
        self.width = getattr(self.embedder, "dim", None) if self.embedder is not None else None
        self.final = (final_height, final_width)
        self._final_rows: dict[tuple, torch.Tensor] = {}

    @property
    def available(self) -> bool:
        return callable(self.embedder) and isinstance(self.width, int) and self.width > 0

    def columns(self, field: str, total: int) -> slice:
        """Where ``field``'s two embeddings sit in a ``vector`` of ``total`` columns."""
        size = 2 * self.width
        start = total - size * (len(FIELDS) - FIELDS.index(field))
        return slice(start, start + size)

    def _embed(self, pairs: Sequence[Sequence[int]], like: torch.Tensor) -> torch.Tensor:
        """``[len(pairs), 2 * width]``: each (a, b) as Forge's engine embeds it, ``embedder([a])``, ``embedder([b])``."""
        values = torch.tensor([v for pair in pairs for v in pair], dtype=torch.float32)
        return self.embedder(values).reshape(len(pairs), 2 * self.width).to(like)

    def edit(self, vector: torch.Tensor, crops: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """``vector`` with the final size in every row and, if given, ``crops[i]`` in the rows of view ``i``
        (rows stacked view-major: ``len(vector) / len(crops)`` rows per view)."""
        out = vector.clone()
        total = vector.shape[-1]
        key = (vector.device, vector.dtype)
        if key not in self._final_rows:
            self._final_rows[key] = self._embed([self.final], vector)
        final = self._final_rows[key]
        out[:, self.columns("original", total)] = final
        out[:, self.columns("target", total)] = final
        if crops is not None:
            rows = vector.shape[0] // len(crops)
            out[:, self.columns("crop", total)] = self._embed(crops, vector).repeat_interleave(rows, dim=0)
        return out


class FinalSizeModifier:
    """Stage 1's ``conditioning_modifiers`` entry: the final size in the ``y`` of every cond and uncond.

    A list entry, not the one-slot model-function wrapper, so it composes with whatever else stage 1 runs.
    ``UnetPatcher.clone`` deep-copies ``model_options``; every copy is this object, so ``remove()`` makes
    all of them inert.
    """

    def __init__(self, size_cond: ForgeSizeConditioning):
        self.size_cond = size_cond
        self.active = True

    def __deepcopy__(self, memo):
        return self

    def __call__(self, model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        if self.active:
            for items in (cond, uncond or []):
                for item in items:
                    conds = item.get("model_conds", {})
                    y = conds.get("y")
                    if y is not None and isinstance(getattr(y, "cond", None), torch.Tensor):
                        conds["y"] = y._copy_with(self.size_cond.edit(y.cond))
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    def remove(self) -> None:
        self.active = False
