"""Separate vs fused q/k/v and w1/w3 projections, interleaved A/B on one machine (same weights, same inputs).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python benchmarks/fuse_ab.py --size 512
    python benchmarks/fuse_ab.py --config full-width --size 512 --rounds 4

Two transformers with the same random weights, one fused with `ZImageTransformer.fuse_projections`; their prepared
steps alternate (A, B, A, B, ...) so that drift in a shared machine's speed hits both alike. Prints the medians, their
ratio and the max difference of the velocities (fusing is exact: 0 on the CPU backend).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from zimage_mlx.models.transformer import ZImageTransformer, ZImageTransformerConfig

CONFIGS = {"issue16": (1536, 12, 6), "full-width": (3840, 30, 2)}   # dim, heads, layers (+ 2 refiners)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=list(CONFIGS), default="issue16")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--caption-tokens", type=int, default=77)
    args = ap.parse_args()
    dim, heads, layers = CONFIGS[args.config]
    cfg = ZImageTransformerConfig(dim=dim, n_heads=heads, n_kv_heads=heads, n_layers=layers, n_refiner_layers=2)
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    separate, fused = ZImageTransformer(cfg), ZImageTransformer(cfg)
    params = [(k, (mx.random.normal(v.shape) * 0.02).astype(dtype)) for k, v in tree_flatten(separate.parameters())]
    separate.update(tree_unflatten(params))
    fused.update(tree_unflatten([(k, mx.array(v)) for k, v in params]))
    del params
    mx.eval(separate.parameters(), fused.parameters())
    fused.fuse_projections()
    n = args.size // 8
    lat = mx.random.normal((1, 16, n, n), key=mx.random.key(0))
    cap = [mx.random.normal((args.caption_tokens, cfg.cap_feat_dim), key=mx.random.key(1)).astype(dtype)]
    t = mx.array([0.5])
    runs = [(separate, separate.prepare(cap, n, n), []), (fused, fused.prepare(cap, n, n), [])]
    outs = [m(lat, t, c) for m, c, _ in runs]
    mx.eval(outs)
    diff = mx.abs(outs[0] - outs[1]).max().item()
    for _ in range(args.rounds):
        for model, captions, times in runs:
            t0 = time.perf_counter()
            mx.eval(model(lat, t, captions))
            times.append(time.perf_counter() - t0)
    a, b = (statistics.median(r[2]) for r in runs)
    print(f"{args.config} ({dim} dim, {layers} layers), {args.size}², {mx.default_device()}, {args.rounds} rounds: "
          f"separate {a:.3f} s, fused {b:.3f} s, fused / separate {b / a:.3f}; max velocity difference {diff:.1e}")


if __name__ == "__main__":
    main()
