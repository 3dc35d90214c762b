"""One loader for every model component, from either on-disk layout, and the MLX layout's writer.

PyTorch layouts (a diffusers `transformer/`, `text_encoder/`, `vae/` directory, or a ComfyUI / FLUX single file):
the model's `sanitize` maps checkpoint keys and layouts to the module's. The MLX layout (written by
`zimage-mlx convert`, described by its manifest):

    DST/zimage_mlx.json               manifest: format version, zimage_mlx version, source and its hashes,
                                      variant, dtype and quantization per component
    DST/{transformer,text_encoder,vae}/config.json + model(-0000k-of-0000n).safetensors [+ index]
    DST/tokenizer/*, DST/scheduler/scheduler_config.json

stores tensors under the module names in MLX layouts (conv weights OHWI, quantized layers packed), so loading it
does no key mapping: build the module, mark quantized layers, read, done. Either way `weights.fill_model` checks,
casts and (optionally) quantizes tensor by tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..models.controlnet import ZImageControlNet, ZImageControlNetConfig
from ..distributed import SPLITS, shard_model, shard_weights
from .quantize import prepare_for_quantized_load
from ..models.text_encoder import Qwen3Encoder, Qwen3EncoderConfig, has_final_layers
from ..models.transformer import ZImageTransformer, ZImageTransformerConfig
from ..models.vae import AutoencoderKL, VAEConfig
from .weights import (WeightError, component_files, fill_model, read_component, read_config, read_safetensors,
                      safetensors_keys)

FORMAT_VERSION = 1
MANIFEST_NAME = "zimage_mlx.json"
MODEL_COMPONENTS = ("transformer", "text_encoder", "vae")
QUANTIZABLE = ("transformer", "text_encoder")
SHARD_BYTES = 4 * 2**30
MODELS = {
    "transformer": (ZImageTransformer, ZImageTransformerConfig),
    "text_encoder": (Qwen3Encoder, Qwen3EncoderConfig),
    "vae": (AutoencoderKL, VAEConfig),
    "controlnet": (ZImageControlNet, ZImageControlNetConfig),   # optional; sized by the memory plan
}


def is_mlx_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightError(f"{path}: unreadable manifest ({e}); convert the model again") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise WeightError(f"{path}: not a zimage_mlx manifest (no format_version)")
    if version > FORMAT_VERSION:
        raise WeightError(f"{path}: format version {version} (written by zimage_mlx "
                          f"{manifest.get('zimage_mlx_version', '?')}) needs a newer zimage_mlx; this one reads up to "
                          f"format version {FORMAT_VERSION}: pip install -U zimage-mlx")
    for name in MODEL_COMPONENTS:
        if not isinstance(manifest.get("components", {}).get(name), dict):
            raise WeightError(f"{path}: the manifest lists no {name} component")
    return manifest


def stored_config(name: str, config: dict, keys) -> dict:
    """A component's config with what only its weights tell: whether a text encoder holds its last layer and
    final norm (models/text_encoder.has_final_layers; `keys`: the checkpoint's or MLX layout's tensor names)."""
    if name != "text_encoder" or "final_layers" in config:
        return config
    return {**config, "final_layers": has_final_layers(keys, int(config.get("num_hidden_layers", 36)))}


def build_model(name: str, config: dict, source: str = "config") -> nn.Module:
    """An un-evaluated module for a component config (parameters stay lazy until weights replace them)."""
    if name not in MODELS:
        raise ValueError(f"unknown component {name!r}; expected one of {', '.join(MODELS)}")
    model_cls, config_cls = MODELS[name]
    try:
        return model_cls(config_cls.from_dict(config))
    except (TypeError, ValueError, KeyError) as e:
        raise WeightError(f"{source}: unusable {name} config ({e})") from None


def load_component(
    name: str,
    path: str | Path,
    dtype: mx.Dtype | None = None,
    bits: int | None = None,
    group_size: int = 64,
    *,
    config: dict | None = None,
    saved: dict | None = None,
    group: mx.distributed.Group | None = None,
) -> nn.Module:
    """Load one component.

    path: a component directory (config.json + safetensors, sharded or not) or one safetensors file (then pass
    `config`). saved: the manifest entry when `path` is in the MLX layout (no key mapping; its bits and group size
    as saved), None for PyTorch layouts (the model's `sanitize` maps the keys). dtype: float tensors are cast to it
    (None keeps the file's). bits: quantize a float transformer / text encoder on load with the policy of
    quantize.py (the VAE always stays float; saved quantized weights keep their own bits).
    group: a tensor-parallel group of several processes: the transformer and the text encoder are split across it
    (distributed.py) and this process reads only its part of each split tensor.
    """
    path = Path(path)
    if path.is_dir():
        config = read_config(path) if config is None else config
        weights = read_component(path)
    elif path.is_file():
        if config is None:
            raise WeightError(f"{path}: a single file carries no config.json; pass its config")
        weights = read_safetensors(path)
    else:
        raise WeightError(f"{path}: not found")
    model = build_model(name, stored_config(name, config, weights), str(path))
    if saved is not None and saved.get("bits"):
        bits, group_size = saved["bits"], saved.get("group_size") or 64
    if name not in QUANTIZABLE:
        bits = None
    split = group is not None and group.size() > 1 and name in SPLITS
    if split:
        # A tensor that `sanitize` passes through is the very array read from the file: remember where it lives.
        # (`keep` holds the originals until then, so no id is reused by a tensor sanitize creates.)
        keep = dict(weights)
        where = {id(v): k for k, v in keep.items()}
        files = component_files(path) if path.is_dir() else [path]
        file_of = {k: f for f in files for k in safetensors_keys(f)}
    if saved is None:
        weights = model.sanitize(weights)
    if not split:
        return fill_model(model, weights, dtype, str(path), bits=bits, group_size=group_size)
    sources = {k: (file_of[where[id(v)]], where[id(v)]) for k, v in weights.items() if id(v) in where}
    del keep, where
    if bits:
        prepare_for_quantized_load(model, bits, group_size)   # QuantizedLinear shells first, then split them
    shard_model(name, model, group)
    return fill_model(model, shard_weights(model, weights, group, sources), dtype, str(path))


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


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot serialize {type(o).__name__}")
