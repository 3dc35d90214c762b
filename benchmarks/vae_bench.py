"""VAE decode: time and peak activation memory, tiled vs untiled (real FLUX VAE config, random MLX-side weights).

    python benchmarks/vae_bench.py --sizes 256 512 --modes tiled untiled [--repeats 2] [--dtype float32] [--cpu]
    python benchmarks/vae_bench.py --sizes 1024 2048 --modes tiled

Modes run back to back for each size and repeat (so a busy machine slows both alike); the table gives each run
and, per size, the ratio of the median tiled time to the median untiled time. Peak memory is
`mx.get_peak_memory()` minus what was allocated before the decode (weights + latents).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from zimage_mlx.vae import AutoencoderKL, VAEConfig


def bench(vae: AutoencoderKL, size: int, tile, checkpoint_bytes: int | None) -> tuple[float, float]:
    f = vae.config.scale_factor
    latents = mx.random.normal((1, vae.config.latent_channels, size // f, size // f), key=mx.random.key(0))
    mx.eval(latents)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t = time.perf_counter()
    img = vae.decode(latents, tile=tile, checkpoint_bytes=checkpoint_bytes)
    mx.eval(img)
    dt = time.perf_counter() - t
    del img
    return dt, (mx.get_peak_memory() - base) / 2**30


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024])
    p.add_argument("--modes", nargs="+", default=["tiled", "untiled"], choices=["tiled", "untiled"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tile", type=int, default=None, help="tiled decode: strip rows (default: decode's 'auto')")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--checkpoint-mb", type=int, default=None,
                   help="tiled decode: largest activation kept whole (default: no limit)")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    if args.cpu:
        mx.set_default_device(mx.cpu)
    vae = AutoencoderKL(VAEConfig())
    vae.set_dtype(getattr(mx, args.dtype))
    mx.eval(vae.parameters())
    weights_gb = sum(v.nbytes for _, v in tree_flatten(vae.parameters())) / 2**30
    ckpt = None if args.checkpoint_mb is None else args.checkpoint_mb << 20
    print(f"device {mx.default_device()}, MLX {mx.__version__}, dtype {args.dtype}, weights {weights_gb:.2f} GiB")
    print(f"{'size':>9} {'mode':>8} {'time s':>8} {'peak GiB':>9}")
    for size in args.sizes:
        times = {m: [] for m in args.modes}
        for _ in range(args.repeats):
            for mode in args.modes:
                tile = (args.tile or "auto") if mode == "tiled" else None
                dt, peak = bench(vae, size, tile, ckpt)
                times[mode].append(dt)
                print(f"{size:>4}x{size:<4} {mode:>8} {dt:8.1f} {peak:9.2f}", flush=True)
        if len(times) == 2:
            ratio = statistics.median(times["tiled"]) / statistics.median(times["untiled"])
            print(f"{size:>4}x{size:<4} tiled / untiled time (medians): {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
