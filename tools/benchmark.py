"""Speed and memory of the ScaleCrafter engine on full-size random-weight UNets, measured side by side.

    python -m tools.benchmark                                   # CPU: SD1.5 at 1024^2 (2x per side), SDXL small
    python -m tools.benchmark --spec sd1:1024 --rounds 5
    python -m tools.benchmark --device cuda --dtype float16 --spec sd1:2048 sd1:4096 sdxl:2048 sdxl:4096

A spec is ``family:pixels[:training size]``; the plan is the one the extension uses for a square image
of that size (a smaller training size keeps the size ratio at a smaller latent, for slow machines).

Timing: every configuration runs once per round, rounds rotate the order, and each ratio is taken
within a round and then the median over rounds (shared machines are noisy; noise only adds time).
On a shared machine ``--clock thread`` (CPU only) times one torch thread by its own CPU time, so what the
machine gives other processes is not counted.
Peak memory: one fresh child process per configuration (CPU: peak RSS of the measured run, weights included,
with the high-water mark reset after building the UNet, whose own peak would otherwise hide the run's;
CUDA: max_memory_allocated).
All evaluations are at t = 981, the noisiest step, where every preset factor is in force.

Reported, with the targets of the project:
* re-dilation:  UNet time re-dilated / vanilla (target <= 1.02x at 2x per side), as the median of ``--pairs``
                back-to-back A B B A pairs (the rounds' ratio is kept as ``redilation_time_rounds``);
* dispersion:   time of the engine's factorised dispersed convs (no 5x5 kernel is ever formed) / convs
                with 5x5 kernels precomputed once (the official approach keeps a copy of the UNet with 5x5
                weights; recreated here by ``precomputed_dispersion``; target <= 1.05x) and peak memory
                with dispersion / without (target <= 1.02x); also, for information, time vs undispersed
                re-dilation and the memory precomputed kernels take;
* noise-damped CFG: UNet samples per step and time per step / plain CFG (target <= 1.5x samples).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lib_hires.scalecrafter import (NoiseDampedCFG, ScaleCrafterController, ScaleCrafterSettings, SharedPrefix,
                                    build_plan, disperse_weight, dispersion_transform, redilated_conv2d)
from lib_hires.scalecrafter.shared_prefix import execution_order, shared_prefix_at
from lib_hires.scalecrafter.redilated_conv import conv_output_size
from tools.kdiffusion_compat import load_k_diffusion
from tools.peak_memory import peak_rss, reset_peak_rss
from tools.tiny_ldm import TinyLatentDiffusion
from tools.unet_factory import FULL, build_unet, example_inputs
from tools.unet_flops import block_flops, shared_fraction

T_EVAL = 981.0
TIME_CONFIGS = ("vanilla", "redilated", "dispersed", "dispersed_precomputed", "cfg", "noise_damped_cfg")
MEMORY_CONFIGS = ("vanilla", "redilated", "dispersed", "dispersed_precomputed")
PREFIX_CONFIGS = ("cfg", "noise_damped_cfg", "shared_prefix_cfg")


@dataclass(frozen=True)
class Spec:
    family: str
    pixels: int
    train_size: int | None

    @classmethod
    def parse(cls, text: str) -> "Spec":
        parts = text.split(":")
        if len(parts) not in (2, 3) or parts[0] not in FULL:
            raise argparse.ArgumentTypeError(f"spec must be family:pixels[:train_size] with family in "
                                             f"{sorted(FULL)}; got {text!r}")
        return cls(parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None)

    def __str__(self):
        return f"{self.family}:{self.pixels}" + (f":{self.train_size}" if self.train_size else "")


@contextmanager
def precomputed_dispersion(unet: nn.Module, controller: ScaleCrafterController) -> Iterator[list[int]]:
    """The comparator for dispersion: each of the plan's dispersed convs runs a 5x5 kernel made once here
    with ``disperse_weight``, as a UNet copy with 5x5 weights would (the official approach).

    Installed as the conv's ``_conv_forward`` over the controller's hook, which still decides the factor;
    whenever the hook would not disperse, the call goes on to it. Removed on exit (before the controller's
    hooks are). Yields a one-item list counting the convs run with a precomputed kernel.
    """
    transform = dispersion_transform()
    used = [0]
    installed: list[tuple[nn.Conv2d, object]] = []

    def forward_for(conv: nn.Conv2d, hook, kernel: torch.Tensor):
        def forward(input, weight, bias):
            if hook.factor <= 1.0 or not hook.dispersed or hook.detached:
                return hook(input, weight, bias)
            used[0] += 1
            # a 5x5 weight: redilated_conv2d pads 2D itself, as the engine does for the factorised conv
            return redilated_conv2d(input, kernel, bias, hook.factor / 2, stride=conv.stride, groups=conv.groups,
                                    padding_mode=conv.padding_mode, out_size=conv_output_size(input.shape[-2:], conv))
        return forward

    try:
        with torch.no_grad():
            for path in sorted(controller.plan.dispersed):
                conv = unet.get_submodule(path)
                hook = controller.handle.hooks[path]
                previous = conv.__dict__["_conv_forward"]
                conv._conv_forward = forward_for(conv, hook, disperse_weight(conv.weight, transform))
                installed.append((conv, previous))
        yield used
    finally:
        for conv, previous in reversed(installed):
            conv._conv_forward = previous


class Bench:
    """One full-size UNet with inputs, plans and a runner per configuration."""

    def __init__(self, spec: Spec, device: str, dtype: torch.dtype, model_size: str = "full",
                 clock: str = "wall"):
        self.clock = time.thread_time if clock == "thread" else time.perf_counter
        self.spec, self.device = spec, device
        self.unet = build_unet(spec.family, size=model_size, device=device, dtype=dtype)
        latent = (spec.pixels // 8, spec.pixels // 8)
        self.x, context, y = example_inputs(self.unet, 2, latent, tokens=77)
        self.t = torch.full((2,), T_EVAL, device=device)
        model = TinyLatentDiffusion(self.unet).to(device)
        self.denoiser = load_k_diffusion().external.CompVisDenoiser(model)
        self.sigma = self.denoiser.t_to_sigma(torch.tensor(T_EVAL, device=device)).expand(1)
        if y is None:
            self.cond_kwargs = {"context": context[:1]}
            self.cond, self.uncond = context[:1], context[1:]
        else:
            self.cond_kwargs = {"context": context[:1], "y": y[:1]}
            self.cond = {"crossattn": context[:1], "vector": y[:1]}
            self.uncond = {"crossattn": context[1:], "vector": y[1:]}

        def plan(**overrides):
            settings = ScaleCrafterSettings(enabled=True, **overrides)
            return build_plan(spec.family, spec.pixels, spec.pixels, settings, train_size=spec.train_size)

        self.plan = plan(noise_damped_cfg="off")
        self.plan_dispersed = plan(noise_damped_cfg="off", dispersion=True)
        self.plan_damped = plan(noise_damped_cfg="on")

    def unet_call(self):
        self.unet(self.x[:1], self.t[:1], **self.cond_kwargs)

    def guided_step(self, controller, prefix=None):
        guided = NoiseDampedCFG(self.denoiser, controller, sigma_to_t=self.denoiser.sigma_to_t, prefix=prefix)
        guided(self.x[:1], self.sigma, cond=self.cond, uncond=self.uncond, cond_scale=7.5)
        return guided.evaluations

    def run(self, config: str) -> tuple[float, int]:
        """Runs one configuration once; returns (seconds of the measured call, UNet samples)."""
        if config == "vanilla":
            return self._timed(self.unet_call), 1
        if config in ("redilated", "dispersed"):
            with ScaleCrafterController(self.unet, self.plan if config == "redilated" else self.plan_dispersed):
                return self._timed(self.unet_call), 1
        if config == "dispersed_precomputed":
            with ScaleCrafterController(self.unet, self.plan_dispersed) as controller, \
                    precomputed_dispersion(self.unet, controller) as used:
                seconds = self._timed(self.unet_call)  # the kernels were made on entry, as a UNet copy's are
            assert used[0] > 0 or not self.plan_dispersed.dispersed
            return seconds, 1
        if config == "shared_prefix_cfg":
            with ScaleCrafterController(self.unet, self.plan_damped) as controller:
                prefix = SharedPrefix(self.unet, controller)
                try:
                    samples = []
                    seconds = self._timed(lambda: samples.append(self.guided_step(controller, prefix)))
                    if shared_prefix_at(prefix.order, self.plan_damped, T_EVAL):
                        assert prefix.hits > 0, "the shared prefix was not replayed"
                    return seconds, samples[0]
                finally:
                    prefix.remove()
        if config in ("cfg", "noise_damped_cfg"):
            plan = self.plan if config == "cfg" else self.plan_damped
            with ScaleCrafterController(self.unet, plan) as controller:
                samples = []
                seconds = self._timed(lambda: samples.append(self.guided_step(controller)))
                return seconds, samples[0]
        raise ValueError(config)

    def _timed(self, fn) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = self.clock()
        with torch.no_grad():
            fn()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return self.clock() - start

    def peak_memory(self, config: str) -> int:
        """Bytes at the peak of one run of ``config`` (CUDA only; CPU uses child processes)."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.run(config)
        return torch.cuda.max_memory_allocated()


