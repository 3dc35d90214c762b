"""Reading checkpoints: safetensors files and sharded Hugging Face trees, lazily.

Every component load goes through `read_component` (or `read_safetensors`) and then `check_and_cast`:
arrays come back from `mx.load` lazily (nothing is read until evaluated), so casting them tensor by tensor
keeps peak memory near one copy of the weights in the target dtype.
Errors name the file, the key and the expected shape; they are `WeightError` (a ValueError).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .quantize import QUANTIZED, prepare_for_quantized_load


class WeightError(ValueError):
    """A checkpoint cannot be used: missing, corrupt, or not what the model expects."""


# --------------------------------------------------------------------------- dtypes
DTYPES = {"bfloat16": mx.bfloat16, "bf16": mx.bfloat16, "float32": mx.float32, "fp32": mx.float32}


def dtype_name(d: mx.Dtype) -> str:
    """"bfloat16" / "float32" (what manifests, metadata and the converter's --dtype use)."""
    return str(d).replace("mlx.core.", "")


def parse_dtype(d) -> mx.Dtype:
    """bfloat16 or float32. float16 is refused: Z-Image's activations overflow its range (black images)."""
    if d in (mx.float16, "float16", "fp16", "half"):
        raise ValueError("float16 is not supported: Z-Image's activations overflow it (black images); "
                         "use bfloat16 (the default on a GPU) or float32")
    if isinstance(d, mx.Dtype) and d in DTYPES.values():
        return d
    if not isinstance(d, str) or d not in DTYPES:
        raise ValueError(f"unknown dtype {d!r}; use 'bfloat16' or 'float32'")
    return DTYPES[d]


def default_dtype() -> mx.Dtype:
    """bfloat16 on a GPU (Metal, CUDA); float32 on the CPU backend, whose bfloat16 matmul is slow."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, validated against the file size."""
    return _safetensors_layout(path)[0]


def _safetensors_layout(path: Path) -> tuple[dict, int]:
    """(the validated JSON header, the byte offset where tensor data starts)."""
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
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not (isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
                and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
                and all(isinstance(o, int) for o in v["data_offsets"] + v["shape"])):
            raise WeightError(f"{path}: corrupt safetensors header (entry {k!r} is not "
                              "{dtype, shape, data_offsets})")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightError(
            f"{path}: truncated or corrupt safetensors file ({size} bytes, the header needs {8 + n + end}); "
            "re-download or re-convert it"
        )
    return header, 8 + n


def safetensors_keys(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype string)} of a safetensors file, from its header only (cheap)."""
    header = _safetensors_header(Path(path))
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}


# safetensors dtype -> the numpy dtype its bytes are read as (bfloat16 as uint16, viewed back in MLX)
_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
                 "U64": np.uint64, "I32": np.int32, "U32": np.uint32, "I16": np.int16, "U16": np.uint16,
                 "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@dataclass(frozen=True)
class TensorSlice:
    """Part `index` of `parts` equal parts along `axis` of one tensor in a safetensors file, read when called.

    Only that part's bytes are copied out of a memory map of the file, so a tensor-parallel rank never holds (or
    allocates) the whole tensor; `mx.load` would read all of it even when only a slice is evaluated.
    `check_and_cast` accepts these in place of arrays and reads each one at its turn.
    """

    path: str
    key: str
    offset: int                 # absolute byte offset of the tensor's data in the file
    dtype: str                  # safetensors dtype string
    full_shape: tuple
    axis: int
    index: int
    parts: int

    @property
    def shape(self) -> tuple:
        shape = list(self.full_shape)
        shape[self.axis] //= self.parts
        return tuple(shape)

    def __call__(self) -> mx.array:
        data = np.memmap(self.path, dtype=_NUMPY_DTYPES[self.dtype], mode="r", offset=self.offset,
                         shape=self.full_shape)
        n = self.full_shape[self.axis] // self.parts
        where = [slice(None)] * len(self.full_shape)
        where[self.axis] = slice(self.index * n, (self.index + 1) * n)
        out = mx.array(np.ascontiguousarray(data[tuple(where)]))
        del data
        return out.view(mx.bfloat16) if self.dtype == "BF16" else out


def safetensors_layout(path: str | Path) -> tuple[dict, int]:
    """(header, data start) of a safetensors file: what `tensor_slice` needs to find a tensor's bytes."""
    return _safetensors_layout(Path(path))


def tensor_slice(path: str | Path, key: str, axis: int, index: int, parts: int,
                 layout: tuple[dict, int] | None = None) -> TensorSlice:
    """A `TensorSlice` of `key` in `path` (pass the file's `safetensors_layout` when slicing many of its tensors)."""
    path = Path(path)
    header, start = _safetensors_layout(path) if layout is None else layout
    entry = header.get(key)
    if not isinstance(entry, dict):
        raise WeightError(f"{path}: no tensor {key}")
    shape = tuple(entry["shape"])
    axis = axis % len(shape) if shape else 0
    if entry["dtype"] not in _NUMPY_DTYPES:
        raise WeightError(f"{path}: tensor {key} has dtype {entry['dtype']}, which cannot be split")
    if not shape or shape[axis] % parts:
        raise WeightError(f"{path}: tensor {key} has shape {shape}; its axis {axis} does not split into {parts} "
                          "equal parts (does the config match the weights?)")
    return TensorSlice(str(path), key, start + entry["data_offsets"][0], entry["dtype"], shape,
                       axis, index, parts)


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
    A value may also be a `TensorSlice` (or any callable returning an array), read when its turn comes.
    """
    expected = dict(tree_flatten(model.parameters()))
    to_quantize = {}
    for path, m in model.named_modules():
        if isinstance(m, QUANTIZED) and f"{path}.weight" in weights and f"{path}.scales" not in weights:
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
            w = _read(weights.pop(key))
            shape = (ref.shape[0], ref.shape[1] * 32 // m.bits)
            if tuple(w.shape) != shape:
                raise WeightError(f"{source}: tensor {key} has shape {tuple(w.shape)}, expected {shape}")
            w = w.astype(dtype if dtype is not None else w.dtype)
            wq, scales, biases = mx.quantize(w, group_size=m.group_size, bits=m.bits)
            stem = key[: -len("weight")]
            mx.eval(wq, scales, biases)
            out[key], out[stem + "scales"], out[stem + "biases"] = wq, scales, biases
            continue
        w = _read(weights.pop(key))
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


def _read(value) -> mx.array:
    return value() if callable(value) else value


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
        prepare_for_quantized_load(model, bits, group_size)
    model.update(tree_unflatten(list(check_and_cast(model, weights, dtype, source).items())))
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
