import pytest
import torch

from lib_hires.scalecrafter import NoiseDampedCFG, ScaleCrafterController, build_plan, guided_combine
from tests.conftest import ldm, tiny_unet

# Image 0 has an AND-prompt with two subprompts (rows 0, 1), image 1 one subprompt (row 2);
# the uncond rows of the two images come last, as in the WebUI's CFG batch.
CONDS_LIST = [[(0, 1.0), (1, 0.5)], [(2, 0.7)]]


def webui_combine_denoised(x_out, conds_list, uncond_rows, cond_scale):
    """The WebUI's CFGDenoiser.combine_denoised, written out."""
    denoised_uncond = x_out[-uncond_rows:]
    denoised = torch.clone(denoised_uncond)
    for i, conds in enumerate(conds_list):
        for cond_index, weight in conds:
            denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
    return denoised


def test_noise_damped_combine_is_the_formula_with_and_prompts_and_batch_2():
    x_out = torch.randn(5, 4, 8, 8)
    base = torch.randn(2, 4, 8, 8)
    scale = 7.0
    out = guided_combine(x_out, CONDS_LIST, scale, base)
    uncond = x_out[3:]
    expected = torch.stack([
        base[0] + scale * (1.0 * (x_out[0] - uncond[0]) + 0.5 * (x_out[1] - uncond[0])),
        base[1] + scale * 0.7 * (x_out[2] - uncond[1]),
    ])
    assert torch.allclose(out, expected, atol=1e-5)


def test_without_a_base_it_is_the_webui_combine():
    x_out = torch.randn(5, 4, 8, 8)
    assert torch.allclose(guided_combine(x_out, CONDS_LIST, 5.5), webui_combine_denoised(x_out, CONDS_LIST, 2, 5.5),
                          atol=1e-5)


def test_base_shape_is_checked():
    with pytest.raises(ValueError, match="base_uncond has shape"):
        guided_combine(torch.randn(5, 4, 8, 8), CONDS_LIST, 5.0, torch.randn(1, 4, 8, 8))


def make_guided(family="sd1", plan=None, k_diffusion=None):
    model = ldm(family)
    denoiser = k_diffusion.external.CompVisDenoiser(model)
    plan = plan or build_plan(family, 256, 256, train_size=64)  # the official 16x preset at a 32x32 latent
    controller = ScaleCrafterController(model.model.diffusion_model, plan)
    return denoiser, controller, NoiseDampedCFG(denoiser, controller, sigma_to_t=denoiser.sigma_to_t)


def sigma_at(denoiser, t):
    return denoiser.t_to_sigma(torch.tensor(float(t)))


def test_noise_damped_step_costs_one_extra_uncond_pass_and_uses_the_base_set(k_diffusion):
    denoiser, controller, guided = make_guided(k_diffusion=k_diffusion)
    try:
        x = torch.randn(2, 4, 32, 32)
        sigma = sigma_at(denoiser, 981).expand(2)
        cond, uncond = torch.randn(3, 7, 32), torch.randn(2, 7, 32)
        out = guided(x, sigma, cond=cond, uncond=uncond, cond_scale=7.0, conds_list=CONDS_LIST)
        assert guided.evaluations == 5 + 2  # cond rows + uncond rows, plus one uncond-only base pass
        t, base_mode, factors = controller.last_call
        assert base_mode and factors == controller.plan.base_at(t) and factors != controller.plan.main_at(t)

        # the same thing by hand: main pass for the CFG batch, base pass for the uncond rows
        rows = torch.tensor([0, 0, 1, 0, 1])
        x_out = denoiser(x[rows], sigma[rows], cond=torch.cat([cond, uncond]))
        with controller.base_pass():
            base = denoiser(x, sigma, cond=uncond)
        assert torch.allclose(out, guided_combine(x_out, CONDS_LIST, 7.0, base), atol=1e-5)
        assert not torch.allclose(out, guided_combine(x_out, CONDS_LIST, 7.0), atol=1e-3)
    finally:
        controller.remove()


def test_plain_cfg_where_noise_damping_is_off(k_diffusion):
    denoiser, controller, guided = make_guided(k_diffusion=k_diffusion)
    try:
        x = torch.randn(1, 4, 32, 32)
        cond, uncond = torch.randn(1, 7, 32), torch.randn(1, 7, 32)
        guided(x, sigma_at(denoiser, 121).expand(1), cond=cond, uncond=uncond, cond_scale=7.0)
        assert guided.evaluations == 2  # past the base set's tau
        guided(x, sigma_at(denoiser, 981).expand(1), cond=cond, uncond=uncond, cond_scale=1.0)
        assert guided.evaluations == 4  # no guidance, nothing to damp
    finally:
        controller.remove()


def test_sdxl_dict_conditioning(k_diffusion):
    denoiser, controller, guided = make_guided("sdxl", build_plan("sdxl", 512, 512, train_size=128), k_diffusion)
    try:
        x = torch.randn(2, 4, 32, 32)
        cond = {"crossattn": torch.randn(2, 7, 32), "vector": torch.randn(2, 16)}
        uncond = {"crossattn": torch.randn(2, 7, 32), "vector": torch.randn(2, 16)}
        out = guided(x, sigma_at(denoiser, 901).expand(2), cond=cond, uncond=uncond, cond_scale=5.0)
        assert out.shape == x.shape and guided.evaluations == 6
    finally:
        controller.remove()
    assert not tiny_unet("sdxl")._forward_pre_hooks
