"""Quantization policy and unified-memory planning.

Policy (one predicate, `nn.quantize`): every `nn.Linear` of the transformer and the text encoder is quantized,
except the embedders and the final layer of the transformer (`t_embedder`, `all_x_embedder`, `cap_embedder`,
`all_final_layer`: small and precision-sensitive) and any layer whose input dim does not divide by the group size.
Norms, pad tokens, the token embedding table and the whole VAE stay in float.

Planning: `plan_memory` reads the machine's memory (Metal's recommended working set on macOS, /proc/meminfo
elsewhere), predicts the peak of each stage for each candidate precision, and picks the best that fits.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

KEEP_FLOAT = ("t_embedder", "all_x_embedder", "cap_embedder", "all_final_layer")
COMPONENTS = ("transformer", "text_encoder")
GROUP_SIZES = (32, 64, 128)


def should_quantize(path: str, module: nn.Module, group_size: int) -> bool:
    """The policy: Linear layers only, not the DiT's embedders/final layer, input dim divisible by the group."""
    if not isinstance(module, nn.Linear) or isinstance(module, nn.QuantizedLinear):
        return False
    if any(part in KEEP_FLOAT for part in path.split(".")):
        return False
    return module.weight.shape[-1] % group_size == 0


def quantized_layers(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]


def prepare_for_quantized_load(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """Turn the policy's Linear layers into QuantizedLinear shells so saved quantized weights load into them."""
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda p, m: should_quantize(p, m, group_size))
    return model


# --------------------------------------------------------------------------- sizes
def _dtype_bytes(dtype: mx.Dtype) -> int:
    return dtype.size


