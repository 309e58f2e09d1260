"""How views become model calls: grouping by size, view-major stacking, and what each call sees.

A call over views ``v0..vk-1`` of a batch of ``R`` rows stacks ``[v0 rows 0..R-1, v1 rows 0..R-1, ...]``.
Rows never mix: every row's views are cut from that row only, and every batch-aligned argument is
repeated in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch

from .views import View


def repeat_rows(value: Any, rows: int, times: int) -> Any:
    """``value`` with every tensor whose first dim is ``rows`` repeated ``times`` times view-major.

    Walks dicts, lists and tuples (the WebUI's ``{"c_crossattn": [t], "c_concat": [t]}`` and SDXL's
    ``{"crossattn": t, "vector": t, ...}``). Other tensors, e.g. a ``[1, ...]`` tensor that broadcasts
    over the batch, and non-tensors pass unchanged.
    """
    if times == 1:
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] != rows:
            return value
        return value.repeat(times, *([1] * (value.ndim - 1)))
    if isinstance(value, dict):
        return {k: repeat_rows(v, rows, times) for k, v in value.items()}
    if isinstance(value, list):
        return [repeat_rows(v, rows, times) for v in value]
    if isinstance(value, tuple):  # a named tuple keeps its type
        items = [repeat_rows(v, rows, times) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def plan_calls(keys: Sequence[Hashable], view_batch: int) -> list[list[int]]:
    """Indices per model call: views with equal keys (their spatial size) in chunks of ``view_batch``.

    Groups keep the order in which their first view appears and views keep their order within a
    group, so the calls, and the sums over their results, do not depend on ``view_batch``.
    """
    if view_batch < 1:
        raise ValueError(f"view_batch must be at least 1; got {view_batch}")
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return [members[k:k + view_batch] for members in groups.values() for k in range(0, len(members), view_batch)]


@dataclass(frozen=True)
class ModelCall:
    """One model call of a fused evaluation, as the ``before_call`` hook sees it."""
    index: int                 # 0-based within this evaluation
    count: int                 # model calls in this evaluation
    views: tuple[View, ...]    # in batch order; each stands for ``rows`` consecutive batch entries
    rows: int
    size: tuple[int, int]      # latent size of every view in the call
    sigma: torch.Tensor        # the noise level of the evaluation, one per row

    @property
    def crops(self) -> list[tuple[int, int]]:
        """(top, left) pixel crop per view, as ``view_cond`` receives them."""
        return [v.crop for v in self.views]

    def cut(self, frame: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """Every view of an unpadded-frame tensor stacked view-major, e.g. an inpainting model's
        ``c_concat`` latent (``scale=1``) or a ControlNet hint (``scale=8``)."""
        return torch.cat([v.cut(frame, scale) for v in self.views])
