"""The conds of DemoFusion's later stages, made for the steps those stages run.

The WebUI builds ``p.c`` / ``p.uc`` for the first pass's step count (``setup_conds``), and a prompt-editing
schedule (``[castle:ruins:0.8]``, ``[a|b]``, ``[x:12]``) is resolved against it: the CFG denoiser picks each
step's cond by its own step counter. A later stage runs ``later_steps`` steps (``sample_img2img(steps=...)``), so
with stage 1's conds a 0.8 switch at step 24 of 30 never comes in an 18-step stage. The Hires. fix pass meets the
same problem and rebuilds its conds for its own step count (``calculate_hr_conds``); the later stages do so here,
through the same ``p.get_conds_with_caching`` with the same prompt functions, step rule
(``SamplerData.total_steps``), extra-network key and size — each later stage follows the schedule over its own
steps, as stage 1 does over ``Sampling steps``.

Where a later stage runs as many schedule steps as stage 1 (``later_steps`` 0 or equal, and img2img's own step
rule, which resolves the schedule against ``Sampling steps`` as the WebUI's img2img does) its conds are stage 1's
very objects: nothing is rebuilt.

The refiner takes over inside the final stage, and the WebUI's switch rebuilds the conds with the refiner
(``apply_refiner`` → ``p.setup_conds()``, then ``update_inner_model`` reads ``p.get_conds()``): while the later
stages sample, instance patches make that rebuild and that read give the later stages' conds too.
"""
from __future__ import annotations

from .instance_patch import InstancePatch


def schedule_steps(p, steps: int) -> int:
    """The step count a cond schedule is made for when the sampler runs ``steps`` steps (``total_steps``:
    second-order samplers count two per step)."""
    from modules import sd_samplers

    config = sd_samplers.find_sampler_config(p.sampler_name)
    return config.total_steps(steps) if config else steps


class LaterStageConds:
    """``c`` and ``uc`` of the later stages of one DemoFusion run over ``p`` (one batch of the job).

    ``first`` is stage 1's ``(c, uc)``; ``steps`` the sampler steps of a later stage. :meth:`install` puts the
    instance patches of ``p.get_conds`` / ``p.setup_conds`` on for the later stages; :meth:`remove` takes them off.
    """

    def __init__(self, p, first: tuple, steps: int):
        self.p, self.first = p, first
        self.steps = schedule_steps(p, steps)
        first_steps = getattr(p, "firstpass_steps", None) or schedule_steps(p, p.steps)
        self.own = self.steps != first_steps  # else stage 1's schedule is the later stages' already
        self._caches = ([None, None], [None, None])   # (uc, c) of this run, as p.cached_hr_uc / cached_hr_c
        self.patches: list[InstancePatch] = []
        self.c, self.uc = self._build() if self.own else first

    def _build(self) -> tuple:
        from modules import prompt_parser

        p = self.p
        prompts = prompt_parser.SdConditioning(p.prompts, width=p.width, height=p.height)
        negative = prompt_parser.SdConditioning(p.negative_prompts, width=p.width, height=p.height,
                                                is_negative_prompt=True)
        uc = p.get_conds_with_caching(prompt_parser.get_learned_conditioning, negative, self.steps,
                                      [self._caches[0]], p.extra_network_data)
        c = p.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, prompts, self.steps,
                                     [self._caches[1]], p.extra_network_data)
        return c, uc

    def install(self) -> None:
        if self.own and not self.patches:
            self._setup_conds, self._get_conds = self.p.setup_conds, self.p.get_conds
            self.patches = [InstancePatch(self.p, "setup_conds", self._setup), InstancePatch(self.p, "get_conds", self._get)]

    def _setup(self, *args, **kwargs):
        """The refiner switch's rebuild: the WebUI's own (``p.c``, ``p.uc`` with the refiner), then the later
        stages' with the model now loaded (the cache key holds its checkpoint)."""
        result = self._setup_conds(*args, **kwargs)
        self.c, self.uc = self._build()
        return result

    def _get(self, *args, **kwargs):
        return self.c, self.uc

    def remove(self) -> None:
        for patch in reversed(self.patches):
            patch.remove()
        self.patches = []
