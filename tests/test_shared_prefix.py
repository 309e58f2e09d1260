"""Noise-damped CFG's base uncond call replays the UNet blocks it shares with the main call (issue 22).

Tiny random-weight SD1 / SDXL UNets with the real module layout; every result is compared with today's separate
base call (bit-identical, or within 1e-6 relative where the batch shape changes the kernels).
"""
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from lib_hires.scalecrafter import NoiseDampedCFG, ScaleCrafterController, SharedPrefix, build_plan
from lib_hires.scalecrafter.shared_prefix import execution_order, shared_blocks, shared_prefix_at
from tests.conftest import ldm, tiny_unet
from tests.test_guidance import CONDS_LIST

T = 901.0


def plan_for(family):
    # the official 4x-per-side presets (sd1.5_2048x2048, sdxl_4096x4096) at a 32x32 latent
    return build_plan(family, 256, 256, train_size=64 if family == "sd1" else 256 // 4)


def share_nothing(plan):
    """``plan`` with its base set also re-dilating conv_in: the two calls differ from the first block on."""
    return replace(plan, base={**plan.base, "input_blocks.0.0": 2.0})


def close(a, b):
    assert a.shape == b.shape
    assert torch.equal(a, b) or ((a - b).abs().max() / b.abs().max()).item() <= 1e-6


def conds(family, gen, batch=2, n_cond=3, tokens=7):
    if family == "sd1":
        return torch.randn(n_cond, tokens, 32, generator=gen), torch.randn(batch, tokens, 32, generator=gen)
    cond = {"crossattn": torch.randn(n_cond, tokens, 32, generator=gen), "vector": torch.randn(n_cond, 16, generator=gen)}
    uncond = {"crossattn": torch.randn(batch, tokens, 32, generator=gen), "vector": torch.randn(batch, 16, generator=gen)}
    return cond, uncond


def guided_pair(k_diffusion, family, plan, conds_list=CONDS_LIST, batch=2):
    """(out with the shared prefix, out with today's separate call, the SharedPrefix)."""
    model = ldm(family)
    unet = model.model.diffusion_model
    denoiser = k_diffusion.external.CompVisDenoiser(model)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, 32, 32, generator=gen)
    cond, uncond = conds(family, gen, batch, sum(len(c) for c in conds_list))
    sigma = denoiser.t_to_sigma(torch.tensor(T)).expand(batch)
    with ScaleCrafterController(unet, plan) as controller:
        today = NoiseDampedCFG(denoiser, controller, sigma_to_t=denoiser.sigma_to_t)
        expected = today(x, sigma, cond=cond, uncond=uncond, cond_scale=7.0, conds_list=conds_list)
        prefix = SharedPrefix(unet, controller)
        try:
            shared = NoiseDampedCFG(denoiser, controller, sigma_to_t=denoiser.sigma_to_t, prefix=prefix)
            out = shared(x, sigma, cond=cond, uncond=uncond, cond_scale=7.0, conds_list=conds_list)
            assert shared.evaluations == today.evaluations
        finally:
            prefix.remove()
    assert not vars(unet.input_blocks[0]).get("forward")  # patches gone
    return out, expected, prefix


def test_the_prefix_is_derived_from_the_plans_and_the_block_order():
    order = execution_order(tiny_unet("sdxl"))
    assert order[:3] == ["time_embed", "label_emb", "input_blocks.0"] and order[-2:] == ["output_blocks.8", "out"]
    # SDXL 4096^2: main dilates from D2 (input_blocks.7), base from the middle block: D0-D1 are shared
    assert shared_prefix_at(order, plan_for("sdxl"), T)[-1] == "input_blocks.6"
    # SD1.5 2048^2: D0 and its downsample (input_blocks.0..3) are shared
    assert shared_prefix_at(execution_order(tiny_unet("sd1")), plan_for("sd1"), T)[-1] == "input_blocks.3"
    assert shared_prefix_at(order, share_nothing(plan_for("sdxl")), T) == []  # only the embeddings: not worth it
    assert shared_prefix_at(order, plan_for("sdxl"), 101) == []  # no base set past its tau
    # a factor that differs only in an output block still branches there, after the whole encoder
    names = shared_blocks(order, {"output_blocks.2.0.in_layers.2": 2.0}, {})
    assert names[-1] == "output_blocks.1" and "middle_block" in names


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_shared_prefix_equals_the_separate_call(k_diffusion, family):
    """AND-prompts (3 cond rows for 2 images) in one CFG batch, SDXL with its micro-conditioning vector."""
    out, expected, prefix = guided_pair(k_diffusion, family, plan_for(family))
    close(out, expected)
    shared = shared_prefix_at(prefix.order, plan_for(family), T)
    assert prefix.hits == len(shared) and prefix.misses == 0


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_plans_that_share_nothing_run_the_separate_call(k_diffusion, family):
    out, expected, prefix = guided_pair(k_diffusion, family, share_nothing(plan_for(family)))
    assert torch.equal(out, expected)
    assert prefix.hits == 0


