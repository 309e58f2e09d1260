"""DemoFusion's views inside Forge's model-function wrapper.

Forge runs CFG in ``backend/sampling/sampling_function.py``: ``calc_cond_uncond_batch`` stacks cond and uncond
chunks of the whole latent and calls ``model_options["model_function_wrapper"](apply_model, {"input", "timestep",
"c", "cond_or_uncond"})``, where ``apply_model(x, sigma, **c)`` returns the denoised ``x0`` (``KModel``). That is
the denoiser :class:`~lib_hires.demofusion.FusedDenoiser` wraps in A1111, with every cond and uncond row, so the
same engine object fuses the local views and the dilated samples here; :class:`ViewFunction` only translates
what Forge passes along with the latent:

* the conds (``c_crossattn``, ``y``, ...) are repeated view-major like every batch-aligned argument, SDXL's ``y``
  gets each view's crop (``sdxl_size.py``);
* ``transformer_options`` describes the batch of chunks: ``cond_or_uncond`` (one entry per chunk) becomes that list
  once per view, and ``cond_mark`` / ``cond_indices`` / ``uncond_indices`` are derived from it as Forge does;
* the built-in ControlNet's signals (``c["control"]``) were computed for the whole latent: each call gets its own
  from the ControlNet chain (``c["control_model"]``, its ``get_control``) with the hint cut like the latent
  (:class:`ControlViews`), and the whole-latent call the sampler makes first is skipped (``gate``);
* a wrapper that held the slot before (one slot) is chained: it receives each call of views as if Forge called it.

Nothing here imports Forge at module level; Forge's own resize and broadcast functions are imported where used.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from lib_hires.demofusion import FusedDenoiser, ModelCall, repeat_rows
from lib_hires.settings import TITLE

VAE_SCALE = 8
WHOLE_LATENT_ONLY = ("transformer_options", "control", "control_model")  # rebuilt for each call of views


class ViewsUnsupported(RuntimeError):
    """Something the views cannot carry faithfully (raised while sampling; the run turns it into a 422)."""


def cond_mark(cond_or_uncond: list, sigmas: torch.Tensor) -> torch.Tensor:
    """As Forge's ``compute_cond_mark``: one 0/1 entry per batch row, chunk by chunk."""
    per_chunk = int(sigmas.shape[0])
    return torch.Tensor([cx for cx in cond_or_uncond for _ in range(per_chunk)]).to(sigmas)


def cond_indices(cond_or_uncond: list, sigmas: torch.Tensor) -> tuple[list[int], list[int]]:
    """As Forge's ``compute_cond_indices``."""
    per_chunk = int(sigmas.shape[0])
    cond, uncond = [], []
    for i, cx in enumerate(cond_or_uncond):
        (cond if cx == 0 else uncond).extend(range(i * per_chunk, (i + 1) * per_chunk))
    return cond, uncond


def view_transformer_options(options: dict, cond_or_uncond: list) -> dict:
    """``transformer_options`` for a call whose chunks are ``cond_or_uncond`` (each view repeats the chunks)."""
    out = dict(options)
    out["cond_or_uncond"] = list(cond_or_uncond)
    sigmas = options.get("sigmas")
    if isinstance(sigmas, torch.Tensor):
        out["cond_mark"] = cond_mark(cond_or_uncond, sigmas)
        out["cond_indices"], out["uncond_indices"] = cond_indices(cond_or_uncond, sigmas)
    return out


def controlnet_chain(head) -> list:
    chain, node = [], head
    while node is not None:
        chain.append(node)
        node = getattr(node, "previous_controlnet", None)
    return chain


def _forge_resize(hint: torch.Tensor, width: int, height: int) -> torch.Tensor:
    from backend.misc import image_resize
    return image_resize.adaptive_resize(hint, width, height, "nearest-exact", "center")


def _forge_broadcast(hint: torch.Tensor, rows: int, chunks: int) -> torch.Tensor:
    from backend.patcher.controlnet import broadcast_image_to
    return broadcast_image_to(hint, rows, chunks)


