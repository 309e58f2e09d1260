"""DemoFusion's later stages follow the prompt schedule over their own steps (issue 19 §5).

Stand-ins of the WebUI v1.10.1 pieces involved: ``prompt_parser``'s schedules (one ``[a:b:when]`` edit, resolved
as ``get_learned_conditioning_prompt_schedules`` does without hires steps), ``get_conds_with_caching`` with its
cache key, ``setup_conds`` / ``get_conds``, ``SamplerData.total_steps`` and the CFG denoiser's per-step pick
(``reconstruct_cond_batch``: the first entry whose ``end_at_step`` is not before the step).
"""
import copy
import re
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from lib_hires.settings import DF, ScaleFusionSettings
from lib_hires.webui import model_info
from lib_hires.webui.demofusion_sampler import DemoFusionRun
from lib_hires.webui.stage_conditioning import LaterStageConds
from tests.conftest import tiny_unet
from tests.webui_fakes import FakeModel, FakeWebUI

EDIT = re.compile(r"\[([^:\]]*):([^:\]]*):([0-9.]+)\]")


def schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    match = EDIT.search(prompt)
    if match is None:
        return [(steps, prompt)]
    when = match.group(3)
    at = min(steps, int(float(when) * steps) if "." in when else int(when))
    before = prompt[:match.start()] + match.group(1) + prompt[match.end():]
    after = prompt[:match.start()] + match.group(2) + prompt[match.end():]
    return [(at, before), (steps, after)] if at >= 1 else [(steps, after)]


def text_at(cond_schedule, step: int) -> str:
    return next((text for end, text in cond_schedule if step <= end), cond_schedule[-1][1])


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None):
        super().__init__(prompts)
        self.width, self.height, self.is_negative_prompt = width, height, is_negative_prompt


class FakeP:
    """The conds part of ``StableDiffusionProcessing`` (txt2img outside a hires pass, and img2img)."""

    def __init__(self, webui, prompt="a [castle:ruins:0.8] at dusk", steps=30, sampler_name="Euler"):
        self.webui, self.steps, self.sampler_name = webui, steps, sampler_name
        self.prompts, self.negative_prompts = [prompt], ["blurry"]
        self.width = self.height = 128
        self.extra_network_data = {}
        self.cached_c, self.cached_uc = [None, None], [None, None]
        self.built: list[tuple[str, int, str]] = []  # (checkpoint, steps, kind) of every text-encoder run
        self.c = self.uc = None

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        model = self.webui.shared.sd_model
        key = (tuple(required_prompts), steps, hires_steps, model.sd_checkpoint_info.name_for_extra,
               repr(extra_network_data))
        for cache in caches:
            if cache[0] == key:
                return cache[1]
        caches[0][1] = function(model, required_prompts, steps, hires_steps, False)
        caches[0][0] = key
        return caches[0][1]

    def setup_conds(self):
        from modules import prompt_parser
        total = demofusion_sampler_total(self)
        self.firstpass_steps = total
        self.uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning,
                                              SdConditioning(self.negative_prompts, True), total, [self.cached_uc], {})
        self.c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning,
                                             SdConditioning(self.prompts), total, [self.cached_c], {})

    def get_conds(self):
        return self.c, self.uc


def demofusion_sampler_total(p) -> int:
    from modules import sd_samplers
    return sd_samplers.find_sampler_config(p.sampler_name).total_steps(p.steps)


