"""Noise-damped CFG's extra uncond call reuses the layers it shares with the main call.

The base (noise-damped) uncond call and the main call's uncond rows see the same latent, timestep and
conditioning, and run identical layers until the first top-level UNet block, in execution order, that holds a
conv whose factor differs between the two factor sets at this timestep. :class:`SharedPrefix` records the
outputs of those shared blocks for the main call's trailing uncond rows and, in the base call, returns them
instead of recomputing.

Right by construction rather than by assumption: a block replays only when the arguments it receives are
exactly the recorded ones (the same tensor objects, or equal values), so whatever another extension adds
between blocks (ControlNet's T2I-adapter features, a reference pass through the same blocks, a row order the
caller did not expect) makes that block, and everything after it, compute as today. The UNet's own forward
(ControlNet's replacement of it included) still runs and assembles the skips; only the shared blocks' work is
skipped. The blocks are patched per instance (``forward``) while a ``SharedPrefix`` lives and restored by
``remove()``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn


def execution_order(unet: nn.Module) -> list[str] | None:
    """The names of the UNet's top-level blocks in the order its forward runs them, or None where the UNet is
    not the ldm / sgm ``UNetModel`` layout (``input_blocks``, ``middle_block``, ``output_blocks``, ``out``)."""
    children = dict(unet.named_children())
    if not all(isinstance(children.get(n), nn.Module) for n in ("time_embed", "input_blocks", "middle_block",
                                                                 "output_blocks", "out")):
        return None
    names = ["time_embed"] + (["label_emb"] if "label_emb" in children else [])
    names += [f"input_blocks.{i}" for i in range(len(unet.input_blocks))] + ["middle_block"]
    names += [f"output_blocks.{i}" for i in range(len(unet.output_blocks))] + ["out"]
    return names


def shared_blocks(order: Sequence[str], main: Mapping[str, float], base: Mapping[str, float]) -> list[str]:
    """The longest run of blocks from the start of ``order`` holding no conv whose factor differs between
    ``main`` and ``base`` (paths relative to the UNet; a missing path is factor 1). Dispersion follows the
    factor, so equal factors mean equal kernels."""
    differing = [p for p in set(main) | set(base) if main.get(p, 1.0) != base.get(p, 1.0)]
    prefix = []
    for name in order:
        if any(p == name or p.startswith(name + ".") for p in differing):
            break
        prefix.append(name)
    return prefix


def shared_prefix_at(order: Sequence[str] | None, plan, t: float) -> list[str]:
    """The blocks of ``order`` that ``plan``'s base call at timestep ``t`` shares with its main call; empty
    where none are worth it (no base set at ``t``, no known structure, or nothing beyond the embeddings)."""
    base = plan.base_at(t)
    if order is None or base is None:
        return []
    prefix = shared_blocks(order, plan.main_at(t), base)
    return prefix if any(n.startswith(("input_blocks.", "middle_block", "output_blocks.")) for n in prefix) else []


def _rows(value, batch: int, rows: int):
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[batch - rows:]
    return value


def _versions(value) -> list[int]:
    """The in-place version counters of the tensors in ``value`` (views share their base's counter); -1 for
    inference-mode tensors, which keep none."""
    if isinstance(value, torch.Tensor):
        return [-1 if value.is_inference() else value._version]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _versions(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _versions(item)]
    return []


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same elements of the same memory: equal values without reading them (no device sync)."""
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr())


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device):
            return False
        return _aliases(a, b) or torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return False


