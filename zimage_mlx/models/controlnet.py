"""Z-Image ControlNet Union (Alibaba PAI's Z-Image-Turbo-Fun-Controlnet-Union v1 / 2.0 / 2.1 / 2.1-lite) in MLX.

Ports diffusers 0.42.1 `ZImageControlNetModel` (models/controlnets/controlnet_z_image.py): "VACE-style" control
blocks (a modulated transformer block plus `after_proj`, and `before_proj` on the first one), the control patch
embedder `control_all_x_embedder` and the control noise refiner. The published files already use these key names.

The ControlNet owns no embedders, RoPE or caption features: it runs inside the main transformer's forward through
the hook `ControlConditioning` (the transformer calls `refiner_hints` before its noise refiner and `layer_hints`
once the unified [image ; caption] sequence exists), so the timestep embedding, the caption features and the RoPE
tables are computed once and shared. Two semantics:

* "reference" -- the code the model was trained with (VideoX-Fun `ZImageControlTransformer2DModel.forward`,
  ComfyUI agrees): the control noise refiner's hints are added to the main noise refiner, and the control layers
  read the main unified sequence.
* "diffusers" -- diffusers 0.42.1 `ZImageControlNetModel.forward` exactly: the refiner hints only reach the
  ControlNet's private pass through the (shared) noise refiner; the main noise refiner never sees them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .transformer import SEQ_MULTI_OF, TransformerBlock, ZImageTransformer, ZImageTransformerConfig
from ..loading.weights import WeightError, fill_model, read_component, read_config, read_safetensors

SEMANTICS = ("reference", "diffusers")
REFINER_MODES = ("control_noise_refiner", "control_layers", None)

# Published variants: control layer count -> places in the 30-layer transformer (diffusers configs and the
# VideoX-Fun yaml files: union v1 every 5th layer, 2.x every 2nd, 2.1-lite [0, 10, 20]).
KNOWN_PLACES = {15: list(range(0, 30, 2)), 6: list(range(0, 30, 5)), 3: [0, 10, 20]}


@dataclass
class ZImageControlNetConfig:
    """diffusers `ZImageControlNetModel` config (the 2.1 values by default)."""

    control_layers_places: list = field(default_factory=lambda: list(range(0, 30, 2)))
    control_refiner_layers_places: list = field(default_factory=lambda: [0, 1])
    control_in_dim: int = 33
    add_control_noise_refiner: str | None = "control_noise_refiner"
    all_patch_size: list = field(default_factory=lambda: [2])
    all_f_patch_size: list = field(default_factory=lambda: [1])
    dim: int = 3840
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True

    @classmethod
    def from_dict(cls, cfg: dict) -> "ZImageControlNetConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})

    def __post_init__(self):
        self.control_layers_places = [int(i) for i in self.control_layers_places]
        self.control_refiner_layers_places = [int(i) for i in (self.control_refiner_layers_places or [])]
        self.all_patch_size = list(self.all_patch_size)
        self.all_f_patch_size = list(self.all_f_patch_size)
        if self.add_control_noise_refiner not in REFINER_MODES:
            raise ValueError(f"add_control_noise_refiner must be one of {REFINER_MODES}, "
                             f"got {self.add_control_noise_refiner!r}")
        if 0 not in self.control_layers_places:
            raise ValueError(f"control_layers_places {self.control_layers_places} must contain 0")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def variant(self) -> str:
        """'2.1', '2.1-lite', '2.0', '2.0-lite' or 'v1' (what the published file would be called)."""
        if self.add_control_noise_refiner is None:
            return "v1"
        lite = "-lite" if len(self.control_layers_places) < 6 else ""
        return ("2.1" if self.add_control_noise_refiner == "control_noise_refiner" else "2.0") + lite

    def block_config(self) -> ZImageTransformerConfig:
        """The transformer config the control blocks are built from (blocks never read the RoPE axes)."""
        head_dim = self.dim // self.n_heads
        axes = [32, 48, 48] if head_dim == 128 else [head_dim, 0, 0]
        return ZImageTransformerConfig(dim=self.dim, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                                       norm_eps=self.norm_eps, qk_norm=self.qk_norm, axes_dims=axes,
                                       n_refiner_layers=self.n_refiner_layers, n_layers=0)

    def check_matches(self, transformer: ZImageTransformerConfig, source: str = "the ControlNet") -> None:
        """Raise ValueError when this ControlNet cannot drive `transformer` (dim, heads, layer places)."""
        problems = []
        if self.dim != transformer.dim:
            problems.append(f"dim {self.dim} != the transformer's {transformer.dim}")
        if self.n_heads != transformer.n_heads:
            problems.append(f"n_heads {self.n_heads} != the transformer's {transformer.n_heads}")
        if max(self.control_layers_places) >= transformer.n_layers:
            problems.append(f"control_layers_places {self.control_layers_places} go past the transformer's "
                            f"{transformer.n_layers} layers")
        if self.control_refiner_layers_places and max(self.control_refiner_layers_places) >= \
                transformer.n_refiner_layers:
            problems.append(f"control_refiner_layers_places {self.control_refiner_layers_places} go past the "
                            f"transformer's {transformer.n_refiner_layers} noise-refiner layers")
        if self.all_patch_size[0] != transformer.all_patch_size[0]:
            problems.append(f"patch size {self.all_patch_size[0]} != the transformer's {transformer.all_patch_size[0]}")
        if problems:
            raise ValueError(f"{source} does not fit this Z-Image transformer: " + "; ".join(problems))


class ControlBlock(TransformerBlock):
    """A modulated block whose output also leaves through `after_proj` as a hint; block 0 first mixes the control
    tokens into the main stream: c = before_proj(c) + x."""

    def __init__(self, cfg: ZImageTransformerConfig, first: bool):
        super().__init__(cfg, modulation=True)
        if first:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)

    def __call__(self, c, x, cos, sin, temb):
        if "before_proj" in self:
            c = self.before_proj(c) + x
        c = super().__call__(c, cos, sin, temb)
        return self.after_proj(c), c


def run_blocks(blocks, c, x, cos, sin, temb):
    """Run control blocks in order; (hints [one per block], final control state)."""
    hints = []
    for block in blocks:
        hint, c = block(c, x, cos, sin, temb)
        hints.append(hint)
    return hints, c


class ZImageControlNet(nn.Module):
    def __init__(self, config: ZImageControlNetConfig):
        super().__init__()
        self.config = cfg = config
        bcfg = cfg.block_config()
        self.control_layers = [ControlBlock(bcfg, i == 0) for i in range(len(cfg.control_layers_places))]
        self.control_all_x_embedder = {
            f"{p}-{pf}": nn.Linear(pf * p * p * cfg.control_in_dim, cfg.dim)
            for p, pf in zip(cfg.all_patch_size, cfg.all_f_patch_size)
        }
        if cfg.add_control_noise_refiner == "control_noise_refiner":
            self.control_noise_refiner = [ControlBlock(bcfg, i == 0) for i in range(cfg.n_refiner_layers)]
        elif cfg.add_control_noise_refiner is None:
            self.control_noise_refiner = [TransformerBlock(bcfg, True) for _ in range(cfg.n_refiner_layers)]

    def set_compile(self, enabled: bool, cpu_streams: bool = True) -> None:
        """mx.compile the control blocks' elementwise chains, as ZImageTransformer.set_compile does for its own."""
        ZImageTransformer.set_compile(self, enabled, cpu_streams)

    @property
    def dtype(self) -> mx.Dtype:
        return self.control_all_x_embedder[f"{self.config.all_patch_size[0]}-1"].bias.dtype

    def embed(self, context: mx.array, x_pad_token: mx.array) -> mx.array:
        """(B, control_in_dim, h, w) control latents -> (B, tokens padded to 32, dim), patchified like the image
        (features ordered (ph, pw, c)); pad rows become the transformer's `x_pad_token`."""
        cfg = self.config
        p, pf = cfg.all_patch_size[0], cfg.all_f_patch_size[0]
        B, C, h, w = context.shape
        if C != cfg.control_in_dim:
            raise ValueError(f"control context has {C} channels, the ControlNet expects {cfg.control_in_dim}")
        n = (h // p) * (w // p)
        t = context.astype(self.dtype).reshape(B, C, h // p, p, w // p, p).transpose(0, 2, 4, 3, 5, 1)
        t = self.control_all_x_embedder[f"{p}-{pf}"](t.reshape(B, n, p * p * C))
        pad = -n % SEQ_MULTI_OF
        if pad:
            t = mx.concatenate([t, mx.broadcast_to(x_pad_token.astype(t.dtype), (B, pad, cfg.dim))], axis=1)
        return t

    def refine(self, c, x, cos, sin, temb):
        """The image-only control stage: (refiner hints, control state). x = the embedded image tokens before the
        noise refiner (what `before_proj`'s sum uses)."""
        mode = self.config.add_control_noise_refiner
        if mode == "control_noise_refiner":
            return run_blocks(self.control_noise_refiner, c, x, cos, sin, temb)
        if mode == "control_layers":   # 2.0: the control layers themselves, over the image tokens only
            return run_blocks(self.control_layers, c, x, cos, sin, temb)
        for block in self.control_noise_refiner:   # v1: plain blocks, no hints
            c = block(c, cos, sin, temb)
        return [], c

    def layer_hints(self, c, unified, cos, sin, temb):
        """Hints for the main layers: the control blocks over [control tokens ; caption part of `unified`]."""
        n_img = c.shape[1]
        cu = mx.concatenate([c, unified[:, n_img:]], axis=1)
        return run_blocks(self.control_layers, cu, unified, cos, sin, temb)[0]

    def sanitize(self, weights: dict) -> dict:
        """Checkpoint keys -> module keys: an optional `model.diffusion_model.` / `controlnet.` prefix is dropped,
        and 2.0 files' unused all-zero `control_noise_refiner.*` tensors are dropped when this is a 2.0 model."""
        out = {}
        for k in list(weights):
            v = weights.pop(k)
            for prefix in ("model.diffusion_model.", "controlnet."):
                k = k.removeprefix(prefix)
            if self.config.add_control_noise_refiner == "control_layers" and k.startswith("control_noise_refiner."):
                continue
            out[k] = v
        return out


# --------------------------------------------------------------------------- the forward hook
@dataclass
class ControlInput:
    """One control image: its (B, control_in_dim, h, w) context latents and conditioning scale."""

    context: mx.array
    scale: float


class ControlConditioning:
    """Per transformer call: the ControlNet, its control inputs (several sum their hints) and the semantics.

    The transformer calls `refiner_hints(...)` (additions after its noise-refiner layers) and then
    `layer_hints(...)` (additions after its main layers), both as {layer index: array}; `select(idx)` takes the
    batch rows `idx` (the transformer runs caption-length groups separately).
    """

    def __init__(self, controlnet: ZImageControlNet, inputs: list[ControlInput], semantics: str = "reference"):
        if semantics not in SEMANTICS:
            raise ValueError(f"controlnet_semantics must be one of {SEMANTICS}, got {semantics!r}")
        self.controlnet = controlnet
        self.inputs = list(inputs)
        self.semantics = semantics
        self._state = None   # set by refiner_hints, used and cleared by layer_hints (one transformer forward)

    def select(self, idx) -> "ControlConditioning":
        idx = mx.array(list(idx))
        return ControlConditioning(self.controlnet, [ControlInput(i.context[idx], i.scale) for i in self.inputs],
                                   self.semantics)

    def doubled(self) -> "ControlConditioning":
        """The same control for a [positive ; negative] CFG batch (diffusers repeats the control latents)."""
        return ControlConditioning(self.controlnet, [ControlInput(mx.concatenate([i.context, i.context]), i.scale)
                                                     for i in self.inputs], self.semantics)

    def refiner_hints(self, model, x, cos, sin, temb) -> dict[int, mx.array]:
        """Called with the embedded image tokens before the noise refiner: the additions to its layers."""
        net, places = self.controlnet, self.controlnet.config.control_refiner_layers_places
        self._state = []   # per input: (its refiner hints, its control stream, its private image tokens or None)
        for inp in self.inputs:
            c = net.embed(inp.context, model.x_pad_token)
            hints, c = net.refine(c, x, cos, sin, temb)
            hints = {p: h * inp.scale for p, h in zip(places, hints)}
            private = None
            if self.semantics == "diffusers" and hints:
                # diffusers: each ControlNet pass runs the shared noise refiner privately, with its own hints.
                private = x
                for i, layer in enumerate(model.noise_refiner):
                    private = layer(private, cos, sin, temb)
                    if i in hints:
                        private = private + hints[i]
            self._state.append((hints, c, private))
        return {} if self.semantics == "diffusers" else _sum_dicts([h for h, _, _ in self._state])

    def layer_hints(self, unified, cos, sin, temb) -> dict[int, mx.array]:
        """Called with the unified [image ; caption] sequence before the main layers: the additions to them."""
        if self._state is None:
            raise RuntimeError("refiner_hints must run before layer_hints")
        net, places = self.controlnet, self.controlnet.config.control_layers_places
        out = []
        for inp, (_, c, private) in zip(self.inputs, self._state):
            u = unified if private is None else mx.concatenate([private, unified[:, private.shape[1]:]], axis=1)
            hints = net.layer_hints(c, u, cos, sin, temb)
            out.append({p: h * inp.scale for p, h in zip(places, hints)})
        self._state = None
        return _sum_dicts(out)


def _sum_dicts(dicts):
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out[k] + v if k in out else v
    return out


# --------------------------------------------------------------------------- files
def _looks_foreign(keys) -> str | None:
    """A message when the keys belong to another model family's ControlNet."""
    def has(frag):
        return any(frag in k for k in keys)

    if has("controlnet_cond_embedding") or has("zero_convs") or has("input_hint_block") or \
            has("down_blocks.0.attentions"):
        return "it looks like a Stable Diffusion / SDXL ControlNet (controlnet_cond_embedding / zero_convs keys)"
    if has("controlnet_x_embedder") or has("controlnet_single_blocks") or has("double_blocks") or \
            has("controlnet_blocks."):
        return "it looks like a FLUX ControlNet (controlnet_x_embedder / controlnet_blocks keys)"
    if has("layers.0.adaLN_modulation.0.weight") and not has("control_layers."):
        return "it is a Z-Image transformer, not a ControlNet"
    if not has("control_all_x_embedder.") or not has("control_layers.0."):
        return "it has no control_all_x_embedder / control_layers tensors"
    return None


def config_from_weights(weights: dict, overrides: dict | None = None) -> ZImageControlNetConfig:
    """The ControlNet config of a published single file, from its keys and shapes (`overrides` win).

    Variant rules: `control_noise_refiner.0.before_proj` present and nonzero -> 2.1; no `control_noise_refiner`
    tensors (or an all-zero before_proj) -> 2.0; refiner blocks without before/after_proj -> v1. The number of
    control layers picks the places (15 -> every 2nd layer, 6 -> every 5th, 3 -> [0, 10, 20]).
    """
    overrides = dict(overrides or {})
    keys = {k.removeprefix("model.diffusion_model.").removeprefix("controlnet."): v for k, v in weights.items()}
    problem = _looks_foreign(keys)
    if problem:
        raise WeightError(f"not a Z-Image ControlNet: {problem}")
    emb = next(v for k, v in keys.items() if k.startswith("control_all_x_embedder.") and k.endswith(".weight"))
    dim, in_features = emb.shape
    norm_q = keys.get("control_layers.0.attention.norm_q.weight")
    head_dim = norm_q.shape[0] if norm_q is not None else 128
    n_layers = len({k.split(".")[1] for k in keys if k.startswith("control_layers.")})
    n_refiner = len({k.split(".")[1] for k in keys if k.startswith("control_noise_refiner.")})
    before = keys.get("control_noise_refiner.0.before_proj.weight")
    if n_refiner == 0:
        mode = "control_layers"
    elif before is not None:
        mode = "control_noise_refiner" if bool(mx.any(before != 0).item()) else "control_layers"
    else:
        mode = None
    cfg = dict(dim=dim, n_heads=dim // head_dim, n_kv_heads=dim // head_dim, control_in_dim=in_features // 4,
               add_control_noise_refiner=mode, qk_norm=norm_q is not None,
               n_refiner_layers=n_refiner or 2, control_refiner_layers_places=list(range(n_refiner or 2)))
    if "control_layers_places" not in overrides:
        if n_layers not in KNOWN_PLACES:
            raise WeightError(f"{n_layers} control layers match no published ControlNet variant; pass a config "
                              "with control_layers_places")
        cfg["control_layers_places"] = KNOWN_PLACES[n_layers]
    cfg.update(overrides)
    return ZImageControlNetConfig.from_dict(cfg)


MLX_KEY = "_zimage_mlx"   # in a converted directory's config.json: {"bits": b | null, "group_size": g}


def controlnet_config(path: str | Path, overrides: dict | None = None) -> ZImageControlNetConfig:
    """The config of a ControlNet file or directory without loading its weights (a single file's variant is read
    from its keys; `overrides` win)."""
    path = Path(path)
    if path.is_dir():
        cfg = read_config(path)
        if "control_layers_places" not in cfg and "control_layers_places" not in (overrides or {}):
            raise WeightError(f"{path}: not a ControlNet directory (its config.json is for "
                              f"{cfg.get('_class_name', 'another model')}, with no control_layers_places)")
        return ZImageControlNetConfig.from_dict({**cfg, **(overrides or {})})
    try:
        return config_from_weights(read_safetensors(path), overrides)
    except WeightError as e:
        raise WeightError(e if str(e).startswith(str(path)) else f"{path}: {e}") from None


def controlnet_from_weights(config: ZImageControlNetConfig | dict, weights: dict, dtype: mx.Dtype = mx.bfloat16,
                            source: str = "weights", bits: int | None = None,
                            group_size: int = 64) -> ZImageControlNet:
    if isinstance(config, dict):
        config = ZImageControlNetConfig.from_dict(config)
    model = ZImageControlNet(config)
    return fill_model(model, model.sanitize(weights), dtype, source, bits=bits, group_size=group_size)


def load_controlnet(path: str | Path, dtype: mx.Dtype | None = mx.bfloat16, config: dict | None = None,
                    bits: int | None = None, group_size: int = 64) -> ZImageControlNet:
    """Load a ControlNet from a published single .safetensors file (variant detected from its keys; `config`
    entries override), a diffusers-layout directory (config.json + safetensors) or a directory written by
    `save_controlnet` (MLX names, quantized layers packed: loaded as saved). `bits` quantizes a float one on load."""
    path = Path(path)
    if not path.exists():
        raise WeightError(f"{path}: not found")
    cfg = controlnet_config(path, config)
    saved = read_config(path).get(MLX_KEY) if path.is_dir() else None
    weights = read_component(path) if path.is_dir() else read_safetensors(path)
    if saved is None:
        problem = _looks_foreign(weights)
        if problem:
            raise WeightError(f"{path}: not a Z-Image ControlNet: {problem}")
        return controlnet_from_weights(cfg, weights, dtype, source=str(path), bits=bits, group_size=group_size)
    model = ZImageControlNet(cfg)
    return fill_model(model, weights, dtype, str(path), bits=saved.get("bits") or bits,
                      group_size=saved.get("group_size") or group_size)


def controlnet_save_config(model: ZImageControlNet, bits: int | None, group_size: int) -> dict:
    """config.json of a converted ControlNet directory: the model config plus how its layers are stored."""
    return {"_class_name": "ZImageControlNetModel", **model.config.to_dict(),
            MLX_KEY: {"bits": bits, "group_size": group_size}}
