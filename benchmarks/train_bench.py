"""A LoRA training step (forward + backward + AdamW update) against the inference step of the same transformer,
with and without gradient checkpointing, and the measured peak against memory.plan_training's prediction.

    python benchmarks/train_bench.py                       # full-width layers (dim 3840, 30 heads), 2+1+1 blocks, 512²
    python benchmarks/train_bench.py --layers 30 --refiner-layers 2 --size 1024 --bits 4     # the real model (a Mac)

Random weights (float32 on the CPU backend, bfloat16 on a GPU; --bits 4/8 quantizes them with the pipeline's
policy, dequantizing matmuls on the CPU as the pipeline does), a 77-token caption, batch 1, rank-32 LoRA on
to_q/k/v/out and w1/w2/w3 (the default targets), LoRATrainer as `zimage-mlx train` runs it. The inference step is
the pipeline's: captions prepared once, one transformer call. Goals (issue 21): train ≤ 2.3× inference without
checkpointing, ≤ 3.3× with it. Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(dim, heads, layers, refiners, bits, group_size=64):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from zimage_mlx.loading.quantize import dequantize_matmuls, should_quantize
    from zimage_mlx.models.transformer import ZImageTransformer, ZImageTransformerConfig

    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    head_dim = dim // heads
    axes = [head_dim - 2 * (head_dim * 3 // 8), head_dim * 3 // 8, head_dim * 3 // 8]
    cfg = ZImageTransformerConfig(dim=dim, n_heads=heads, n_kv_heads=heads, n_layers=layers,
                                  n_refiner_layers=refiners, axes_dims=axes)
    model = ZImageTransformer(cfg)
    model.update(tree_unflatten([(k, (mx.random.normal(v.shape) * 0.02).astype(dtype))
                                 for k, v in tree_flatten(model.parameters())]))
    mx.eval(model.parameters())
    if bits:
        nn.quantize(model, group_size=group_size, bits=bits,
                    class_predicate=lambda p, m: should_quantize(p, m, group_size))
        if mx.default_device() == mx.cpu:
            dequantize_matmuls(model)
        mx.eval(model.parameters())
    return model, dtype


def measure(args, checkpointing: bool) -> dict:
    import mlx.core as mx
    import numpy as np

    gc.collect()              # the previous configuration's model is gone before this one is measured
    mx.clear_cache()

    from zimage_mlx.memory import plan_training
    from zimage_mlx.sampler import SchedulerConfig
    from zimage_mlx.training import LoRATrainer

    model, dtype = build(args.dim, args.heads, args.layers, args.refiner_layers, args.bits)
    h = args.size // 8
    x0 = mx.random.normal((1, 16, h, h), key=mx.random.key(0))
    cap = [mx.random.normal((args.caption_tokens, 2560), key=mx.random.key(1)).astype(dtype)]

    # inference step: as the pipeline runs it (captions prepared once per generation)
    prepared = model.prepare(cap, h, h)
    mx.eval(model(x0, mx.array([0.5]), prepared))
    infer = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        mx.eval(model(x0, mx.array([0.5]), prepared))
        infer.append(time.perf_counter() - t0)
    del prepared

    pipe = SimpleNamespace(transformer=model, scheduler_config=SchedulerConfig())
    trainer = LoRATrainer(pipe, rank=args.rank, gradient_checkpointing=checkpointing)
    noise, sigmas = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32), [0.5]
    trainer.step(x0, cap, noise, sigmas)        # warm-up (optimizer state allocated)
    mx.clear_cache()
    mx.reset_peak_memory()
    train = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        trainer.step(x0, cap, noise, sigmas)
        train.append(time.perf_counter() - t0)
    peak = mx.get_peak_memory()
    config = dict(dim=args.dim, n_heads=args.heads, n_layers=args.layers, n_refiner_layers=args.refiner_layers)
    plan = plan_training(config, dtype, args.bits, args.size, args.rank, checkpointing=checkpointing,
                         budget=1 << 50)
    ti, tt = statistics.median(infer), statistics.median(train)
    return {"checkpointing": checkpointing, "inference_s": ti, "train_s": tt, "ratio": tt / ti,
            "peak_gb": peak / 1e9, "planned_gb": plan.peak / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=3840)
    p.add_argument("--heads", type=int, default=30)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--refiner-layers", type=int, default=1)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--caption-tokens", type=int, default=77)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--bits", type=int, choices=[4, 8], default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import mlx.core as mx

    rows = [measure(args, c) for c in {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]]
    device = f"{platform.machine()} {mx.default_device()} (MLX {mx.__version__})"
    print(f"train_bench: dim {args.dim}, {args.layers}+{args.refiner_layers}+{args.refiner_layers} blocks, "
          f"{args.size}², rank {args.rank}, bits {args.bits or 'float'}, {device}")
    print(f"{'checkpointing':>14} {'inference s':>12} {'train s':>9} {'ratio':>6} {'goal':>5} {'peak GB':>8} "
          f"{'plan GB':>8}")
    for r in rows:
        goal = 3.3 if r["checkpointing"] else 2.3
        print(f"{'on' if r['checkpointing'] else 'off':>14} {r['inference_s']:12.3f} {r['train_s']:9.3f} "
              f"{r['ratio']:6.2f} {goal:5.1f} {r['peak_gb']:8.2f} {r['planned_gb']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