@pytest.fixture
def webui(monkeypatch):
    w = FakeWebUI(FakeModel(copy.deepcopy(tiny_unet("sd1")), "base")).install(monkeypatch)
    prompt_parser = types.ModuleType("modules.prompt_parser")
    prompt_parser.SdConditioning = SdConditioning
    built: list = []
    w.built = built

    def learned(kind):
        def function(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
            assert hires_steps is None  # each stage's own timeline, not the hires pass's continuation
            built.append((model.sd_checkpoint_info.name_for_extra, steps, kind))
            return [[(end, f"{model.sd_checkpoint_info.name_for_extra}: {text}") for end, text in schedule(x, steps)]
                    for x in prompts]
        return function

    prompt_parser.get_learned_conditioning = learned("uc")
    prompt_parser.get_multicond_learned_conditioning = learned("c")
    sd_samplers = types.ModuleType("modules.sd_samplers")
    second_order = {"DPM2", "Heun", "DPM++ SDE"}
    sd_samplers.find_sampler_config = lambda name: SimpleNamespace(
        total_steps=lambda steps: steps * 2 if name in second_order else steps)
    for name, module in (("prompt_parser", prompt_parser), ("sd_samplers", sd_samplers)):
        monkeypatch.setitem(sys.modules, f"modules.{name}", module)
        setattr(w.package, name, module)
    return w


def test_a_later_stage_of_other_steps_switches_at_its_own_fraction(webui):
    p = FakeP(webui)
    p.setup_conds()
    later = LaterStageConds(p, p.get_conds(), 18)
    assert webui.built[-2:] == [("base", 18, "uc"), ("base", 18, "c")]
    texts = [text_at(later.c[0], step) for step in range(18)]
    assert texts == ["base: a castle at dusk"] * 15 + ["base: a ruins at dusk"] * 3  # int(0.8 * 18) = 14
    assert all(text_at(p.c[0], step) == "base: a castle at dusk" for step in range(18))  # stage 1's never switch
    assert p.get_conds() == (p.c, p.uc)  # nothing is patched before install()


def test_second_order_samplers_count_their_schedule_as_the_webui_does(webui):
    p = FakeP(webui, sampler_name="Heun")
    p.setup_conds()
    LaterStageConds(p, p.get_conds(), 18)
    assert webui.built[-1] == ("base", 36, "c") and p.firstpass_steps == 60


@pytest.mark.parametrize("steps", [30, None], ids=["later steps = steps", "img2img's own step rule"])
def test_the_same_step_count_keeps_stage_ones_very_conds(webui, steps):
    p = FakeP(webui)
    p.setup_conds()
    first, runs = p.get_conds(), len(webui.built)
    later = LaterStageConds(p, first, steps or p.steps)
    later.install()
    assert (later.c, later.uc) == first and later.c is first[0] and len(webui.built) == runs
    assert not later.patches and "get_conds" not in vars(p)


def test_the_refiner_switch_rebuilds_the_later_conds_with_the_refiner(webui):
    p = FakeP(webui)
    p.setup_conds()
    later = LaterStageConds(p, p.get_conds(), 18)
    later.install()
    refiner = FakeModel(copy.deepcopy(tiny_unet("sd1")), "refiner")
    webui.reload_model_weights(refiner, same_object=False)
    p.setup_conds()                       # apply_refiner
    c, uc = p.get_conds()                 # update_inner_model -> sampler_extra_args
    assert text_at(c[0], 15) == "refiner: a ruins at dusk" and text_at(c[0], 14) == "refiner: a castle at dusk"
    assert text_at(p.c[0], 15) == "refiner: a castle at dusk"  # the WebUI's own rebuild still happened (30 steps)
    assert uc[0][0][1] == "refiner: blurry"
    later.remove()
    assert "get_conds" not in vars(p) and "setup_conds" not in vars(p) and p.get_conds() == (p.c, p.uc)


class StageRecorder:
    def __init__(self):
        self.stages = []

    def __call__(self, run, stage, z, c, uc, engine, jitter):
        self.stages.append((stage.index, c, uc, run.p.get_conds()))
        return torch.nn.functional.interpolate(z, size=stage.latent_size, mode="nearest")


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_every_later_stage_samples_with_the_conds_of_its_steps(webui, monkeypatch, img2img):
    recorder = StageRecorder()
    monkeypatch.setattr(DemoFusionRun, "_sample_stage", lambda self, *args: recorder(self, *args))
    state = webui.shared.state
    state.interrupted = state.skipped = False
    state.processing_has_refined_job_count = True
    state.nextjob = lambda: None
    settings = ScaleFusionSettings(enabled=True, method=DF, native_size=128, scale=3, later_steps=18)
    p = FakeP(webui)
    p.sd_model, p.extra_generation_params, p.scripts = webui.sd_model, {}, None
    p.denoising_strength = 0.6
    p.init_latent = torch.zeros(1, 4, 16, 16) if img2img else None
    p.setup_conds()
    job = SimpleNamespace(settings=settings, info=model_info.describe(webui.sd_model, 128), end_pass=lambda: None)
    run = DemoFusionRun(p, job, lambda **kwargs: torch.zeros(1, 4, 16, 16))
    run._stages(p.c, p.uc, [1], [1], 0.0, p.prompts)
    assert [index for index, *_ in recorder.stages] == [2, 3]
    for _, c, uc, got in recorder.stages:
        assert [text_at(c[0], step) for step in (14, 15)] == ["base: a castle at dusk", "base: a ruins at dusk"]
        assert uc[0][-1][0] == 18 and got == (c, uc)  # p.get_conds() gives them too (the refiner's rebuild reads it)
    assert "get_conds" not in vars(p) and p.get_conds()[0] is p.c