class ControlViews:
    """Forge's built-in ControlNet chain, evaluated for each call of views.

    ``ControlNet.get_control`` resizes ``cond_hint_original`` to the latent it is given only when its cached
    ``cond_hint`` has another size and broadcasts it only when the batch differs. Each call sets every unit's
    ``cond_hint`` to the stage's hint (the resize Forge itself makes for the whole latent) cut like the latent
    for each view, rows view-major, so ``get_control`` uses it as is. T2I-Adapters cache their features per hint:
    the cache is dropped each call.
    """

    def __init__(self, head, resize: Callable = _forge_resize, broadcast: Callable = _forge_broadcast):
        self.head = head
        self.chain = controlnet_chain(head)
        self.resize, self.broadcast = resize, broadcast
        self._get_control = head.get_control
        self._inside = False
        self._stage_hints: dict[tuple, torch.Tensor] = {}
        for unit in self.chain:
            reason = self.unsupported(unit)
            if reason:
                raise ViewsUnsupported(reason)

    @staticmethod
    def unsupported(unit) -> str | None:
        name = type(unit).__name__
        if not isinstance(getattr(unit, "cond_hint_original", None), torch.Tensor):
            return (f"{TITLE}: DemoFusion cannot cut the hint of the ControlNet {name} per view (it has no hint "
                    "image); turn that unit off")
        if getattr(unit, "advanced_mask_weighting", None) is not None:
            return (f"{TITLE}: DemoFusion does not support ControlNet masks (effective region masks) yet: the "
                    "mask would be resized to every view instead of cut from the stage; remove the unit's mask")
        return None

    def gate(self, *args, **kwargs):
        """``get_control`` of the chain's head outside the views: the sampler's call for the whole latent, whose
        signals the views never use, is skipped (None: no control), so the ControlNet runs on views only."""
        if self._inside:
            return self._get_control(*args, **kwargs)
        return None

    def _dtype_hint(self, unit, hint: torch.Tensor) -> torch.Tensor:
        # What get_control does right after its resize (ControlNet: the model's dtype; T2I-Adapter: float,
        # grey for a one-channel adapter).
        if hasattr(unit, "t2i_model"):
            hint = hint.float()
            if getattr(unit, "channels_in", None) == 1 and hint.shape[1] > 1:
                hint = torch.mean(hint, 1, keepdim=True)
            return hint
        dtype = getattr(unit, "manual_cast_dtype", None) or getattr(getattr(unit, "control_model", None),
                                                                      "dtype", None)
        return hint.to(dtype) if dtype is not None else hint

    def stage_hint(self, unit, latent_hw: tuple[int, int], rows: int, chunks: int) -> torch.Tensor:
        key = (id(unit), latent_hw, rows, chunks)
        if key not in self._stage_hints:
            height, width = latent_hw
            hint = self._dtype_hint(unit, self.resize(unit.cond_hint_original, width * VAE_SCALE,
                                                      height * VAE_SCALE))
            if hint.shape[0] == 1:
                # Forge's broadcast leaves a one-image hint as is for torch to broadcast; cut per view, that
                # would be one row per view, and get_control's own broadcast would then keep the first view's
                # piece for every view. Each row of the latent gets its copy before the cut instead.
                hint = hint.expand(rows, *hint.shape[1:])
            elif hint.shape[0] != rows:
                hint = self.broadcast(hint, rows, chunks)
            self._stage_hints[key] = hint
        return self._stage_hints[key]

    def control(self, call: ModelCall, latent_hw, chunks: int, x, sigma, c: dict, options: dict, views_chunks: int):
        """The signals of one call of views: every unit's hint cut for the call's views, then the chain."""
        for unit in self.chain:
            unit.transformer_options = options
            hint = self.stage_hint(unit, latent_hw, call.rows, chunks)
            unit.cond_hint = call.cut(hint, VAE_SCALE)
            if hasattr(unit, "control_input"):
                unit.control_input = None
        with self._calling():
            return self.head.get_control(x, sigma, dict(c), views_chunks)

    @contextlib.contextmanager
    def _calling(self):
        self._inside = True
        try:
            yield
        finally:
            self._inside = False

    def restore(self) -> None:
        """The units recompute their whole-latent hint when next asked (as after Forge's own ``cleanup``)."""
        for unit in self.chain:
            unit.cond_hint = None
            if hasattr(unit, "control_input"):
                unit.control_input = None


@dataclass
class _Evaluation:
    """What Forge passed with the latent of the evaluation in progress."""
    apply_model: Callable
    options: dict
    cond_or_uncond: list
    control_model: object
    rows: int
    latent_hw: tuple[int, int]