def child_peak_rss(spec: Spec, config: str, dtype: str, model_size: str) -> int:
    """Peak RSS in bytes of a fresh process that builds the UNet and runs ``config`` once."""
    cmd = [sys.executable, "-m", "tools.benchmark", "--child", config, "--spec", str(spec), "--dtype", dtype,
           "--model-size", model_size]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ)).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss"]


def paired_ratio(bench: "Bench", num: str, den: str) -> float:
    """``num`` / ``den`` time from back-to-back calls in A B B A order, so a slow drift of the machine's speed
    (other jobs, clocks) cancels; a 2% target needs that, rounds of all configurations take minutes."""
    a1, b1, b2, a2 = (bench.run(c)[0] for c in (den, num, num, den))
    return (b1 + b2) / (a1 + a2)


def ratio_stats(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def row(label: str, value: float, target: float | None = None, unit: str = "x") -> str:
    verdict = "" if target is None else ("  ok" if value <= target else "  OVER TARGET")
    goal = f"<= {target:g}{unit}" if target is not None else ""
    return f"  {label:<62} {value:7.3f}{unit}  {goal:<9}{verdict}"


def benchmark(spec: Spec, args) -> dict:
    dtype = getattr(torch, args.dtype)
    print(f"\n== {spec.family.upper()}-architecture UNet, {spec.pixels}x{spec.pixels} px "
          f"(latent {spec.pixels // 8}^2{', training size ' + str(spec.train_size) if spec.train_size else ''}), "
          f"{args.device} {args.dtype}, {args.rounds} rounds ==", flush=True)
    start = time.perf_counter()
    bench = Bench(spec, args.device, dtype, args.model_size, args.clock)
    params = sum(p.numel() for p in bench.unet.parameters())
    print(f"  built: {params / 1e6:.1f} M parameters in {time.perf_counter() - start:.0f} s")
    print("  " + bench.plan.describe().replace("\n", "\n  "))
    print(f"  dispersion layers: {len(bench.plan_dispersed.dispersed)}", flush=True)

    for config in TIME_CONFIGS:  # warm-up: first calls pay for allocator growth and kernel selection
        bench.run(config)
    times: dict[str, list[float]] = {c: [] for c in TIME_CONFIGS}
    samples: dict[str, int] = {}
    for r in range(args.rounds):
        order = TIME_CONFIGS[r % len(TIME_CONFIGS):] + TIME_CONFIGS[:r % len(TIME_CONFIGS)]
        for config in order:
            seconds, n = bench.run(config)
            times[config].append(seconds)
            samples[config] = n
        print(f"  round {r + 1}: " + ", ".join(f"{c} {times[c][-1]:.2f}s" for c in TIME_CONFIGS), flush=True)
    pairs = [paired_ratio(bench, "redilated", "vanilla") for _ in range(args.pairs)]
    if pairs:
        print("  re-dilated / vanilla, ABBA pairs: " + ", ".join(f"{r:.3f}" for r in pairs), flush=True)

    if args.device.startswith("cuda"):
        memory = {c: bench.peak_memory(c) for c in MEMORY_CONFIGS} if args.memory else {}
    else:
        del bench
        memory = {c: child_peak_rss(spec, c, args.dtype, args.model_size) for c in MEMORY_CONFIGS} if args.memory else {}

    results = {
        "redilation_time": statistics.median(pairs) if pairs else ratio_stats(times, "redilated", "vanilla"),
        "redilation_time_rounds": ratio_stats(times, "redilated", "vanilla"),
        "dispersion_time_vs_precomputed": ratio_stats(times, "dispersed", "dispersed_precomputed"),
        "dispersion_time_vs_undispersed": ratio_stats(times, "dispersed", "redilated"),
        "ndcfg_samples": samples["noise_damped_cfg"] / samples["cfg"],
        "ndcfg_time": ratio_stats(times, "noise_damped_cfg", "cfg"),
    }
    if memory:
        results.update({
            "redilation_memory": memory["redilated"] / memory["vanilla"],
            "dispersion_memory": memory["dispersed"] / memory["redilated"],
            "precomputed_memory": memory["dispersed_precomputed"] / memory["redilated"],
        })
    print("  median seconds: " + ", ".join(f"{c} {statistics.median(v):.3f}" for c, v in times.items()))
    if memory:
        print("  peak memory GiB: " + ", ".join(f"{c} {v / 2 ** 30:.2f}" for c, v in memory.items()))
    print(row("re-dilation: time vs vanilla" + (f" (median of {len(pairs)} ABBA pairs)" if pairs else ""),
              results["redilation_time"], 1.02))
    print(row("dispersion: time, factorised vs precomputed 5x5 kernels", results["dispersion_time_vs_precomputed"],
              1.05))
    if memory:
        print(row("dispersion: peak memory vs no dispersion", results["dispersion_memory"], 1.02))
    print(row("noise-damped CFG: UNet samples per step vs plain CFG", results["ndcfg_samples"], 1.5))
    print(row("noise-damped CFG: time per step vs plain CFG", results["ndcfg_time"]))
    print("  for information:")
    print(row("dispersion: time vs undispersed re-dilation", results["dispersion_time_vs_undispersed"]))
    if memory:
        print(row("re-dilation: peak memory vs vanilla", results["redilation_memory"]))
        print(row("precomputed 5x5 kernels: peak memory vs no dispersion", results["precomputed_memory"]))
    return {"spec": str(spec), "device": args.device, "dtype": args.dtype, "rounds": args.rounds,
            "seconds": times, "memory_bytes": memory, **results}


def preset_name(spec: Spec) -> str:
    """The official preset a spec's plan follows: its output size at the family's training size."""
    train = {"sd1": 512, "sd2": 768, "sdxl": 1024}[spec.family]
    side = spec.pixels * train // (spec.train_size or train)
    return f"{'sd1.5' if spec.family == 'sd1' else spec.family}_{side}x{side}"


def benchmark_shared_prefix(spec: Spec, args) -> dict:
    """Time per guided step of plain CFG, noise-damped CFG with a separate base call and with the shared
    prefix, side by side in rounds; ``f`` counted from the layers at the benchmark's latent and the real one."""
    dtype = getattr(torch, args.dtype)
    name = preset_name(spec)
    latent = spec.pixels // 8
    print(f"\n== {name}: {spec.family.upper()} UNet, latent {latent}^2 ({spec}), {args.device} {args.dtype}, "
          f"{args.rounds} rounds ==", flush=True)
    start = time.perf_counter()
    bench = Bench(spec, args.device, dtype, args.model_size, args.clock)
    print(f"  built in {time.perf_counter() - start:.0f} s")
    print("  " + bench.plan_damped.describe().replace("\n", "\n  "))
    prefix = shared_prefix_at(execution_order(bench.unet), bench.plan_damped, T_EVAL)
    real_latent = int(name.rsplit("x", 1)[1]) // 8
    f = shared_fraction(block_flops(spec.family, (latent, latent), size=args.model_size), prefix)
    f_real = shared_fraction(block_flops(spec.family, (real_latent, real_latent), size=args.model_size), prefix)
    print(f"  shared blocks at t={T_EVAL:g}: {prefix[0] if prefix else '-'} .. {prefix[-1] if prefix else '-'} "
          f"({len(prefix)}); f = {f:.3f} of an uncond call's FLOPs here, {f_real:.3f} at the real {real_latent}^2",
          flush=True)
    for config in PREFIX_CONFIGS:  # warm-up
        bench.run(config)
    times: dict[str, list[float]] = {c: [] for c in PREFIX_CONFIGS}
    for r in range(args.rounds):
        order = PREFIX_CONFIGS[r % len(PREFIX_CONFIGS):] + PREFIX_CONFIGS[:r % len(PREFIX_CONFIGS)]
        for config in order:
            times[config].append(bench.run(config)[0])
        print(f"  round {r + 1}: " + ", ".join(f"{c} {times[c][-1]:.2f}s" for c in PREFIX_CONFIGS), flush=True)
    result = {"preset": name, "spec": str(spec), "latent": latent, "shared_blocks": prefix, "f": f,
              "f_real": f_real, "seconds": times,
              "ndcfg_time": ratio_stats(times, "noise_damped_cfg", "cfg"),
              "shared_time": ratio_stats(times, "shared_prefix_cfg", "cfg")}
    result["target"] = 1.03 * (1.5 - f / 2)
    result["met"] = result["shared_time"] <= result["target"]
    return result


def print_shared_prefix_table(results: list[dict]) -> None:
    print("\n| preset | latent here | shared blocks | f here (real size) | plain CFG s/step | noise-damped s/step "
          "(x plain) | shared prefix s/step (x plain) | target 1.03(1.5-f/2) | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        med = {c: statistics.median(v) for c, v in r["seconds"].items()}
        blocks = f"{r['shared_blocks'][0]}..{r['shared_blocks'][-1]}" if r["shared_blocks"] else "none"
        print(f"| {r['preset']} | {r['latent']}² | {blocks} | {r['f']:.3f} ({r['f_real']:.3f}) | {med['cfg']:.2f} | "
              f"{med['noise_damped_cfg']:.2f} ({r['ndcfg_time']:.3f}×) | {med['shared_prefix_cfg']:.2f} "
              f"({r['shared_time']:.3f}×) | {r['target']:.3f}× | {'yes' if r['met'] else 'NO'} |")


def child_main(args) -> int:
    spec = args.spec[0]
    bench = Bench(spec, "cpu", getattr(torch, args.dtype), args.model_size)
    reset = reset_peak_rss()  # building the UNet peaks far above a run; only the run is measured
    bench.run(args.child)
    print(json.dumps({"peak_rss": peak_rss(reset), "run_only": reset}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Spec.parse, nargs="+", default=None,
                    help="family:pixels[:train_size] (default: sd1:1024 sdxl:512:256 on CPU, "
                         "sd1:1024 sd1:2048 sd1:4096 sdxl:2048 sdxl:4096 on CUDA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 on CPU, float16 on CUDA by default")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=5, help="ABBA pairs for the re-dilation ratio (0: use the rounds)")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--model-size", choices=["full", "tiny"], default="full",
                    help="tiny: the test-size UNets, to check the script itself in seconds")
    ap.add_argument("--shared-prefix", action="store_true",
                    help="only plain CFG vs noise-damped CFG vs noise-damped CFG with the shared prefix (issue 22), "
                         "for the official presets (default specs: sd1:256:64 sdxl:256:64 sd1:256:128 sdxl:256:128)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread (CPU only): one torch thread, timed by the CPU time of the thread that runs every "
                         "kernel, so time the machine gives to other processes is not counted (for shared machines; "
                         "cache and memory-bandwidth contention still count)")
    ap.add_argument("--child", choices=MEMORY_CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    if args.spec is None and args.shared_prefix:
        args.spec = [Spec.parse(s) for s in ("sd1:256:64", "sdxl:256:64", "sd1:256:128", "sdxl:256:128")]
    if args.spec is None:
        args.spec = [Spec.parse(s) for s in (["sd1:1024", "sd1:2048", "sd1:4096", "sdxl:2048", "sdxl:4096"] if cuda
                                             else ["sd1:1024", "sdxl:512:256"])]
    if args.clock == "thread":
        if cuda:
            ap.error("--clock thread times CPU kernels; CUDA kernels run outside the thread's CPU time")
        torch.set_num_threads(1)  # with one intra-op thread every kernel runs inline on the timed thread
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # random weights can underflow into denormals, ~100x slower on CPUs
    if args.child:
        return child_main(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock {args.clock}, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}")
    if args.shared_prefix:
        results = [benchmark_shared_prefix(spec, args) for spec in args.spec]
        print_shared_prefix_table(results)
    else:
        results = [benchmark(spec, args) for spec in args.spec]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
