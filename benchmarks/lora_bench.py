"""LoRA cost in zimage_mlx: per-step overhead of run-time side branches, load and switch time, memory per LoRA.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/lora_bench.py --device cpu --layers 2 --size 128
    python benchmarks/lora_bench.py --device gpu --dtype bfloat16 --layers 30 --size 1024

A full-width transformer (dim 3840, 30 heads, the real hidden sizes) with --layers main blocks and one refiner
block each, random weights (N(0, 0.02²)) made in MLX, optionally quantized with the package's policy. LoRAs are
rank --rank (alpha = rank / 2) on every linear of every block (to_q/k/v, to_out.0, w1/w2/w3, adaLN_modulation.0),
written as kohya .safetensors files and loaded through the public `ZImagePipeline.load_lora_weights` (the
transformer injected). A step is one transformer call for a 1-image batch at --size² with a 32-token caption,
the fastest of --repeats interleaved rounds after one warm-up. Never part of the test pass/fail.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import mlx.nn as nn

from zimage_mlx.lora.adapters import LoRAState, load_adapter
from zimage_mlx.lora.patches import LowRank
from zimage_mlx.pipeline.pipeline import ZImagePipeline
from zimage_mlx.loading.quantize import prepare_for_quantized_load
from zimage_mlx.sampler import SchedulerConfig
from zimage_mlx.models.transformer import ZImageTransformer, ZImageTransformerConfig

BLOCK_LINEARS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")


def random_model(layers: int, dtype: mx.Dtype, bits: int | None, seed: int = 0) -> ZImageTransformer:
    cfg = ZImageTransformerConfig(n_layers=layers, n_refiner_layers=1)
    model = ZImageTransformer(cfg)
    params = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        if p.ndim >= 2:
            v = mx.random.normal(p.shape, key=mx.random.key(seed * 100_003 + i)) * 0.02
        else:
            v = mx.ones(p.shape) if "norm" in name else mx.zeros(p.shape)
        params.append((name, v.astype(dtype)))
        mx.eval(params[-1][1])
    model.load_weights(params)
    if bits:
        prepare_for_quantized_load(model, bits, 64)   # quantizes the float layers in place with the policy
    mx.eval(model.parameters())
    return model


def write_lora(model, path: Path, rank: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    shapes = {}
    for prefix in ["layers", "noise_refiner"]:
        for i in range(len(getattr(model, prefix))):
            for lin in BLOCK_LINEARS:
                shapes[f"{prefix}.{i}.{lin}"] = None
    for i in range(len(model.context_refiner)):
        for lin in BLOCK_LINEARS[:-1]:
            shapes[f"context_refiner.{i}.{lin}"] = None
    modules = dict(model.named_modules())
    tensors = {}
    for target in shapes:
        m = modules[target]
        out_dim = m.weight.shape[0]
        in_dim = m.weight.shape[1] * (32 // m.bits if hasattr(m, "bits") else 1)
        k = "lora_unet_" + target.replace(".", "_")
        tensors[f"{k}.lora_down.weight"] = mx.array(rng.standard_normal((rank, in_dim), np.float32) * 0.01)
        tensors[f"{k}.lora_up.weight"] = mx.array(rng.standard_normal((out_dim, rank), np.float32) * 0.01)
        tensors[f"{k}.alpha"] = mx.array(rank / 2, dtype=mx.float32)
    mx.save_safetensors(str(path), tensors)
    return path


def step_fn(model, size: int):
    lat = mx.random.normal((1, 16, size // 8, size // 8), key=mx.random.key(1))
    cap = [mx.random.normal((32, 2560), key=mx.random.key(2)).astype(model.dtype)]
    t = mx.array([0.5])

    def step() -> float:
        t0 = time.perf_counter()
        mx.eval(model(lat, t, cap))
        return time.perf_counter() - t0

    return step


def lora_bytes(pipe) -> int:
    seen, total = set(), 0
    for a in pipe._lora.adapters.values():
        for p in a.patches:
            arrays = [p.down, *p.ups] if isinstance(p, LowRank) else [getattr(p, "w1", None), getattr(p, "w2", None),
                                                                         getattr(p, "tensor", None)]
            for x in arrays:
                if x is not None and id(x) not in seen:
                    seen.add(id(x))
                    total += x.nbytes
    return total


def run(args, bits, dtype, tmp: Path) -> list[dict]:
    """Base, 1 LoRA and 2 LoRAs timed in interleaved rounds, the fastest of each kept (on a shared machine the
    minimum is the least disturbed run), then fused (float)."""
    t0 = time.perf_counter()
    model = random_model(args.layers, dtype, bits)
    print(f"(random {bits or 'float'} model in {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    pipe = ZImagePipeline(tokenizer=None, scheduler_config=SchedulerConfig(), transformer=model)
    files = [write_lora(model, tmp / f"lora{i}.safetensors", args.rank, seed=i) for i in range(2)]
    step = step_fn(model, args.size)
    step()                                                    # warm-up
    times = {0: [], 1: [], 2: []}
    extra = {}
    for r in range(args.repeats):
        pipe.unload_lora_weights()
        times[0].append(step())
        mem0 = mx.get_active_memory()
        t0 = time.perf_counter()
        pipe.load_lora_weights(str(files[0]), adapter_name="a")
        extra.setdefault("load_s", time.perf_counter() - t0)
        extra.setdefault("active_mb", (mx.get_active_memory() - mem0) / 1e6)
        extra.setdefault("mem_mb", lora_bytes(pipe) / 1e6)
        extra.setdefault("file_mb", files[0].stat().st_size / 1e6)
        times[1].append(step())
        pipe.load_lora_weights(str(files[1]), adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.7, -0.4])
        times[2].append(step())
    t0 = time.perf_counter()
    for _ in range(10):
        pipe.set_adapters(["a"], [1.0])
        pipe.set_adapters(["a", "b"], [0.7, -0.4])
    switch_s = (time.perf_counter() - t0) / 20
    base = min(times[0])
    rows = [{"loras": 0, "step": base},
            {"loras": 1, "step": min(times[1]), **extra},
            {"loras": 2, "step": min(times[2]), "switch_s": switch_s}]
    if not bits:
        pipe.fuse_lora()
        rows.append({"loras": "2 fused", "step": min(step() for _ in range(args.repeats))})
        pipe.unfuse_lora()
    pipe.unload_lora_weights()
    for r in rows:
        r["overhead"] = r["step"] / base - 1
    return rows


class _OneLayer(nn.Module):
    """A model of one linear, for per-layer timings through LoRAState (the pipeline's adapter state)."""

    def __init__(self, layer, dtype):
        super().__init__()
        self.lin = layer
        self._dtype = dtype

    @property
    def dtype(self):
        return self._dtype

    def sanitize(self, weights):
        return weights


def layer_rows(dtype, bits, tokens: int, rank: int, repeats: int) -> list[dict]:
    """Per-layer overhead of 1 and 2 LoRAs on the DiT's three linear shapes: many short runs, fastest kept."""
    rows = []
    for n_in, n_out in ((3840, 3840), (3840, 10240), (10240, 3840)):
        lin = nn.Linear(n_in, n_out, bias=False)
        lin.set_dtype(dtype)
        if bits:
            lin = nn.QuantizedLinear.from_linear(lin, 64, bits)
        model = _OneLayer(lin, dtype)
        mx.eval(model.parameters())
        x = mx.random.normal((1, tokens, n_in)).astype(dtype)
        state = LoRAState()
        state.attach(model)

        for k in (1, 2):
            a = mx.random.normal((rank, n_in)) * 0.01
            b = mx.random.normal((n_out, rank)) * 0.01
            state.add(load_adapter({"lin.lora_A.weight": a, "lin.lora_B.weight": b}, model, dtype, f"a{k}"))
        weights = {0: {}, 1: {"a1": 1.0}, 2: {"a1": 1.0, "a2": 1.0}}
        times = {k: [] for k in weights}
        for _ in range(repeats):   # interleaved: the machine's speed drifts
            for k, w in weights.items():
                state.set_weights(w)   # weight 0: the branch is skipped, as without the LoRA
                mx.eval(model.lin(x))
                t0 = time.perf_counter()
                mx.eval(model.lin(x))
                times[k].append(time.perf_counter() - t0)
        base = min(times[0])
        out = {"shape": f"{n_in}→{n_out}", "base": base, 1: min(times[1]) / base - 1, 2: min(times[2]) / base - 1}
        rows.append(out)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="gpu" if mx.default_device() == mx.gpu else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--size", type=int, default=128, help="image size in pixels (tokens: (size/16)²)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (the fastest is kept)")
    ap.add_argument("--bits", default="none,4", help="comma list of none, 4, 8")
    ap.add_argument("--layer-tokens", type=int, default=256, help="tokens for the per-layer timings")
    ap.add_argument("--skip-model", action="store_true", help="per-layer timings only")
    args = ap.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    dtype = getattr(mx, args.dtype or ("bfloat16" if args.device == "gpu" else "float32"))
    print(f"# {platform.machine()} {platform.system()}, MLX {mx.__version__} {args.device}, {dtype}; dim 3840, "
          f"{args.layers} layers + 1 refiner each, {(args.size // 16) ** 2} image + 32 caption tokens, "
          f"rank-{args.rank} LoRAs on every block linear")
    print(f"\nper layer ({args.layer_tokens} tokens, fastest of {4 * args.repeats} runs):")
    print("| weights | layer | step (ms) | +1 LoRA | +2 LoRAs |")
    print("|---|---|---|---|---|", flush=True)
    for b in args.bits.split(","):
        bits = None if b == "none" else int(b)
        for r in layer_rows(dtype, bits, args.layer_tokens, args.rank, 4 * args.repeats):
            print(f"| {f'{bits}-bit' if bits else str(dtype).split('.')[-1]} | {r['shape']} | {r['base'] * 1e3:.1f} | "
                  f"{r[1]:+.1%} | {r[2]:+.1%} |", flush=True)
    if args.skip_model:
        return
    print("\nwhole model:")
    print("| weights | LoRAs | step (s) | overhead | load (s) | switch (ms) | LoRA memory (MB) |")
    print("|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.bits.split(","):
            bits = None if b == "none" else int(b)
            for r in run(args, bits, dtype, Path(tmp)):
                print(f"| {f'{bits}-bit' if bits else str(dtype).split('.')[-1]} | {r['loras']} | {r['step']:.3f} | "
                      f"{r['overhead']:+.1%} | {r.get('load_s', float('nan')):.2f} | "
                      f"{r.get('switch_s', float('nan')) * 1e3:.2f} | "
                      + (f"{r['mem_mb']:.0f} (active +{r['active_mb']:.0f}; file {r['file_mb']:.0f})"
                         if "mem_mb" in r else "") + " |", flush=True)


if __name__ == "__main__":
    main()