class SharedPrefix:
    """Records and replays the shared prefix blocks of ``controller``'s UNet for noise-damped CFG.

    ``recording(rows)`` around the main call(s) of a step: the last UNet call in main mode whose batch holds at
    least ``rows`` rows is recorded for its trailing ``rows`` rows (where the WebUI and ``NoiseDampedCFG`` put
    the uncond rows), and only while the plan has a base set at that call's timestep. ``replaying()`` around the
    base call: its shared blocks return the recording where their arguments match it. ``clear()`` drops the
    recording (call it once the base call is done). ``hits`` / ``misses`` count replayed / recomputed blocks.
    """

    def __init__(self, unet: nn.Module, controller):
        self.controller = controller
        self.order = execution_order(unet)
        self.hits = 0
        self.misses = 0
        self._rows: int | None = None
        self._replaying = False
        self._active: frozenset[str] = frozenset()  # blocks recorded / replayed in the current UNet call
        self._recorded: dict[str, tuple[tuple, dict, Any, list[int]]] = {}  # args, kwargs, out, versions
        self._patched: list[tuple[nn.Module, bool, Any, Any]] = []
        self._pre_hook = None
        if self.order is None:
            return
        try:
            # registered after the controller's pre-hook, so it sees the factors of this very call
            self._pre_hook = unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
            for name in self.order:
                self._patch(unet.get_submodule(name), name)
        except BaseException:
            self.remove()
            raise

    def prefix_at(self, t: float) -> list[str]:
        """The blocks the base call at timestep ``t`` shares with the main call (see :func:`shared_prefix_at`)."""
        return shared_prefix_at(self.order, self.controller.plan, t)

    def _on_unet_call(self, module, args, kwargs):
        call = self.controller.last_call
        self._active = frozenset()
        if call is None:
            return None
        t, base_mode, _ = call
        if base_mode and self._replaying and self._recorded:
            self._active = frozenset(self._recorded)
        elif not base_mode and self._rows is not None:
            x = args[0] if args else kwargs.get("x")
            if x is not None and x.shape[0] >= self._rows:
                self._recorded = {}  # only the last main call of the step counts: it holds the uncond rows
                self._active = frozenset(self.prefix_at(t))
        return None

    def _patch(self, block: nn.Module, name: str) -> None:
        had_own = "forward" in vars(block)
        original = block.forward

        def forward(*args, **kwargs):
            if name not in self._active:
                return original(*args, **kwargs)
            if self._replaying:
                recorded = self._recorded.get(name)
                # a recording whose memory was written in place since (by anyone) no longer holds what the
                # main call computed; the version counters say so without reading the tensors
                if recorded is not None and _versions(recorded[:3]) == recorded[3] \
                        and _same(args, recorded[0]) and _same(kwargs, recorded[1]):
                    self.hits += 1
                    return recorded[2]
                self.misses += 1
                return original(*args, **kwargs)
            out = original(*args, **kwargs)
            batch = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else None
            rows = self._rows
            if batch is not None and rows is not None and batch >= rows and isinstance(out, torch.Tensor) \
                    and out.shape[0] == batch:
                # views, not copies: the main call holds these tensors as skips anyway
                entry = (tuple(_rows(a, batch, rows) for a in args),
                         {k: _rows(v, batch, rows) for k, v in kwargs.items()}, out[batch - rows:])
                self._recorded[name] = (*entry, _versions(entry))
            return out

        block.forward = forward
        self._patched.append((block, had_own, original, forward))

    @contextmanager
    def recording(self, rows: int) -> Iterator[None]:
        self.start_recording(rows)
        try:
            yield
        finally:
            self.stop_recording()

    def start_recording(self, rows: int) -> None:
        self._recorded, self._rows = {}, rows

    def stop_recording(self) -> None:
        self._rows = None
        self._active = frozenset()

    @contextmanager
    def replaying(self) -> Iterator[None]:
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False
            self._active = frozenset()

    def clear(self) -> None:
        self._recorded, self._rows, self._active = {}, None, frozenset()

    def remove(self) -> None:
        self.clear()
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        for block, had_own, original, ours in reversed(self._patched):
            if vars(block).get("forward") is not ours:
                continue  # patched again on top of ours: leave that chain; ours is inert now (nothing active)
            if had_own:
                block.forward = original
            else:
                del block.forward
        self._patched = []
