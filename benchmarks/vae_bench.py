"""VAE decode: time and peak activation memory, tiled vs untiled (real FLUX VAE config, random MLX-side weights).

    python benchmarks/vae_bench.py --sizes 512 1024 --modes tiled untiled [--dtype float32] [--cpu]

Peak memory is `mx.get_peak_memory()` minus what was allocated before the decode (weights + latents).
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from zimage_mlx.vae import AutoencoderKL, VAEConfig


def bench(vae: AutoencoderKL, size: int, tiled: bool, checkpoint_bytes: int | None) -> tuple[float, float]:
    f = vae.config.scale_factor
    latents = mx.random.normal((1, vae.config.latent_channels, size // f, size // f), key=mx.random.key(0))
    mx.eval(latents)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t = time.perf_counter()
    img = vae.decode(latents, tile="auto" if tiled else None, checkpoint_bytes=checkpoint_bytes)
    mx.eval(img)
    dt = time.perf_counter() - t
    return dt, (mx.get_peak_memory() - base) / 2**30


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024])
    p.add_argument("--modes", nargs="+", default=["tiled", "untiled"], choices=["tiled", "untiled"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--checkpoint-mb", type=int, default=512, help="tiled decode: largest activation kept whole")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    if args.cpu:
        mx.set_default_device(mx.cpu)
    vae = AutoencoderKL(VAEConfig())
    vae.set_dtype(getattr(mx, args.dtype))
    mx.eval(vae.parameters())
    weights_gb = sum(v.nbytes for _, v in tree_flatten(vae.parameters())) / 2**30
    print(f"device {mx.default_device()}, dtype {args.dtype}, weights {weights_gb:.2f} GiB")
    print(f"{'size':>9} {'mode':>8} {'time s':>8} {'peak GiB':>9}")
    for size in args.sizes:
        for mode in args.modes:
            dt, peak = bench(vae, size, mode == "tiled", args.checkpoint_mb << 20)
            print(f"{size:>4}x{size:<4} {mode:>8} {dt:8.1f} {peak:9.2f}", flush=True)


if __name__ == "__main__":
    main()
