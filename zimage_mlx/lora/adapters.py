"""LoRA adapters for the Z-Image transformer: every published file format, applied at run time.

Formats are recognised from the keys, one row each in the tables below (diffusers/PEFT with alpha in the header
metadata, ai-toolkit `diffusion_model.` + `.alpha`, kohya/musubi `lora_unet_…` with `lora_down`/`lora_up`, the
dot format `….lora.down.weight`, ComfyUI's fused `attention.qkv`/`attention.out` and full deltas `.diff`/`.diff_b`,
LyCORIS LoKr). Original (ComfyUI) module names are mapped by the transformer's own `sanitize`, so a rename stays a
one-place change; targets are addressed by diffusers' module names (`layers.0.attention.to_q`).

Each adapter is applied as a side branch: y = base(x) + Σᵢ wᵢ·sᵢ·Bᵢ(Aᵢ·x), sᵢ = alpha/rank, with A and B cast once to
the activation dtype. The base layer may be `nn.Linear` or `nn.QuantizedLinear`: a 4-bit model keeps the full
effect of the LoRA, which merging into the 4-bit codes would mostly erase. A fused-qkv LoRA computes A·x once for
to_q, to_k and to_v. Full deltas on float tensors (norms, biases, float weights) are merged and undone exactly.
The pipeline's transformer runs q/k/v as one `to_qkv` and w1/w3 as one `w13` (transformer.FUSED_PROJECTIONS): a
target inside a fused layer is that layer's row slice, for branches, merges and fuse_lora alike.
The math follows diffusers' `ZImageLoraLoaderMixin` (diffusers/loaders/lora_pipeline.py) and its converter
`_convert_non_diffusers_z_image_lora_to_diffusers` (diffusers/loaders/lora_conversion_utils.py); LoKr follows
LyCORIS `lycoris/functional/lokr.py` (ΔW = kron(w1, w2)·alpha/rank).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..models.transformer import FUSED_PROJECTIONS
from ..loading.weights import WeightError, safetensors_keys


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


# ------------------------------------------------------------------------------------------------ patches
# A patch runs in two stages: first(x), shared by the layers of a fused target (computed once), then the part of
# one layer: delta(h, part, c) = c·ΔW_part·x, or add(y, …) = y + that (one fused matmul-add for a low-rank part).
class _Patch:
    def add(self, y, h, part, c):
        return y + self.delta(h, part, c)


@dataclass
class LowRank(_Patch):
    """ΔW = scale · up @ down: one `up` per target (a fused qkv's up split in three row blocks, sharing down)."""
    targets: tuple
    down: mx.array     # (rank, in)
    ups: tuple         # (out, rank) per target
    scale: float

    def first(self, x):
        return x @ self.down.T

    def delta(self, h, part, c):
        return (h * c) @ self.ups[part].T

    def add(self, y, h, part, c):
        return mx.addmm(y, h, self.ups[part].T, alpha=c)

    def matrix(self, part) -> mx.array:
        return self.ups[part].astype(mx.float32) @ self.down.astype(mx.float32)


@dataclass
class Kron(_Patch):
    """ΔW = scale · kron(w1, w2), applied as w1 · X · w2ᵀ on x viewed as (…, in₁, in₂) (LyCORIS bypass mode);
    over a fused qkv the output rows are split (the whole product computed once)."""
    targets: tuple
    w1: mx.array       # (out₁, in₁)
    w2: mx.array       # (out₂, in₂)
    scale: float

    def first(self, x):
        X = x.reshape(*x.shape[:-1], self.w1.shape[1], self.w2.shape[1])
        return (self.w1 @ (X @ self.w2.T)).reshape(*x.shape[:-1], -1)

    def delta(self, h, part, c):
        n = h.shape[-1] // len(self.targets)
        return c * (h if len(self.targets) == 1 else h[..., part * n:(part + 1) * n])

    def matrix(self, part) -> mx.array:
        full = (self.w1.astype(mx.float32)[:, None, :, None] * self.w2.astype(mx.float32)[None, :, None, :])
        full = full.reshape(self.w1.shape[0] * self.w2.shape[0], -1)
        return _rows(full, part, len(self.targets))


@dataclass
class Delta(_Patch):
    """tensor += scale · delta (ComfyUI `.diff` / `.diff_b`). Merged into float tensors; a delta on a quantized
    layer's weight runs as a dense side branch instead."""
    targets: tuple     # one tensor path, e.g. "layers.0.attention_norm1.weight"
    tensor: mx.array
    scale: float = 1.0

    def first(self, x):
        return x

    def delta(self, h, part, c):
        return (h * c) @ self.tensor.T

    def add(self, y, h, part, c):
        return mx.addmm(y, h, self.tensor.T, alpha=c)

    def matrix(self, part) -> mx.array:
        return self.tensor.astype(mx.float32)


def _rows(m, part, parts):
    n = m.shape[0] // parts
    return m if parts == 1 else m[part * n:(part + 1) * n]


@dataclass
class Adapter:
    name: str
    source: str                      # file name (or "state dict")
    sha256: str | None
    patches: list
    weight: float = 1.0


# ------------------------------------------------------------------------------------------------ run time
class _Once:
    """x -> f(x), computed once for the layers that share it (a fused qkv's to_q, to_k, to_v see the same x)."""

    def __init__(self, fn, users: int):
        self.fn, self.users, self.memo = fn, users, None

    def __call__(self, x):
        if self.users == 1:
            return self.fn(x)
        if self.memo is not None and self.memo[0] is x:
            _, h, left = self.memo
            self.memo = (x, h, left - 1) if left > 1 else None
            return h
        h = self.fn(x)
        self.memo = (x, h, self.users - 1)
        return h


@dataclass
class Branch:
    """One adapter's side branch on one layer: adds w·s·ΔW_part·x to the output (rows: to a slice of it)."""
    adapter: Adapter
    patch: object
    part: int
    first: _Once
    rows: tuple | None = None
    fused: float = 0.0               # the factor merged into the weight by fuse_lora (the branch is then off)

    def factor(self) -> float:
        return 0.0 if self.fused else self.adapter.weight * self.patch.scale


class LoRALinear(nn.Module):
    """A `nn.Linear` or `nn.QuantizedLinear` with side branches: base(x) + Σ wᵢ·sᵢ·Bᵢ(Aᵢ·x).

    The branches are plain objects, not parameters, so the model's parameters stay those of the base layers.
    A branch may add to a slice of the output (`rows`), so a layer that fuses to_q/to_k/to_v into one matmul can
    still carry a LoRA per projection.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        object.__setattr__(self, "branches", [])

    def __getattr__(self, name):   # weight, bias, scales, bits, … of the base layer
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "base" in self:
                return getattr(self["base"], name)
            raise

    def __call__(self, x):
        y = self.base(x)
        by_rows = {}
        for b in self.branches:
            c = b.factor()
            if c == 0.0:
                continue
            h = b.first(x)
            if b.rows is None:
                y = b.patch.add(y, h, b.part, c)
            else:
                d = b.patch.delta(h, b.part, c)
                by_rows[b.rows] = d if b.rows not in by_rows else by_rows[b.rows] + d
        return _add_rows_out(y, by_rows) if by_rows else y


def _add_rows_out(y: mx.array, deltas: dict) -> mx.array:
    """y plus deltas for slices of its last axis ({(start, stop): delta}): one add when the slices tile it (a LoRA
    on each of q, k and v of a fused to_qkv), else one scatter-add per slice."""
    spans = sorted(deltas)
    if spans[0][0] == 0 and spans[-1][1] == y.shape[-1] and all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
        return y + mx.concatenate([deltas[s] for s in spans], axis=-1)
    for (r0, r1), d in deltas.items():
        y = y.at[..., r0:r1].add(d)
    return y


def _is_linear(m) -> bool:
    return isinstance(m, (nn.Linear, nn.QuantizedLinear))


def _in_features(m) -> int:
    if isinstance(m, nn.QuantizedLinear):
        return m.weight.shape[1] * 32 // m.bits
    return m.weight.shape[1]


def _modules(model: nn.Module) -> dict:
    """{path: module}, with a LoRALinear standing for its base layer (its `.base` path hidden)."""
    out = {}
    for path, m in model.named_modules():
        if path.endswith(".base") and isinstance(out.get(path[: -len(".base")]), LoRALinear):
            continue
        out[path] = m
    return out


def _linear_shapes(modules: dict) -> dict:
    """{layer path: (out, in)} of every Linear/QuantizedLinear (wrapped or not)."""
    out = {}
    for path, m in modules.items():
        base = m.base if isinstance(m, LoRALinear) else m
        if _is_linear(base):
            out[path] = (base.weight.shape[0], _in_features(base))
    return out


def _tensor_shapes(model: nn.Module, modules: dict) -> dict:
    """{tensor path: logical shape} of every floating tensor a `.diff` may patch (quantized weights included)."""
    out = {}
    for key, v in tree_flatten(model.parameters()):
        out[key.replace(".base.", ".")] = tuple(v.shape)
    for path, shape in _linear_shapes(modules).items():
        out[f"{path}.weight"] = shape
    for path, m in modules.items():
        base = m.base if isinstance(m, LoRALinear) else m
        if isinstance(base, nn.QuantizedLinear):
            out.pop(f"{path}.scales", None)
            out.pop(f"{path}.biases", None)
        stem, _, leaf = path.rpartition(".")
        if _is_linear(base) and leaf in FUSED_PROJECTIONS:     # the parts of a fused layer, by their own names
            parts = FUSED_PROJECTIONS[leaf]
            rows, cols = out[f"{path}.weight"]
            for part in parts:
                out[f"{stem}.{part}.weight"] = (rows // len(parts), cols)
    return out


def _resolve_layer(shapes: dict, target: str):
    """(layer path, output rows or None) for a diffusers target name: the layer itself or, in a model whose
    projections are fused (transformer.FUSED_PROJECTIONS: q/k/v in `to_qkv`, w1/w3 in `w13`), that layer's rows."""
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


def _resolve_tensor(shapes: dict, path: str):
    """(tensor path, rows or None) for a tensor name: `….to_q.weight` of a fused model is rows of `….to_qkv.weight`."""
    layer, _, attr = path.rpartition(".")
    real, rows = _resolve_layer(shapes, layer)
    if rows is None:
        return path, None
    return f"{real}.{attr}", rows


def _target_shape(shapes: dict, target: str):
    """(out, in) of a target (a row slice's height for a projection inside a fused layer), or None."""
    path, rows = _resolve_layer(shapes, target)
    if path is None:
        return None
    return (rows[1] - rows[0] if rows else shapes[path][0]), shapes[path][1]


def _get(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def _set(model: nn.Module, path: str, value) -> None:
    parent, _, last = path.rpartition(".")
    obj = _get(model, parent) if parent else model
    if isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value


def _tensor_owner(model: nn.Module, path: str):
    """(module holding the tensor, attribute name); a wrapped layer's tensors live on its base."""
    parent, _, attr = path.rpartition(".")
    owner = _get(model, parent) if parent else model
    return (owner.base if isinstance(owner, LoRALinear) else owner), attr


# ------------------------------------------------------------------------------------------------ reading
def read_lora(path: str | Path):
    """(tensors, header metadata, sha256) of a .safetensors LoRA; pickles are refused without being opened."""
    path = Path(path)
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


def _as_mx(v) -> mx.array:
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


def _vocabulary(modules: dict, tensors: dict) -> dict:
    """Module names containing "_" (to_q, feed_forward, adaLN_modulation, …) as token tuples, lower-cased."""
    words = set(ALIAS_WORDS)
    for path in list(modules) + list(tensors):
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


def _layer_targets(model: nn.Module, path: str) -> list[str]:
    """Diffusers layer names for a module path, through the transformer's sanitize (ComfyUI names; a fused
    `attention.qkv` gives to_q, to_k, to_v)."""
    return [k.rpartition(".")[0] for k in model.sanitize({path + ".weight": mx.zeros((3, 1))})]


def _foreign(keys, source: str) -> None:
    for key in keys:
        for fragment, model in FOREIGN:
            if fragment in key:
                raise LoRAError(f"{source}: this LoRA is for {model}, not for the Z-Image transformer "
                                f"(key {key})")


def _metadata_alpha(metadata: dict, source: str):
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


def _f32(v) -> mx.array:
    return v.astype(mx.float32)


def parse_lora(state: dict, metadata: dict, model: nn.Module, source: str, dtype: mx.Dtype) -> list:
    """Patches (arrays cast to `dtype`) for a LoRA state dict, or one LoRAError naming what does not fit `model`.

    `model` is only read (its layer names and shapes); nothing is changed.
    """
    if not state:
        raise LoRAError(f"{source}: the LoRA holds no tensors")
    _foreign(state, source)
    modules = _modules(model)
    layers = _linear_shapes(modules)
    tensors = _tensor_shapes(model, modules)
    vocab = _vocabulary(modules, tensors)
    groups: dict[str, dict] = {}
    unmatched = []
    for key, value in state.items():
        role, path = _split_role(key, source)
        if role is None:
            unmatched.append(key)
            continue
        path = _tokenize(_strip_prefixes(path), vocab)
        groups.setdefault(path, {})[role] = (key, _as_mx(value))
    for path, roles in groups.items():
        for key, v in roles.values():
            if not mx.issubdtype(v.dtype, mx.floating):
                raise LoRAError(f"{source}: tensor {key} has dtype {v.dtype}; a LoRA holds floating-point tensors")

    alpha_of = _metadata_alpha(metadata, source)
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
        patches.append(_cast(found[0][1], dtype))
    return patches


def _cast(p, dtype):
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

    targets = _layer_targets(model, path)
    shapes = [_target_shape(layers, x) for x in targets]
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

    w1 = t("w1") if "w1" in roles else _product(roles, "w1_a", "w1_b", source)
    if "t2" in roles:   # Tucker: w2 = einsum("ij,ip,jr->pr", t2, w2_a, w2_b) (LyCORIS rebuild_tucker)
        t2, wa, wb = _f32(t("t2")), _f32(_need(roles, "w2_a", source)), _f32(_need(roles, "w2_b", source))
        if t2.ndim < 2 or math.prod(t2.shape[2:]) != 1:
            raise LoRAError(f"{source}: {key('t2')} has shape {tuple(t2.shape)}; a linear layer's Tucker core is "
                            "(rank, rank)")
        w2 = wa.T @ t2.reshape(t2.shape[0], t2.shape[1]) @ wb
    else:
        w2 = t("w2") if "w2" in roles else _product(roles, "w2_a", "w2_b", source)
    w1, w2 = _f32(w1), _f32(w2)
    if w1.ndim != 2 or w2.ndim != 2:
        raise LoRAError(f"{source}: LoKr factors of {path} must be matrices (got {w1.shape} and {w2.shape})")
    if (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) != (out_dim, in_dim):
        raise LoRAError(f"{source}: {path}: kron(w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}) does not fit layer "
                        f"{' + '.join(targets)} of shape ({out_dim}, {in_dim})")
    rank = roles["w2_b"][1].shape[0] if "w2_b" in roles else roles["w1_b"][1].shape[0] if "w1_b" in roles else None
    scale = alpha / rank if (alpha is not None and rank is not None) else 1.0
    return [Kron(tuple(targets), w1, w2, scale)]


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


# ------------------------------------------------------------------------------------------------ state
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

    def set_weights(self, weights: dict) -> None:
        """{name: weight}; adapters not named get weight 0 (diffusers' set_adapters)."""
        unknown = [n for n in weights if n not in self.adapters]
        if unknown:
            raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; loaded: "
                             f"{', '.join(map(repr, self.adapters)) or 'none'}")
        if self.fused_names():
            raise ValueError("unfuse_lora() before changing adapter weights (they are fused into the weights)")
        for name, a in self.adapters.items():
            a.weight = float(weights.get(name, 0.0))
        self._remerge()

    def clear(self) -> None:
        """Remove every adapter; the model is exactly the base model again (after a fuse: up to one rounding)."""
        if self.model is not None:
            self.unfuse()
            for path, wrapper in self._wrapped.items():
                _set(self.model, path, wrapper.base)
            for path, original in self._originals.items():
                owner, attr = _tensor_owner(self.model, path)
                owner[attr] = original
        self.adapters, self._wrapped, self._originals, self._merges = {}, {}, {}, {}

    def fused_names(self) -> list[str]:
        return sorted({b.adapter.name for w in self._wrapped.values() for b in w.branches if b.fused})

    def fuse(self, names=None, lora_scale: float = 1.0) -> None:
        """Merge the branches of `names` (default: all active) into float weights (faster steps)."""
        if self.model is None:
            raise RuntimeError("fuse_lora needs the transformer loaded")
        names = set(self.adapters if names is None else ([names] if isinstance(names, str) else names))
        quantized = [p for p, w in self._wrapped.items()
                     if isinstance(w.base, nn.QuantizedLinear) and any(b.adapter.name in names for b in w.branches)]
        if quantized:
            raise ValueError(f"fuse_lora merges into float weights only; {quantized[0]} is quantized (merging "
                             "into quantized codes loses most of the LoRA; the side branch keeps all of it)")
        for w in self._wrapped.values():
            for b in w.branches:
                if b.adapter.name in names and not b.fused and b.factor() != 0.0:
                    c = b.factor() * lora_scale
                    _add_rows(w.base, b.rows, c * b.patch.matrix(b.part))
                    b.fused = c

    def unfuse(self) -> None:
        """Undo fuse(): subtract what was merged (exact up to one rounding in the weight dtype)."""
        for w in self._wrapped.values():
            for b in w.branches:
                if b.fused:
                    _add_rows(w.base, b.rows, -b.fused * b.patch.matrix(b.part))
                    b.fused = 0.0

    # ---------------------------------------------------------------------------- internals
    def _attach(self, adapter: Adapter) -> None:
        modules = _modules(self.model)
        shapes = _linear_shapes(modules)
        dtype = self.model.dtype
        for i, p in enumerate(adapter.patches):
            p = adapter.patches[i] = _cast(p, dtype) if _patch_dtype(p) != dtype else p
            if isinstance(p, Delta):
                layer = p.targets[0].rpartition(".")[0]
                base = modules.get(_resolve_layer(shapes, layer)[0] or layer)
                base = base.base if isinstance(base, LoRALinear) else base
                if isinstance(base, nn.QuantizedLinear) and p.targets[0].endswith(".weight"):
                    self._branch(adapter, p, 0, _Once(p.first, 1), layer, shapes, modules)
                else:
                    self._merges.setdefault(p.targets[0], []).append((adapter, p))
                continue
            first = _Once(p.first, len(p.targets))
            for part, target in enumerate(p.targets):
                self._branch(adapter, p, part, first, target, shapes, modules)

    def _branch(self, adapter, patch, part, first, target, shapes, modules):
        path, rows = _resolve_layer(shapes, target)
        wrapper = self._wrapped.get(path)
        if wrapper is None:
            wrapper = self._wrapped[path] = LoRALinear(modules[path])
            _set(self.model, path, wrapper)
        wrapper.branches.append(Branch(adapter, patch, part, first, rows))

    def _remerge(self) -> None:
        if not self._merges:
            return
        shapes = _linear_shapes(_modules(self.model))
        values = {}
        for path, merges in self._merges.items():
            real, rows = _resolve_tensor(shapes, path)    # a part of a fused layer: rows of its tensor
            if real not in values:
                owner, attr = _tensor_owner(self.model, real)
                values[real] = self._originals.setdefault(real, owner[attr])
            for adapter, d in merges:
                if adapter.weight != 0.0:
                    delta = (adapter.weight * d.scale) * d.tensor
                    values[real] = values[real] + delta if rows is None else \
                        values[real].at[rows[0]:rows[1]].add(delta)
        for real, value in values.items():
            owner, attr = _tensor_owner(self.model, real)
            owner[attr] = value
        mx.eval(list(values.values()))


def _patch_dtype(p):
    return p.down.dtype if isinstance(p, LowRank) else p.w1.dtype if isinstance(p, Kron) else p.tensor.dtype


def _add_rows(layer: nn.Linear, rows, delta: mx.array) -> None:
    w = layer.weight.astype(mx.float32)
    w = w + delta if rows is None else w.at[rows[0]:rows[1]].add(delta)
    layer.weight = w.astype(layer.weight.dtype)
    mx.eval(layer.weight)


def load_adapter(source, model: nn.Module, dtype: mx.Dtype, name: str) -> Adapter:
    """Read and check a LoRA (a .safetensors path or a {key: array} dict) against `model`."""
    if isinstance(source, dict):
        state, metadata, sha, label = dict(source), {}, None, "state dict"
    else:
        state, metadata, sha = read_lora(source)
        label = str(source)
    patches = parse_lora(state, metadata, model, label, dtype)
    return Adapter(name, Path(label).name if sha else label, sha, patches)
