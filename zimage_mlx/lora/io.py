"""Writing and reading trained LoRAs in the diffusers / PEFT layout.

Keys `transformer.<diffusers module>.lora_A.weight` (rank × in) and `.lora_B.weight` (out × rank); the header holds
`format: pt` and `lora_adapter_metadata`: the PEFT `LoraConfig(...).to_dict()` with every key prefixed
`transformer.`, serialized as diffusers' `LoraBaseMixin.write_lora_layers` does (json.dumps(indent=2,
sort_keys=True), sets as lists). diffusers' `load_lora_weights`, ComfyUI and `lora.adapters` read it as is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..loading.weights import WeightError

PREFIX = "transformer."


def lora_config(rank: int, alpha: float, target_modules, use_rslora: bool = False) -> dict:
    """PEFT's `LoraConfig(r=rank, lora_alpha=alpha, target_modules=...)`.to_dict(), limited to the fields every
    PEFT release since 0.9 accepts (diffusers rebuilds the config with `LoraConfig(**metadata)`, which refuses
    unknown fields; PEFT reads back r, lora_alpha, target_modules, rank_pattern, alpha_pattern, use_rslora)."""
    return {
        "alpha_pattern": {}, "base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": False, "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "lora_alpha": alpha, "lora_dropout": 0.0, "modules_to_save": None, "peft_type": "LORA", "r": rank,
        "rank_pattern": {}, "revision": None, "target_modules": sorted(set(target_modules)), "task_type": None,
        "use_dora": False, "use_rslora": use_rslora,
    }


def adapter_metadata(config: dict) -> dict:
    """The safetensors header diffusers writes for a transformer LoRA with this PEFT config dict."""
    packed = {f"{PREFIX}{k}": (sorted(v) if isinstance(v, (set, frozenset)) else v) for k, v in config.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def peft_tensors(state: dict) -> dict:
    """{diffusers module: (A, B)} -> {file key: float32 numpy array}."""
    out = {}
    for module, (a, b) in sorted(state.items()):
        out[f"{PREFIX}{module}.lora_A.weight"] = np.array(mx.array(a).astype(mx.float32))
        out[f"{PREFIX}{module}.lora_B.weight"] = np.array(mx.array(b).astype(mx.float32))
    return out


def save_peft_lora(path: str | Path, state: dict, rank: int, alpha: float, extra_metadata: dict | None = None,
                   dtype=np.float32) -> Path:
    """Write {diffusers module: (A, B)} as a PEFT-layout .safetensors, atomically (temp file, then os.replace:
    a failed write leaves any previous file intact). `target_modules` lists the full module names, so PEFT
    matches exactly the trained layers."""
    from safetensors.numpy import save_file

    if not state:
        raise ValueError("no LoRA layers to save")
    path = Path(path)
    tensors = {k: v.astype(dtype) for k, v in peft_tensors(state).items()}
    metadata = adapter_metadata(lora_config(rank, alpha, list(state)))
    metadata.update(extra_metadata or {})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_peft_lora(path: str | Path) -> tuple[dict, int, float]:
    """({diffusers module: (A, B)} float32 numpy, rank, alpha) of a PEFT-layout file such as `save_peft_lora`
    writes (a training run's init_lora). Alpha from `lora_adapter_metadata`, else = rank."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightError(f"{path}: LoRA file not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise WeightError(f"{path}: not a readable .safetensors file ({e})") from None
    state, ranks = {}, set()
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")].removeprefix(PREFIX).removeprefix("diffusion_model.")
        b_key = key[: -len("lora_A.weight")] + "lora_B.weight"
        if b_key not in tensors:
            raise WeightError(f"{path}: {key} has no matching {b_key}")
        a, b = tensors[key].astype(np.float32), tensors[b_key].astype(np.float32)
        state[module] = (a, b)
        ranks.add(a.shape[0])
    if not state:
        raise WeightError(f"{path}: no diffusers/PEFT LoRA keys (`….lora_A.weight` / `….lora_B.weight`)")
    if len(ranks) != 1:
        raise WeightError(f"{path}: layers have different ranks {sorted(ranks)}; a training run needs one rank")
    rank = ranks.pop()
    alpha = float(rank)
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            cfg = json.loads(raw)
        except ValueError:
            raise WeightError(f"{path}: unreadable lora_adapter_metadata in the header") from None
        alpha = float(cfg.get(f"{PREFIX}lora_alpha", cfg.get("lora_alpha", alpha)))
    return state, rank, alpha
