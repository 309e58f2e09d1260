"""What other extensions installed on the UnetPatcher that samples, read from its ``model_options`` at each step.

Forge's built-ins (Self-Attention Guidance, Kohya HRFix, FreeU, Perturbed Attention Guidance, Dynamic
Thresholding, Latent Modifier, ControlNet / T2I-Adapters) patch a clone of ``forge_objects.unet`` in their
``process_before_every_sampling``, before or after ScaleFusion's depending on the script order, so what they
installed is known for sure only once sampling starts: a ``sampler_pre_cfg_function`` receives the
``model_options`` of the step and returns the ones the step runs with (the UNet calls of the batch, the CFG
function, every post-CFG function and the UNet calls they make). What the passes need from them is decided there:

* :func:`resize_guarded` wraps the block patches and block modifiers so that one that changes the spatial size of
  the UNet's features (Kohya HRFix's shrink) is refused when it does so: right by construction, whatever installed
  it, and silent for those that keep the size (FreeU) or a shrink factor of 1;
* :func:`running_last` moves a post-CFG function behind the others (noise-damped CFG behind SAG and PAG, which add
  guidance terms computed from the step's own predictions);
* :func:`whole_latent_attention` names a post-CFG function that reads state recorded inside one UNet call over the
  whole latent (SAG's attention map), which DemoFusion's views cannot provide. That one is told by its code's
  name: nothing in ``model_options`` says that a function keeps such state.

Nothing here imports Forge.
"""
from __future__ import annotations

from typing import Callable

from lib_hires.webui.messages import RequestError

INPUT_PATCHES = ("input_block_patch", "input_block_patch_after_skip")  # (h, transformer_options) -> h
OUTPUT_PATCH = "output_block_patch"                                     # (h, hsp, transformer_options) -> h, hsp
BLOCK_MODIFIERS = "block_modifiers"                                     # (h, "before"/"after", options) -> h

# Post-CFG functions whose guidance reads what they recorded inside the UNet call of the whole latent, by
# ``__qualname__``: Forge's SAG (extensions-builtin/sd_forge_sag/scripts/forge_sag.py) keeps the uncond rows'
# middle-block self-attention map from its attn1 replace and blurs the latent with it.
WHOLE_LATENT_ATTENTION = {
    "SelfAttentionGuidance.patch.<locals>.post_cfg_function": "Self-Attention Guidance (SelfAttentionGuidance "
                                                              "Integrated)",
}

Refusal = Callable[[str], str]   # what resized the features (where, from, to) -> the message to raise


def _size(tensor) -> tuple[int, ...]:
    return tuple(tensor.shape[2:])


def _where(transformer_options: dict) -> str:
    block = transformer_options.get("block")
    return f"{block[0]} block {block[1]}" if isinstance(block, (tuple, list)) and len(block) == 2 else "a block"


def _describe(kind: str, where: str, before, after) -> str:
    return f"{kind} at {where}: {'x'.join(map(str, before))} -> {'x'.join(map(str, after))}"


def _guarded(fn: Callable, kind: str, refusal: Refusal) -> Callable:
    if getattr(fn, "_resize_guarded", False):
        return fn

    if kind == OUTPUT_PATCH:
        def guard(h, hsp, transformer_options):
            out_h, out_hsp = fn(h, hsp, transformer_options)
            for before, after in ((h, out_h), (hsp, out_hsp)):
                if _size(after) != _size(before):
                    raise RequestError(refusal(_describe(kind, _where(transformer_options), _size(before),
                                                         _size(after))))
            return out_h, out_hsp
    elif kind == BLOCK_MODIFIERS:
        def guard(h, when, transformer_options):
            out = fn(h, when, transformer_options)
            if _size(out) != _size(h):
                raise RequestError(refusal(_describe(f"a block modifier ({when})", _where(transformer_options),
                                                     _size(h), _size(out))))
            return out
    else:
        def guard(h, transformer_options):
            out = fn(h, transformer_options)
            if _size(out) != _size(h):
                raise RequestError(refusal(_describe(kind, _where(transformer_options), _size(h), _size(out))))
            return out

    guard._resize_guarded = True
    guard.__wrapped__ = fn
    return guard


def resize_guarded(model_options: dict, refusal: Refusal) -> dict:
    """``model_options`` for this step with every input/output block patch and block modifier of its
    ``transformer_options`` wrapped: one that returns features of another spatial size than it was handed raises
    ``RequestError(refusal(what))`` there. Unchanged (the same object) where nothing is installed; the patcher's
    own ``model_options`` are never changed (Forge reads them afresh at every step)."""
    transformer = model_options.get("transformer_options") or {}
    patches = transformer.get("patches") or {}
    modifiers = transformer.get(BLOCK_MODIFIERS) or []
    kinds = [k for k in (*INPUT_PATCHES, OUTPUT_PATCH) if patches.get(k)]
    if not kinds and not modifiers:
        return model_options
    guarded_patches = dict(patches)
    for kind in kinds:
        guarded_patches[kind] = [_guarded(fn, kind, refusal) for fn in patches[kind]]
    guarded = {**transformer, "patches": guarded_patches}
    if modifiers:
        guarded[BLOCK_MODIFIERS] = [_guarded(fn, BLOCK_MODIFIERS, refusal) for fn in modifiers]
    return {**model_options, "transformer_options": guarded}


def running_last(model_options: dict, fn: Callable) -> dict:
    """``model_options`` whose post-CFG functions run ``fn`` after all the others (the same object where it
    already does, or is not there)."""
    functions = list(model_options.get("sampler_post_cfg_function") or [])
    if fn not in functions or functions[-1] is fn:
        return model_options
    return {**model_options, "sampler_post_cfg_function": [f for f in functions if f is not fn] + [fn]}


def whole_latent_attention(model_options: dict) -> str | None:
    """The name of an installed post-CFG function that guides with attention recorded over the whole latent."""
    for fn in model_options.get("sampler_post_cfg_function") or []:
        name = WHOLE_LATENT_ATTENTION.get(getattr(fn, "__qualname__", ""))
        if name:
            return name
    return None
