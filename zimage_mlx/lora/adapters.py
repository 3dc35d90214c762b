"""Named LoRA adapters of one pipeline: load, attach, switch weights, fuse/unfuse, clear.

Each adapter is applied as side branches (layers.py): y = base(x) + Σᵢ wᵢ·sᵢ·Bᵢ(Aᵢ·x), sᵢ = alpha/rank, with A and B
cast once to the activation dtype; full deltas on float tensors (norms, biases, float weights) are merged and undone
exactly. A target inside a fused layer (to_q in `to_qkv`) is that layer's row slice, for branches, merges and
fuse_lora alike. The API is diffusers' `ZImageLoraLoaderMixin` (diffusers/loaders/lora_pipeline.py).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .formats import LoRAError, read_lora
from .layers import (LoRABranch, LoRALinear, PatchBranch, add_rows, group_targets, linear_shapes, model_modules,
                     resolve_layer, resolve_tensor, set_module, tensor_owner, unwrap, wrap)
from .patches import Delta, LowRank, cast_patch, parse_lora, patch_dtype

__all__ = ["Adapter", "LoRAError", "LoRAState", "check_lora_args", "load_adapter"]


@dataclass
class Adapter:
    name: str
    source: str                      # file name (or "state dict")
    sha256: str | None
    patches: list
    weight: float = 1.0


class LoRAState:
    """The LoRAs of one pipeline: parsed once, attached to the transformer now or when it loads.

    Switching adapters or weights changes Python floats (and re-merges `.diff` tensors); the base weights are
    never reloaded.
    """

    def __init__(self):
        self.adapters: dict[str, Adapter] = {}
        self.model: nn.Module | None = None
        self._wrapped: dict[str, LoRALinear] = {}    # layer path -> wrapper
        self._originals: dict[str, mx.array] = {}    # tensor path -> the tensor before any merge
        self._merges: dict[str, list] = {}           # tensor path -> [(Adapter, Delta)]

    def add(self, adapter: Adapter) -> None:
        """Add an adapter; as in diffusers, the newest adapter is the active one (set_weights combines them)."""
        if adapter.name in self.adapters:
            raise ValueError(f"adapter name {adapter.name!r} is already in use; pass another adapter_name or "
                             "unload_lora_weights() first")
        if self.fused_names():
            raise ValueError("unfuse_lora() before loading another LoRA")
        for other in self.adapters.values():
            other.weight = 0.0
        self.adapters[adapter.name] = adapter
        if self.model is not None:
            self._attach(adapter)
            self._remerge()

    def attach(self, model: nn.Module) -> None:
        """Apply every adapter to a (newly loaded) transformer."""
        self.model, self._wrapped, self._originals, self._merges = model, {}, {}, {}
        for a in self.adapters.values():
            self._attach(a)
        self._remerge()

    def set_adapters(self, names, weights=None) -> None:
        """diffusers' `set_adapters`: `names` one name or a list; `weights` None (1.0), one number for all, or one
        per name (numpy numbers and 0-d arrays are numbers). Bad names or weights are refused before any change."""
        names = _names("adapter_names", names)
        if weights is None or _is_number(weights):
            weights = [1.0 if weights is None else weights] * len(names)
        elif isinstance(weights, (list, tuple)) or getattr(weights, "ndim", None) == 1:
            weights = list(weights)
        else:
            raise TypeError(f"adapter_weights must be one number or a list with one number per adapter, got "
                            f"{type(weights).__name__}")
        if len(weights) != len(names):
            raise ValueError(f"{len(weights)} adapter weights for {len(names)} adapters")
        self.set_weights(dict(zip(names, weights)))

    def set_weights(self, weights: dict) -> None:
        """{name: weight}; adapters not named get weight 0 (diffusers' set_adapters)."""
        self._check_known(weights)
        weights = {name: _weight(name, w) for name, w in weights.items()}
        if self.fused_names():
            raise ValueError("unfuse_lora() before changing adapter weights (they are fused into the weights)")
        for name, a in self.adapters.items():
            a.weight = weights.get(name, 0.0)
        self._remerge()

    def clear(self) -> None:
        """Remove every adapter; the model is exactly the base model again (after a fuse: up to one rounding).
        Branches that are not an adapter's (layers.add_trainable_lora) stay."""
        if self.model is not None:
            self.unfuse()
            for path, wrapper in self._wrapped.items():
                wrapper.branches = [b for b in wrapper.branches if b.adapter is None]
                if not wrapper.branches:
                    set_module(self.model, path, wrapper.base)
            for path, original in self._originals.items():
                owner, attr = tensor_owner(self.model, path)
                owner[attr] = original
        self.adapters, self._wrapped, self._originals, self._merges = {}, {}, {}, {}

    def fused_names(self) -> list[str]:
        return sorted({b.adapter.name for b in self._branches() if b.fused})

    def fuse(self, names=None, lora_scale: float = 1.0) -> None:
        """Merge the branches of `names` (default: all active) into float weights (faster steps)."""
        if not _is_number(lora_scale) or not math.isfinite(float(lora_scale)):
            raise ValueError(f"lora_scale must be a finite number, got {lora_scale!r}")
        names = set(self.adapters if names is None else self._check_known(_names("adapter_names", names)))
        if self.model is None:
            raise RuntimeError("fuse_lora needs the transformer loaded")
        quantized = [p for p, w in self._wrapped.items() if isinstance(w.base, nn.QuantizedLinear)
                     and any(b.adapter is not None and b.adapter.name in names for b in w.branches)]
        if quantized:
            raise ValueError(f"fuse_lora merges into float weights only; {quantized[0]} is quantized (merging "
                             "into quantized codes loses most of the LoRA; the side branch keeps all of it)")
        for w in self._wrapped.values():
            for b in w.branches:
                if b.adapter is not None and b.adapter.name in names and not b.fused and b.factor() != 0.0:
                    c = b.factor() * float(lora_scale)
                    add_rows(w.base, b.span, c * b.matrix())
                    b.fused = c

    def unfuse(self) -> None:
        """Undo fuse(): subtract what was merged (exact up to one rounding in the weight dtype)."""
        for w in self._wrapped.values():
            for b in w.branches:
                if b.adapter is not None and b.fused:
                    add_rows(w.base, b.span, -b.fused * b.matrix())
                    b.fused = 0.0

    # ---------------------------------------------------------------------------- internals
    def _check_known(self, names):
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; loaded: "
                             f"{', '.join(map(repr, self.adapters)) or 'none'}")
        return names

    def _branches(self):
        return [b for w in self._wrapped.values() for b in w.branches if b.adapter is not None]

    def _attach(self, adapter: Adapter) -> None:
        modules = model_modules(self.model)
        shapes = linear_shapes(modules)
        dtype = self.model.dtype
        for i, p in enumerate(adapter.patches):
            p = adapter.patches[i] = cast_patch(p, dtype) if patch_dtype(p) != dtype else p
            if isinstance(p, Delta):
                path, rows = resolve_layer(shapes, p.targets[0].rpartition(".")[0])
                if path and isinstance(unwrap(modules[path]), nn.QuantizedLinear) and p.targets[0].endswith(".weight"):
                    self._add_branch(path, PatchBranch(p, (0,), rows, adapter))
                else:
                    self._merges.setdefault(p.targets[0], []).append((adapter, p))
                continue
            for path, parts, span in group_targets(shapes, p.targets):
                if isinstance(p, LowRank):
                    up = p.ups[parts[0]] if len(parts) == 1 else mx.concatenate([p.ups[j] for j in parts])
                    branch = LoRABranch(p.down, up, p.scale, span, adapter=adapter, patch=p)
                    branch.freeze()
                else:
                    branch = PatchBranch(p, parts, span, adapter)
                self._add_branch(path, branch)

    def _add_branch(self, path: str, branch) -> None:
        wrapper = self._wrapped[path] = wrap(self.model, path)
        wrapper.branches.append(branch)

    def _remerge(self) -> None:
        if not self._merges:
            return
        shapes = linear_shapes(model_modules(self.model))
        values = {}
        for path, merges in self._merges.items():
            real, rows = resolve_tensor(shapes, path)    # a part of a fused layer: rows of its tensor
            if real not in values:
                owner, attr = tensor_owner(self.model, real)
                values[real] = self._originals.setdefault(real, owner[attr])
            for adapter, d in merges:
                if adapter.weight != 0.0:
                    delta = (adapter.weight * d.scale) * d.tensor
                    values[real] = values[real] + delta if rows is None else \
                        values[real].at[rows[0]:rows[1]].add(delta)
        for real, value in values.items():
            owner, attr = tensor_owner(self.model, real)
            owner[attr] = value
        mx.eval(list(values.values()))


