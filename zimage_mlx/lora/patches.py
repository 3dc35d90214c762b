"""LoRA patches: what a LoRA file changes in the transformer, parsed from its tensors and checked against the model.

Three kinds: `LowRank` (ΔW = scale·up·down; a ComfyUI fused-qkv LoRA is one down shared by to_q/to_k/to_v with up
split in three row blocks), `Kron` (LyCORIS LoKr, ΔW = kron(w1, w2)·alpha/rank, `lycoris/functional/lokr.py`) and
`Delta` (ComfyUI `.diff`/`.diff_b`: tensor += delta). The math follows diffusers' `ZImageLoraLoaderMixin`
(diffusers/loaders/lora_pipeline.py) and `_convert_non_diffusers_z_image_lora_to_diffusers`
(diffusers/loaders/lora_conversion_utils.py). layers.py runs them; adapters.py keeps them per named adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..loading.weights import WeightError
from .formats import LoRAError, group_tensors, layer_targets, metadata_alpha
from .layers import linear_shapes, model_modules, target_shape, tensor_shapes


# ------------------------------------------------------------------------------------------------ the patches
@dataclass
class LowRank:
    """ΔW = scale · up @ down: one `up` per target (a fused qkv's up split in three row blocks, sharing down)."""
    targets: tuple
    down: mx.array     # (rank, in)
    ups: tuple         # (out, rank) per target
    scale: float


@dataclass
class Kron:
    """ΔW = scale · kron(w1, w2), applied as w1 · X · w2ᵀ on x viewed as (…, in₁, in₂) (LyCORIS bypass mode).
    Over a fused qkv the output rows are split; the rows of some targets need only the matching rows of w1."""
    targets: tuple
    w1: mx.array       # (out₁, in₁)
    w2: mx.array       # (out₂, in₂)
    scale: float

    def _rows(self, parts):
        n = self.w1.shape[0] * self.w2.shape[0] // len(self.targets)
        return parts[0] * n, (parts[-1] + 1) * n

    def delta(self, x, parts, c):
        lo, hi = self._rows(parts)
        o2, w1 = self.w2.shape[0], self.w1
        whole = (lo, hi) == (0, w1.shape[0] * o2)
        if not whole and lo % o2 == 0 and hi % o2 == 0:
            w1, whole = w1[lo // o2:hi // o2], True
        X = x.reshape(*x.shape[:-1], self.w1.shape[1], self.w2.shape[1])
        h = (w1 @ (X @ self.w2.T)).reshape(*x.shape[:-1], -1)
        return c * (h if whole else h[..., lo:hi])

    def add(self, y, x, parts, c):
        return y + self.delta(x, parts, c)

    def matrix(self, parts) -> mx.array:
        full = (self.w1.astype(mx.float32)[:, None, :, None] * self.w2.astype(mx.float32)[None, :, None, :])
        lo, hi = self._rows(parts)
        return full.reshape(self.w1.shape[0] * self.w2.shape[0], -1)[lo:hi]


@dataclass
class Delta:
    """tensor += scale · delta (ComfyUI `.diff` / `.diff_b`). Merged into float tensors; a delta on a quantized
    layer's weight runs as a dense side branch instead."""
    targets: tuple     # one tensor path, e.g. "layers.0.attention_norm1.weight"
    tensor: mx.array
    scale: float = 1.0

    def delta(self, x, parts, c):
        return (x * c) @ self.tensor.T

    def add(self, y, x, parts, c):
        return mx.addmm(y, x, self.tensor.T, alpha=c)

    def matrix(self, parts) -> mx.array:
        return self.tensor.astype(mx.float32)


def cast_patch(p, dtype):
    """The patch with its arrays in `dtype` (the activation dtype: bf16 × float32 would promote the stream)."""
    if isinstance(p, LowRank):
        out = LowRank(p.targets, p.down.astype(dtype), tuple(u.astype(dtype) for u in p.ups), p.scale)
        mx.eval(out.down, out.ups)
    elif isinstance(p, Kron):
        out = Kron(p.targets, p.w1.astype(dtype), p.w2.astype(dtype), p.scale)
        mx.eval(out.w1, out.w2)
    else:
        out = Delta(p.targets, p.tensor.astype(dtype), p.scale)
        mx.eval(out.tensor)
    return out


def patch_dtype(p):
    return p.down.dtype if isinstance(p, LowRank) else p.w1.dtype if isinstance(p, Kron) else p.tensor.dtype


def _f32(v) -> mx.array:
    return v.astype(mx.float32)


# ------------------------------------------------------------------------------------------------ parsing
def parse_lora(state: dict, metadata: dict, model: nn.Module, source: str, dtype: mx.Dtype) -> list:
    """Patches (arrays cast to `dtype`) for a LoRA state dict, or one LoRAError naming what does not fit `model`.

    `model` is only read (its layer names and shapes); nothing is changed.
    """
    modules = model_modules(model)
    layers = linear_shapes(modules)
    tensors = tensor_shapes(model, modules)
    groups, unmatched = group_tensors(state, list(modules) + list(tensors), source)
    alpha_of = metadata_alpha(metadata, source)
    claimed: dict[tuple, list] = {}   # targets -> [(module path in the file, patch)]
    for path, roles in groups.items():
        found = _patches_for(model, path, roles, layers, tensors, alpha_of, source)
        if found is None:
            unmatched.extend(k for k, _ in roles.values())
            continue
        for p in found:
            claimed.setdefault(p.targets, []).append((path, p))
    if unmatched:
        more = f" (and {len(unmatched) - 5} more)" if len(unmatched) > 5 else ""
        raise LoRAError(f"{source}: {len(unmatched)} key(s) match no layer of the Z-Image transformer: "
                        f"{', '.join(sorted(unmatched)[:5])}{more}")
    # The dot format stores a fused `qkv` (and a bare `out`) next to the split keys it duplicates: keep the
    # diffusers-named ones, as diffusers' converter does.
    single = {targets[0] for targets in claimed if len(targets) == 1}
    patches = []
    for targets, found in claimed.items():
        if len(targets) > 1 and any(t in single for t in targets):
            continue
        if len(found) > 1:
            named = [p for path, p in found if path in (targets[0], targets[0].rpartition(".")[0])]
            if len(named) != 1:
                raise LoRAError(f"{source}: several tensor sets target {targets[0]} "
                                f"({', '.join(path for path, _ in found)})")
            found = [(None, named[0])]
        patches.append(cast_patch(found[0][1], dtype))
    return patches


def _patches_for(model, path, roles, layers, tensors, alpha_of, source):
    """The patches of one module path's tensors, or None when the path names nothing in the model."""
    def t(role):
        return roles[role][1] if role in roles else None

    def key(role):
        return roles[role][0]

    lora = {"down", "up"} & set(roles)
    lokr = {"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"} & set(roles)
    diffs = {"diff", "diff_b"} & set(roles)
    if sum(map(bool, (lora, lokr, diffs))) > 1:
        raise LoRAError(f"{source}: module {path} mixes LoRA, LoKr and full-delta tensors "
                        f"({', '.join(k for k, _ in roles.values())})")
    if diffs:
        out = []
        for role, attr in (("diff", "weight"), ("diff_b", "bias")):
            if role not in roles:
                continue
            v = t(role)
            try:
                mapped = model.sanitize({f"{path}.{attr}": v})
            except WeightError as e:
                raise LoRAError(f"{source}: {key(role)}: {e}") from None
            if not mapped:
                return None
            for name, d in mapped.items():
                if name not in tensors:
                    return None
                if tuple(d.shape) != tensors[name]:
                    raise LoRAError(f"{source}: tensor {key(role)} has shape {tuple(v.shape)}; {name} has shape "
                                    f"{tensors[name]}")
                out.append(Delta((name,), _f32(d)))
        return out

    targets = layer_targets(model, path)
    shapes = [target_shape(layers, x) for x in targets]
    if not targets or None in shapes:
        return None
    out_dim = sum(o for o, _ in shapes)
    in_dim = shapes[0][1]
    alpha = float(t("alpha").reshape(-1)[0].item()) if "alpha" in roles else None
    if lora:
        if "down" not in roles or "up" not in roles:
            have = key("down" if "down" in roles else "up")
            raise LoRAError(f"{source}: {have} has no matching lora_{'B/up' if 'down' in roles else 'A/down'} "
                            "tensor")
        down, up = _matrix(t("down"), key("down"), source), _matrix(t("up"), key("up"), source)
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise LoRAError(f"{source}: rank mismatch: {key('down')} has rank {rank} (shape {tuple(down.shape)}) "
                            f"but {key('up')} has {up.shape[1]} (shape {tuple(up.shape)})")
        if down.shape[1] != in_dim or up.shape[0] != out_dim:
            raise LoRAError(f"{source}: {path} has ΔW of shape ({up.shape[0]}, {down.shape[1]}) but layer "
                            f"{' + '.join(targets)} is ({out_dim}, {in_dim})")
        rslora = False
        if alpha is None and alpha_of is not None:
            alpha, rslora = alpha_of(targets[0] if len(targets) == 1 else path, rank)
        scale = 1.0 if alpha is None else float(alpha) / (math.sqrt(rank) if rslora else rank)
        starts = np.cumsum([0] + [o for o, _ in shapes])
        ups = tuple(up[int(a):int(b)] for a, b in zip(starts[:-1], starts[1:]))
        return [LowRank(tuple(targets), down, ups, scale)]

    return [_kron(roles, path, targets, (out_dim, in_dim), alpha, source)]


def _kron(roles, path, targets, shape, alpha, source) -> Kron:
    """A LoKr patch: w1 (or w1_a·w1_b) and w2 (or w2_a·w2_b, or Tucker), scaled alpha/rank when factored."""
    def t(role):
        return roles[role][1]

    w1 = t("w1") if "w1" in roles else _product(roles, "w1_a", "w1_b", source)
    if "t2" in roles:   # Tucker: w2 = einsum("ij,ip,jr->pr", t2, w2_a, w2_b) (LyCORIS rebuild_tucker)
        t2, wa, wb = _f32(t("t2")), _f32(_need(roles, "w2_a", source)), _f32(_need(roles, "w2_b", source))
        if t2.ndim < 2 or math.prod(t2.shape[2:]) != 1:
            raise LoRAError(f"{source}: {roles['t2'][0]} has shape {tuple(t2.shape)}; a linear layer's Tucker "
                            "core is (rank, rank)")
        w2 = wa.T @ t2.reshape(t2.shape[0], t2.shape[1]) @ wb
    else:
        w2 = t("w2") if "w2" in roles else _product(roles, "w2_a", "w2_b", source)
    w1, w2 = _f32(w1), _f32(w2)
    if w1.ndim != 2 or w2.ndim != 2:
        raise LoRAError(f"{source}: LoKr factors of {path} must be matrices (got {w1.shape} and {w2.shape})")
    if (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) != shape:
        raise LoRAError(f"{source}: {path}: kron(w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}) does not fit layer "
                        f"{' + '.join(targets)} of shape {shape}")
    rank = roles["w2_b"][1].shape[0] if "w2_b" in roles else roles["w1_b"][1].shape[0] if "w1_b" in roles else None
    scale = alpha / rank if (alpha is not None and rank is not None) else 1.0
    return Kron(tuple(targets), w1, w2, scale)


def _matrix(v, key, source):
    if v.ndim == 4 and v.shape[2:] == (1, 1):   # kohya stores 1×1-conv shapes for some linears
        v = v.reshape(v.shape[:2])
    if v.ndim != 2:
        raise LoRAError(f"{source}: tensor {key} has shape {tuple(v.shape)}; expected a matrix")
    return _f32(v)


def _need(roles, role, source):
    if role not in roles:
        raise LoRAError(f"{source}: LoKr factor lokr_{role} is missing next to {next(k for k, _ in roles.values())}")
    return roles[role][1]


def _product(roles, a, b, source):
    return _f32(_need(roles, a, source)) @ _f32(_need(roles, b, source))