class ViewFunction:
    """The UnetPatcher's ``model_function_wrapper`` for one later stage: ``fused`` is the engine's
    :class:`FusedDenoiser`, which calls :meth:`_views` once per call of views.

    ``UnetPatcher.clone`` deep-copies ``model_options``; every copy is this object (``__deepcopy__``), and
    ``remove()`` makes it pass calls straight through, wherever a copy of it is left.
    """

    def __init__(self, make_fused: Callable[..., FusedDenoiser], *, previous=None, size_cond=None,
                 controls: ControlViews | None = None, check_interrupt: Callable[[], None] | None = None,
                 latent_hw: tuple[int, int] | None = None):
        self.previous, self.size_cond, self.controls = previous, size_cond, controls
        self.latent_hw = latent_hw  # the stage's latent: any other input is a crop Forge made of it
        self.check_interrupt = check_interrupt
        self.fused = make_fused(self._views, view_cond=self._view_cond, before_call=self._before_call)
        self.active = True
        self.call: ModelCall | None = None
        self._evaluation: _Evaluation | None = None

    def __deepcopy__(self, memo):
        return self

    def remove(self) -> None:
        self.active = False

    def _plain(self, apply_model, args):
        if self.previous is not None:
            return self.previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def __call__(self, apply_model, args):
        if not self.active:
            return self._plain(apply_model, args)
        x, c = args["input"], dict(args["c"])
        options = c.get("transformer_options", {})
        if self.latent_hw is not None and tuple(x.shape[-2:]) != tuple(self.latent_hw):
            raise ViewsUnsupported(f"{TITLE}: DemoFusion's views need the whole {self.latent_hw[1] * 8}x"
                                   f"{self.latent_hw[0] * 8} latent, and Forge handed the UNet a "
                                   f"{x.shape[-1] * 8}x{x.shape[-2] * 8} part of it (area conditioning, as an "
                                   "extension's regional prompts set): turn that off to use DemoFusion")
        if "c_concat" in c and isinstance(c["c_concat"], torch.Tensor) and c["c_concat"].shape[-2:] == x.shape[-2:]:
            raise ViewsUnsupported(f"{TITLE}: DemoFusion cannot cut a latent-sized image conditioning (c_concat: "
                                   "an inpainting model or an extension's concat condition) per view")
        control_model = c.get("control_model")
        if control_model is not None and (self.controls is None or self.controls.head is not control_model):
            raise ViewsUnsupported(f"{TITLE}: a ControlNet was added after DemoFusion's stage began; its hints "
                                   "cannot follow the views")
        for key in WHOLE_LATENT_ONLY:
            c.pop(key, None)
        self._evaluation = _Evaluation(apply_model, options, list(args["cond_or_uncond"]), control_model,
                                       x.shape[0], tuple(x.shape[-2:]))
        try:
            return self.fused(x, args["timestep"], **c)
        finally:
            self._evaluation = None
            self.call = None

    def _before_call(self, call: ModelCall) -> None:
        self.call = call
        if self.check_interrupt is not None:
            self.check_interrupt()

    def _view_cond(self, extra_args: dict, crops) -> dict:
        args = repeat_rows(extra_args, self.call.rows, len(crops))
        if self.size_cond is not None and isinstance(args.get("y"), torch.Tensor):
            args["y"] = self.size_cond.edit(args["y"], crops)
        return args

    def _views(self, x: torch.Tensor, sigma: torch.Tensor, **c) -> torch.Tensor:
        """One call of views, as Forge would make it for a batch of ``views x chunks`` chunks."""
        evaluation, call = self._evaluation, self.call
        views = x.shape[0] // evaluation.rows
        cond_or_uncond = evaluation.cond_or_uncond * views
        options = view_transformer_options(evaluation.options, cond_or_uncond)
        c = {**c, "transformer_options": options}
        if evaluation.control_model is not None:
            c["control"] = self.controls.control(call, evaluation.latent_hw, len(evaluation.cond_or_uncond), x,
                                                 sigma, c, options, len(cond_or_uncond))
            c["control_model"] = evaluation.control_model
        return self._plain(evaluation.apply_model,
                           {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": cond_or_uncond})
