"""Peak memory and time of the tiled VAE decode against a full decode, measured side by side.

    python -m tools.benchmark_decode                       # CPU: the SD/SDXL VAE layout at 1/4 width, fp32
    python -m tools.benchmark_decode --width 1 --sizes 1024 2048
    python -m tools.benchmark_decode --device cuda --dtype float16 --width 1

The decoder is ``tools.vae_factory`` (random weights, the real layout; ``--width`` scales its channels:
1/4 is the width of the tiny WebUI fixtures and keeps a 4096² decode within minutes on a CPU). The tile
is the one the extension would pick on this machine (``choose_tile``) unless ``--tile`` is given.

Every decode runs in a fresh child process (CPU: peak RSS of the decode, weights and the accumulated
image included, with the high-water mark reset after building the decoder; CUDA: max_memory_allocated),
rounds alternate the order, and time ratios are the median of the per-round ratios. A full decode is
only attempted where its estimated peak (``decoder_peak_bytes``) fits in 60% of the free memory.

Targets: tiled peak at 4096² <= 1.5x the full decode's peak at 1024²; tiled time <= 1.3x the full
decode's where the full decode fits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from lib_hires.vae import decoder_peak_bytes, default_overlap, tiled_decode
from tools.peak_memory import GIB, free_memory, peak_rss, reset_peak_rss, resolve_vae_args
from tools.vae_factory import build_decoder




def decode_once(mode: str, pixels: int, args) -> dict:
    """Builds the decoder, decodes one seeded latent (``full`` or ``tiled``), returns seconds and peak bytes."""
    dtype = getattr(torch, args.dtype)
    decoder = build_decoder(args.width, device=args.device, dtype=dtype)
    side = pixels // 8
    latent = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1)).to(args.device, dtype)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        reset = True
    else:
        reset = reset_peak_rss()
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "full":
            image = decoder(latent).to("cpu", torch.float32)
        else:
            image = tiled_decode(decoder, latent, tile=args.tile, overlap=default_overlap(args.tile), out_device="cpu")
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss(reset)
    assert image.shape[-2:] == (pixels, pixels)
    return {"seconds": seconds, "peak": peak}


def run_child(mode: str, pixels: int, args) -> dict:
    cmd = [sys.executable, "-m", "tools.benchmark_decode", "--child", f"{mode}:{pixels}", "--device", args.device,
           "--dtype", args.dtype, "--width", str(args.width), "--tile", str(args.tile)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ)).stdout
    return json.loads(out.strip().splitlines()[-1])


def row(label: str, value: float, target: float | None = None) -> str:
    verdict = "" if target is None else ("  ok" if value <= target else "  OVER TARGET")
    goal = f"<= {target:g}x" if target is not None else ""
    return f"  {label:<58} {value:7.3f}x  {goal:<9}{verdict}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 on CPU, float16 on CUDA by default")
    ap.add_argument("--width", type=float, default=None, help="decoder channel scale (CPU 0.25, CUDA 1 by default)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 1536, 2048, 4096])
    ap.add_argument("--tile", type=int, default=0, help="latent px; 0: what the extension picks here")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds where the full decode fits")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda, element, channels = resolve_vae_args(args, cpu_width=0.25)
    torch.set_flush_denormal(True)
    if args.child:
        mode, pixels = args.child.split(":")
        print(json.dumps(decode_once(mode, int(pixels), args)))
        return 0

    free = free_memory(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}, {free / GIB:.1f} GiB free")
    print(f"decoder: SD/SDXL VAE layout, width {args.width:g} ({channels} middle channels), {args.dtype}; "
          f"tile {args.tile} latent px ({8 * args.tile} px), overlap {default_overlap(args.tile)}")
    fits = {p: decoder_peak_bytes(p // 8, p // 8, element, channels) <= 0.6 * free for p in args.sizes}
    results = {p: {"full": [], "tiled": []} for p in args.sizes}
    for r in range(max(1, args.rounds)):
        for pixels in args.sizes:
            if r > 0 and not fits[pixels]:
                continue  # nothing to time against: one measurement of memory is enough
            modes = ["full", "tiled"] if fits[pixels] else ["tiled"]
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                results[pixels][mode].append(run_child(mode, pixels, args))
                m = results[pixels][mode][-1]
                print(f"  round {r + 1}: {pixels}² {mode:<5} {m['seconds']:8.2f} s  peak {m['peak'] / GIB:6.2f} GiB",
                      flush=True)

    summary = {"device": args.device, "dtype": args.dtype, "width": args.width, "tile": args.tile, "sizes": {}}
    print("\n  size    full peak   tiled peak   full s    tiled s   tiled/full time")
    for pixels in args.sizes:
        full, tiled = results[pixels]["full"], results[pixels]["tiled"]
        entry = {"tiled_peak": max(m["peak"] for m in tiled), "tiled_seconds": statistics.median(
            m["seconds"] for m in tiled)}
        if full:
            entry.update(full_peak=max(m["peak"] for m in full),
                         full_seconds=statistics.median(m["seconds"] for m in full),
                         time_ratio=statistics.median(t["seconds"] / f["seconds"] for t, f in zip(tiled, full)))
        summary["sizes"][pixels] = entry
        full_text = f"{entry['full_peak'] / GIB:8.2f}G" if full else "  too big"
        print(f"  {pixels:>5}²  {full_text:<11} {entry['tiled_peak'] / GIB:8.2f}G  "
              + (f"{entry['full_seconds']:8.2f}  " if full else f"{'-':>8}  ")
              + f"{entry['tiled_seconds']:8.2f}  " + (f"{entry['time_ratio']:8.3f}x" if full else ""))
    base = min((p for p in args.sizes if "full_peak" in summary["sizes"][p]), default=None)
    largest = max(args.sizes)
    if base is not None:
        ratio = summary["sizes"][largest]["tiled_peak"] / summary["sizes"][base]["full_peak"]
        summary["largest_tiled_vs_smallest_full_peak"] = ratio
        print(row(f"peak: tiled at {largest}² vs full at {base}²", ratio, 1.5 if (base, largest) == (1024, 4096)
                  else None))
    for pixels in args.sizes:
        if "time_ratio" in summary["sizes"][pixels]:
            print(row(f"time: tiled vs full at {pixels}²", summary["sizes"][pixels]["time_ratio"], 1.3))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
