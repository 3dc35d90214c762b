"""Random Z-Image LoRAs (alpha != rank) written in every published key format, and hand-merged torch references.

A LoRA is first made canonical -- {diffusers target: (A, B, alpha)} -- then written in one format; the reference is
the torch transformer with W += weight * alpha / rank * B @ A merged by hand (kron for LoKr, + diff for deltas).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import torch
from safetensors.numpy import save_file

# Every kind of Linear a Z-Image LoRA targets (tiny config: 2 layers, 1 refiner layer each).
TARGETS = [
    "layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v", "layers.0.attention.to_out.0",
    "layers.0.feed_forward.w1", "layers.0.feed_forward.w2", "layers.0.feed_forward.w3", "layers.0.adaLN_modulation.0",
    "layers.1.attention.to_q", "layers.1.attention.to_v", "layers.1.feed_forward.w2",
    "noise_refiner.0.attention.to_k", "noise_refiner.0.feed_forward.w1", "noise_refiner.0.adaLN_modulation.0",
    "context_refiner.0.attention.to_out.0", "context_refiner.0.feed_forward.w3",
    "all_x_embedder.2-1", "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1",
    "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2",
]
QKV_BLOCKS = ["layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"]


def linear(model, target):
    m = model
    for part in target.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def random_lora(model, targets=TARGETS, rank=4, alpha=6.0, seed=0, strength=1.0) -> dict:
    """{target: (A (r, in), B (out, r), alpha)} with ΔW = alpha/r · B A about `strength` × the layer's RMS."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in targets:
        w = linear(model, t).weight.detach().numpy()
        a = rng.standard_normal((rank, w.shape[1])).astype(np.float32) / float(np.sqrt(w.shape[1]))
        b = rng.standard_normal((w.shape[0], rank)).astype(np.float32)
        b *= strength * float(np.sqrt((w ** 2).mean())) * np.sqrt(w.shape[1]) / (alpha / rank) / np.sqrt(rank)
        out[t] = (a, b, alpha)
    return out


def fused_qkv_lora(model, blocks=QKV_BLOCKS, rank=4, alpha=6.0, seed=0, strength=1.0) -> dict:
    """{block: (A (r, dim), B (3·dim, r), alpha)} for ComfyUI's fused attention.qkv."""
    rng = np.random.default_rng(seed)
    out = {}
    for blk in blocks:
        w = linear(model, f"{blk}.attention.to_q").weight.detach().numpy()
        a = rng.standard_normal((rank, w.shape[1])).astype(np.float32) / float(np.sqrt(w.shape[1]))
        b = rng.standard_normal((3 * w.shape[0], rank)).astype(np.float32)
        b *= strength * float(np.sqrt((w ** 2).mean())) * np.sqrt(w.shape[1]) / (alpha / rank) / np.sqrt(rank)
        out[blk] = (a, b, alpha)
    return out


def split_qkv(fused: dict) -> dict:
    """The same update as per-projection targets (A shared, B split in three row blocks)."""
    out = {}
    for blk, (a, b, alpha) in fused.items():
        for name, part in zip(("to_q", "to_k", "to_v"), np.split(b, 3)):
            out[f"{blk}.attention.{name}"] = (a, part, alpha)
    return out


def kohya_name(target: str) -> str:
    return "lora_unet_" + target.replace(".", "_")


NATIVE = {"attention.to_out.0": "attention.out", "all_x_embedder.2-1": "x_embedder",
          "all_final_layer.2-1": "final_layer"}


def native_name(target: str) -> str:
    for new, old in NATIVE.items():
        target = target.replace(new, old)
    return target


# ------------------------------------------------------------------------------ writers: canonical -> file tensors
def as_peft(lora: dict, prefix="transformer.", adapter=""):
    """diffusers/PEFT keys; alpha goes to the header metadata (returned second)."""
    t = {}
    for k, (a, b, _) in lora.items():
        t[f"{prefix}{k}.lora_A{adapter}.weight"], t[f"{prefix}{k}.lora_B{adapter}.weight"] = a, b
    return t


def as_ai_toolkit(lora: dict, prefix="diffusion_model.", adapter=""):
    t = as_peft(lora, prefix, adapter)
    for k, (_, _, alpha) in lora.items():
        t[f"{prefix}{k}.alpha"] = np.array(alpha, np.float32)
    return t


def as_kohya(lora: dict, name=kohya_name):
    t = {}
    for k, (a, b, alpha) in lora.items():
        n = name(k)
        t[f"{n}.lora_down.weight"], t[f"{n}.lora_up.weight"], t[f"{n}.alpha"] = a, b, np.array(alpha, np.float32)
    return t


def as_dot(lora: dict, prefix="diffusion_model."):
    """The dot format (Anime-Z): `to.q.lora.down.weight`, no alpha (scale 1: pass a LoRA with alpha = rank)."""
    t = {}
    for k, (a, b, alpha) in lora.items():
        assert alpha == a.shape[0]
        k = k.replace("attention.to_q", "attention.to.q").replace("attention.to_k", "attention.to.k")
        k = k.replace("attention.to_v", "attention.to.v")
        t[f"{prefix}{k}.lora.down.weight"], t[f"{prefix}{k}.lora.up.weight"] = a, b
    return t


def peft_metadata(lora: dict, alpha_pattern: dict | None = None, prefix="transformer.") -> dict:
    """The header metadata diffusers writes (`lora_adapter_metadata`: a LoraConfig dict, keys prefixed)."""
    from peft import LoraConfig

    a, _, alpha = next(iter(lora.values()))
    cfg = LoraConfig(r=a.shape[0], lora_alpha=alpha, target_modules=sorted(lora),
                     alpha_pattern=alpha_pattern or {}).to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    return {"lora_adapter_metadata": json.dumps({f"{prefix}{k}": v for k, v in cfg.items()})}


def save(path, tensors: dict, metadata: dict | None = None):
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------------------ references
def merged(model, *loras, weights=None, kron=None, diffs=None):
    """A deep copy of the torch transformer with W += w·alpha/r·B A for each (lora, w); kron: {target: (w1, w2,
    scale, w)}; diffs: {parameter name: (delta, w)}."""
    model = copy.deepcopy(model)
    weights = weights or [1.0] * len(loras)
    with torch.no_grad():
        for lora, w in zip(loras, weights):
            for t, (a, b, alpha) in lora.items():
                lin = linear(model, t)
                lin.weight += torch.from_numpy(w * alpha / a.shape[0] * (b.astype(np.float64) @ a).astype(np.float32))
        for t, (w1, w2, scale, w) in (kron or {}).items():
            linear(model, t).weight += torch.from_numpy((w * scale * np.kron(w1, w2)).astype(np.float32))
        params = dict(model.named_parameters())
        for name, (d, w) in (diffs or {}).items():
            params[name] += torch.from_numpy(w * d)
    return model
