"""What a step preview costs: x̂0 + the 16×3 RGB map (+ PIL, + PNG as the server streams it), and TAEF1, per image
size — against a DiT step of the parity tier's reduced config on the same machine (a real step is ~1000× that)
and, for TAEF1, against the real DiT's step by FLOP count.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/preview_bench.py [--sizes 256,512,1024] [--taef1-sizes 256,512]

Random weights (TAEF1 and DiT); medians of --repeats after one warm-up. Never part of the test pass/fail.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time

import mlx.core as mx
import numpy as np

from zimage_mlx.pipeline.preview import LatentRGB, Previewer, TinyDecoder, to_pil
from zimage_mlx.models.transformer import ZImageTransformer, ZImageTransformerConfig

REDUCED_DIT = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, cap_feat_dim=256, axes_dims=[16, 24, 24])
REAL_DIT_PARAMS = 6.15e9
CAPTION_TOKENS = 128


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def taef1_flops(size: int) -> float:
    """Multiply-adds × 2 of TAEF1's decoder for a size × size image (convs only)."""
    f, side = 0.0, size // 8
    f += 16 * 64 * 9 * side * side
    for stage in range(3):
        f += 3 * 3 * 64 * 64 * 9 * side * side       # three blocks of three 3×3 convs
        side *= 2
        f += 64 * 64 * 9 * side * side               # conv after the upsample
    f += 3 * 64 * 64 * 9 * side * side + 64 * 3 * 9 * side * side
    return 2 * f


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512,1024")
    ap.add_argument("--taef1-sizes", default="256,512")
    ap.add_argument("--dit-sizes", default="256,512")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    rows = []

    dit = ZImageTransformer(ZImageTransformerConfig(**REDUCED_DIT))
    mx.eval(dit.parameters())
    dit_ms = {}
    for s in [int(x) for x in args.dit_sizes.split(",")]:
        lat = mx.array(rng.standard_normal((1, 16, s // 8, s // 8)).astype(np.float32))
        cap = [mx.array(rng.standard_normal((CAPTION_TOKENS, 256)).astype(np.float32))]
        t = mx.array([0.5], dtype=mx.float32)
        dit_ms[s] = median_ms(lambda: mx.eval(dit(lat, t, cap)), max(3, args.repeats // 3))
        rows.append((f"reduced-config DiT step {s}²", f"{dit_ms[s]:.1f} ms", "(dim 256, 4 layers; the real one: dim 3840, 30 layers)"))

    for s in sizes:
        prev = mx.array(rng.standard_normal((1, 16, s // 8, s // 8)).astype(np.float32))
        cur = mx.array(rng.standard_normal((1, 16, s // 8, s // 8)).astype(np.float32))

        def linear_preview():
            p = Previewer(LatentRGB(), start=prev, start_sigma=0.9)
            return p(0, 0.8, cur)

        def with_png():
            buf = io.BytesIO()
            linear_preview().save(buf, format="PNG", compress_level=1)

        a, b = median_ms(linear_preview, args.repeats), median_ms(with_png, args.repeats)
        ref = f"{100 * b / dit_ms[s]:.1f}% of a reduced-config step" if s in dit_ms else ""
        rows.append((f"x̂0 + 16×3 map → PIL ({s // 8}² preview of {s}²)", f"{a:.2f} ms", f"+ PNG {b:.2f} ms  {ref}"))

    taef1 = TinyDecoder()
    mx.eval(taef1.parameters())
    for s in [int(x) for x in args.taef1_sizes.split(",") if x]:
        lat = mx.array(rng.standard_normal((1, 16, s // 8, s // 8)).astype(np.float32))
        ms = median_ms(lambda: to_pil(taef1(lat)[0]), max(3, args.repeats // 3))
        real_step = 2 * REAL_DIT_PARAMS * ((s // 16) ** 2 + CAPTION_TOKENS)
        rows.append((f"TAEF1 decode {s}²", f"{ms:.0f} ms",
                     f"{taef1_flops(s) / 1e9:.0f} GFLOP = {100 * taef1_flops(s) / real_step:.2f}% of a real DiT step's "
                     f"{real_step / 1e12:.1f} TFLOP"))
    for s in (1024,):
        real_step = 2 * REAL_DIT_PARAMS * ((s // 16) ** 2 + CAPTION_TOKENS)
        rows.append((f"TAEF1 decode {s}² (FLOPs only)", "",
                     f"{taef1_flops(s) / 1e9:.0f} GFLOP = {100 * taef1_flops(s) / real_step:.2f}% of a real DiT step's "
                     f"{real_step / 1e12:.1f} TFLOP"))

    print(f"preview_bench: {platform.machine()} {platform.system()}, MLX {mx.__version__} on {mx.default_device()}, "
          "float32")
    w = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{w}}  {value:>10}  {note}")


if __name__ == "__main__":
    main()
