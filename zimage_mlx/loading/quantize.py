"""Quantization policy: which layers, how many bits, which group size (a leaf: imports nothing of the package).

One predicate, applied with `nn.quantize`: every `nn.Linear` of the transformer and the text encoder is quantized,
and the text encoder's token-embedding table (`nn.Embedding`, 0.8 GB in bf16: a quantized encoder keeps it
quantized too, as mlx-lm does), except the embedders and the final layer of the transformer (`t_embedder`,
`all_x_embedder`, `cap_embedder`, `all_final_layer`: small and precision-sensitive) and any layer whose input dim
does not divide by the group size. Norms, pad tokens and the whole VAE stay in float.

`parse_quantize` is the one reader of the quantization vocabulary, shared by the Python API and the CLI.

On MLX's CPU backend `dequantize_matmuls` turns the quantized layers into `DequantizingLinear`: its
`quantized_matmul` is far slower there than dequantizing the weight and multiplying in float (below).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import QuantizedAllToShardedLinear, QuantizedShardedToAllLinear

KEEP_FLOAT = ("t_embedder", "all_x_embedder", "cap_embedder", "all_final_layer")
COMPONENTS = ("transformer", "text_encoder")
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
_ALIASES = {"dit": "transformer", "te": "text_encoder", "text-encoder": "text_encoder"}
_NONE = ("none", "no", "off", "float", "0", "16", "32")
VOCABULARY = "auto, none, 4, 8, or per model: transformer=4,text_encoder=8"


def should_quantize(path: str, module: nn.Module, group_size: int) -> bool:
    """The policy: Linear and Embedding layers, not the DiT's embedders/final layer, last dim divisible by the group."""
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        return False
    if any(part in KEEP_FLOAT for part in path.split(".")):
        return False
    return module.weight.shape[-1] % group_size == 0


# Layers holding packed weights: QuantizedLinear, its tensor-parallel forms (mlx.nn.layers.distributed),
# QuantizedEmbedding (and subclasses, such as distributed.py's vocabulary-split one)
QUANTIZED = (nn.QuantizedLinear, QuantizedAllToShardedLinear, QuantizedShardedToAllLinear, nn.QuantizedEmbedding)


def quantized_layers(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, QUANTIZED)]


class DequantizingLinear(nn.QuantizedLinear):
    """A QuantizedLinear that multiplies by its dequantized weight instead of calling `mx.quantized_matmul`.

    For MLX's CPU backend: there quantized_matmul runs at about 2 GFLOP/s on this project's 2-core test VM, the float
    matmul (BLAS) at about 130 -- a 4-bit DiT step 58x slower than float32 (benchmarks/step_bench.py --bits 4;
    docs/memory-quantization.md). The weight stays quantized at rest; the float copies of the few layers in flight
    cost under 7x one feed-forward weight in float (memory.dequantized_weights_bytes). Same values up to float
    rounding (the products are summed in another order)."""

    def __call__(self, x: mx.array) -> mx.array:
        # made to depend on x, so the float weight is computed when its matmul can run: otherwise the breadth-first
        # schedule of `mx.eval` dequantizes later layers' weights early (peak above the weights, 12-layer Qwen3
        # encoder: 1.35 GB without, 0.61 GB with, whatever the depth)
        packed = mx.depends(self["weight"], x)
        w = mx.dequantize(packed, self["scales"], self.get("biases"), group_size=self.group_size, bits=self.bits,
                          mode=self.mode)
        y = x @ w.T
        return y + self["bias"] if "bias" in self else y


def dequantize_matmuls(model: nn.Module) -> int:
    """Make every plain QuantizedLinear of `model` a DequantizingLinear, in place (the class alone changes: same
    parameters, same module objects, so wrappers such as LoRA branches keep pointing at them). Tensor-parallel
    quantized layers keep their own forward. Returns how many layers changed."""
    layers = [m for _, m in model.named_modules() if type(m) is nn.QuantizedLinear]
    for m in layers:
        m.__class__ = DequantizingLinear
    return len(layers)


def prepare_for_quantized_load(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """Turn the policy's Linear layers into QuantizedLinear shells so saved quantized weights load into them."""
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda p, m: should_quantize(p, m, group_size))
    return model


def _one_bits(value, where: str) -> int | None:
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: bits must be 4, 8 or none, got {value!r}")
    text = str(value).strip().lower()
    if text in _NONE:
        return None
    if text in ("4", "8"):
        return int(text)
    raise ValueError(f"{where}: bits must be 4, 8 or none, got {value!r}")


def parse_quantize(value) -> str | dict[str, int | None]:
    """"auto", or {"transformer": bits, "text_encoder": bits} (bits 4, 8 or None) from any spelling:

    None/False/"none" (float), 4, 8, "4", "auto", {"transformer": 4, "text_encoder": 8}, or the CLI's
    "transformer=4,text_encoder=8" (also dit=/te=). Anything else is a ValueError naming the allowed values.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, str) and "=" in value:
        items = [tuple(s.strip() for s in part.partition("=")[::2]) for part in value.split(",")]
    else:
        try:
            b = _one_bits(value, "quantize")
        except ValueError:
            raise ValueError(f"quantize: cannot read {value!r}; use {VOCABULARY}") from None
        return {n: b for n in COMPONENTS}
    out = {n: None for n in COMPONENTS}
    for name, bits in items:
        key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
        if key not in COMPONENTS:
            raise ValueError(f"quantize: unknown model {name!r}; use transformer and/or text_encoder ({VOCABULARY})")
        out[key] = _one_bits(bits, f"quantize[{key}]")
    return out


def describe_bits(bits: dict) -> str:
    """'transformer 4-bit, text encoder 8-bit' (float for None); 'none' when nothing is quantized."""
    if not any(bits.get(n) for n in COMPONENTS):
        return "none"

    def one(b):
        return "float" if not b else f"{b}-bit"

    return f"transformer {one(bits.get('transformer'))}, text encoder {one(bits.get('text_encoder'))}"
