"""Unified-memory planning: bits per component and stage order from the machine's memory and the image size.

`plan_memory` reads the machine's memory (Metal's recommended working set on macOS, /proc/meminfo elsewhere),
predicts the peak of each stage (encode, denoise, decode) for each candidate precision, and picks the best that
fits. Weight sizes come from the real module shapes (`components.build_model`, nothing evaluated); activation
sizes are calibrated formulas (benchmarks/vae_bench.py, benchmarks/weights_bench.py).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .loading.components import MODEL_COMPONENTS, build_model
from .distributed import is_split
from .loading.quantize import COMPONENTS, describe_bits, parse_quantize, should_quantize
from .models.transformer import feed_forward_width
from .models.vae_tiling import auto_tile, largest_decoder_activation


# --------------------------------------------------------------------------- sizes
def weight_bytes(model: nn.Module, bits: int | None, group_size: int, dtype: mx.Dtype, name: str = "",
                 shards: int = 1) -> int:
    """Bytes of `model`'s parameters once loaded in `dtype` and (optionally) quantized with the policy; with
    `shards` > 1, what one rank of a tensor-parallel group holds of component `name` (distributed.is_split).

    Works on an un-evaluated model (only shapes are read), so the real 6B config costs nothing to size.
    """
    total = 0
    quantizable = set()
    if bits:
        for path, m in model.named_modules():
            if should_quantize(path, m, group_size):
                quantizable.add(path + ".weight")
    for key, p in tree_flatten(model.parameters()):
        n = math.prod(p.shape)
        if shards > 1 and is_split(name, key):
            n //= shards
        if key in quantizable:
            total += n * bits // 8 + 2 * (n // group_size) * dtype.size
        else:
            total += n * dtype.size
    return total


# --------------------------------------------------------------------------- machine memory
def machine_memory_bytes() -> tuple[int, str]:
    """(bytes usable by MLX, where the number came from)."""
    if sys.platform == "darwin":
        try:
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            ws = int(info.get("max_recommended_working_set_size", 0))
            if ws:
                return ws, "Metal recommended working set"
        except Exception:  # noqa: BLE001 - fall back to the total memory
            pass
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.75), "75% of physical memory"
        except (ValueError, OSError):
            pass
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
        if "MemAvailable" in info:
            return info["MemAvailable"], "MemAvailable in /proc/meminfo"
        return info["MemTotal"], "MemTotal in /proc/meminfo"
    except (OSError, KeyError, ValueError):
        return 16 * 2**30, "unknown (assumed 16 GiB)"


@dataclass
class MemoryPlan:
    bits: dict[str, int | None]
    group_size: int
    free_text_encoder_first: bool
    predicted_peak: int
    available: int
    source: str
    stages: dict[str, int] = field(default_factory=dict)
    free_transformer_before_decode: bool = False
    cpu: bool = False          # planned for MLX's CPU backend (SDPA materializes the attention scores there)
    shards: dict[str, int] = field(default_factory=dict)   # {component: tensor-parallel processes it is split over}

    @property
    def order(self) -> tuple[bool, bool]:
        return self.free_text_encoder_first, self.free_transformer_before_decode

    def summary(self) -> str:
        gb = 1e9
        steps = ["encode, free the text encoder, then load the transformer" if self.free_text_encoder_first
                 else "keep both models loaded"]
        if self.free_transformer_before_decode:
            steps.append("free the transformer before decoding (it reloads for the next image)")
        steps = [f"{n.replace('_', ' ')} split over {k} processes" for n, k in self.shards.items()] + steps
        per = " per process" if self.shards else ""
        return (f"memory plan: {describe_bits(self.bits)} (group {self.group_size}); {'; '.join(steps)}; predicted "
                f"peak {self.predicted_peak / gb:.1f} GB{per} of {self.available / gb:.1f} GB available "
                f"({self.source})")


# --------------------------------------------------------------------------- planning
# Candidate precisions, best quality first: (transformer bits, text-encoder bits).
CANDIDATES = ((None, None), (None, 8), (8, 8), (4, 8), (4, 4))
HEADROOM = 0.95          # plan to use at most this share of the available memory
OVERHEAD = 0.15e9        # tokenizer, latents, RoPE tables, allocator slack
ENCODE_TOKENS = 512      # plan for the longest prompt


def component_weight_bytes(name: str, config: dict, dtype: mx.Dtype, bits: int | None, group_size: int,
                           shards: int = 1) -> int:
    quantized = name in COMPONENTS or name == "controlnet"
    return weight_bytes(build_model(name, config), bits if quantized else None, group_size, dtype, name, shards)


def component_bits(name: str, bits: dict) -> int | None:
    """A ControlNet is stored like the transformer it steers."""
    return bits.get("transformer") if name == "controlnet" else bits.get(name)


def planned_components(configs: dict) -> tuple[str, ...]:
    """The three models, plus the ControlNet when one is loaded."""
    return MODEL_COMPONENTS + (("controlnet",) if "controlnet" in configs else ())


def size_multiple(configs: dict) -> int:
    """Pixels per DiT patch side: the VAE factor 2 ** (len(block_out_channels) - 1) × the patch size 2."""
    return 2 * 2 ** (len(configs["vae"].get("block_out_channels", (128, 256, 512, 512))) - 1)


def image_tokens(configs: dict, height: int, width: int) -> int:
    """DiT image tokens: one per patch."""
    m = size_multiple(configs)
    return (height // m) * (width // m)


def dit_activation_bytes(config: dict, dtype: mx.Dtype, tokens: int, caption_tokens: int = 128,
                         cpu: bool | None = None, shards: int = 1) -> int:
    """Live activations of one DiT block for `tokens` image tokens (hidden states, q/k/v, float32 RoPE, SwiGLU),
    plus the attention score matrix where SDPA materializes it (MLX's CPU backend). With `shards` tensor-parallel
    processes each holds 1/shards of the heads and of the SwiGLU width (the hidden states stay whole)."""
    dim = config.get("dim", 3840)
    heads = config.get("n_heads", 30) // shards
    hidden = feed_forward_width(dim) // shards
    s = tokens + caption_tokens
    s += -s % 32
    b = dtype.size
    act = s * (dim * 12 * b + hidden * 4 * b)
    if cpu if cpu is not None else mx.default_device() == mx.cpu:
        act += heads * s * s * 4 * 2
    return act


def controlnet_activation_bytes(config: dict, dtype: mx.Dtype, tokens: int, caption_tokens: int = 128) -> int:
    """What a ControlNet keeps alive during a DiT step: one hint per control layer over the unified sequence, plus
    the control stream (its blocks' own activations are the DiT block's, and run one at a time)."""
    s = tokens + caption_tokens
    s += -s % 32
    return (len(config.get("control_layers_places", [])) + 1) * s * config.get("dim", 3840) * dtype.size


def text_encoder_activation_bytes(config: dict, dtype: mx.Dtype, tokens: int = ENCODE_TOKENS) -> int:
    h = config.get("hidden_size", 2560)
    inter = config.get("intermediate_size", 9728)
    heads = config.get("num_attention_heads", 32)
    return tokens * (h * 8 + inter * 4) * dtype.size + heads * tokens * tokens * 4 * 2


def vae_decode_activation_bytes(config: dict, height: int, width: int, dtype: mx.Dtype = mx.float32,
                                cpu: bool | None = None) -> int:
    """VAE decode activations, calibrated on the real config (float32, MLX CPU backend, vae_bench.py). Untiled
    (vae.auto_tile's small images): ≈ 39.4 kB per output pixel, scaled by the dtype size and by the width of the
    first decoder stage relative to FLUX's 512. Tiled: the decoder's whole activations, 1.05 x the largest (FLUX: 256
    channels at full size, 1 GiB at 1024² in float32), plus 9.5 x one strip's input (decode's "auto" strips:
    32768 // width rows, at most the image's, of the output's channels; measured 0.09 / 0.21 / 0.40 / 1.18 GiB at
    128² / 256² / 512² / 1024²)."""
    ch = config.get("block_out_channels", [128, 256, 512, 512])
    tile = auto_tile(height, width, cpu)
    if tile:
        f = 2 ** (len(ch) - 1)
        largest = largest_decoder_activation(ch, 1, height // f, width // f, dtype.size)
        strip = min(tile, height) * width * ch[0] * dtype.size
        return int(1.05 * largest + 9.5 * strip)
    return int(39.4e3 * height * width * dtype.size / 4 * ch[-1] / 512)


def dequantized_weights_bytes(name: str, config: dict, dtype: mx.Dtype) -> int:
    """On MLX's CPU backend a quantized model multiplies by dequantized weights (quantize.DequantizingLinear): the
    float copies in flight peak below 7x one feed-forward weight in float, whatever the depth (measured in float32
    above the weights: Qwen3 encoder 0.61 GB, DiT 0.82 GB; this gives 0.70 and 1.10)."""
    if name == "text_encoder":
        dim, hidden = config.get("hidden_size", 2560), config.get("intermediate_size", 9728)
    else:
        dim = config.get("dim", 3840)
        hidden = feed_forward_width(dim)
    return 7 * dim * hidden * dtype.size


def _stages(configs: dict, dtype: mx.Dtype, w: dict, height: int, width: int, order: tuple[bool, bool],
            batch: int = 1, cpu: bool | None = None, shards: dict | None = None,
            bits: dict | None = None) -> dict[str, int]:
    """Peak bytes per stage. order = (free the text encoder before the transformer loads, free the transformer
    before the VAE decode); `w` and the result are per process when `shards` splits components; bits: the
    quantization (on the CPU a quantized component adds its dequantized weights in flight)."""
    free_te, free_dit = order
    cpu = (mx.default_device() == mx.cpu) if cpu is None else cpu

    def dequantized(name: str) -> int:   # tensor-parallel shards keep MLX's quantized_matmul
        quantized = component_bits(name, bits or {}) and (shards or {}).get(name, 1) == 1
        return dequantized_weights_bytes(name, configs[name], dtype) if cpu and quantized else 0
    te_resident = 0 if free_te else w["text_encoder"]
    tokens = image_tokens(configs, height, width)
    dit = dit_activation_bytes(configs["transformer"], dtype, tokens, cpu=cpu,
                               shards=(shards or {}).get("transformer", 1)) * batch
    dit_weights = w["transformer"] + w.get("controlnet", 0)   # a ControlNet lives and goes with the transformer
    if "controlnet" in configs:
        dit += controlnet_activation_bytes(configs["controlnet"], dtype, tokens) * batch
    return {
        "encode": int(w["text_encoder"] + text_encoder_activation_bytes(configs["text_encoder"], dtype)
                      + dequantized("text_encoder") + OVERHEAD),
        "denoise": int(te_resident + dit_weights + dit + dequantized("transformer") + OVERHEAD),
        "decode": int(te_resident + (0 if free_dit else dit_weights) + w["vae"]
                      + vae_decode_activation_bytes(configs["vae"], height, width, dtype, cpu) + OVERHEAD),
        **{f"weights_{n}": v for n, v in w.items()},
    }


def predict_stages(configs: dict, dtype: mx.Dtype, bits: dict, group_size: int, height: int, width: int,
                   free_text_encoder: bool = True, batch: int = 1, free_transformer: bool = False,
                   cpu: bool | None = None, shards: dict | None = None) -> dict[str, int]:
    """Predicted peak bytes of each stage (encode, denoise, decode) and the weights of each component (per process
    when `shards` = {component: processes} splits components for tensor parallelism)."""
    shards = shards or {}
    w = {n: component_weight_bytes(n, configs[n], dtype, component_bits(n, bits), group_size, shards.get(n, 1))
         for n in planned_components(configs)}
    return _stages(configs, dtype, w, height, width, (free_text_encoder, free_transformer), batch, cpu, shards, bits)


def _weights(stages: dict) -> dict[str, int]:
    return {n[len("weights_"):]: v for n, v in stages.items() if n.startswith("weights_")}


def _peak(stages: dict) -> int:
    return max(stages["encode"], stages["denoise"], stages["decode"])


def check_fits(configs: dict, dtype: mx.Dtype, plan: MemoryPlan, height: int, width: int, batch: int = 1) -> None:
    """Re-check `plan` for a height × width generation of `batch` images; MemoryError (naming the largest square
    size that fits) when it cannot fit the memory the plan was made for."""
    w = _weights(plan.stages)

    def peak(h, wd, b=batch):
        return _peak(_stages(configs, dtype, w, h, wd, plan.order, b, plan.cpu, plan.shards, plan.bits))

    budget = plan.available * HEADROOM
    need = peak(height, width)
    if need <= budget:
        return
    side = _largest_square(configs, lambda h, wd: peak(h, wd, 1), budget)
    fits = f"the largest square image that fits is about {side}x{side}" if side else "not even the smallest size fits"
    raise MemoryError(
        f"{width}x{height}{f' x {batch} images' if batch > 1 else ''} needs about {need / 1e9:.1f} GB, but "
        f"{plan.available / 1e9:.1f} GB are available ({plan.source}) with {describe_bits(plan.bits)}; {fits}"
        f"{' (or make fewer images at once)' if batch > 1 else ''}"
    )


def _largest_square(configs: dict, peak, budget: float) -> int:
    """The largest square side (a multiple of the size multiple, up to 16384) whose predicted peak fits."""
    m = size_multiple(configs)
    lo, hi = 0, 16384 // m
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if peak(mid * m, mid * m) <= budget else (lo, mid - 1)
    return lo * m


# Stage orders (free the text encoder before the transformer loads, free the transformer before the VAE decode),
# by what the caller does with the text encoder (`keep_text_encoder`: True keeps it, False frees it after encoding,
# None lets the plan keep it when it fits); per entry: the orders tried first, then the last resorts (a transformer
# reload per image).
ORDERS = {
    None: (((False, False), (True, False)), ((True, True),)),
    False: (((True, False),), ((True, True),)),
    True: (((False, False),), ((False, True),)),
}


def plan_memory(configs: dict, dtype: mx.Dtype, requested="auto", height: int = 1024, width: int = 1024,
                group_size: int = 64, available: int | None = None, source: str | None = None,
                cpu: bool | None = None, shards: dict[str, int] | None = None,
                keep_text_encoder: bool | None = None) -> MemoryPlan:
    """Choose bits per component (for "auto") and the stage order (ORDERS) that fit the memory.

    keep_text_encoder: what the pipeline will do with the text encoder after encoding (False: free it, True: keep
    it, None: keep it when that fits), so the plan predicts the stages the calls run.

    requested: anything `quantize.parse_quantize` reads ("auto", None, 4, 8, per-model dict). Raises MemoryError with a
    clear message when even 4-bit cannot fit an "auto" plan. cpu: plan for MLX's CPU backend (default: whether it
    is the default device). shards: {component: processes} for tensor parallelism; each machine holds its share
    and `available` is one machine's memory.
    """
    shards = {n: k for n, k in (shards or {}).items() if k > 1}
    if available is None:
        available, source = machine_memory_bytes()
    cpu = (mx.default_device() == mx.cpu) if cpu is None else cpu
    budget = available * HEADROOM
    requested = parse_quantize(requested)
    candidates = [dict(zip(COMPONENTS, c)) for c in CANDIDATES] if requested == "auto" else [requested]
    weights = [{n: component_weight_bytes(n, configs[n], dtype, component_bits(n, bits), group_size,
                                          shards.get(n, 1)) for n in planned_components(configs)}
               for bits in candidates]
    best = None
    # Quality first: every precision with the models kept through the decode; freeing the transformer before the
    # decode (a reload per image) only when nothing fits otherwise.
    for orders in ORDERS[keep_text_encoder]:
        for bits, w in zip(candidates, weights):
            for order in orders:
                st = _stages(configs, dtype, w, height, width, order, 1, cpu, shards, bits)
                plan = MemoryPlan(bits, group_size, order[0], _peak(st), available, source or "", st, order[1], cpu,
                                  shards)
                if plan.predicted_peak <= budget:
                    return plan
                if best is None or plan.predicted_peak < best.predicted_peak:
                    best = plan
    if requested == "auto":
        w = _weights(best.stages)
        side = _largest_square(
            configs, lambda h, wd: _peak(_stages(configs, dtype, w, h, wd, best.order, 1, cpu, shards, best.bits)),
            budget)
        smaller = f"the largest square image that fits at 4-bit is about {side}x{side}" if side else \
            "close other apps"
        smaller += " (or split the model across several Macs: parallel='tensor' under mlx.launch)"
        raise MemoryError(
            f"Z-Image does not fit in this machine's memory even at 4-bit: it needs about "
            f"{best.predicted_peak / 1e9:.1f} GB at {width}x{height}, {available / 1e9:.1f} GB are available "
            f"({source}); {smaller}."
        )
    return best


# --------------------------------------------------------------------------- training
# Saved-for-backward bytes per token of one DiT block, in units of dim and of the SwiGLU width (the block's inputs,
# norms, modulated inputs, q/k/v and their float32 RoPE copies, attention output, residuals; w1/w3 outputs, SiLU,
# product), and the LoRA's parameters, gradients and two AdamW moments (float32): docs/training.md.
TRAIN_DIM_FACTOR = 20
TRAIN_HIDDEN_FACTOR = 4
LORA_TRAIN_COPIES = 4
# With checkpointing, the block being differentiated holds its recomputed activations and their gradients:
# benchmarks/train_bench.py at full width (dim 3840, 2+1+1 blocks, 512², float32) measured 4.49 GB against 4.16 GB
# planned with one block's activations, 5.42 GB against 5.71 GB without checkpointing.
RECOMPUTED_BLOCKS = 1.6


@dataclass
class TrainingPlan:
    weights: int
    lora: int
    activations: int
    peak: int
    budget: int
    gradient_checkpointing: bool

    def summary(self) -> str:
        return (f"training memory plan: weights {self.weights / 1e9:.1f} GB + LoRA/optimizer {self.lora / 1e9:.2f} GB"
                f" + activations {self.activations / 1e9:.1f} GB = {self.peak / 1e9:.1f} GB of {self.budget / 1e9:.1f}"
                f" GB; gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}")


def lora_parameter_count(config: dict, rank: int, targets) -> int:
    """Parameters of a rank-`rank` LoRA on the transformer's linear layers matching `targets` (PEFT matching)."""
    model = build_model("transformer", config)
    n = 0
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and any(path == t or path.endswith("." + t) for t in targets):
            n += rank * (m.weight.shape[0] + m.weight.shape[1])
    return n


