"""Demo: plan DemoFusion stages and run them on a tiny random SD1 UNet, with views, model calls and timings.

    python -m tools.demo_demofusion                           # base 256^2, scales x2 and x2.5, 10 Euler steps
    python -m tools.demo_demofusion --width 384 --height 256 --scales 3.2 --steps 20

The base plays the model's training size (the window is base / 8 latent px, as 512 px and a 64-px
window are for SD1), so the small tiny-UNet run has the proportions of a real one. Each stage prints
its size, dilation, views and model calls per step, its UNet samples against plain sampling at the base
size (the cost multiple on any model) and its time. CFG runs around the per-view denoiser here; the WebUI puts
the fused denoiser under its CFG instead, which is the same by linearity (see the stage tests).
Images from random weights are noise: the demo shows the schedule and the cost, not pictures.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from lib_hires.demofusion import DemoFusionSettings, plan_stages, row_stats, sample_stages
from tools.kdiffusion_compat import load_k_diffusion
from tools.tiny_ldm import TinyLatentDiffusion
from tools.unet_factory import build_unet, example_inputs

UNET_MULTIPLE = 8  # latent px: the stand-in UNet's three downsamples need exact halving


class CountingDenoiser:
    """Counts calls and samples, and pads inputs the strict stand-in UNet cannot take.

    The WebUI's UNet accepts any latent size (it resizes its skip connections); the stand-in raises
    instead, so sizes that are not multiples of 8 (a fractional stage's dilated samples) are padded
    at the bottom and right by edge replication and the prediction is cropped back.
    """

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.calls = self.samples = self.padded = 0

    def __call__(self, x, sigma, **kwargs):
        self.calls += 1
        self.samples += x.shape[0]
        h, w = x.shape[-2:]
        ph, pw = -h % UNET_MULTIPLE, -w % UNET_MULTIPLE
        if ph or pw:
            self.padded += 1
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.denoiser(x, sigma, **kwargs)[..., :h, :w]


def guided(denoiser):
    """Classifier-free guidance over a batch of images, cond rows then uncond rows in one call; the
    conditioning comes in as arguments, so the fused denoiser repeats it for every view."""
    def model(x, sigma, cond, uncond, cond_scale):
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        positive, negative = out.chunk(2)
        return negative + (positive - negative) * cond_scale
    return model


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=256, help="base width in px (plays the training size)")
    ap.add_argument("--height", type=int, default=None, help="base height in px (default: the width)")
    ap.add_argument("--scales", type=float, nargs="+", default=[2.0, 2.5])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--view-batch", type=int, default=16)
    ap.add_argument("--no-jitter", dest="jitter", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    width, height = args.width, args.height or args.width
    window = min(width, height) // 8
    window -= window % 8
    if window < 8:
        print("--width/--height must be at least 64 px", file=sys.stderr)
        return 2
    settings = DemoFusionSettings(window=window, stride=window // 2, view_batch=args.view_batch, jitter=args.jitter)

    torch.set_flush_denormal(True)  # random weights can underflow into slow denormal floats on CPUs
    kd = load_k_diffusion()
    unet = build_unet("sd1", seed=args.seed)
    base_denoiser = kd.external.CompVisDenoiser(TinyLatentDiffusion(unet))
    counter = CountingDenoiser(base_denoiser)
    _, cond, _ = example_inputs(unet, 1, (8, 8), seed=args.seed)
    _, uncond, _ = example_inputs(unet, 1, (8, 8), seed=args.seed + 1)
    extra = {"cond": cond, "uncond": uncond, "cond_scale": args.cfg}
    sigmas = base_denoiser.get_sigmas(args.steps)
    print(f"Tiny random SD1 UNet, Euler {args.steps} steps, CFG {args.cfg}, window {settings.window} / stride "
          f"{settings.stride} latent px, jitter {'on' if settings.jitter else 'off'}")

    for scale in args.scales:
        plan = plan_stages(width, height, scale, window=settings.window, stride=settings.stride)
        print("\n" + plan.describe(settings.view_batch))
        marks = []  # (stage, time, model calls, samples) after every step

        def step_done(stage_index, info):
            marks.append((stage_index, time.perf_counter(), counter.calls, counter.samples))

        noise = torch.randn(1, 4, *plan.stages[0].latent_size, generator=torch.Generator().manual_seed(args.seed))
        counter.calls = counter.samples = counter.padded = 0
        start = time.perf_counter()
        with torch.no_grad():
            latents = sample_stages(guided(counter), plan.stages, sigmas, noise, extra_args=extra,
                                    settings=settings, sigma_to_t=base_denoiser.sigma_to_t,
                                    generator=torch.Generator().manual_seed(args.seed + 1),
                                    jitter_generator=torch.Generator().manual_seed(args.seed + 2),
                                    callback=step_done)
        previous = (start, 0, 0)
        base_samples = None
        for st in plan.stages:
            _, end, calls, samples = [m for m in marks if m[0] == st.index][-1]
            mean, std = (float(v) for v in row_stats(latents[st.index - 1]))
            h, w = st.latent_size
            stage_samples = samples - previous[2]
            base_samples = base_samples or stage_samples
            print(f"  stage {st.index} x{st.factor:.3g}: latent {w}x{h}, "
                  f"{st.views_per_step(settings.window, settings.stride)} views/step, model calls "
                  f"{calls - previous[1]} ({(calls - previous[1]) / args.steps:g}/step), {stage_samples} UNet samples "
                  f"({stage_samples / base_samples:g}x stage 1), {end - previous[0]:.2f} s, "
                  f"latent mean {mean:+.3f} std {std:.3f}")
            previous = (end, calls, samples)
        if counter.padded:
            print(f"  ({counter.padded} calls padded to multiples of {UNET_MULTIPLE} latent px for the stand-in UNet)")
        print(f"  DemoFusion x{scale:g}: {time.perf_counter() - start:.2f} s in all, "
              f"{counter.samples / base_samples:g}x the UNet samples of plain sampling at the base size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