def load_adapter(source, model: nn.Module, dtype: mx.Dtype, name: str) -> Adapter:
    """Read and check a LoRA (a .safetensors path or a {key: array} dict) against `model`."""
    if isinstance(source, dict):
        state, metadata, sha, label = dict(source), {}, None, "state dict"
    else:
        state, metadata, sha = read_lora(source)
        label = str(source)
    patches = parse_lora(state, metadata, model, label, dtype)
    return Adapter(name, Path(label).name if sha else label, sha, patches)


def check_lora_args(source, adapter_name) -> None:
    """load_lora_weights' arguments: a .safetensors path, hub file name or {key: array} dict, and an adapter name
    that is None (a default name is chosen) or a non-empty string."""
    if not isinstance(source, (str, os.PathLike, dict)):
        got = "None" if source is None else type(source).__name__
        raise TypeError(f"a LoRA is a .safetensors path, a hub file \"owner/repo/file.safetensors\" or a "
                        f"{{key: array}} dict, got {got}")
    if isinstance(source, str) and not source.strip():
        raise ValueError("the LoRA path is empty")
    if adapter_name is not None and not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a string, got {type(adapter_name).__name__}")
    if adapter_name is not None and not adapter_name.strip():
        raise ValueError("adapter_name must not be empty")


def _is_number(v) -> bool:
    """A real number: Python's and numpy's (np.float32(0.5)), or a 0-d numpy / MLX array; not a bool."""
    if isinstance(v, np.ndarray):
        return v.ndim == 0 and v.dtype != np.bool_
    if isinstance(v, mx.array):
        return v.ndim == 0 and v.dtype != mx.bool_
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _weight(name: str, w) -> float:
    if not _is_number(w):
        raise TypeError(f"adapter {name!r}: the weight must be a number, got {type(w).__name__}")
    if not math.isfinite(float(w)):
        raise ValueError(f"adapter {name!r}: the weight must be a finite number, got {float(w)}")
    return float(w)


def _names(what: str, names) -> list[str]:
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        got = type(names).__name__ if not isinstance(names, (list, tuple)) else \
            f"a list holding {', '.join(sorted({type(n).__name__ for n in names if not isinstance(n, str)}))}"
        raise TypeError(f"{what} must be a name or a list of names, got {got}")
    return list(names)