# Training runs attention in query chunks of at most this many float32 score bytes (training/checkpointing.py
# chunked_attention); a chunk's forward and backward hold about SCORE_CHUNK_COPIES times that at once (measured on
# MLX's CPU backend: scores, probabilities, their gradients and the fallback's temporaries).
SCORE_CHUNK_BYTES = 16 * 2**20
SCORE_CHUNK_COPIES = 12


def training_activation_bytes(config: dict, dtype: mx.Dtype, tokens: int, batch: int, checkpointing: bool,
                              caption_tokens: int = 128) -> int:
    """Activations kept for the backward pass: every block's saved tensors, or with checkpointing each block's
    input plus one block recomputed at a time and one query chunk's attention scores (SCORE_CHUNK_BYTES; the
    chunked attention runs with checkpointing), or without it the full scores of the block being differentiated."""
    dim = config.get("dim", 3840)
    heads = config.get("n_heads", 30)
    blocks = config.get("n_layers", 30) + 2 * config.get("n_refiner_layers", 2)
    s = tokens + caption_tokens
    s += -s % 32
    per_block = s * (dim * TRAIN_DIM_FACTOR + feed_forward_width(dim) * TRAIN_HIDDEN_FACTOR) * dtype.size
    full = heads * s * s * 4
    scores = SCORE_CHUNK_COPIES * min(SCORE_CHUNK_BYTES, full) if checkpointing else full * 2
    kept = blocks * s * dim * dtype.size + RECOMPUTED_BLOCKS * per_block if checkpointing else blocks * per_block
    return int(batch * (kept + scores))


