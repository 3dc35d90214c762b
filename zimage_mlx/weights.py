"""Reading checkpoints: safetensors files and sharded Hugging Face trees, lazily.

Every component loader goes through `read_component` (or `read_safetensors`) and then `check_and_cast`:
arrays come back from `mx.load` lazily (nothing is read until evaluated), so casting them tensor by tensor
keeps peak memory near one copy of the weights in the target dtype.
Errors name the file, the key and the expected shape; they are `WeightError` (a ValueError).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


class WeightError(ValueError):
    """A checkpoint cannot be used: missing, corrupt, or not what the model expects."""


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, validated against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > min(size - 8, 100_000_000):
                raise WeightError(f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightError(f"{path}: cannot read safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise WeightError(f"{path}: safetensors header is not a JSON object")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightError(
            f"{path}: truncated or corrupt safetensors file ({size} bytes, the header needs {8 + n + end}); "
            "re-download or re-convert it"
        )
    return header


def safetensors_keys(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype string)} of a safetensors file, from its header only (cheap)."""
    header = _safetensors_header(Path(path))
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}


def read_safetensors(path: str | Path) -> dict[str, mx.array]:
    """Lazily load one safetensors file (validated first, so truncation is a clear WeightError)."""
    path = Path(path)
    if not path.is_file():
        raise WeightError(f"{path}: file not found")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise WeightError(f"{path}: pickle checkpoints are never loaded (unsafe); use a .safetensors file")
    if path.suffix == ".gguf":
        raise WeightError(f"{path}: GGUF files are not supported; use the .safetensors checkpoint")
    _safetensors_header(path)
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise WeightError(f"{path}: cannot load ({e})") from None