def _counting(unet, prefix_names):
    """Counts, per top-level block, the rows its first layer computes (the block's own work)."""
    rows = {n: 0 for n in prefix_names}
    handles = []
    for name in rows:
        def hook(module, args, _name=name):
            rows[_name] += args[0].shape[0]
        handles.append(unet.get_submodule(name)[0].register_forward_pre_hook(hook))
    return rows, handles


def test_shared_blocks_run_once_per_step_for_the_uncond_rows(k_diffusion):
    model = ldm("sd1")
    unet = model.model.diffusion_model
    denoiser = k_diffusion.external.CompVisDenoiser(model)
    plan = plan_for("sd1")
    x, (cond, uncond) = torch.randn(2, 4, 32, 32), conds("sd1", torch.Generator().manual_seed(0))
    sigma = denoiser.t_to_sigma(torch.tensor(T)).expand(2)
    order = execution_order(unet)
    shared = shared_prefix_at(order, plan, T)
    watched = [n for n in order if n.startswith(("input_blocks.", "middle_block"))]
    with ScaleCrafterController(unet, plan) as controller:
        prefix = SharedPrefix(unet, controller)
        rows, handles = _counting(unet, watched)
        try:
            guided = NoiseDampedCFG(denoiser, controller, sigma_to_t=denoiser.sigma_to_t, prefix=prefix)
            for _ in range(2):  # two steps: nothing carries over from one to the next
                guided(x, sigma, cond=cond, uncond=uncond, cond_scale=7.0, conds_list=CONDS_LIST)
        finally:
            for h in handles:
                h.remove()
            prefix.remove()
    main_rows = 3 + 2
    for name in watched:
        expected = 2 * main_rows if name in shared else 2 * (main_rows + 2)
        assert rows[name] == expected, name


def test_replay_needs_exactly_the_recorded_arguments(sdxl_unet):
    """A base call whose y (SDXL size conditioning) differs recomputes everything from the embedding on."""
    plan = plan_for("sdxl")
    gen = torch.Generator().manual_seed(5)
    x, context, y = torch.randn(2, 4, 32, 32, generator=gen), torch.randn(2, 7, 32, generator=gen), torch.randn(2, 16, generator=gen)
    t = torch.full((2,), T)
    with ScaleCrafterController(sdxl_unet, plan) as controller:
        with controller.base_pass():
            y_other = y[1:] + 1.0
            expected_same = sdxl_unet(x[1:], t[1:], context=context[1:], y=y[1:])
            expected_other = sdxl_unet(x[1:], t[1:], context=context[1:], y=y_other)
        prefix = SharedPrefix(sdxl_unet, controller)
        try:
            for y_base, expected, hits in ((y[1:], expected_same, True), (y_other, expected_other, False)):
                prefix.hits = prefix.misses = 0
                with prefix.recording(1):
                    sdxl_unet(x, t, context=context, y=y)
                with controller.base_pass(), prefix.replaying():
                    out = sdxl_unet(x[1:], t[1:], context=context[1:], y=y_base)
                prefix.clear()
                close(out, expected)
                if hits:
                    assert prefix.hits == len(shared_prefix_at(prefix.order, plan, T)) and prefix.misses == 0
                else:  # the time embedding's input is the same; label_emb's is not, and all after it see its emb
                    assert prefix.hits == 1 and prefix.misses == len(shared_prefix_at(prefix.order, plan, T)) - 1
        finally:
            prefix.remove()