def plan_training(config: dict, dtype: mx.Dtype, bits: int | None, resolution: int, rank: int, batch: int = 1,
                  budget: int | None = None, checkpointing: bool | None = None, group_size: int = 64,
                  targets=("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")) -> TrainingPlan:
    """Predicted peak of a training step; checkpointing None = on only when needed. Refuses (ValueError, naming
    the largest square resolution that fits) when even checkpointing cannot fit the budget."""
    if budget is None:
        budget = machine_memory_bytes()[0]
    weights = weight_bytes(build_model("transformer", config), bits, group_size, dtype)
    lora = LORA_TRAIN_COPIES * 4 * lora_parameter_count(config, rank, targets)
    tokens = (resolution // 16) ** 2

    def plan(ckpt, tok=tokens):
        act = training_activation_bytes(config, dtype, tok, batch, ckpt)
        return TrainingPlan(weights, lora, act, int(weights + lora + act + OVERHEAD), int(budget), ckpt)

    if checkpointing is not None:
        return plan(checkpointing)
    fits = [p for p in (plan(False), plan(True)) if p.peak <= budget * HEADROOM]
    if fits:
        return fits[0]
    side = resolution
    while side > 16 and plan(True, (side // 16) ** 2).peak > budget * HEADROOM:
        side -= 16
    hint = f"at most {side}x{side} fits" if side > 16 else "no resolution fits; use --quantize 4"
    raise ValueError(f"training at {resolution}x{resolution} needs about {plan(True).peak / 1e9:.1f} GB with "
                     f"gradient checkpointing, {budget / 1e9:.1f} GB available: {hint}")