def component_files(directory: str | Path) -> list[Path]:
    """The safetensors files of one component directory (index-listed shards, or every *.safetensors)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightError(f"{directory}: directory not found")
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise WeightError(f"{indexes[0]}: unreadable shard index ({e})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightError(f"{indexes[0]}: lists shard(s) {', '.join(missing)} that are missing from {directory}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightError(f"{directory}: no .safetensors weights found")
    return files


def read_component(directory: str | Path) -> dict[str, mx.array]:
    """All tensors of a (possibly sharded) component directory, lazily loaded."""
    weights: dict[str, mx.array] = {}
    for f in component_files(directory):
        weights.update(read_safetensors(f))
    return weights


def read_config(directory: str | Path, name: str = "config.json") -> dict:
    path = Path(directory) / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightError(f"{path}: config file not found") from None
    except (OSError, ValueError) as e:
        raise WeightError(f"{path}: unreadable config ({e})") from None


def check_and_cast(
    model: nn.Module,
    weights: dict[str, mx.array],
    dtype: mx.Dtype | None,
    source: str,
) -> dict[str, mx.array]:
    """Match `weights` (already in the model's key names and layouts) against the model's parameters.

    Raises WeightError naming the missing/unexpected key or the shape mismatch. Floating tensors are cast to
    `dtype` (unless dtype is None); the result is evaluated tensor by tensor so the source is
    never held twice. Quantized layers of `model` (QuantizedLinear shells, see quantize.py) accept either their
    saved packed weights/scales/biases or a float weight, which is quantized here, one tensor at a time.
    `weights` is consumed (emptied): a lazily loaded source tensor that stays referenced after its cast is
    evaluated would keep its file data alive, doubling peak memory. Callers must hold no other references.
    """
    expected = dict(tree_flatten(model.parameters()))
    to_quantize = {}
    for path, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear) and f"{path}.weight" in weights and f"{path}.scales" not in weights:
            to_quantize[f"{path}.weight"] = m
    provided = set(weights)
    for key in to_quantize:
        provided |= {key[: -len("weight")] + "scales", key[: -len("weight")] + "biases"}
    missing = sorted(set(expected) - provided)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightError(
            f"{source}: missing tensor(s) {', '.join(missing[:5])}{more}; expected e.g. "
            f"{missing[0]} with shape {tuple(expected[missing[0]].shape)}"
        )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise WeightError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}{more}")
    out = {}
    for key, ref in expected.items():
        if key in out:
            continue
        if key in to_quantize:
            m = to_quantize[key]
            w = weights.pop(key)
            shape = (ref.shape[0], ref.shape[1] * 32 // m.bits)
            if tuple(w.shape) != shape:
                raise WeightError(f"{source}: tensor {key} has shape {tuple(w.shape)}, expected {shape}")
            w = w.astype(dtype if dtype is not None else w.dtype)
            wq, scales, biases = mx.quantize(w, group_size=m.group_size, bits=m.bits)
            stem = key[: -len("weight")]
            mx.eval(wq, scales, biases)
            out[key], out[stem + "scales"], out[stem + "biases"] = wq, scales, biases
            continue
        w = weights.pop(key)
        if tuple(w.shape) != tuple(ref.shape):
            raise WeightError(
                f"{source}: tensor {key} has shape {tuple(w.shape)}, expected {tuple(ref.shape)} "
                "(does the config match the weights?)"
            )
        if not mx.issubdtype(ref.dtype, mx.floating):
            if w.dtype != ref.dtype:
                raise WeightError(f"{source}: tensor {key} has dtype {w.dtype}, expected {ref.dtype}")
        elif not mx.issubdtype(w.dtype, mx.floating):
            raise WeightError(f"{source}: tensor {key} has dtype {w.dtype}, expected a floating-point tensor")
        elif dtype is not None:
            w = w.astype(dtype)
        mx.eval(w)
        out[key] = w
    return out


def load_into(model: nn.Module, params: Mapping[str, mx.array]) -> nn.Module:
    model.update(tree_unflatten(list(params.items())))
    return model


def fill_model(
    model: nn.Module,
    weights: dict[str, mx.array],
    dtype: mx.Dtype | None,
    source: str,
    bits: int | None = None,
    group_size: int = 64,
) -> nn.Module:
    """Check, cast (and with `bits`, quantize with the policy of quantize.py) `weights` into `model`.

    `weights` must already be in the model's names and layouts; it is consumed (see check_and_cast).
    """
    if bits:
        from .quantize import prepare_for_quantized_load

        prepare_for_quantized_load(model, bits, group_size)
    load_into(model, check_and_cast(model, weights, dtype, source))
    model.eval()
    return model


def strip_prefix(weights: Mapping[str, mx.array], prefixes: Iterable[str]) -> dict[str, mx.array]:
    """Remove the first matching prefix from every key that has it."""
    prefixes = tuple(prefixes)
    out = {}
    for k, v in weights.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


# --------------------------------------------------------------------------- sources
DEFAULT_REPO = "Tongyi-MAI/Z-Image-Turbo"
# What a pipeline needs from a diffusers-layout repo (no .bin/.pt duplicates, no README images).
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "transformer/*.json",
    "transformer/*.safetensors",
    "vae/*.json",
    "vae/*.safetensors",
]


def looks_like_repo_id(src: str) -> bool:
    parts = str(src).split("/")
    return len(parts) == 2 and all(parts) and not str(src).startswith((".", "~")) and not Path(src).exists()


def resolve_source(src: str | Path, revision: str | None = None, offline: bool | None = None) -> Path:
    """A local directory for `src`: the directory itself, or a hub snapshot (downloading only what is needed).

    Offline (HF_HUB_OFFLINE=1 or offline=True) with nothing cached raises WeightError with the fix.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightError(f"{path}: expected a model directory, got a file (single files go through convert)")
    if not looks_like_repo_id(str(src)):
        raise WeightError(f"{src}: no such directory, and not a hub id like {DEFAULT_REPO}")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    local_only = constants.HF_HUB_OFFLINE if offline is None else offline
    try:
        return Path(snapshot_download(str(src), revision=revision, allow_patterns=HUB_ALLOW_PATTERNS,
                                      local_files_only=local_only))
    except LocalEntryNotFoundError:
        raise WeightError(
            f"{src} is not in the local Hugging Face cache and downloading is off (offline or no network): "
            f"run once online, or `hf download {src}`, or pass a local directory"
        ) from None
    except GatedRepoError:
        raise WeightError(f"{src}: gated repository; accept its licence on the hub and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise WeightError(f"{src}: no such repository on the hub (or it is private)") from None
    except RevisionNotFoundError:
        raise WeightError(f"{src}: revision {revision!r} not found") from None
    except OSError as e:
        raise WeightError(f"{src}: download failed ({e}); check the network or pass a local directory") from None


# --------------------------------------------------------------------------- single-file kinds
KIND_NAMES = {
    "transformer": "a Z-Image transformer (S3-DiT)",
    "text_encoder": "a Qwen3 text encoder",
    "vae": "a FLUX 16-channel VAE",
}


def _file_kind_from_keys(keys: dict[str, tuple]) -> str:
    """'transformer' | 'text_encoder' | 'vae', or a WeightError saying what the file looks like."""
    names = list(keys)

    def has(*fragments):
        return any(all(f in k for f in fragments) for k in names)

    if has("lora_") or has(".lora.") or has("lokr_") or has("hada_w"):
        raise WeightError("it looks like a LoRA (lora_A/lora_down keys); LoRAs are applied on top of a model, "
                          "they are not a model")
    if has("layers.0.adaLN_modulation.0.weight") and (has("cap_embedder") or has("x_pad_token")):
        return "transformer"
    if has("double_blocks.") or has("single_blocks."):
        raise WeightError("it looks like a FLUX transformer (double_blocks/single_blocks), not Z-Image")
    if has("input_blocks.") or has("conditioner.embedders") or has("down_blocks.0.attentions"):
        raise WeightError("it looks like a Stable Diffusion / SDXL UNet checkpoint, not Z-Image")
    if has("self_attn.q_norm.weight") and has("embed_tokens.weight"):
        return "text_encoder"
    if has("self_attn.q_proj") and has("embed_tokens.weight"):
        raise WeightError("it looks like a language model without q/k norms (Qwen2/Llama?), not the Qwen3 encoder")
    conv_in = next((v for k, v in keys.items() if k.endswith("decoder.conv_in.weight")), None)
    if conv_in is not None:
        if len(conv_in[0]) == 4 and conv_in[0][1] != 16:
            raise WeightError(f"it looks like a {conv_in[0][1]}-channel VAE (SD/SDXL); Z-Image needs the 16-channel "
                              "FLUX VAE (ae.safetensors)")
        return "vae"
    raise WeightError("it is not a Z-Image transformer, Qwen3 text encoder or FLUX VAE checkpoint "
                      f"(first keys: {', '.join(names[:3])})")


def detect_file_kind(path: str | Path) -> str:
    """Which Z-Image component a single checkpoint file holds, from its keys (never unpickles anything)."""
    path = Path(path)
    if not path.is_file():
        raise WeightError(f"{path}: file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or path.suffix.lower() == ".gguf":
        raise WeightError(f"{path}: a GGUF file; zimage_mlx reads .safetensors checkpoints (convert it or use the "
                          "bf16 safetensors release)")
    if magic[:2] == b"PK" or magic[:1] == b"\x80" or path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise WeightError(f"{path}: a pickle checkpoint (.ckpt/.pt/.bin); these can run code when loaded and are "
                          "never opened: use the .safetensors release")
    try:
        return _file_kind_from_keys(safetensors_keys(path))
    except WeightError as e:
        if str(e).startswith(str(path)):
            raise
        raise WeightError(f"{path}: {e}") from None