def test_a_recording_written_in_place_is_not_replayed(sd1_unet):
    plan = plan_for("sd1")
    x, context, t = torch.randn(2, 4, 32, 32), torch.randn(2, 7, 32), torch.full((2,), T)
    with ScaleCrafterController(sd1_unet, plan) as controller:
        with controller.base_pass():
            expected = sd1_unet(x[1:], t[1:], context=context[1:])
        prefix = SharedPrefix(sd1_unet, controller)
        try:
            recorded = {}
            hook = sd1_unet.input_blocks[1].register_forward_hook(lambda m, a, out: recorded.setdefault("h", out))
            with prefix.recording(1):
                sd1_unet(x, t, context=context)
            hook.remove()
            recorded["h"].mul_(2.0)  # someone writes the main call's activation after the fact
            with controller.base_pass(), prefix.replaying():
                out = sd1_unet(x[1:], t[1:], context=context[1:])
            close(out, expected)
            assert prefix.misses >= 1
        finally:
            prefix.remove()


def controlnet_forward(unet, scale=0.1):
    """ControlNet's A1111 hook in miniature: the UNet's forward replaced per instance, T2I-adapter features
    added after input block 2 and residuals added to the middle output and every skip, per row of ``x``."""
    from tools.unet_factory import timestep_embedding

    def forward(x, timesteps=None, context=None, y=None, **kwargs):
        emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + unet.label_emb(y)
        hs, h = [], x
        control = x.mean(dim=1, keepdim=True) * scale  # a function of each row's own input
        for i, module in enumerate(unet.input_blocks):
            h = module(h, emb, context)
            if i == 2:
                h = h + torch.nn.functional.interpolate(control, size=h.shape[-2:])
            hs.append(h)
        h = unet.middle_block(h, emb, context) + torch.nn.functional.interpolate(control, size=h.shape[-2:])
        for module in unet.output_blocks:
            skip = hs.pop()
            h = torch.cat([h, skip + torch.nn.functional.interpolate(control, size=skip.shape[-2:])], dim=1)
            h = module(h, emb, context)
        return unet.out(h)
    return forward


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_composes_with_controlnet_residuals(k_diffusion, family):
    unet = tiny_unet(family)
    unet.forward = controlnet_forward(unet)
    try:
        out, expected, prefix = guided_pair(k_diffusion, family, plan_for(family))
        close(out, expected)
        assert prefix.hits > 0
    finally:
        del unet.forward


# --- the WebUI's CFG batch layouts (modules/sd_samplers_cfg_denoiser.py, v1.10.1, as described there) -------

class LayoutCFGDenoiser:
    """A stand-in of the WebUI's CFGDenoiser.forward batch layouts: AND-prompts, batch_cond_uncond on/off,
    cond/uncond of different token lengths (padded, or run apart), skipped uncond rows (NGMS)."""

    def __init__(self, denoiser, conds_list, *, batch_cond_uncond=True, pad=False, skip_uncond=False):
        self.inner_model = lambda x, sigma, cond: denoiser(x, sigma, cond=cond["c_crossattn"][0])
        self.conds_list = conds_list
        self.batch_cond_uncond, self.pad, self.skip_uncond = batch_cond_uncond, pad, skip_uncond

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def forward(self, x, sigma, cond, uncond, cond_scale, image_cond):
        from lib_hires.webui.scalecrafter_pass import on_cfg_denoiser
        batch = x.shape[0]
        repeats = [len(c) for c in self.conds_list]
        rep = lambda v: torch.cat([torch.stack([v[i]] * n) for i, n in enumerate(repeats)] + [v])
        x_in, sigma_in, image_cond_in = rep(x), rep(sigma), rep(image_cond)
        params = SimpleNamespace(x=x_in, sigma=sigma_in, image_cond=image_cond_in, text_cond=cond,
                                 text_uncond=uncond, denoiser=self)
        on_cfg_denoiser(params)
        x_in, sigma_in, image_cond_in = params.x, params.sigma, params.image_cond
        call = lambda a, b, c: self.inner_model(x_in[a:b], sigma_in[a:b],
                                                cond={"c_crossattn": [c], "c_concat": [image_cond_in[a:b]]})
        n_cond = cond.shape[0]
        if self.skip_uncond:
            x_in, sigma_in, image_cond_in = x_in[:-batch], sigma_in[:-batch], image_cond_in[:-batch]
        if self.pad and cond.shape[1] != uncond.shape[1]:
            uncond = torch.cat([uncond, uncond[:, -1:].expand(-1, cond.shape[1] - uncond.shape[1], -1)], dim=1)
        if cond.shape[1] == uncond.shape[1] or self.skip_uncond:
            cond_in = cond if self.skip_uncond else torch.cat([cond, uncond])
            if self.batch_cond_uncond:
                x_out = call(0, x_in.shape[0], cond_in)
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch):
                    x_out[a:a + batch] = call(a, a + batch, cond_in[a:a + batch])
        else:
            x_out = torch.zeros_like(x_in)
            step = 2 * batch if self.batch_cond_uncond else batch
            for a in range(0, n_cond, step):
                b = min(a + step, n_cond)
                x_out[a:b] = call(a, b, cond[a:b])
            x_out[-batch:] = call(x_in.shape[0] - batch, x_in.shape[0], uncond)
        if self.skip_uncond:
            x_out = torch.cat([x_out, x_out[-batch:]])
            return self.combine_denoised(x_out, self.conds_list, uncond, 1.0)
        return self.combine_denoised(x_out, self.conds_list, uncond, cond_scale)