def weight_bytes(model: nn.Module, bits: int | None, group_size: int, dtype: mx.Dtype) -> int:
    """Bytes of `model`'s parameters once loaded in `dtype` and (optionally) quantized with the policy.

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
        if key in quantizable:
            total += n * bits // 8 + 2 * (n // group_size) * _dtype_bytes(dtype)
        else:
            total += n * _dtype_bytes(dtype)
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


def describe_bits(bits: dict) -> str:
    """'transformer 4-bit, text encoder 8-bit' (float for None); 'none' when nothing is quantized."""
    if not any(bits.get(n) for n in COMPONENTS):
        return "none"

    def one(b):
        return "float" if not b else f"{b}-bit"

    return f"transformer {one(bits.get('transformer'))}, text encoder {one(bits.get('text_encoder'))}"


@dataclass
class MemoryPlan:
    bits: dict[str, int | None]
    group_size: int
    free_text_encoder_first: bool
    predicted_peak: int
    available: int
    source: str
    stages: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        return describe_bits(self.bits)

    def summary(self) -> str:
        gb = 1e9
        enc = "encode, free the text encoder, then load the transformer" if self.free_text_encoder_first \
            else "keep both models loaded"
        return (f"memory plan: {self.describe()} (group {self.group_size}); {enc}; predicted peak "
                f"{self.predicted_peak / gb:.1f} GB of {self.available / gb:.1f} GB available ({self.source})")


# --------------------------------------------------------------------------- planning
# Candidate precisions, best quality first: (transformer bits, text-encoder bits).
CANDIDATES = ((None, None), (None, 8), (8, 8), (4, 8), (4, 4))
HEADROOM = 0.95          # plan to use at most this share of the available memory
OVERHEAD = 0.15e9        # tokenizer, latents, RoPE tables, allocator slack
ENCODE_TOKENS = 512      # plan for the longest prompt


def component_weight_bytes(name: str, config: dict, dtype: mx.Dtype, bits: int | None, group_size: int) -> int:
    from .mlx_format import build_model

    return weight_bytes(build_model(name, config), bits if name != "vae" else None, group_size, dtype)


def dit_activation_bytes(config: dict, dtype: mx.Dtype, height: int, width: int, caption_tokens: int = 128,
                         cpu: bool | None = None) -> int:
    """Live activations of one DiT block at this size (hidden states, q/k/v, float32 RoPE, SwiGLU), plus the
    attention score matrix where SDPA materializes it (MLX's CPU backend)."""
    dim = config.get("dim", 3840)
    heads = config.get("n_heads", 30)
    hidden = int(dim / 3 * 8)
    s = (height // 16) * (width // 16) + caption_tokens
    s += -s % 32
    b = dtype.size
    act = s * (dim * 12 * b + hidden * 4 * b)
    if cpu if cpu is not None else mx.default_device() == mx.cpu:
        act += heads * s * s * 4 * 2
    return act


def text_encoder_activation_bytes(config: dict, dtype: mx.Dtype, tokens: int = ENCODE_TOKENS) -> int:
    h = config.get("hidden_size", 2560)
    inter = config.get("intermediate_size", 9728)
    heads = config.get("num_attention_heads", 32)
    return tokens * (h * 8 + inter * 4) * dtype.size + heads * tokens * tokens * 4 * 2


def vae_decode_activation_bytes(config: dict, height: int, width: int, dtype: mx.Dtype = mx.float32) -> int:
    """VAE decode activations, calibrated on the real config (float32, MLX CPU backend, vae_bench.py):
    untiled (≤ 256², vae.decode's "auto" rule) ≈ 39.4 kB per output pixel; strip-tiled ≈ 0.8 GB + 966 B/pixel.
    Scaled by the dtype size and by the width of the first decoder stage relative to FLUX's 512."""
    ch = config.get("block_out_channels", [128, 256, 512, 512])
    scale = dtype.size / 4 * ch[-1] / 512
    pixels = height * width
    if pixels > 256 * 256:
        return int((0.8e9 + 966 * pixels) * scale)
    return int(39.4e3 * pixels * scale)


def predict_stages(configs: dict, dtype: mx.Dtype, bits: dict, group_size: int, height: int, width: int,
                   free_text_encoder: bool = True) -> dict[str, int]:
    w = {n: component_weight_bytes(n, configs[n], dtype, bits.get(n), group_size) for n in configs}
    te_resident = 0 if free_text_encoder else w["text_encoder"]
    return {
        "encode": int(w["text_encoder"] + text_encoder_activation_bytes(configs["text_encoder"], dtype) + OVERHEAD),
        "denoise": int(te_resident + w["transformer"] + dit_activation_bytes(configs["transformer"], dtype, height,
                                                                             width) + OVERHEAD),
        "decode": int(te_resident + w["transformer"] + w["vae"]
                      + vae_decode_activation_bytes(configs["vae"], height, width, dtype) + OVERHEAD),
        **{f"weights_{n}": v for n, v in w.items()},
    }


def plan_memory(configs: dict, dtype: mx.Dtype, requested="auto", height: int = 1024, width: int = 1024,
                group_size: int = 64, available: int | None = None, source: str | None = None) -> MemoryPlan:
    """Choose bits per component (for "auto") and whether the text encoder must be freed before the transformer.

    requested: "auto", None/0 (float), 4, 8, or {"transformer": b, "text_encoder": b}. Raises MemoryError with a
    clear message when even 4-bit cannot fit an "auto" plan.
    """
    if available is None:
        available, source = machine_memory_bytes()
    budget = available * HEADROOM
    if requested == "auto":
        candidates = [dict(zip(COMPONENTS, c)) for c in CANDIDATES]
    elif isinstance(requested, dict):
        candidates = [{n: requested.get(n) for n in COMPONENTS}]
    else:
        candidates = [{n: (int(requested) if requested else None) for n in COMPONENTS}]

    def stages(bits, free):
        st = predict_stages(configs, dtype, bits, group_size, height, width, free)
        return st, max(st["encode"], st["denoise"], st["decode"])

    best = None
    for bits in candidates:
        st, peak = stages(bits, free=False)
        if peak <= budget:
            return MemoryPlan(bits, group_size, False, peak, available, source or "", st)
        st, peak = stages(bits, free=True)
        if peak <= budget or best is None or peak < best.predicted_peak:
            best = MemoryPlan(bits, group_size, True, peak, available, source or "", st)
        if peak <= budget:
            return best
    if requested == "auto":
        raise MemoryError(
            f"Z-Image does not fit in this machine's memory even at 4-bit: it needs about "
            f"{best.predicted_peak / 1e9:.1f} GB at {width}x{height}, {available / 1e9:.1f} GB are available "
            f"({source}). Close other apps, or try a smaller size."
        )
    return best
