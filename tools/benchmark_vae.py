"""Tiled VAE decode and encode, GroupNorm statistics of the whole image vs per tile vs one whole pass, side by side.

    python -m tools.benchmark_vae --quick                           # CPU: 1024², 2048², 4096² in bounded time
    python -m tools.benchmark_vae --sizes 1024 --tile 64            # a size where tiles and a whole pass both run
    python -m tools.benchmark_vae --device cuda --sizes 1024 2048 4096 --modes whole shared   # GPU, see docs/benchmarks.md
    python -m tools.benchmark_vae --parked-table                    # parked host memory at full width, no passes

For each output size and each half of the VAE (``tools.vae_factory``: random weights, the real layout;
``--width`` scales its channels), three modes: ``whole`` (one pass, where its estimated peak fits in 60% of
the free memory, or up to ``--whole-up-to``), ``shared`` (tiles, GroupNorms with whole-image statistics, tiles
parked in host memory between them: ``lib_hires.vae``) and ``per-tile`` (tiles, each normalised on its
own). A size that is one tile at ``--tile`` runs its tiled modes at half its latent side, so that tiles and the
whole pass can be compared (said in the output). Every run is a fresh child process; it reports seconds, the
host peak (the process's peak resident memory: weights, input, output and, for ``shared``, the parked tiles
included; the high-water mark reset after building the module; above the resident memory of torch's own runtime
before the module was built), the device peak (CUDA: max_memory_allocated;
a CPU run: the host's resident memory less the bytes parked at that moment, measured between parking events,
see ``tools.peak_memory.DevicePeakOnHost``: what a GPU would hold), and the parked bytes. PSNR is against the
whole pass (8-bit levels of the decoded image; for the encode, the latent mean against its own range), on the
input of issue 12: a smooth left half and a textured right half, with attention's output projection zeroed
(``--attention`` keeps it) so that only normalisation and borders differ; where no whole pass fits it is not
measured.

``--quick``: the layout at 1/32 width (4 base channels, 16 in the middle block; one GroupNorm group per channel
at the narrowest levels), fp32, tile 128 latent px as the extension picks (64 at 1024²), per tile only at 1024²
(it costs the same convolutions as the shared mode and has no whole pass to be compared with above), one torch
thread per run: on a machine loaded beyond its cores, two threads wait on each other at every op (a 16-channel
conv on a 54² tile took 300 ms with two, 5 ms with one), which punishes the many small ops of tiles and makes
every ratio meaningless. A whole 2048² pass does not fit
here: the layout's attention (as the WebUI's, on transposed q, k, v) falls back to torch's math kernel, whose
scores over 256² latent px take 32 GB at any width. The figures are the structure's, not the real width's: memory and time per pixel
scale with width, the ratios hold roughly, PSNR depends on the weights.

Targets (issue 12): shared tiles >= 40 dB against the whole pass; shared time <= 1.5x the whole pass where
it fits; shared device peak at 4096² <= 1.5x a whole 1024² pass.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from lib_hires.vae import shared_norm
from lib_hires.vae import (decoder_peak_bytes, default_overlap, tile_layout,
                                 tiled_decode, tiled_encode)
from tools.peak_memory import (GIB, DevicePeakOnHost, current_rss, free_memory, peak_rss, reset_peak_rss,
                               resolve_vae_args)
from tools.vae_factory import build_decoder, build_encoder

MODES = ("whole", "shared", "per-tile")



def half_smooth(channels: int, side: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, channels, side // 16 + 1, side // 16 + 1, generator=gen)
    x = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=True)
    x[..., side // 2:] = torch.randn(1, channels, side, side - side // 2, generator=gen)
    return x


def build(part: str, args):
    dtype = getattr(torch, args.dtype)
    module = (build_decoder if part == "decode" else build_encoder)(args.width, seed=1, device=args.device, dtype=dtype)
    if not args.attention:
        for m in module.modules():
            if hasattr(m, "proj_out"):
                torch.nn.init.zeros_(m.proj_out.weight)
                torch.nn.init.zeros_(m.proj_out.bias)
    return module


def run_once(part: str, mode: str, pixels: int, tile: int, args, out_path: str) -> dict:
    # torch's own runtime (hundreds of MB of libraries) is not the pass's: on a GPU it is no device memory, and at
    # a reduced width it would hide what the pass holds; peaks are counted above it
    runtime = current_rss() if not args.device.startswith("cuda") else 0
    module = build(part, args)
    dtype = getattr(torch, args.dtype)
    if part == "decode":
        x = half_smooth(4, pixels // 8, seed=2)
    else:
        x = torch.tanh(half_smooth(3, pixels, seed=2))
    x = x.to(args.device, dtype)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reset = reset_peak_rss()
    monitor = DevicePeakOnHost() if not cuda and mode == "shared" else None
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "whole":
            out = module(x)
        elif mode == "shared":
            out = shared_norm.shared_norm_forward(module, x, tile=tile, overlap=default_overlap(tile),
                                                 unit=1 if part == "decode" else 8, monitor=monitor)
        else:
            out = (tiled_decode if part == "decode" else tiled_encode)(
                module, x, tile=tile, overlap=default_overlap(tile), groupnorm="per tile")
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if monitor is not None:
        monitor(0)   # closes the last interval: nothing is parked after the pass
    host = (peak_rss(reset) if monitor is None else monitor.host) - runtime
    result = {"seconds": seconds, "host_peak": host,
              "parked": shared_norm.last_pass.parked_peak if mode == "shared" else 0}
    if mode == "shared":
        program = shared_norm.program_of(module, x, 1 if part == "decode" else 8)
        grid = shared_norm._grid(x, tile, default_overlap(tile), 1 if part == "decode" else 8)
        result["parked_estimate"] = shared_norm.parked_bytes(program, x, tile, default_overlap(tile),
                                                            1 if part == "decode" else 8)
        # what the scheme before this one parked: every tile's whole window, overlaps twice
        result["parked_windows"] = int(program.parked_per_px * grid.th * grid.tw * len(grid.rows) * len(grid.cols)
                                       * x.shape[0] * x.element_size())
    # the compute side: CUDA's allocator; on a CPU all memory less the parked tiles (for whole and per tile
    # nothing is parked, so it is the host peak)
    result["device_peak"] = torch.cuda.max_memory_allocated() if cuda else \
        (monitor.device - runtime if monitor is not None else host)
    torch.save(out.to("cpu", torch.float32), out_path)
    return result


def run_child(part: str, mode: str, pixels: int, tile: int, args, out_path: str) -> dict:
    cmd = [sys.executable, "-m", "tools.benchmark_vae", "--child", f"{part}:{mode}:{pixels}:{tile}:{out_path}",
           "--device", args.device, "--dtype", args.dtype, "--width", str(args.width), "--tile", str(args.tile),
           "--threads", str(args.threads)]
    if args.attention:
        cmd.append("--attention")
    # freed tensors go back to the OS at once, so that resident memory is what is held (see DevicePeakOnHost)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", str(2 ** 20)))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def psnr(part: str, out: torch.Tensor, whole: torch.Tensor) -> float:
    if part == "decode":
        a, b, peak = (out.clamp(-1, 1) + 1) * 127.5, (whole.clamp(-1, 1) + 1) * 127.5, 255.0
    else:
        a, b = out[:, :4], whole[:, :4]
        peak = (b.max() - b.min()).item()
    mse = F.mse_loss(a.double(), b.double()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def parked_table() -> None:
    """Host memory the shared pass parks at 4096² (and 2048²), full width, from the program's probe: no pass runs."""
    print("Parked host memory of the shared pass, full width (the probe's exact count; no pass is run):")
    print(f"  {'part':<7}{'size':>6} {'dtype':>9} {'cores (now)':>12} {'windows (before)':>17}")
    for part in ("decode", "encode"):
        for dtype in (torch.float32, torch.float16):
            module = (build_decoder if part == "decode" else build_encoder)(1.0, dtype=torch.float32)
            unit = 1 if part == "decode" else 8
            probe = torch.zeros(1, 4 if part == "decode" else 3, 16 * unit, 16 * unit)
            program = shared_norm.program_of(module, probe, unit)
            for pixels in (2048, 4096):
                side = pixels // 8
                x = torch.empty(1, probe.shape[1], side * unit, side * unit, dtype=dtype, device="meta")
                grid = shared_norm._grid(x, 128, default_overlap(128), unit)
                cores = shared_norm.parked_bytes(program, x, 128, default_overlap(128), unit)
                windows = program.parked_per_px * grid.th * grid.tw * len(grid.rows) * len(grid.cols) * x.element_size()
                print(f"  {part:<7}{pixels:>5}² {str(dtype)[6:]:>9} {cores / GIB:10.2f}G {windows / GIB:15.2f}G")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 on CPU, float16 on CUDA by default")
    ap.add_argument("--width", type=float, default=None, help="VAE channel scale (CPU 1/8, CUDA 1 by default)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--parts", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--tile", type=int, default=0, help="latent px; 0: what the extension picks here")
    ap.add_argument("--whole-up-to", type=int, default=0,
                    help="run whole passes up to this size (px) whatever the estimate says (an attention that does "
                         "not hold its scores needs far less than it counts)")
    ap.add_argument("--per-tile-up-to", type=int, default=0, help="run the per-tile mode only up to this size (px)")
    ap.add_argument("--quick", action="store_true", help="1/32 width, 1024² to 4096² in bounded time on a CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds (alternating order) where a whole pass fits")
    ap.add_argument("--attention", action="store_true", help="keep attention's output projection")
    ap.add_argument("--parked-table", action="store_true", help="only print the parked memory at full width")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.parked_table:
        parked_table()
        return 0
    if args.quick:
        args.width = args.width or 1 / 32
        args.tile = args.tile or 128
        args.per_tile_up_to = args.per_tile_up_to or 1024
        args.threads = args.threads or 1
    cuda, element, channels = resolve_vae_args(args, cpu_width=0.125)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        part, mode, pixels, tile, out_path = args.child.split(":", 4)
        print(json.dumps(run_once(part, mode, int(pixels), int(tile), args, out_path)))
        return 0

    free = free_memory(args.device)
    base = build_decoder(args.width).up[0].block[0].conv2.out_channels
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}, {free / GIB:.1f} GiB free")
    print(f"VAE: SD/SDXL layout at width {args.width:g}: {base} base channels (real: 128), {channels} in the middle "
          f"block (real: 512); {args.dtype}; tile {args.tile} latent px ({8 * args.tile} px), overlap "
          f"{default_overlap(args.tile)}; attention {'kept' if args.attention else 'output projection zeroed'}")
    print("device peak: " + ("torch.cuda.max_memory_allocated" if cuda else
                             "CPU, one memory: resident memory less the parked tiles at that moment (DevicePeakOnHost)")
          + "; peaks on a CPU are above torch's own runtime (resident before the module is built)")
    summary = {"device": args.device, "dtype": args.dtype, "width": args.width, "tile": args.tile, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            for pixels in args.sizes:
                side = pixels // 8
                fits = decoder_peak_bytes(side, side, element, channels) <= 0.6 * free or pixels <= args.whole_up_to
                tile = args.tile if side > args.tile else side // 2
                tiles = len(tile_layout(side, tile, default_overlap(tile))[1]) ** 2
                modes = [m for m in MODES if m in args.modes and (m != "whole" or fits)
                         and (m != "per-tile" or not args.per_tile_up_to or pixels <= args.per_tile_up_to)]
                runs = {m: [] for m in modes}
                for r in range(max(1, args.rounds) if fits else 1):
                    for mode in (modes if r % 2 == 0 else modes[::-1]):
                        runs[mode].append(run_child(part, mode, pixels, tile, args,
                                                    os.path.join(tmp, f"{mode}.pt")))
                        m = runs[mode][-1]
                        print(f"  round {r + 1}: {part} {pixels}² {mode:<8} {m['seconds']:8.2f} s  device peak "
                              f"{m['device_peak'] / GIB:6.2f} GiB  host peak {m['host_peak'] / GIB:6.2f} GiB  "
                              f"parked {m['parked'] / GIB:6.2f} GiB", flush=True)
                entry = {"tiles": tiles, "tile": tile}
                whole = torch.load(os.path.join(tmp, "whole.pt")) if "whole" in runs else None
                for mode in modes:
                    ms = runs[mode]
                    e = {"seconds": statistics.median(m["seconds"] for m in ms),
                         "host_peak": max(m["host_peak"] for m in ms), "parked": max(m["parked"] for m in ms),
                         "device_peak": max(m["device_peak"] for m in ms)}
                    for key in ("parked_estimate", "parked_windows"):
                        if key in ms[0]:
                            e[key] = ms[0][key]
                    if whole is not None and mode != "whole":
                        e["psnr"] = psnr(part, torch.load(os.path.join(tmp, f"{mode}.pt")), whole)
                        e["time_ratio"] = statistics.median(t["seconds"] / w["seconds"]
                                                            for t, w in zip(ms, runs["whole"]))
                    entry[mode] = e
                    if "psnr" in e:
                        print(f"  {part} {pixels}² {mode}: PSNR {e['psnr']:.1f} dB, time {e['time_ratio']:.3f}x the "
                              "whole pass", flush=True)
                summary["results"][f"{part} {pixels}"] = entry
                if args.json:   # as it goes: a long run that is stopped keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(summary, f, indent=1)

    print(f"\n  {'part':<7}{'size':>6} {'tiles':>10}  {'mode':<9}{'PSNR dB':>8} {'dev peak':>9} {'host peak':>10} "
          f"{'parked':>8} {'(windows)':>10} {'seconds':>9} {'vs whole':>9}")
    for key, entry in summary["results"].items():
        part, pixels = key.split()
        for mode in MODES:
            if mode not in entry:
                continue
            e = entry[mode]
            quality = f"{e['psnr']:8.1f}" if "psnr" in e else f"{'-':>8}"
            ratio = f"{e['time_ratio']:8.3f}x" if "time_ratio" in e else f"{'-':>9}"
            windows = f"{e['parked_windows'] / GIB:9.3f}G" if "parked_windows" in e else f"{'':>10}"
            layout = f"{entry['tiles']}@{entry['tile']}" if mode != "whole" else "1"
            print(f"  {part:<7}{pixels + '²':>6} {layout:>10}  {mode:<9}{quality} {e['device_peak'] / GIB:8.3f}G "
                  f"{e['host_peak'] / GIB:9.3f}G {e['parked'] / GIB:7.3f}G {windows} {e['seconds']:9.2f} {ratio}")
    print("  (parked: the largest the shared pass held at once; windows: what parking whole tile windows, the "
          "scheme before, held, from the same probe)")
    verdicts = []
    for key, entry in summary["results"].items():
        shared = entry.get("shared", {})
        if "psnr" in shared:
            verdicts.append(f"{key}²: shared PSNR {shared['psnr']:.1f} dB (>= 40: "
                            f"{'ok' if shared['psnr'] >= 40 else 'BELOW TARGET'}), time {shared['time_ratio']:.3f}x "
                            f"the whole pass (<= 1.5: {'ok' if shared['time_ratio'] <= 1.5 else 'OVER TARGET'})")
    for part in args.parts:
        small, big = summary["results"].get(f"{part} 1024", {}), summary["results"].get(f"{part} 4096", {})
        if "whole" in small and "shared" in big:
            ratio = big["shared"]["device_peak"] / small["whole"]["device_peak"]
            verdicts.append(f"{part}: shared device peak at 4096² / whole at 1024²: {ratio:.3f}x (<= 1.5: "
                            f"{'ok' if ratio <= 1.5 else 'OVER TARGET'})")
    for line in verdicts:
        print("  " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
