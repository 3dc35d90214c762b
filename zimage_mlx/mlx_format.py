"""The MLX layout: a directory of ready-to-load components, written by `zimage-mlx convert`.

    DST/zimage_mlx.json               manifest: format version, zimage_mlx version, source and its hashes,
                                      variant, dtype and quantization per component
    DST/{transformer,text_encoder,vae}/config.json + model(-0000k-of-0000n).safetensors [+ index]
    DST/tokenizer/*, DST/scheduler/scheduler_config.json

Tensors are stored under the MLX module names in MLX layouts (conv weights OHWI, quantized layers packed), so
loading does no key mapping and no transposes: build the module, mark quantized layers, read, done.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .weights import WeightError, fill_model, read_component, read_config

FORMAT_VERSION = 1
MANIFEST_NAME = "zimage_mlx.json"
MODEL_COMPONENTS = ("transformer", "text_encoder", "vae")
SHARD_BYTES = 4 * 2**30


def is_mlx_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightError(f"{path}: unreadable manifest ({e}); convert the model again") from None
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise WeightError(f"{path}: not a zimage_mlx manifest (no format_version)")
    if version > FORMAT_VERSION:
        raise WeightError(f"{path}: format version {version} was written by a newer zimage_mlx; upgrade the package")
    for name in MODEL_COMPONENTS:
        if name not in manifest.get("components", {}):
            raise WeightError(f"{path}: the manifest lists no {name} component")
    return manifest


def build_model(name: str, config: dict) -> nn.Module:
    """An un-evaluated module for a component config (parameters stay lazy until weights replace them)."""
    if name == "transformer":
        from .transformer import ZImageTransformer, ZImageTransformerConfig

        return ZImageTransformer(ZImageTransformerConfig.from_dict(config))
    if name == "text_encoder":
        from .text_encoder import Qwen3Encoder, Qwen3EncoderConfig

        return Qwen3Encoder(Qwen3EncoderConfig.from_dict(config))
    if name == "vae":
        from .vae import AutoencoderKL, VAEConfig

        return AutoencoderKL(VAEConfig.from_dict(config))
    raise ValueError(f"unknown component {name!r}")


def save_component(directory: Path, model: nn.Module, config: dict, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Write config.json and the model's parameters as safetensors shards (+ index when more than one)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=_json_default))
    params = tree_flatten(model.parameters())
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for key, value in params:
        if size and size + value.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(directory / name), shard, metadata={"format": "mlx"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.nbytes for _, v in params)},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return names


def load_component(root: str | Path, name: str, manifest: dict, bits: int | None = None,
                   group_size: int | None = None) -> nn.Module:
    """Load one component of an MLX-layout directory. `bits` quantizes a float component on load."""
    entry = manifest["components"][name]
    directory = Path(root) / name
    model = build_model(name, read_config(directory))
    saved_bits = entry.get("bits")
    use_bits = saved_bits or bits
    group = entry.get("group_size") or group_size or 64
    return fill_model(model, read_component(directory), None, str(directory), bits=use_bits, group_size=group)


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot serialize {type(o).__name__}")
