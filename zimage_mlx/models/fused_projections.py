"""Fused projections: to_q/to_k/to_v as one `to_qkv` and w1/w3 as one `w13` matmul after loading, for float,
quantized and tensor-parallel layers. Checkpoints, conversions and LoRAs keep naming the parts."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import AllToShardedLinear, QuantizedAllToShardedLinear

from ..loading.quantize import DequantizingLinear


# Projections that read the same input, run as one matmul after loading (`fuse_projections`): {fused: parts}.
# Checkpoints, conversions and LoRAs keep naming the parts (lora/layers.py addresses a part as a row slice of the fused
# layer).
FUSED_PROJECTIONS = {"to_qkv": ("to_q", "to_k", "to_v"), "w13": ("w1", "w3")}
_FLOAT_LINEARS = (nn.Linear, AllToShardedLinear)
_QUANTIZED_LINEARS = (nn.QuantizedLinear, DequantizingLinear, QuantizedAllToShardedLinear)


def fuse_linears(parts: list) -> nn.Module | None:
    """One layer whose output is the parts' outputs concatenated, or None when they cannot be fused.

    Float weights are stacked by rows. Quantized weights are too: group quantization runs along each row, so the
    stacked codes, scales and biases are exactly those of quantizing the stacked float weight. Tensor-parallel
    "all-to-sharded" parts (mlx.nn.layers.distributed) fuse into a plain layer: at inference their forward is the
    plain matmul over this rank's rows.
    """
    first = parts[0]
    if any("bias" in p for p in parts):
        return None
    if all(type(p) in _FLOAT_LINEARS for p in parts):
        fused = nn.Linear(1, 1, bias=False)
        fused.weight = mx.concatenate([p.weight for p in parts])
        return fused
    quantized = all(type(p) in _QUANTIZED_LINEARS for p in parts)
    if not quantized or any((p.bits, p.group_size, p.mode) != (first.bits, first.group_size, first.mode)
                            or p.weight.shape[1] != first.weight.shape[1] for p in parts):
        return None
    in_dims = first.weight.shape[1] * 32 // first.bits
    # the CPU's dequantizing layers (quantize.DequantizingLinear) stay so once fused
    kind = DequantizingLinear if all(type(p) is DequantizingLinear for p in parts) else nn.QuantizedLinear
    fused = kind(in_dims, 1, bias=False, group_size=first.group_size, bits=first.bits, mode=first.mode)
    fused.weight = mx.concatenate([p.weight for p in parts])
    fused.scales = mx.concatenate([p.scales for p in parts])
    if first.get("biases") is not None:
        fused.biases = mx.concatenate([p.biases for p in parts])
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Replace every Attention's to_q/to_k/to_v by one `to_qkv` and every FeedForward's w1/w3 by one `w13`
    (FUSED_PROJECTIONS), one module at a time (the parts are freed as each fused weight is made). Modules whose parts
    differ (bits, group size, a bias) keep them. Returns the number of fused layers."""
    count = 0
    # (named_modules' list also holds the Linear parts themselves: keep only their parents, so each part is freed
    # as soon as its module is fused)
    for module in [m for _, m in model.named_modules()
                   if any(all(p in m for p in parts) for parts in FUSED_PROJECTIONS.values())]:
        for name, part_names in FUSED_PROJECTIONS.items():
            if name in module or not all(p in module for p in part_names):
                continue
            fused = fuse_linears([module[p] for p in part_names])
            if fused is None:
                continue
            mx.eval(fused.parameters())
            for p in part_names:
                del module[p]
            module[name] = fused
            count += 1
    return count
