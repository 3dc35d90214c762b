"""LoRA file formats: the key tables, reading a .safetensors LoRA, and normalizing its keys to diffusers' names.

Formats are recognised from the keys, one row each in the tables below (diffusers/PEFT with alpha in the header
metadata, ai-toolkit `diffusion_model.` + `.alpha`, kohya/musubi `lora_unet_…` with `lora_down`/`lora_up`, the
dot format `….lora.down.weight`, ComfyUI's fused `attention.qkv`/`attention.out` and full deltas `.diff`/`.diff_b`,
LyCORIS LoKr). Original (ComfyUI) module names are mapped by the transformer's own `sanitize`, so a rename stays a
one-place change; targets are addressed by diffusers' module names (`layers.0.attention.to_q`).
The key handling follows diffusers' `_convert_non_diffusers_z_image_lora_to_diffusers`
(diffusers/loaders/lora_conversion_utils.py); patches.py turns the grouped tensors into patches.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..loading.weights import WeightError, safetensors_keys

# The largest magnitude a LoRA tensor may hold. A LoRA is a small correction: PEFT initializes A in ±1/√in and B at
# 0 and trained factors stay of order 1, full deltas are of the size of the weights they patch, and alpha is at most a
# few times the rank (≤ 1024 in published files). A value beyond 1e4 is a damaged or diverged file, whose update
# (×rank) would swamp the weights: refused at load rather than found as a black image after the whole denoise.
MAX_ABS = 1e4


class LoRAError(WeightError):
    """A LoRA cannot be applied: another model's LoRA, keys that match no layer, bad shapes, unreadable file."""


# ------------------------------------------------------------------------------------------------ the format table
PREFIXES = ("transformer.", "model.diffusion_model.", "diffusion_model.", "base_model.model.", "lora_unet_",
            "lycoris_")
ROLES = {  # key ending -> what the tensor is
    "lora_A.weight": "down", "lora_down.weight": "down", "lora.down.weight": "down",
    "lora_B.weight": "up", "lora_up.weight": "up", "lora.up.weight": "up",
    "alpha": "alpha",
    "lokr_w1": "w1", "lokr_w1_a": "w1_a", "lokr_w1_b": "w1_b",
    "lokr_w2": "w2", "lokr_w2_a": "w2_a", "lokr_w2_b": "w2_b", "lokr_t2": "t2",
    "diff": "diff", "diff_b": "diff_b",
}
REFUSED = {  # key ending -> why it is refused (never dropped silently)
    "dora_scale": "DoRA (dora_scale) is not supported; ignoring the magnitude vector would give wrong images",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector) is not supported; ignoring it would give wrong images",
    "lora_B.bias": "LoRA biases (PEFT lora_bias) are not supported",
    "lora_mid.weight": "LoCon with a Tucker mid tensor (lora_mid) is not supported",
    "hada_w1_a": "LoHa (hada_w1_a/…) is not supported",
    "set_weight": "weight replacement patches (set_weight) are not supported",
}
FOREIGN = (  # key fragment -> the model the file was made for
    ("double_blocks", "FLUX"), ("single_blocks", "FLUX"), ("single_transformer_blocks", "FLUX"),
    ("img_mlp", "Qwen-Image"), ("txt_mlp", "Qwen-Image"), ("img_mod", "Qwen-Image"),
    ("transformer_blocks", "FLUX, SD3 or Qwen-Image"),
    ("down_blocks", "Stable Diffusion / SDXL"), ("up_blocks", "Stable Diffusion / SDXL"),
    ("input_blocks", "Stable Diffusion / SDXL"), ("output_blocks", "Stable Diffusion / SDXL"),
    ("self_attn", "a text encoder (zimage_mlx applies LoRAs to the transformer only)"),
    ("lora_te", "a text encoder (zimage_mlx applies LoRAs to the transformer only)"),
    ("text_encoder", "a text encoder (zimage_mlx applies LoRAs to the transformer only)"),
)
# Names with underscores a LoRA may use that are not module names of the model (kohya spells every "." as "_"):
# ComfyUI / original Z-Image names (the transformer's sanitize maps them to diffusers'), and diffusers' projection
# names, which stay addressable in a model that fuses q/k/v into one `to_qkv` layer.
ALIAS_WORDS = ("x_embedder", "final_layer", "q_norm", "k_norm", "to_q", "to_k", "to_v")




# ------------------------------------------------------------------------------------------------ reading
def read_lora(path: str | Path):
    """(tensors, header metadata, sha256) of a .safetensors LoRA; pickles are refused without being opened."""
    path = Path(path)
    if path.is_dir():
        raise LoRAError(f"{path}: is a directory; pass a .safetensors file")
    if not path.is_file():
        raise LoRAError(f"{path}: LoRA file not found")
    with open(path, "rb") as f:
        head = f.read(9)
    safetensors = head[8:9] == b"{"   # an 8-byte header length, then the JSON header
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl") or \
            (not safetensors and (head[:2] == b"PK" or head[:1] == b"\x80")):
        raise LoRAError(f"{path}: a pickle file (.ckpt/.pt/.bin); these can run code when opened and are never "
                        "loaded: use the .safetensors version of the LoRA")
    try:
        safetensors_keys(path)   # validates the header against the file size
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except WeightError as e:
        raise LoRAError(str(e)) from None
    except (RuntimeError, ValueError) as e:
        raise LoRAError(f"{path}: cannot read the LoRA ({e})") from None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return tensors, metadata or {}, h.hexdigest()



