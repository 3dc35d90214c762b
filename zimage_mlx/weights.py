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
from typing import Callable, Iterable, Mapping

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


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    return _safetensors_header(Path(path)).get("__metadata__", {}) or {}


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
    dtype: mx.Dtype,
    source: str,
    keep_dtype: Callable[[str], bool] = lambda k: False,
) -> dict[str, mx.array]:
    """Match `weights` (already in the model's key names and layouts) against the model's parameters.

    Raises WeightError naming the missing/unexpected key or the shape mismatch. Floating tensors are cast to
    `dtype` (unless keep_dtype(key)); the result is evaluated tensor by tensor so the source is never held twice.
    `weights` is consumed (emptied): a lazily loaded source tensor that stays referenced after its cast is
    evaluated would keep its file data alive, doubling peak memory. Callers must hold no other references.
    """
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
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
        w = weights.pop(key)
        if tuple(w.shape) != tuple(ref.shape):
            raise WeightError(
                f"{source}: tensor {key} has shape {tuple(w.shape)}, expected {tuple(ref.shape)} "
                "(does the config match the weights?)"
            )
        if not mx.issubdtype(w.dtype, mx.floating):
            raise WeightError(f"{source}: tensor {key} has dtype {w.dtype}, expected a floating-point tensor")
        if not keep_dtype(key):
            w = w.astype(dtype)
        mx.eval(w)
        out[key] = w
    return out


def load_into(model: nn.Module, params: Mapping[str, mx.array]) -> nn.Module:
    model.update(tree_unflatten(list(params.items())))
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
