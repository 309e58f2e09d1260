"""Model calls per step and the cost outside the model of the DemoFusion fused denoiser, measured side by side.

    python -m tools.benchmark_demofusion                        # CPU: SD1.5 UNet, x2 (1024^2) and x3 (1536^2)
    python -m tools.benchmark_demofusion --family sdxl          # SDXL x2 (2048^2) and x3 (3072^2): a GPU job
    python -m tools.benchmark_demofusion --model-size tiny --base 128 --window 16   # the script itself, seconds
    python -m tools.benchmark_demofusion --levers               # speed levers: whole runs, x2 x3 x4 (CPU, minutes)

``--levers`` runs whole DemoFusion generations (``sample_stages``, Euler, every stage) on a random-weight
UNet with the real SDXL block layout at the test width (``tools/unet_factory.TINY``: 32 channels, fewer
transformer blocks; a 2-core CPU runs the whole table in minutes) from a base of one window, and prints side by side, per scale, the UNet samples (inputs of the model, summed over all
stages and steps) and the wall time of: the official schedule; stage strength 0.6 with later steps =
0.6 x steps (the last 60 % of the official schedule; strength 0.6 with the same steps does the official
run's work, as Hires. fix does: it only moves the start, so it is not timed); the plan ``2, 4`` (x4 only: at x2 and x3 the automatic plan already has the fewest
stages the 2x-per-stage rule allows); and both. Ratios are against the official run of the same scale,
which runs first; ``saved`` counts the model calls the exact savings skipped.

The stages are those of the extension's plan for ``--scale`` (default 3: x1, x2, x3) from a square
``--base`` (default: the training size, as the official pipeline); stage 1 is plain sampling, so
stages 2.. are measured. Each evaluation is one call of the fused denoiser at t = 981 with ``--rows``
batch rows (2 = one image's cond and uncond rows, as the WebUI's inner model sees them).

Reported per stage, with the targets of the project:
* model calls per step, counted, against ``ceil((views + s^2) / view_batch)`` where local views and
  dilated samples have one size (the official integer stages), else one group per size;
* time of the fused call / the sum of the model calls it made, timed inside the same call (so the two
  share every disturbance): the engine's own cost (views, blur, accumulation) is the excess, target
  <= 1.05x. Rounds alternate the stages; the ratio is taken per call and its median reported.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from lib_hires.demofusion import (DemoFusionSettings, FusedDenoiser, default_settings, partial_sigmas, plan_stages,
                                  repeat_rows, sample_stages)
from tools.kdiffusion_compat import load_k_diffusion
from tools.tiny_ldm import TinyLatentDiffusion
from tools.unet_factory import build_unet, example_inputs

T_EVAL = 981.0
OVERHEAD_TARGET = 1.05


class TimedDenoiser:
    """Times every call of the wrapped denoiser (synchronised on CUDA) and keeps the input sizes."""

    def __init__(self, denoiser, device: str):
        self.denoiser, self.device = denoiser, device
        self.seconds: list[float] = []
        self.batches: list[int] = []

    def sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def __call__(self, x, sigma, **kwargs):
        self.sync()
        start = time.perf_counter()
        out = self.denoiser(x, sigma, **kwargs)
        self.sync()
        self.seconds.append(time.perf_counter() - start)
        self.batches.append(x.shape[0])
        return out


def expected_calls(views: int, samples: int, same_size: bool, view_batch: int) -> int:
    if same_size:
        return math.ceil((views + samples) / view_batch)
    return math.ceil(views / view_batch) + math.ceil(samples / view_batch)


def row(label: str, value: float, target: float | None = None, unit: str = "x") -> str:
    verdict = "" if target is None else ("  ok" if value <= target else "  OVER TARGET")
    goal = f"<= {target:g}{unit}" if target is not None else ""
    return f"  {label:<58} {value:8.3f}{unit}  {goal:<9}{verdict}"


LEVER_TARGETS = {4.0: 0.5, 2.0: 0.65}  # UNet samples of the fast combination / the official schedule


def lever_configs(scale: float, steps: int, strength: float) -> list[tuple[str, float, int, tuple[float, ...]]]:
    """(label, stage strength, later steps, plan) per configuration; the last one is the "fast" combination."""
    short = max(1, round(strength * steps))
    configs = [("official (strength 1, automatic plan)", 1.0, steps, ()),
               (f"strength {strength:g}, later steps {short}", strength, short, ())]
    if scale == 4:
        configs += [("plan 2, 4", 1.0, steps, (2.0, 4.0)),
                    (f"plan 2, 4 + strength {strength:g}, later steps {short}", strength, short, (2.0, 4.0))]
    return configs


def levers_main(args) -> int:
    torch.manual_seed(0)
    unet = build_unet(args.family, size=args.model_size, device=args.device)
    denoiser = load_k_diffusion().external.CompVisDenoiser(TinyLatentDiffusion(unet).to(args.device))
    window = args.window or 8
    stride = args.stride or window // 2
    base = args.base or window * 8
    settings = DemoFusionSettings(window=window, stride=stride, view_batch=args.view_batch)
    _, context, y = example_inputs(unet, args.rows, (8, 8), tokens=77)
    cond = context if y is None else {"crossattn": context, "vector": y}
    counter = TimedDenoiser(denoiser, args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {args.model_size}-width "
          f"{args.family.upper()}-topology UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters, "
          f"random weights), float32, {args.rows} row(s); base {base}x{base} px (window {window}, stride {stride} "
          f"latent px), Euler, {args.steps} steps, view batch {args.view_batch}", flush=True)
    sigmas = denoiser.get_sigmas(args.steps)
    with torch.no_grad():  # warm-up: one full call per input size pays for allocator growth and kernel choice
        sizes = {(window, window)} | {st.sample_size for scale in args.scales
                                      for st in plan_stages(base, base, scale, window=window, stride=stride).stages}
        for size in sorted(sizes):
            batch = args.rows * args.view_batch
            denoiser(torch.randn(batch, 4, *size), sigmas[:1].expand(batch),
                     cond=repeat_rows(cond, args.rows, args.view_batch))
    results, ok = [], True
    for scale in args.scales:
        print(f"\n== x{scale:g}: {int(base * scale)}x{int(base * scale)} px ==")
        print(f"  {'configuration':<48} {'stages':<14} {'UNet samples':>12} {'ratio':>6} {'seconds':>8} "
              f"{'ratio':>6} {'saved':>6}")
        official = None
        for label, strength, later_steps, factors in lever_configs(scale, args.steps, args.strength):
            plan = plan_stages(base, base, scale, window=window, stride=stride, factors=factors)
            later = partial_sigmas(denoiser.get_sigmas, later_steps, strength)
            noise = torch.randn(args.rows, 4, *plan.stages[0].latent_size, generator=torch.Generator().manual_seed(1))
            fused: list[FusedDenoiser] = []
            counter.batches.clear()
            begin = time.perf_counter()
            with torch.no_grad():
                sample_stages(counter, plan.stages, sigmas, noise, settings=settings, sigma_to_t=denoiser.sigma_to_t,
                              generator=torch.Generator().manual_seed(2),
                              jitter_generator=torch.Generator().manual_seed(3), extra_args={"cond": cond},
                              later_sigmas=later, fused_denoisers=fused)
            seconds = time.perf_counter() - begin
            samples = sum(counter.batches) // args.rows
            saved = sum(f.skipped_calls for f in fused)
            official = official or (samples, seconds)
            stages = " ".join(f"x{st.factor:g}" for st in plan.stages)
            print(f"  {label:<48} {stages:<14} {samples:>12} {samples / official[0]:>6.2f} {seconds:>8.1f} "
                  f"{seconds / official[1]:>6.2f} {saved:>6}", flush=True)
            results.append({"scale": scale, "config": label, "stage_strength": strength, "later_steps": later_steps,
                            "stages": list(factors), "unet_samples": samples, "seconds": seconds,
                            "samples_ratio": samples / official[0], "seconds_ratio": seconds / official[1],
                            "saved_calls": saved})
        if scale in LEVER_TARGETS:
            fast = results[-1]
            print(row(f"fast combination ({fast['config']}), UNet samples", fast["samples_ratio"],
                      LEVER_TARGETS[scale]))
            ok &= fast["samples_ratio"] <= LEVER_TARGETS[scale]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"family": args.family, "model_size": args.model_size, "steps": args.steps, "base": base,
                       "window": window, "rows": args.rows, "results": results}, f, indent=1)
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levers", action="store_true", help="whole runs of the speed levers (see above)")
    ap.add_argument("--family", choices=["sd1", "sd2", "sdxl"], default=None, help="default: sd1 (sdxl with --levers)")
    ap.add_argument("--model-size", choices=["full", "tiny"], default=None,
                    help="tiny: the test-size UNets, to check the script itself in seconds (default: full; "
                         "tiny with --levers)")
    ap.add_argument("--scales", type=float, nargs="+", default=[2.0, 3.0, 4.0], help="--levers: the scales")
    ap.add_argument("--steps", type=int, default=5, help="--levers: Euler steps of the first stage")
    ap.add_argument("--strength", type=float, default=0.6, help="--levers: the stage strength compared")
    ap.add_argument("--base", type=int, default=None, help="square base size in px (default: training size)")
    ap.add_argument("--scale", type=float, default=3.0, help="the plan's scale; stages 2.. are measured")
    ap.add_argument("--window", type=int, default=None, help="latent px (default: the family's training latent)")
    ap.add_argument("--stride", type=int, default=None, help="latent px (default: window / 2)")
    ap.add_argument("--view-batch", type=int, default=16)
    ap.add_argument("--rows", type=int, default=1, help="batch rows per evaluation (2: cond + uncond)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 on CPU, float16 on CUDA by default")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    args.family = args.family or ("sdxl" if args.levers else "sd1")
    args.model_size = args.model_size or ("tiny" if args.levers else "full")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.levers:
        return levers_main(args)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # random weights can underflow into denormals, ~100x slower on CPUs

    defaults = default_settings(args.family)
    window = args.window or defaults.window
    stride = args.stride or window // 2
    base = args.base or window * 8
    plan = plan_stages(base, base, args.scale, window=window, stride=stride)
    stages = plan.stages[1:]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}; {args.model_size} {args.family.upper()}-architecture "
          f"UNet, {args.dtype or dtype}, {args.rows} row(s), {args.rounds} rounds")
    print("  " + plan.describe(args.view_batch).replace("\n", "\n  "), flush=True)

    start = time.perf_counter()
    unet = build_unet(args.family, size=args.model_size, device=args.device, dtype=dtype)
    denoiser = load_k_diffusion().external.CompVisDenoiser(TinyLatentDiffusion(unet).to(args.device))
    print(f"  built: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    _, context, y = example_inputs(unet, args.rows, (8, 8), tokens=77)
    cond = context if y is None else {"crossattn": context, "vector": y}
    sigma = denoiser.t_to_sigma(torch.tensor(T_EVAL, device=args.device)).expand(args.rows).to(dtype)
    timed = TimedDenoiser(denoiser, args.device)
    inputs = {st.index: torch.randn(args.rows, 4, *st.latent_size, generator=torch.Generator().manual_seed(st.index))
              .to(args.device, dtype) for st in stages}

    def evaluate(st) -> tuple[float, float, int]:
        fused = FusedDenoiser(timed, dilation=st.dilation, window=window, stride=stride, view_batch=args.view_batch,
                              sigma_to_t=denoiser.sigma_to_t, jitter=torch.Generator().manual_seed(st.index))
        timed.seconds.clear()
        timed.sync()
        begin = time.perf_counter()
        with torch.no_grad():
            fused(inputs[st.index], sigma, cond=cond)
        timed.sync()
        return time.perf_counter() - begin, sum(timed.seconds), fused.model_calls

    with torch.no_grad():  # warm-up: one plain call per input size pays for allocator growth and kernel choice
        for size in sorted({(min(window, h), min(window, w)) for h, w in (st.latent_size for st in stages)}
                           | {st.sample_size for st in stages}):
            denoiser(torch.randn(args.rows, 4, *size, device=args.device, dtype=dtype), sigma, cond=cond)

    fused_s = {st.index: [] for st in stages}
    model_s = {st.index: [] for st in stages}
    calls = {}
    for r in range(args.rounds):
        order = stages[r % len(stages):] + stages[:r % len(stages)]
        for st in order:
            total, model, n = evaluate(st)
            fused_s[st.index].append(total)
            model_s[st.index].append(model)
            calls[st.index] = n
        print(f"  round {r + 1}: " + ", ".join(f"x{st.factor:g} {fused_s[st.index][-1]:.2f}s "
                                               f"(model {model_s[st.index][-1]:.2f}s)" for st in stages), flush=True)

    results = []
    for st in stages:
        n_h, n_w = st.local_grid(window, stride)
        h, w = st.latent_size
        same = (min(window, h), min(window, w)) == st.sample_size
        expected = expected_calls(n_h * n_w, st.dilation ** 2, same, args.view_batch)
        ratio = statistics.median(a / b for a, b in zip(fused_s[st.index], model_s[st.index]))
        print(f"\n== stage x{st.factor:g}: {st.width}x{st.height} px, latent {w}x{h}, dilation {st.dilation}, "
              f"{n_h * n_w} local views + {st.dilation ** 2} dilated samples "
              f"({'one size' if same else 'two sizes'}) ==")
        print(f"  model calls per step: counted {calls[st.index]}, expected {expected} "
              f"= {'ceil((views + s^2) / view_batch)' if same else 'one group per size'} "
              f"{'ok' if calls[st.index] == expected else 'MISMATCH'}")
        print(f"  median seconds: fused call {statistics.median(fused_s[st.index]):.3f}, "
              f"its model calls {statistics.median(model_s[st.index]):.3f}")
        print(row("fused call / sum of its model calls (paired, median)", ratio, OVERHEAD_TARGET))
        results.append({"stage": st.index, "factor": st.factor, "width": st.width, "height": st.height,
                        "dilation": st.dilation, "views": n_h * n_w, "samples": st.dilation ** 2,
                        "calls": calls[st.index], "expected_calls": expected, "overhead_ratio": ratio,
                        "fused_seconds": fused_s[st.index], "model_seconds": model_s[st.index]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"family": args.family, "model_size": args.model_size, "device": args.device,
                       "rows": args.rows, "view_batch": args.view_batch, "stages": results}, f, indent=1)
    return 0 if all(r["calls"] == r["expected_calls"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
