"""SDXL micro-conditioning for DemoFusion: every stage says "part of a final-size image", every view its crop.

SDXL's ``vector`` conditioning ends with the embeddings of ``original_size``, ``crop_coords_top_left``
and ``target_size`` (in the conditioner's embedder order). The WebUI builds them for Width/Height, the
first stage; the official pipeline uses the final size everywhere and each local view's crop
(``demofusion.md`` §2). This rewrites those columns of the ``vector`` rows a UNet call receives, cond
and uncond rows alike, so the conds themselves (and ControlNet's marks on them) stay as they are.
"""
from __future__ import annotations

from typing import Sequence

import torch

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


class SizeConditioning:
    """Column ranges of the size embeddings in ``vector`` and the embedders that make them."""

    def __init__(self, sd_model, final_width: int, final_height: int):
        self.embedders = {}
        self.columns: dict[str, slice] = {}
        embedders = list(getattr(getattr(sd_model, "conditioner", None), "embedders", []))
        # The size embedders are the last contributions to "vector"; walk back from its end.
        end = None
        for embedder in reversed(embedders):
            key = getattr(embedder, "input_key", None)
            if key not in SIZE_KEYS:
                break
            start = (0 if end is None else end) - self._embed(embedder, [[0, 0]]).shape[-1]
            self.embedders[key] = embedder
            self.columns[key] = slice(start, end)
            end = start
        self.final = (final_height, final_width)
        self._final_rows: dict[tuple, torch.Tensor] = {}

    @property
    def available(self) -> bool:
        return set(self.columns) == set(SIZE_KEYS)

    @staticmethod
    def _embed(embedder, values, like: torch.Tensor | None = None) -> torch.Tensor:
        param = next(embedder.parameters(), None) if hasattr(embedder, "parameters") else None
        device = like.device if like is not None else (param.device if param is not None else "cpu")
        out = embedder(torch.tensor(values, device=device, dtype=torch.float32))
        return out.to(like) if like is not None else out

    def _final(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._final_rows:
            original = self._embed(self.embedders["original_size_as_tuple"], [list(self.final)], like)
            target = self._embed(self.embedders["target_size_as_tuple"], [list(self.final)], like)
            self._final_rows[key] = torch.cat([original, target], dim=-1)
        return self._final_rows[key]

    def edit(self, vector: torch.Tensor, crops: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """``vector`` with the final size in every row and, if given, ``crops[i]`` in the rows of view ``i``
        (rows stacked view-major: ``len(vector) / len(crops)`` rows per view)."""
        out = vector.clone()
        final = self._final(vector)
        out[:, self.columns["original_size_as_tuple"]] = final[:, :final.shape[-1] // 2]
        out[:, self.columns["target_size_as_tuple"]] = final[:, final.shape[-1] // 2:]
        if crops is not None:
            rows = vector.shape[0] // len(crops)
            embedded = self._embed(self.embedders["crop_coords_top_left"], [list(c) for c in crops], vector)
            out[:, self.columns["crop_coords_top_left"]] = embedded.repeat_interleave(rows, dim=0)
        return out

    def edit_cond(self, cond: dict, crops: Sequence[tuple[int, int]] | None = None) -> dict:
        """A cond dict as ``CFGDenoiser`` hands it to the inner model, with ``vector`` edited."""
        if not self.available or not isinstance(cond, dict) or "vector" not in cond:
            return cond
        return {**cond, "vector": self.edit(cond["vector"], crops)}
