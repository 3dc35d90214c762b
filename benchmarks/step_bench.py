"""One DiT denoising step: time per step, GFLOP/s, compile warm-up and peak memory, for each speed change.

    python benchmarks/step_bench.py                              # issue 16's configuration (dim 1536, 6 layers, 512²)
    python benchmarks/step_bench.py --config full-width --size 1024 --layers 2
    python benchmarks/step_bench.py --baseline-rev dbdd36f       # also time an older commit's transformer (before)

Random weights (float32 on the CPU backend, bfloat16 on a GPU; --bits 4/8 quantizes them with the pipeline's policy
and, on the CPU, multiplies by the dequantized weights as the pipeline does there -- ZIMAGE_QUANTIZED_MATMUL=1 keeps
MLX's quantized_matmul instead), a 77-token caption, batch 1. Variants:
  per-call   the caption path (embedding, context refiner, RoPE tables) recomputed inside every step (the old way)
  prepared   `ZImageTransformer.prepare` once per generation, reused by every step (what the pipeline does)
  compiled   prepared + `mx.compile`d elementwise chains (ZImageTransformer.set_compile)
  fused      prepared + q/k/v and w1/w3 as one matmul each (ZImageTransformer.fuse_projections): what the pipeline
             runs on the CPU
  fused-compiled  fused + compiled: what the pipeline runs on a GPU
A baseline revision runs in a subprocess from a `git worktree` of that commit. Prints a table and writes JSON.

Side by side with mflux (issue 16): --mflux-python runs benchmarks/mflux_step.py under that interpreter, once per
--mflux-modes entry, each in its own process, with the same config, size, caption, repeats and device, and adds the
rows "mflux 0.24" (one eager forward of mflux's ZImageTransformer, which recomputes its caption path every call) and
"mflux 0.24 compiled" (the forward under mx.compile, as mflux's own denoising loop runs it), a "÷ mflux" column (each
row's step over mflux's eager step) and the ratios of our prepared/compiled/fused steps to mflux's. mflux is never a
dependency of zimage_mlx: give it its own venv. On Linux its wheel pins mlx[cuda13]==0.32.2, so install it without
dependencies over the system's MLX, plus the three small modules its transformer's imports need:

    python3 -m venv /tmp/mflux-venv --system-site-packages
    /tmp/mflux-venv/bin/pip install --no-deps mflux==0.24.0 platformdirs piexif toml
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/step_bench.py --mflux-python /tmp/mflux-venv/bin/python

A plain `pip install mflux==0.24.0` would also pull its full dependency set (on Linux mlx[cuda13] 0.32.2, torch,
opencv, matplotlib), none of which the step needs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    # issue 16's side-by-side configuration (zimage_mlx vs mflux vs diffusers on this CPU)
    "issue16": dict(dim=1536, n_heads=12, n_kv_heads=12, n_layers=6, n_refiner_layers=2, axes_dims=[32, 48, 48]),
    # the real width and heads, few layers
    "full-width": dict(dim=3840, n_heads=30, n_kv_heads=30, n_layers=2, n_refiner_layers=2, axes_dims=[32, 48, 48]),
}
REPO = Path(__file__).resolve().parents[1]


def step_flops(cfg: dict, image_tokens: int, caption_tokens: int, per_call: bool) -> float:
    """Matmul FLOPs of one step (batch 1): noise refiner on the image tokens, main layers on both, attention, and
    (per-call only) the context refiner on the caption."""
    d, hidden = cfg["dim"], int(cfg["dim"] / 3 * 8)
    pad = lambda n: n + (-n) % 32  # noqa: E731

    def block(s):
        return 2 * s * (4 * d * d + 3 * d * hidden) + 4 * s * s * d

    s_img, s_cap = pad(image_tokens), pad(caption_tokens)
    flops = cfg["n_refiner_layers"] * block(s_img) + cfg["n_layers"] * block(s_img + s_cap)
    if per_call:
        flops += cfg["n_refiner_layers"] * block(s_cap) + 2 * s_cap * 2560 * d
    return float(flops)


def run_variants(cfg: dict, size: int, caption_tokens: int, repeats: int, variants: list[str],
                 bits: int | None = None, group_size: int = 64) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from zimage_mlx.loading.quantize import dequantize_matmuls, should_quantize
    from zimage_mlx.models.transformer import ZImageTransformer, ZImageTransformerConfig

    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    model = ZImageTransformer(ZImageTransformerConfig(**cfg))
    params = [(k, (mx.random.normal(v.shape) * 0.02).astype(dtype)) for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten(params))
    del params     # the model holds the only references (fuse_projections frees the separate projections)
    mx.eval(model.parameters())
    if bits:       # the pipeline's policy (zimage_mlx/quantize.py)
        nn.quantize(model, group_size=group_size, bits=bits,
                    class_predicate=lambda path, m: should_quantize(path, m, group_size))
        mx.eval(model.parameters())
    dequantize = bits and mx.default_device() == mx.cpu and os.environ.get("ZIMAGE_QUANTIZED_MATMUL") != "1"
    lat = mx.random.normal((1, 16, size // 8, size // 8), key=mx.random.key(0))
    cap = [mx.random.normal((caption_tokens, 2560), key=mx.random.key(1)).astype(dtype)]
    t = mx.array([0.5])
    out = {}
    order = ["per-call", "prepared", "compiled", "fused", "fused-compiled"]   # fusing cannot be undone: last
    unknown = [v for v in variants if v not in order]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(order)})")
    for variant in sorted(variants, key=order.index):
        if variant != "per-call" and not hasattr(model, "prepare"):
            continue
        if variant.startswith("fused"):
            if not hasattr(model, "fuse_projections"):
                continue
            model.fuse_projections()
        if dequantize:     # as the pipeline does on the CPU (after fusing: fused layers are new QuantizedLinears)
            dequantize_matmuls(model)
        if hasattr(model, "set_compile"):
            model.set_compile(variant.endswith("compiled"))
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        captions = cap if variant == "per-call" else model.prepare(cap, size // 8, size // 8)
        mx.eval(model(lat, t, captions))
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mx.eval(model(lat, t, captions))
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        flops = step_flops(cfg, (size // 16) ** 2, caption_tokens, variant == "per-call")
        out[variant] = {"step_s": med, "min_s": min(times), "first_call_s": first, "warmup_s": first - med,
                        "gflops": flops / med / 1e9, "peak_gb": mx.get_peak_memory() / 1e9}
    return out


def baseline(rev: str, args) -> dict:
    """The same measurement on an older commit's transformer, in its own worktree and process."""
    tmp = Path(tempfile.mkdtemp(prefix="zimage-baseline-"))
    try:
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tmp / "wt"), rev], check=True,
                       capture_output=True)
        env = dict(os.environ, PYTHONPATH=str(tmp / "wt"))
        cmd = [sys.executable, __file__, "--config", args.config, "--size", str(args.size), "--caption-tokens",
               str(args.caption_tokens), "--repeats", str(args.repeats), "--variants", "per-call", "--json-only"]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])["per-call"]
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "wt")], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def mflux_rows(args, cfg: dict) -> dict:
    """mflux's transformer step at the same setting: benchmarks/mflux_step.py under --mflux-python, one process per
    mode. Rows carry the same fields as run_variants' (GFLOP/s counted with the caption path, which mflux runs every
    call)."""
    if cfg["n_kv_heads"] != cfg["n_heads"]:
        raise SystemExit("mflux's Z-Image transformer has no separate key/value head count")
    script = Path(__file__).resolve().with_name("mflux_step.py")
    cmd = [args.mflux_python, str(script), "--dim", str(cfg["dim"]), "--n-heads", str(cfg["n_heads"]),
           "--n-layers", str(cfg["n_layers"]), "--n-refiner-layers", str(cfg["n_refiner_layers"]),
           "--axes-dims", ",".join(map(str, cfg["axes_dims"])), "--size", str(args.size),
           "--caption-tokens", str(args.caption_tokens), "--repeats", str(args.repeats)]
    if args.device:
        cmd += ["--device", args.device]
    flops = step_flops(cfg, (args.size // 16) ** 2, args.caption_tokens, per_call=True)
    rows = {}
    for mode in args.mflux_modes.split(","):
        if mode not in ("eager", "compiled"):
            raise SystemExit(f"--mflux-modes: unknown mode {mode!r} (eager, compiled)")
        res = subprocess.run(cmd + (["--compile"] if mode == "compiled" else []), capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"mflux ({mode}) failed, exit {res.returncode}:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        name = "mflux " + ".".join(r["mflux"].split(".")[:2]) + ("" if mode == "eager" else " compiled")
        rows[name] = {"step_s": r["step_s"], "min_s": r["min_s"], "first_call_s": r["first_call_s"],
                      "warmup_s": r["first_call_s"] - r["step_s"], "gflops": flops / r["step_s"] / 1e9,
                      "peak_gb": r["peak_gb"], "mflux_version": r["mflux"], "mlx_version": r["mlx"]}
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=list(CONFIGS), default="issue16")
    ap.add_argument("--layers", type=int, default=None, help="override n_layers")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--caption-tokens", type=int, default=77)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="per-call,prepared,compiled,fused,fused-compiled")
    ap.add_argument("--baseline-rev", default=None, help="git revision to time as 'before' (per-call variant)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default=None)
    ap.add_argument("--bits", type=int, choices=[4, 8], default=None,
                    help="quantize the DiT (the pipeline's policy, group size 64) before timing")
    ap.add_argument("--mflux-python", default=None, metavar="PATH",
                    help="python of a venv with mflux (e.g. /tmp/mflux-venv/bin/python): also time mflux's step")
    ap.add_argument("--mflux-modes", default="eager,compiled",
                    help="mflux rows: eager (plain forward) and/or compiled (mx.compile, as mflux's loop runs it)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bits and (args.baseline_rev or args.mflux_python):
        ap.error("--bits times our quantized step only: not with --baseline-rev or --mflux-python")

    import mlx.core as mx

    if args.device == "gpu" and not mx.is_available(mx.gpu):
        ap.error("--device gpu: MLX has no GPU backend here (install mlx-cuda on Linux, or use --device cpu)")
    if args.device:
        mx.set_default_device(mx.cpu if args.device == "cpu" else mx.gpu)
    cfg = dict(CONFIGS[args.config])
    if args.layers:
        cfg["n_layers"] = args.layers
    results = run_variants(cfg, args.size, args.caption_tokens, args.repeats, args.variants.split(","), args.bits)
    if args.json_only:
        print(json.dumps(results))
        return
    if args.baseline_rev:
        results[f"before ({args.baseline_rev})"] = baseline(args.baseline_rev, args)
    mflux = mflux_rows(args, cfg) if args.mflux_python else {}
    results.update(mflux)
    ref = next((r["step_s"] for name, r in mflux.items() if not name.endswith("compiled")), None)
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, MLX {mx.__version__} {mx.default_device()}"
    print(f"\nDiT step, {args.config} config ({cfg['dim']} dim, {cfg['n_layers']} layers"
          f"{f', {args.bits}-bit' if args.bits else ''}), {args.size}², "
          f"{args.caption_tokens}-token caption, batch 1 — {machine}")
    print(f"{'variant':<22}{'step s':>9}{'min s':>9}{'warm-up s':>11}{'GFLOP/s':>10}{'peak GB':>9}"
          + (f"{'÷ mflux':>9}" if ref else ""))
    for name, r in results.items():
        print(f"{name:<22}{r['step_s']:>9.3f}{r['min_s']:>9.3f}{r['warmup_s']:>11.3f}{r['gflops']:>10.1f}"
              f"{r['peak_gb']:>9.2f}" + (f"{r['step_s'] / ref:>9.2f}" if ref else ""))
    ratios = {}
    for ours in ("prepared", "compiled", "fused", "fused-compiled"):
        for theirs in mflux:
            if ours in results:
                ratios[f"{ours} / {theirs}"] = results[ours]["step_s"] / mflux[theirs]["step_s"]
    if ratios:
        print("step ratios (issue 16 goal: ours ≤ 0.90 × mflux): "
              + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if args.json:
        args.json.write_text(json.dumps({"config": cfg, "size": args.size, "bits": args.bits, "machine": machine,
                                         "results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
