"""Demo: resolve a ScaleCrafter plan and sample with it on a tiny random UNet, with timings.

    python -m tools.demo                       # SD1 at 2048x2048 (the official 16x preset)
    python -m tools.demo --family sdxl --width 4096 --height 2048 --sampler sample_dpmpp_2m

The plan printed first is the one for the requested size on the real model. The sampling run then
uses the same size ratio on a tiny random-weight UNet of the same layout (a small latent, so it runs
on a CPU in seconds): the training size is scaled down with the latent, so the very same preset
applies. Images from random weights are noise; what the demo shows is which convs are dilated, by how
much, at which noise level, and what that costs against vanilla sampling on the same model.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from lib_hires.scalecrafter import (NoiseDampedCFG, ScaleCrafterController, ScaleCrafterSettings, build_plan,
                                    official_step, training_size)
from tools.kdiffusion_compat import load_k_diffusion
from tools.tiny_ldm import TinyLatentDiffusion
from tools.unet_factory import build_unet, example_inputs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sd1", "sd2", "sdxl"], default="sd1")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--height", type=int, default=2048)
    ap.add_argument("--v-prediction", action="store_true", help="SD2 768-px model (training size 768)")
    ap.add_argument("--multiplier", type=float, default=1.0, help="dilation multiplier")
    ap.add_argument("--stop-at", type=float, default=None, help="fraction of the noise schedule (default: preset)")
    ap.add_argument("--ndcfg", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--dispersion", action="store_true")
    ap.add_argument("--sampler", default="sample_euler", help="a k_diffusion.sampling function name")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--demo-latent", type=int, default=32, help="long latent side of the tiny run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed runs of each variant")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    kd = load_k_diffusion()
    sampler = getattr(kd.sampling, args.sampler, None)
    if sampler is None or not args.sampler.startswith("sample_"):
        print(f"--sampler must name a k_diffusion.sampling.sample_* function; got {args.sampler!r}", file=sys.stderr)
        return 2
    settings = ScaleCrafterSettings(enabled=True, dilation_multiplier=args.multiplier, stop_at=args.stop_at,
                                    noise_damped_cfg=args.ndcfg, dispersion=args.dispersion)
    train = training_size(args.family, v_prediction=args.v_prediction)
    print(build_plan(args.family, args.width, args.height, settings, train_size=train).describe())

    # The same ratios at a small latent: scale the training size down with the image.
    shrink = args.demo_latent * 8 / max(args.width, args.height)
    width, height = round(args.width * shrink / 8) * 8, round(args.height * shrink / 8) * 8
    demo_train = round(train * shrink)
    plan = build_plan(args.family, width, height, settings, train_size=demo_train)
    print(f"\nTiny random {args.family} UNet at {width}x{height} px (latent {height // 8}x{width // 8}, "
          f"training size scaled to {demo_train}), {args.sampler}, {args.steps} steps, CFG {args.cfg}")

    torch.set_flush_denormal(True)  # random weights can underflow into slow denormal floats on CPUs
    torch.manual_seed(args.seed)
    unet = build_unet(args.family, seed=args.seed)
    model = TinyLatentDiffusion(unet)
    denoiser = kd.external.CompVisDenoiser(model)
    sigmas = kd.sampling.get_sigmas_karras(args.steps, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    x, context, y = example_inputs(unet, 1, (height // 8, width // 8), seed=args.seed)
    _, uncond_context, uncond_y = example_inputs(unet, 1, (8, 8), seed=args.seed + 1)
    cond, uncond = (context, uncond_context) if y is None else (
        {"crossattn": context, "vector": y}, {"crossattn": uncond_context, "vector": uncond_y})
    extra = {"cond": cond, "uncond": uncond, "cond_scale": args.cfg}

    def sample(controller, verbose=False):
        guided = NoiseDampedCFG(denoiser, controller, sigma_to_t=denoiser.sigma_to_t)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        with torch.no_grad():
            out = sampler(guided, x * sigmas[0], sigmas, extra_args=extra, callback=report if verbose else None,
                          disable=True)
        return out, time.perf_counter() - start, guided.evaluations

    def report(info):
        t = float(denoiser.sigma_to_t(info["sigma"].max()))
        factors = plan.main_at(t)
        base = plan.base_at(t)
        print(f"  step {info['i']:>3}  sigma {float(info['sigma'].max()):8.3f}  t {t:6.1f}  official step "
              f"{official_step(t):>2}  dilated convs {len(factors):>2}"
              f"{f' (max {max(factors.values()):g})' if factors else '':<10}"
              f"  noise-damped base: {'vanilla' if base == {} else f'{len(base)} convs' if base else 'no'}")

    # Alternate the two runs and keep the fastest of each: a shared machine's noise only ever adds time.
    with ScaleCrafterController(unet, plan) as controller:
        runs = {"vanilla": [], "ScaleCrafter": []}
        for round_ in range(args.rounds):
            runs["vanilla"].append(sample(None))
            runs["ScaleCrafter"].append(sample(controller, verbose=round_ == 0))
    (vanilla, vanilla_time, vanilla_evals), (crafted, crafted_time, crafted_evals) = (
        min(runs[name], key=lambda r: r[1]) for name in ("vanilla", "ScaleCrafter"))
    print(f"\nbest of {args.rounds} alternating runs each:")
    print(f"  vanilla:      {vanilla_time:6.2f} s, {vanilla_evals} UNet samples")
    print(f"  ScaleCrafter: {crafted_time:6.2f} s, {crafted_evals} UNet samples "
          f"({crafted_time / vanilla_time:.2f}x time, {crafted_evals / vanilla_evals:.2f}x samples)")
    change = ((crafted - vanilla).norm() / vanilla.norm()).item()
    print(f"  relative change of the final latent: {change:.3f}; hooks left on the UNet: "
          f"{sum('_conv_forward' in vars(m) for m in unet.modules()) + len(unet._forward_pre_hooks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