def as_mx(v) -> mx.array:
    if isinstance(v, mx.array):
        return v
    if hasattr(v, "detach"):   # a torch tensor (diffusers-style state dicts)
        v = v.detach().cpu().float().numpy()
    return mx.array(np.asarray(v))


# ------------------------------------------------------------------------------------------------ parsing
def _split_role(key: str, source: str):
    """(role, module path) from a key ending in the ROLES table; PEFT adapter names (`lora_A.default.weight`) go."""
    parts = key.split(".")
    if len(parts) >= 4 and parts[-3] in ("lora_A", "lora_B") and parts[-1] == "weight":
        key = ".".join(parts[:-2] + ["weight"])
    for ending, why in REFUSED.items():
        if key.endswith("." + ending):
            raise LoRAError(f"{source}: {why} (key {key})")
    for ending in sorted(ROLES, key=len, reverse=True):
        if key.endswith("." + ending):
            return ROLES[ending], key[: -len(ending) - 1]
    return None, key


def _vocabulary(paths) -> dict:
    """Module names containing "_" (to_q, feed_forward, adaLN_modulation, …) as token tuples, lower-cased."""
    words = set(ALIAS_WORDS)
    for path in paths:
        words.update(w for w in path.split(".") if "_" in w)
    return {tuple(w.lower().split("_")): w for w in words}


def _tokenize(path: str, vocab: dict) -> str:
    """kohya `layers_0_attention_to_q` and dot-format `layers.0.attention.to.q` -> `layers.0.attention.to_q`."""
    tokens = re.split(r"[._]", path)
    longest = max(len(k) for k in vocab)
    out, i = [], 0
    while i < len(tokens):
        for n in range(min(longest, len(tokens) - i), 0, -1):
            word = vocab.get(tuple(t.lower() for t in tokens[i:i + n]))
            if word is not None:
                out.append(word)
                i += n
                break
        else:
            out.append(tokens[i])
            i += 1
    return ".".join(out)


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def layer_targets(model: nn.Module, path: str) -> list[str]:
    """Diffusers layer names for a module path, through the transformer's sanitize (ComfyUI names; a fused
    `attention.qkv` gives to_q, to_k, to_v)."""
    return [k.rpartition(".")[0] for k in model.sanitize({path + ".weight": mx.zeros((3, 1))})]


def _foreign(keys, source: str) -> None:
    for key in keys:
        for fragment, model in FOREIGN:
            if fragment in key:
                raise LoRAError(f"{source}: this LoRA is for {model}, not for the Z-Image transformer "
                                f"(key {key})")


def metadata_alpha(metadata: dict, source: str):
    """A function path -> (alpha, rslora) from diffusers/PEFT header metadata, or None without metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        raise LoRAError(f"{source}: unreadable lora_adapter_metadata in the header") from None
    if any(k.startswith("transformer.") for k in cfg):   # saved by a pipeline: one entry per component
        cfg = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
    alpha, patterns, rslora = cfg.get("lora_alpha"), cfg.get("alpha_pattern") or {}, bool(cfg.get("use_rslora"))
    if alpha is None and not patterns:
        return None

    def lookup(path, rank):
        for pattern, a in patterns.items():   # peft's get_pattern_key
            if re.match(rf"(.*\.)?({pattern})$", path):
                return a, rslora
        return (alpha if alpha is not None else rank), rslora

    return lookup



def group_tensors(state: dict, model_paths, source: str) -> tuple[dict, list]:
    """({module path: {role: (key, mx array)}}, keys with no role) for a LoRA state dict: the format's prefixes
    stripped and its spelling normalized to the model's names (`model_paths`: its module and tensor paths)."""
    if not state:
        raise LoRAError(f"{source}: the LoRA holds no tensors")
    _foreign(state, source)
    vocab = _vocabulary(model_paths)
    groups: dict[str, dict] = {}
    unmatched = []
    for key, value in state.items():
        role, path = _split_role(key, source)
        if role is None:
            unmatched.append(key)
            continue
        path = _tokenize(_strip_prefixes(path), vocab)
        groups.setdefault(path, {})[role] = (key, as_mx(value))
    _check_values([kv for roles in groups.values() for kv in roles.values()], source)
    return groups, unmatched


def _check_values(tensors: list, source: str) -> None:
    """Floating-point tensors, finite, |value| ≤ MAX_ABS; else one LoRAError naming the first bad key."""
    for key, v in tensors:
        if not mx.issubdtype(v.dtype, mx.floating):
            raise LoRAError(f"{source}: tensor {key} has dtype {v.dtype}; a LoRA holds floating-point tensors")
    tensors = [(key, v) for key, v in tensors if v.size]
    finite = [mx.isfinite(v).all() for _, v in tensors]
    peak = [mx.abs(v).max() for _, v in tensors]
    mx.eval(finite, peak)
    for (key, _), ok, m in zip(tensors, finite, peak):
        if not ok.item():
            raise LoRAError(f"{source}: tensor {key} holds values that are not finite (NaN or inf): a damaged file "
                            "or a diverged training")
        if m.item() > MAX_ABS:
            raise LoRAError(f"{source}: tensor {key} holds a value of magnitude {m.item():.3g}, larger than "
                            f"{MAX_ABS:g}, which no working LoRA holds: a damaged file or a diverged training")