LAYOUTS = {
    # name: (conds_list, cond tokens, CFGDenoiser options, whether the uncond rows end the last main call)
    "batched, AND-prompts": (CONDS_LIST, 7, {}, True),
    "batch_cond_uncond off": ([[(0, 1.0)], [(1, 1.0)]], 7, {"batch_cond_uncond": False}, True),
    "batch_cond_uncond off, AND-prompts": (CONDS_LIST, 7, {"batch_cond_uncond": False}, False),
    "longer prompt, padded": (CONDS_LIST, 14, {"pad": True}, True),
    "longer prompt, run apart": (CONDS_LIST, 14, {}, True),
    "NGMS: uncond skipped": (CONDS_LIST, 7, {"skip_uncond": True}, False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_webui_batch_layouts_share_or_fall_back_with_the_same_result(k_diffusion, layout):
    from lib_hires.scalecrafter import scan_unet
    from lib_hires.settings import ScaleFusionSettings
    from lib_hires.webui.model_info import ModelInfo
    from lib_hires.webui.scalecrafter_pass import ScaleCrafterPass, plan_for_latent

    conds_list, tokens, options, shares = LAYOUTS[layout]
    model = ldm("sd1")
    unet = model.model.diffusion_model
    denoiser = k_diffusion.external.CompVisDenoiser(model)
    info = ModelInfo("sd1", 64, unet, scan_unet(unet))
    sd_model = SimpleNamespace(model=SimpleNamespace(conditioning_key="crossattn"))
    gen = torch.Generator().manual_seed(7)
    batch, n_cond = len(conds_list), sum(len(c) for c in conds_list)
    x = torch.randn(batch, 4, 32, 32, generator=gen)
    cond, uncond = torch.randn(n_cond, tokens, 32, generator=gen), torch.randn(batch, 7, 32, generator=gen)
    image_cond = torch.zeros(batch, 5, 1, 1)
    sigma = denoiser.t_to_sigma(torch.tensor(T)).expand(batch)
    plan = plan_for_latent(info, ScaleFusionSettings(enabled=True), (32, 32))

    results = []
    for use_prefix in (False, True):
        cfg = LayoutCFGDenoiser(denoiser, conds_list, **options)
        active = ScaleCrafterPass(plan, info, cfg, sd_model)
        try:
            prefix = active.prefix
            if not use_prefix:  # today's separate call: nothing recorded
                prefix.start_recording = lambda rows: None
            results.append(cfg.forward(x, sigma, cond, uncond, 7.0, image_cond))
            hits = prefix.hits
            assert active.base_evaluations == (0 if options.get("skip_uncond") else batch)
        finally:
            active.remove()
        assert not vars(unet.input_blocks[0]).get("forward")
    close(results[1], results[0])
    # falling back, at most the time embedding replays (every row has the same timestep)
    assert (hits > 1) == shares
