"""Tiled VAE decode and encode, GroupNorm statistics of the whole image vs per tile vs one whole pass, side by side.

    python -m tools.benchmark_vae                                   # CPU: the SD/SDXL VAE layout at 1/8 width, fp32
    python -m tools.benchmark_vae --sizes 1024 --tile 64            # a size where tiles and a whole pass both run
    python -m tools.benchmark_vae --device cuda --dtype float16 --width 1 --sizes 1024 2048 4096

For each output size and each half of the VAE (``tools.vae_factory``: random weights, the real layout;
``--width`` scales its channels), three modes: ``whole`` (one pass, where its estimated peak fits in 60% of
the free memory), ``shared`` (tiles, GroupNorms with whole-image statistics, tiles parked in host memory
between them: ``lib_hires.vae_layers``) and ``per-tile`` (tiles, each normalised on its own). Every run is a
fresh child process; it reports seconds, the peak resident memory of the process (weights, input, output
and, for ``shared``, the parked tiles included; the high-water mark reset after building the module), on
CUDA also the peak device memory, and the parked bytes. PSNR is against the whole pass (8-bit levels of
the decoded image; for the encode, the latent mean against its own range), on the input of issue 12: a
smooth left half and a textured right half, with attention's output projection zeroed (``--attention``
keeps it) so that only normalisation and borders differ; where no whole pass fits it is not measured.

Targets (issue 12): shared tiles >= 40 dB against the whole pass; shared time <= 1.5x the whole pass where
it fits; on a GPU, shared peak device memory at 4096² <= 1.5x a whole 1024² pass.
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

from lib_hires import vae_layers
from lib_hires.vae_tiles import (decoder_peak_bytes, default_overlap, tile_layout,
                                 tiled_decode, tiled_encode)
from tools.peak_memory import GIB, free_memory, peak_rss, reset_peak_rss, resolve_vae_args
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


def run_once(part: str, mode: str, pixels: int, args, out_path: str) -> dict:
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
    tiled = tiled_decode if part == "decode" else tiled_encode
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "whole":
            out = module(x)
        else:
            out = tiled(module, x, tile=args.tile, overlap=default_overlap(args.tile),
                        groupnorm="whole image" if mode == "shared" else "per tile")
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "host_peak": peak_rss(reset),
              "parked": vae_layers.last_pass.parked_peak if mode == "shared" else 0}
    if cuda:
        result["device_peak"] = torch.cuda.max_memory_allocated()
    torch.save(out.to("cpu", torch.float32), out_path)
    return result


def run_child(part: str, mode: str, pixels: int, args, out_path: str) -> dict:
    cmd = [sys.executable, "-m", "tools.benchmark_vae", "--child", f"{part}:{mode}:{pixels}:{out_path}",
           "--device", args.device, "--dtype", args.dtype, "--width", str(args.width), "--tile", str(args.tile)]
    if args.attention:
        cmd.append("--attention")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ)).stdout
    return json.loads(out.strip().splitlines()[-1])


def psnr(part: str, out: torch.Tensor, whole: torch.Tensor) -> float:
    if part == "decode":
        a, b, peak = (out.clamp(-1, 1) + 1) * 127.5, (whole.clamp(-1, 1) + 1) * 127.5, 255.0
    else:
        a, b = out[:, :4], whole[:, :4]
        peak = (b.max() - b.min()).item()
    mse = F.mse_loss(a.double(), b.double()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 on CPU, float16 on CUDA by default")
    ap.add_argument("--width", type=float, default=None, help="VAE channel scale (CPU 1/8, CUDA 1 by default)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--parts", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    ap.add_argument("--tile", type=int, default=0, help="latent px; 0: what the extension picks here")
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds (alternating order) where a whole pass fits")
    ap.add_argument("--attention", action="store_true", help="keep attention's output projection")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda, element, channels = resolve_vae_args(args, cpu_width=0.125)
    torch.set_flush_denormal(True)
    if args.child:
        part, mode, pixels, out_path = args.child.split(":", 3)
        print(json.dumps(run_once(part, mode, int(pixels), args, out_path)))
        return 0

    free = free_memory(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}, {free / GIB:.1f} GiB free")
    print(f"VAE: SD/SDXL layout, width {args.width:g} ({channels} middle channels), {args.dtype}; tile {args.tile} "
          f"latent px ({8 * args.tile} px), overlap {default_overlap(args.tile)}; attention "
          f"{'kept' if args.attention else 'output projection zeroed'}")
    summary = {"device": args.device, "dtype": args.dtype, "width": args.width, "tile": args.tile, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            for pixels in args.sizes:
                side = pixels // 8
                fits = decoder_peak_bytes(side, side, element, channels) <= 0.6 * free
                tiles = len(tile_layout(side, args.tile, default_overlap(args.tile))[1]) ** 2
                modes = [m for m in MODES if (m != "whole" or fits) and (m == "whole" or tiles > 1)]
                runs = {m: [] for m in modes}
                for r in range(max(1, args.rounds) if fits else 1):
                    for mode in (modes if r % 2 == 0 else modes[::-1]):
                        runs[mode].append(run_child(part, mode, pixels, args, os.path.join(tmp, f"{mode}.pt")))
                        m = runs[mode][-1]
                        print(f"  round {r + 1}: {part} {pixels}² {mode:<8} {m['seconds']:8.2f} s  host peak "
                              f"{m['host_peak'] / GIB:6.2f} GiB" + (f"  device peak {m['device_peak'] / GIB:6.2f} GiB"
                                                                    if cuda else ""), flush=True)
                entry = {"tiles": tiles}
                whole = torch.load(os.path.join(tmp, "whole.pt")) if "whole" in runs else None
                for mode in modes:
                    ms = runs[mode]
                    e = {"seconds": statistics.median(m["seconds"] for m in ms),
                         "host_peak": max(m["host_peak"] for m in ms), "parked": max(m["parked"] for m in ms)}
                    if cuda:
                        e["device_peak"] = max(m["device_peak"] for m in ms)
                    if whole is not None and mode != "whole":
                        e["psnr"] = psnr(part, torch.load(os.path.join(tmp, f"{mode}.pt")), whole)
                        e["time_ratio"] = statistics.median(t["seconds"] / w["seconds"]
                                                            for t, w in zip(ms, runs["whole"]))
                    entry[mode] = e
                summary["results"][f"{part} {pixels}"] = entry

    print(f"\n  {'part':<7}{'size':>6} {'tiles':>6}  {'mode':<9}{'PSNR dB':>8} {'host peak':>10} {'parked':>8}"
          + (f" {'dev peak':>9}" if cuda else "") + f" {'seconds':>9} {'vs whole':>9}")
    for key, entry in summary["results"].items():
        part, pixels = key.split()
        for mode in MODES:
            if mode not in entry:
                continue
            e = entry[mode]
            quality = f"{e['psnr']:8.1f}" if "psnr" in e else f"{'-':>8}"
            ratio = f"{e['time_ratio']:8.3f}x" if "time_ratio" in e else f"{'-':>9}"
            print(f"  {part:<7}{pixels + '²':>6} {entry['tiles']:>6}  {mode:<9}{quality} {e['host_peak'] / GIB:9.2f}G "
                  f"{e['parked'] / GIB:7.2f}G" + (f" {e['device_peak'] / GIB:8.2f}G" if cuda else "")
                  + f" {e['seconds']:9.2f} {ratio}")
    verdicts = []
    for key, entry in summary["results"].items():
        shared = entry.get("shared", {})
        if "psnr" in shared:
            verdicts.append(f"{key}²: shared PSNR {shared['psnr']:.1f} dB (>= 40: "
                            f"{'ok' if shared['psnr'] >= 40 else 'BELOW TARGET'}), time {shared['time_ratio']:.3f}x "
                            f"the whole pass (<= 1.5: {'ok' if shared['time_ratio'] <= 1.5 else 'OVER TARGET'})")
    if cuda:
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
