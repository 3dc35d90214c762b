"""Run-time LoRA layers: a linear layer plus side branches, for inference and for training.

`LoRALinear` wraps a `nn.Linear`, a `nn.QuantizedLinear` or the CPU's dequantizing layer
(loading/quantize.DequantizingLinear) and returns base(x) + Σᵢ cᵢ·ΔWᵢ·x, cᵢ = adapter weight · alpha/rank: a 4-bit
model keeps the full effect of a LoRA, which merging into the 4-bit codes would mostly erase.
A low-rank branch (`LoRABranch`) holds its factors as MLX parameters with PEFT's names, `lora_A` (rank, in) and
`lora_B` (out, rank). Loaded for inference they are frozen, so `model.trainable_parameters()` stays the base's;
`add_trainable_lora` adds trainable ones (PEFT's `LoraLayer` in peft/tuners/lora/layer.py: y = W·x + (α/r)·B(A·x)).
LoKr and full-delta patches run as `PatchBranch`es, whose arrays are not parameters.

The pipeline's transformer may run q/k/v as one `to_qkv` and w1/w3 as one `w13` (models/transformer.py
FUSED_PROJECTIONS): a diffusers target inside a fused layer is that layer's row slice. The branches of one patch on
one layer are one branch over the rows they cover, so a fused-qkv LoRA's shared down-projection runs once per call.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..models.fused_projections import FUSED_PROJECTIONS


# ------------------------------------------------------------------------------------------------ branches
class LoRABranch(nn.Module):
    """c·B(A·x) added to a layer's output, or to rows `span` = (start, stop) of it (None: all of it).

    c = weight·scale, the weight read from `adapter` (1.0 for a trainable branch, which has none). A trainable
    branch keeps float32 factors (PEFT's autocast_adapter_dtype) and casts its update to the activation dtype;
    an adapter's factors are already in the activation dtype, so nothing changes type.
    """

    def __init__(self, lora_A, lora_B, scale: float, span=None, adapter=None, patch=None, target=None):
        super().__init__()
        self.lora_A = lora_A          # (rank, in)
        self.lora_B = lora_B          # (out rows, rank)
        object.__setattr__(self, "span", span)
        object.__setattr__(self, "adapter", adapter)   # adapters.Adapter (name, weight) or None
        object.__setattr__(self, "patch", patch)       # the patches.LowRank it was made from, or None
        object.__setattr__(self, "target", target)     # a trainable branch's diffusers module name
        self.scale = float(scale)
        self.fused = 0.0               # the factor fuse_lora merged into the weight (the branch is then off)

    def factor(self) -> float:
        return 0.0 if self.fused else (1.0 if self.adapter is None else self.adapter.weight) * self.scale

    def delta(self, x, c):
        d = ((x @ self.lora_A.T) * c) @ self.lora_B.T
        return d if d.dtype == x.dtype else d.astype(x.dtype)

    def add(self, y, x, c):
        if self.lora_A.dtype != y.dtype:
            return y + self.delta(x, c).astype(y.dtype)
        return mx.addmm(y, x @ self.lora_A.T, self.lora_B.T, alpha=c)

    def matrix(self) -> mx.array:
        """ΔW of the rows it covers, float32 (without the factor)."""
        return self.lora_B.astype(mx.float32) @ self.lora_A.astype(mx.float32)


class PatchBranch(nn.Module):
    """A LoKr or full-delta patch (patches.Kron / Delta) on the rows of its targets `parts`: not trainable."""

    def __init__(self, patch, parts: tuple, span, adapter):
        super().__init__()
        for k, v in (("patch", patch), ("parts", parts), ("span", span), ("adapter", adapter)):
            object.__setattr__(self, k, v)
        self.scale = float(patch.scale)
        self.fused = 0.0

    def factor(self) -> float:
        return 0.0 if self.fused else self.adapter.weight * self.scale

    def delta(self, x, c):
        return self.patch.delta(x, self.parts, c)

    def add(self, y, x, c):
        return self.patch.add(y, x, self.parts, c)

    def matrix(self) -> mx.array:
        return self.patch.matrix(self.parts)


# ------------------------------------------------------------------------------------------------ the layer
class LoRALinear(nn.Module):
    """A linear layer with side branches: base(x) + Σ cᵢ·ΔWᵢ·x; `branches` is a list of LoRABranch/PatchBranch.

    Branches on row slices of a fused layer are summed per slice and added in one concatenated add when the slices
    tile the output (a LoRA on each of q, k and v of a fused to_qkv), else one scatter-add per slice.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.branches = []

    def __getattr__(self, name):   # weight, bias, scales, bits, … of the base layer
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "base" in self:
                return getattr(self["base"], name)
            raise

    def __call__(self, x):
        y = self.base(x)
        by_span = {}
        for b in self.branches:
            c = b.factor()
            if c == 0.0:
                continue
            if b.span is None:
                y = b.add(y, x, c)
            else:
                d = b.delta(x, c)
                by_span[b.span] = by_span[b.span] + d if b.span in by_span else d
        return _add_spans(y, by_span) if by_span else y


def _add_spans(y: mx.array, deltas: dict) -> mx.array:
    spans = sorted(deltas)
    if spans[0][0] == 0 and spans[-1][1] == y.shape[-1] and all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
        return y + mx.concatenate([deltas[s] for s in spans], axis=-1)
    for (r0, r1), d in deltas.items():
        y = y.at[..., r0:r1].add(d)
    return y


def add_rows(layer: nn.Linear, span, delta: mx.array) -> None:
    """layer.weight[span] += delta, computed in float32 (a merge by fuse_lora, or its undoing)."""
    w = layer.weight.astype(mx.float32)
    w = w + delta if span is None else w.at[span[0]:span[1]].add(delta)
    layer.weight = w.astype(layer.weight.dtype)
    mx.eval(layer.weight)


# ------------------------------------------------------------------------------------------------ addressing
def is_linear(m) -> bool:
    return isinstance(m, (nn.Linear, nn.QuantizedLinear))


def unwrap(m):
    return m.base if isinstance(m, LoRALinear) else m


def in_features(m) -> int:
    if isinstance(m, nn.QuantizedLinear):
        return m.weight.shape[1] * 32 // m.bits
    return m.weight.shape[1]


def model_modules(model: nn.Module) -> dict:
    """{path: module}, with a LoRALinear standing for its base layer (its `.base` and branches hidden)."""
    named = dict(model.named_modules())
    wrapped = tuple(f"{p}." for p, m in named.items() if isinstance(m, LoRALinear))
    return {p: m for p, m in named.items() if not p.startswith(wrapped)}


def linear_shapes(modules: dict) -> dict:
    """{layer path: (out, in)} of every Linear/QuantizedLinear (wrapped or not)."""
    return {path: (unwrap(m).weight.shape[0], in_features(unwrap(m)))
            for path, m in modules.items() if is_linear(unwrap(m))}


def tensor_shapes(model: nn.Module, modules: dict) -> dict:
    """{tensor path: logical shape} of every floating tensor a `.diff` may patch (quantized weights included)."""
    wrapped = tuple(f"{p}.branches." for p, m in modules.items() if isinstance(m, LoRALinear))
    out = {key.replace(".base.", "."): tuple(v.shape) for key, v in tree_flatten(model.parameters())
           if not key.startswith(wrapped)}
    shapes = linear_shapes(modules)
    for path, shape in shapes.items():
        out[f"{path}.weight"] = shape
    for path, m in modules.items():
        base = unwrap(m)
        if isinstance(base, nn.QuantizedLinear):
            out.pop(f"{path}.scales", None)
            out.pop(f"{path}.biases", None)
        stem, _, leaf = path.rpartition(".")
        if is_linear(base) and leaf in FUSED_PROJECTIONS:     # the parts of a fused layer, by their own names
            parts = FUSED_PROJECTIONS[leaf]
            rows, cols = shapes[path]
            for part in parts:
                out[f"{stem}.{part}.weight"] = (rows // len(parts), cols)
    return out


def diffusers_names(shapes: dict) -> list[str]:
    """The diffusers names of the linear layers in `shapes` (a fused layer's parts by their own names), sorted."""
    out = []
    for path in shapes:
        stem, _, leaf = path.rpartition(".")
        out.extend([f"{stem}.{p}" for p in FUSED_PROJECTIONS[leaf]] if leaf in FUSED_PROJECTIONS else [path])
    return sorted(out)


def resolve_layer(shapes: dict, target: str):
    """(layer path, output rows or None) for a diffusers target name: the layer itself or, in a model whose
    projections are fused (fused_projections.FUSED_PROJECTIONS: q/k/v in `to_qkv`, w1/w3 in `w13`), that layer's rows."""
    if target in shapes:
        return target, None
    stem, _, proj = target.rpartition(".")
    for fused_name, parts in FUSED_PROJECTIONS.items():
        fused = f"{stem}.{fused_name}"
        if proj in parts and fused in shapes:
            n = shapes[fused][0] // len(parts)
            i = parts.index(proj)
            return fused, (i * n, (i + 1) * n)
    return None, None


def resolve_tensor(shapes: dict, path: str):
    """(tensor path, rows or None) for a tensor name: `….to_q.weight` of a fused model is rows of `….to_qkv.weight`."""
    layer, _, attr = path.rpartition(".")
    real, rows = resolve_layer(shapes, layer)
    if rows is None:
        return path, None
    return f"{real}.{attr}", rows


def target_shape(shapes: dict, target: str):
    """(out, in) of a target (a row slice's height for a projection inside a fused layer), or None."""
    path, rows = resolve_layer(shapes, target)
    if path is None:
        return None
    return (rows[1] - rows[0] if rows else shapes[path][0]), shapes[path][1]


def group_targets(shapes: dict, targets) -> list[tuple]:
    """[(layer path, parts, span)] for the targets of one patch: consecutive targets in one fused layer (a fused-qkv
    LoRA on `to_qkv`) become one group over their rows; span None when the group covers the whole output."""
    groups = []
    for i, target in enumerate(targets):
        path, rows = resolve_layer(shapes, target)
        if groups and groups[-1][0] == path and rows and groups[-1][2] and groups[-1][2][1] == rows[0]:
            last = groups.pop()
            groups.append((path, last[1] + (i,), (last[2][0], rows[1])))
        else:
            groups.append((path, (i,), rows))
    return [(path, parts, None if span in (None, (0, shapes[path][0])) else span) for path, parts, span in groups]


def get_module(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def set_module(model: nn.Module, path: str, value) -> None:
    parent, _, last = path.rpartition(".")
    obj = get_module(model, parent) if parent else model
    if isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value


def wrap(model: nn.Module, path: str) -> LoRALinear:
    """The LoRALinear at `path`, wrapping the layer there first if it is a plain one."""
    layer = get_module(model, path)
    if not isinstance(layer, LoRALinear):
        layer = LoRALinear(layer)
        set_module(model, path, layer)
    return layer


def tensor_owner(model: nn.Module, path: str):
    """(module holding the tensor, attribute name); a wrapped layer's tensors live on its base."""
    parent, _, attr = path.rpartition(".")
    return unwrap(get_module(model, parent) if parent else model), attr


# ------------------------------------------------------------------------------------------------ training
def add_trainable_lora(model: nn.Module, targets, rank: int, alpha: float | None = None, init: dict | None = None,
                       key: mx.array | None = None) -> dict[str, LoRALinear]:
    """Add a trainable PEFT LoRA to the linear layers `targets` name; freeze everything else. The training API.

    targets: a name or a list, matched as PEFT's `target_modules`: a layer matches when its diffusers module name
      equals an entry or ends with "." + entry ("to_q", "attention.to_out.0", "layers.0.feed_forward.w1"); on a
      model with fused projections, to_q/to_k/to_v (w1/w3) address row slices of `to_qkv` (`w13`). Every entry
      must match a layer (else ValueError).
    rank: r; alpha: None means alpha = r; scale = alpha / r.
    init: None gives PEFT's default init (lora_A ~ kaiming_uniform_(a=√5) = U(±1/√in), lora_B = 0, so the model
      is unchanged until B moves); or {diffusers module name: (A (r, in), B (out, r))} arrays for some or all
      matched modules (the others get the default).
    key: an `mx.random` key, split over the matched modules in sorted-name order; None: MLX's global generator.
    Returns {diffusers module name: the LoRALinear holding its branch}, sorted by name. The new branches
    (LoRABranch, float32 `lora_A`/`lora_B`, on float, quantized and dequantizing layers alike) are the model's only
    trainable parameters, so `nn.value_and_grad(model, loss)` differentiates exactly them; LoRAs already loaded
    for inference stay frozen and active. Read the factors back with `trainable_lora_state`.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    scale = (rank if alpha is None else float(alpha)) / rank
    if not math.isfinite(scale):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    entries = [targets] if isinstance(targets, str) else list(targets)
    if not entries or not all(isinstance(t, str) and t for t in entries):
        raise ValueError(f"targets must be module names (e.g. 'to_q', 'feed_forward.w1'), got {targets!r}")
    shapes = linear_shapes(model_modules(model))
    names = diffusers_names(shapes)
    matched = [n for n in names if any(n == t or n.endswith("." + t) for t in entries)]
    missing = [t for t in entries if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"targets {', '.join(map(repr, missing))} match no linear layer of the model "
                         f"(diffusers names such as {', '.join(names[:3])})")
    init = dict(init or {})
    unknown = sorted(set(init) - set(matched))
    if unknown:
        raise ValueError(f"init names {', '.join(map(repr, unknown))}, which are not among the targeted layers")
    keys = mx.random.split(key, len(matched)) if key is not None else [None] * len(matched)
    branches = {name: _new_branch(shapes, name, rank, scale, init.get(name), k) for name, k in zip(matched, keys)}
    layers = {name: resolve_layer(shapes, name)[0] for name in matched}
    taken = sorted(set(matched) & set(trainable_lora_state(model)))
    if taken:
        raise ValueError(f"{', '.join(taken)} already carry a trainable LoRA")
    model.freeze()
    out = {}
    for name, branch in branches.items():
        out[name] = wrap(model, layers[name])
        out[name].branches.append(branch)
    mx.eval([(b.lora_A, b.lora_B) for b in branches.values()])
    return out


def _new_branch(shapes: dict, name: str, rank: int, scale: float, init, key) -> LoRABranch:
    out_dim, in_dim = target_shape(shapes, name)
    if init is None:
        bound = 1.0 / math.sqrt(in_dim)   # kaiming_uniform_(a=√5): gain √(2/6) · √(3/fan_in)
        A = mx.random.uniform(-bound, bound, (rank, in_dim), key=key)
        B = mx.zeros((out_dim, rank))
    else:
        A, B = (mx.array(v).astype(mx.float32) for v in init)
        if A.shape != (rank, in_dim) or B.shape != (out_dim, rank):
            raise ValueError(f"init[{name!r}]: A {A.shape} and B {B.shape}; expected A {(rank, in_dim)} and "
                             f"B {(out_dim, rank)}")
    path, rows = resolve_layer(shapes, name)
    span = None if rows is None or rows == (0, shapes[path][0]) else rows
    return LoRABranch(A, B, scale, span, target=name)


def trainable_lora_state(model: nn.Module) -> dict[str, tuple]:
    """{diffusers module name: (lora_A (r, in), lora_B (out, r))} of the branches `add_trainable_lora` added."""
    out = {}
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out.update({b.target: (b.lora_A, b.lora_B) for b in m.branches if getattr(b, "target", None)})
    return dict(sorted(out.items()))
