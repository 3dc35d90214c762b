"""Tensor- and data-parallel DiT steps on 2 local processes (`mlx.launch -n 2`, ring backend over loopback) vs one
process; bytes exchanged per step (every all_sum / all_gather payload counted); projected Thunderbolt-5 time.

    python benchmarks/distributed_bench.py                      # full width (dim 3840, 30 heads), 2 layers, 256²
    python benchmarks/distributed_bench.py --size 512 --layers 2 --steps 3

The driver times one process itself, then runs this file under `mlx.launch -n 2 --backend ring` (loopback), and
prints one table. Random weights (float32 on the CPU backend, bfloat16 on a GPU), the same on every rank (same
seed) so the tensor-parallel velocity is compared with one process's; a 64-token caption; batch 1 per process.

  tensor  the DiT split across both processes (distributed.shard_model): 2 all_sums of (tokens, dim) per block
  data    each process runs its own image with the whole model; throughput = images per second over both

Projection: a tensor-parallel step on two Macs ≈ (one process's step) / 2 + exchange time, exchange time =
wire bytes / bandwidth + all_sums × latency; wire bytes per process = 2 (N-1)/N × payload (ring all_sum). The
bandwidth and latency are assumptions, printed with the result (--bandwidth-gbs, --latency-us).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zimage_mlx.loading.components import build_model  # noqa: E402
from zimage_mlx.distributed import init_group, shard_model  # noqa: E402

FULL_WIDTH = dict(dim=3840, n_heads=30, n_kv_heads=30, n_refiner_layers=1, axes_dims=[32, 48, 48], cap_feat_dim=2560)
CAPTION_TOKENS = 64


def build(layers: int, dtype: mx.Dtype):
    mx.random.seed(0)      # the same weights on every rank
    model = build_model("transformer", {**FULL_WIDTH, "n_layers": layers})
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    mx.eval(model.parameters())
    return model


def inputs(size: int, dtype: mx.Dtype, seed: int = 1):
    h = w = size // 8
    key = mx.random.key(seed)
    x = mx.random.normal((1, 16, h, w), key=key).astype(dtype)
    cap = mx.random.normal((CAPTION_TOKENS, FULL_WIDTH["cap_feat_dim"]), key=mx.random.split(key)[1]).astype(dtype)
    return x, cap


class Counter:
    """Counts the payload bytes of every all_sum / all_gather while active (the layers look them up per call)."""

    def __init__(self):
        self.bytes, self.calls = 0, 0
        self._orig = {}

    def __enter__(self):
        for name in ("all_sum", "all_gather"):
            orig = self._orig[name] = getattr(mx.distributed, name)

            def counted(x, *a, _orig=orig, **k):
                self.bytes += x.nbytes
                self.calls += 1
                return _orig(x, *a, **k)

            setattr(mx.distributed, name, counted)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(mx.distributed, name, orig)


def time_steps(model, size: int, steps: int, dtype: mx.Dtype, seed: int = 1) -> tuple[float, mx.array]:
    x, cap = inputs(size, dtype, seed)
    captions = model.prepare([cap], x.shape[2], x.shape[3])
    t = mx.array([0.5])
    v = model(x, t, captions)
    mx.eval(v)                     # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        v = model(x, t, captions)
        mx.eval(v)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), v


def one_process(args, dtype) -> dict:
    model = build(args.layers, dtype)
    weights = mx.get_active_memory()
    step, v = time_steps(model, args.size, args.steps, dtype)
    np.save(args.out / "v-one.npy", np.array(v.astype(mx.float32)))
    return {"step": step, "weights": weights}


def worker(args, dtype) -> None:
    group = init_group()
    model = build(args.layers, dtype)
    # data: each rank its own image (seed 1 + rank), whole model
    group_barrier(group)
    t0 = time.perf_counter()
    step_data, _ = time_steps(model, args.size, args.steps, dtype, seed=1 + group.rank())
    group_barrier(group)
    data_wall = time.perf_counter() - t0
    # tensor: split in place; copying the parts frees the full weights (a slice is a view that would keep them)
    shard_model("transformer", model, group)
    model.update(tree_map(mx.array, model.parameters()))
    mx.eval(model.parameters())
    mx.clear_cache()
    weights = mx.get_active_memory()
    step_tensor, v = time_steps(model, args.size, args.steps, dtype)
    x, cap = inputs(args.size, dtype)
    captions = model.prepare([cap], x.shape[2], x.shape[3])
    with Counter() as c:
        mx.eval(model(x, mx.array([0.5]), captions))
    if group.rank() == 0:
        np.save(args.out / "v-tensor.npy", np.array(v.astype(mx.float32)))
        (args.out / "two.json").write_text(json.dumps({
            "step_tensor": step_tensor, "weights_tensor": weights, "payload": c.bytes, "collectives": c.calls,
            "step_data": step_data, "data_wall": data_wall, "images_data": group.size() * (args.steps + 1)}))


def group_barrier(group) -> None:
    mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (tokens = (size/16)²)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median), after one warm-up")
    ap.add_argument("--bandwidth-gbs", type=float, default=8.0,
                    help="assumed Thunderbolt-5 bandwidth in GB/s (80 Gb/s = 10 GB/s raw, minus overhead)")
    ap.add_argument("--latency-us", type=float, default=50.0, help="assumed time per all_sum round trip, µs")
    ap.add_argument("--out", type=Path, default=Path("/tmp/zimage_distributed_bench"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    if args.worker:
        return worker(args, dtype)

    one = one_process(args, dtype)
    cmd = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()", "-n", "2", "--backend",
           "ring", "--starting-port", str(free_port()), "--", sys.executable, str(Path(__file__).resolve()),
           "--worker", "--size", str(args.size), "--layers", str(args.layers), "--steps", str(args.steps),
           "--out", str(args.out)]
    subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    two = json.loads((args.out / "two.json").read_text())
    v1, v2 = np.load(args.out / "v-one.npy"), np.load(args.out / "v-tensor.npy")
    rel = float(np.abs(v1 - v2).max() / np.abs(v1).max())

    tokens = (args.size // 16) ** 2
    wire = two["payload"] * 2 * (2 - 1) / 2
    comm = wire / (args.bandwidth_gbs * 1e9) + two["collectives"] * args.latency_us * 1e-6
    gb = 1e9
    print(f"\nDiT step, dim {FULL_WIDTH['dim']}, {args.layers} layers + {FULL_WIDTH['n_refiner_layers']} refiner, "
          f"{args.size}x{args.size} ({tokens} image + {CAPTION_TOKENS} caption tokens), {dtype}, "
          f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, MLX {mx.__version__} "
          f"({mx.default_device()}); median of {args.steps} steps\n")
    rows = [
        ("1 process", f"{one['step']:.2f} s", f"{one['weights'] / gb:.2f} GB", "-", "-", f"{1 / one['step']:.2f}"),
        ("tensor, 2 processes (loopback)", f"{two['step_tensor']:.2f} s", f"{two['weights_tensor'] / gb:.2f} GB",
         f"{two['payload'] / 1e6:.1f} MB in {two['collectives']}", f"{rel:.1e}", f"{1 / two['step_tensor']:.2f}"),
        ("data, 2 processes (loopback)", f"{two['step_data']:.2f} s", f"{one['weights'] / gb:.2f} GB", "-", "-",
         f"{two['images_data'] / two['data_wall']:.2f}"),
    ]
    head = ("mode", "step", "weights/process", "all_sum payload/step", "rel. err", "images/s")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"\nper process and step on the wire (ring all_sum, 2 processes): {wire / 1e6:.1f} MB; over Thunderbolt 5 "
          f"at an assumed {args.bandwidth_gbs:g} GB/s and {args.latency_us:g} µs per all_sum: {comm * 1e3:.0f} ms")
    print(f"projected tensor-parallel step on two machines: {one['step'] / 2:.2f} s (half of one process's compute) "
          f"+ {comm:.3f} s exchange = {one['step'] / 2 + comm:.2f} s vs {one['step']:.2f} s on one")
    # 2 all_sums of (tokens, dim) per block; the context refiner runs once per generation (prepare), not per step
    blocks = args.layers * (tokens + CAPTION_TOKENS) + FULL_WIDTH["n_refiner_layers"] * tokens
    formula = 2 * blocks * FULL_WIDTH["dim"] * dtype.size
    real = 2 * (30 * (4096 + 128) + 2 * 4096) * 3840 * 2
    real_comm = real / (args.bandwidth_gbs * 1e9) + 64 * args.latency_us * 1e-6
    print(f"payload check: 2 x (tokens x blocks) x dim x {dtype.size} B = {formula / 1e6:.1f} MB (measured "
          f"{two['payload'] / 1e6:.1f} MB)")
    print(f"the real model at 1024² (30 blocks over 4096 image + 128 caption tokens, 2 refiner blocks over 4096, "
          f"bfloat16): {real / 1e9:.2f} GB payload in 64 all_sums per step, {real_comm:.2f} s exchange per step at "
          f"{args.bandwidth_gbs:g} GB/s")

if __name__ == "__main__":
    main()
