"""VAE decode: time and peak activation memory, tiled vs untiled (real FLUX VAE config, random MLX-side weights).

    python benchmarks/vae_bench.py --sizes 256 512 --modes tiled untiled [--repeats 2] [--dtype float32] [--cpu]
    python benchmarks/vae_bench.py --sizes 1024 2048 --modes tiled

Modes run back to back for each size and repeat (so a busy machine slows both alike); the table gives each run
and, per size, the ratio of the median tiled time (and process CPU time, less sensitive to other jobs on the
machine) to the median untiled one. Peak memory is
`mx.get_peak_memory()` minus what was allocated before the decode (weights + latents).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from zimage_mlx.models.vae import AutoencoderKL, VAEConfig


def bench(vae: AutoencoderKL, size: int, tile, checkpoint_bytes: int | None) -> tuple[float, float, float]:
    f = vae.config.scale_factor
    latents = mx.random.normal((1, vae.config.latent_channels, size // f, size // f), key=mx.random.key(0))
    mx.eval(latents)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t, cpu = time.perf_counter(), time.process_time()
    img = vae.decode(latents, tile=tile, checkpoint_bytes=checkpoint_bytes)
    mx.eval(img)
    dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    del img
    return dt, cpu, (mx.get_peak_memory() - base) / 2**30


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024])
    p.add_argument("--modes", nargs="+", default=["tiled", "untiled"], choices=["tiled", "untiled"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tile", type=int, default=None,
                   help="tiled decode: strip rows (default: decode's 'auto' height, also for sizes 'auto' leaves "
                        "untiled: 64² on the CPU, 256² on a GPU)")
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
    print(f"{'size':>9} {'mode':>8} {'time s':>8} {'CPU s':>8} {'peak GiB':>9}")
    for size in args.sizes:
        times = {m: [] for m in args.modes}
        for _ in range(args.repeats):
            for mode in args.modes:
                tile = (args.tile or max(8, 32768 // size)) if mode == "tiled" else None  # decode's "auto" strips
                dt, cpu, peak = bench(vae, size, tile, ckpt)
                times[mode].append((dt, cpu))
                print(f"{size:>4}x{size:<4} {mode:>8} {dt:8.1f} {cpu:8.1f} {peak:9.2f}", flush=True)
        if len(times) == 2:
            wall, cpu = ([statistics.median(t[i] for t in times[m]) for m in ("tiled", "untiled")] for i in (0, 1))
            print(f"{size:>4}x{size:<4} tiled / untiled (medians): time {wall[0] / wall[1]:.2f}, CPU time "
                  f"{cpu[0] / cpu[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
