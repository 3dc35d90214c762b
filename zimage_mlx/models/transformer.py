"""Z-Image S3-DiT (single-stream diffusion transformer) in MLX.

Ports diffusers 0.42.1 `ZImageTransformer2DModel` (text-to-image "basic" mode). Module names follow the
checkpoint, so the diffusers keys load with no renames (`sanitize` is the one place key maps live).
Numerics follow diffusers' `models/transformers/transformer_z_image.py`: float32 timestep sinusoid, RoPE tables
built in float64, RoPE applied in float32, RMSNorm statistics in float32; everything else in the weight dtype.
The output is float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..loading.weights import WeightError
from .fused_projections import fuse_projections
from .kernels import PLAIN_KERNELS, Kernels, scaled_dot_product_attention, swiglu

ADALN_EMBED_DIM = 256
SEQ_MULTI_OF = 32
FREQ_EMBED_SIZE = 256
T_EMBED_HIDDEN = 1024


@dataclass
class ZImageTransformerConfig:
    all_patch_size: list = field(default_factory=lambda: [2])
    all_f_patch_size: list = field(default_factory=lambda: [1])
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30  # diffusers ignores it (plain multi-head attention)
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: list = field(default_factory=lambda: [32, 48, 48])
    axes_lens: list = field(default_factory=lambda: [1536, 512, 512])

    @classmethod
    def from_dict(cls, cfg: dict) -> "ZImageTransformerConfig":
        """From a diffusers `transformer/config.json` dict; unknown keys (`_class_name`, ...) are ignored."""
        if cfg.get("siglip_feat_dim") is not None:
            raise ValueError("Omni checkpoints (siglip_feat_dim set) are not supported")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})

    def __post_init__(self):
        self.all_patch_size = list(self.all_patch_size)
        self.all_f_patch_size = list(self.all_f_patch_size)
        self.axes_dims = list(self.axes_dims)
        self.axes_lens = list(self.axes_lens)
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            raise ValueError(f"axes_dims {self.axes_dims} must be even and sum to head_dim {self.head_dim}")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise ValueError("axes_dims and axes_lens must have 3 entries")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    # diffusers rounds x*rsqrt(var) to the weight dtype before the weight product; mx.fast.rms_norm rounds once
    # at the end (float32 inside) -- identical in float32, at most one bf16 rounding apart in bfloat16.
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ZImageTransformerConfig):
        super().__init__()
        dim = cfg.dim
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = [nn.Linear(dim, dim, bias=False)]
        if cfg.qk_norm:  # q/k norm eps is hard-coded 1e-5 in diffusers
            self.norm_q = RMSNorm(self.head_dim, eps=1e-5)
            self.norm_k = RMSNorm(self.head_dim, eps=1e-5)
        self.qk_norm = cfg.qk_norm
        self.kernels = PLAIN_KERNELS

    def __call__(self, x, cos, sin):
        B, S, _ = x.shape
        if "to_qkv" in self:     # fuse_projections
            qkv = self.to_qkv(x).reshape(B, S, 3, self.n_heads, self.head_dim)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = self.to_q(x).reshape(B, S, self.n_heads, self.head_dim)
            k = self.to_k(x).reshape(B, S, self.n_heads, self.head_dim)
            v = self.to_v(x).reshape(B, S, self.n_heads, self.head_dim)
        v = v.transpose(0, 2, 1, 3)
        if self.qk_norm:
            q, k = self.norm_q(q), self.norm_k(k)
        # cos/sin: (S, head_dim) -> broadcast over (B, H, S, head_dim)
        q = self.kernels.rope(q.transpose(0, 2, 1, 3), cos, sin)
        k = self.kernels.rope(k.transpose(0, 2, 1, 3), cos, sin)
        o = self.kernels.attention(q, k, v)
        return self.to_out[0](o.transpose(0, 2, 1, 3).reshape(B, S, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.kernels = PLAIN_KERNELS

    def __call__(self, x):
        if "w13" in self:       # fuse_projections
            h = self.w13(x)
            n = h.shape[-1] // 2
            return self.w2(self.kernels.swiglu(h[..., :n], h[..., n:]))
        return self.w2(self.kernels.swiglu(self.w1(x), self.w3(x)))


def feed_forward_width(dim: int) -> int:
    """The SwiGLU hidden width of a block of width `dim` (diffusers' ZImageTransformerBlock: int(dim / 3 * 8))."""
    return int(dim / 3 * 8)


class TransformerBlock(nn.Module):
    """Sandwich-norm block; with modulation: tanh gates and 1+scale from the timestep embedding (no shifts)."""

    def __init__(self, cfg: ZImageTransformerConfig, modulation: bool):
        super().__init__()
        dim, eps = cfg.dim, cfg.norm_eps
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(dim, feed_forward_width(dim))
        self.attention_norm1 = RMSNorm(dim, eps)
        self.ffn_norm1 = RMSNorm(dim, eps)
        self.attention_norm2 = RMSNorm(dim, eps)
        self.ffn_norm2 = RMSNorm(dim, eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = [nn.Linear(min(dim, ADALN_EMBED_DIM), 4 * dim)]
        self.kernels = PLAIN_KERNELS

    def __call__(self, x, cos, sin, temb=None):
        if self.modulation:
            mod = self.adaLN_modulation[0](temb)[:, None, :]
            scale_msa, gate_msa, scale_mlp, gate_mlp = mx.split(mod, 4, axis=-1)
            h = self.attention(self.attention_norm1(x) * (1.0 + scale_msa), cos, sin)
            x = self.kernels.gated_residual(x, gate_msa, self.attention_norm2(h))
            h = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_mlp))
            return self.kernels.gated_residual(x, gate_mlp, self.ffn_norm2(h))
        x = x + self.attention_norm2(self.attention(self.attention_norm1(x), cos, sin))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(min(dim, ADALN_EMBED_DIM), dim)]

    def __call__(self, x, temb):
        scale = 1.0 + self.adaLN_modulation[1](self.adaLN_modulation[0](temb))
        return self.linear(mx.fast.layer_norm(x, None, None, 1e-6) * scale[:, None, :])


class TimestepEmbedder(nn.Module):
    def __init__(self, out_size: int, mid_size: int):
        super().__init__()
        self.mlp = [nn.Linear(FREQ_EMBED_SIZE, mid_size), nn.SiLU(), nn.Linear(mid_size, out_size)]

    def __call__(self, t: mx.array) -> mx.array:
        half = FREQ_EMBED_SIZE // 2
        freqs = mx.exp(-math.log(10000) * mx.arange(half, dtype=mx.float32) / half)
        args = t.astype(mx.float32)[:, None] * freqs[None]
        emb = mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)
        w = self.mlp[0].weight.dtype
        emb = emb.astype(w if mx.issubdtype(w, mx.floating) else self.mlp[0].scales.dtype)
        for layer in self.mlp:
            emb = layer(emb)
        return emb


def rope_tables(axes_dims, axes_lens, theta):
    """Per-axis (cos, sin) tables [len, d/2] as diffusers builds them: float64 angles rounded to float32."""
    tables = []
    for d, n in zip(axes_dims, axes_lens):
        inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        ang = np.outer(np.arange(n, dtype=np.float64), inv).astype(np.float32).astype(np.float64)
        tables.append((np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)))
    return tables


def _round_up(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


class ZImageTransformer(nn.Module):
    """model(latents (B,C,h,w), timestep (B,) = 1 - sigma, cap_feats [list of (L_i, cap_feat_dim)]) -> (B,C,h,w)."""

    def __init__(self, config: ZImageTransformerConfig):
        super().__init__()
        self.config = cfg = config
        dim, c = cfg.dim, cfg.in_channels
        self.all_x_embedder = {}
        self.all_final_layer = {}
        for p, pf in zip(cfg.all_patch_size, cfg.all_f_patch_size):
            self.all_x_embedder[f"{p}-{pf}"] = nn.Linear(pf * p * p * c, dim)
            self.all_final_layer[f"{p}-{pf}"] = FinalLayer(dim, p * p * pf * c)
        self.noise_refiner = [TransformerBlock(cfg, True) for _ in range(cfg.n_refiner_layers)]
        self.context_refiner = [TransformerBlock(cfg, False) for _ in range(cfg.n_refiner_layers)]
        self.t_embedder = TimestepEmbedder(min(dim, ADALN_EMBED_DIM), T_EMBED_HIDDEN)
        self.cap_embedder = [RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, dim)]
        self.x_pad_token = mx.zeros((1, dim))
        self.cap_pad_token = mx.zeros((1, dim))
        self.layers = [TransformerBlock(cfg, True) for _ in range(cfg.n_layers)]
        self._rope = rope_tables(cfg.axes_dims, cfg.axes_lens, cfg.rope_theta)

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype (pad tokens are never quantized)."""
        return self.x_pad_token.dtype

    def set_compile(self, enabled: bool, cpu_streams: bool = True) -> None:
        """Run the blocks' elementwise chains through `mx.compile` (see Kernels) or plainly. cpu_streams=False keeps
        every op on the default stream. Runs with mx.distributed collectives use that as a precaution: a rank whose
        peer died was seen to hang in MLX's ring backend (cause not pinned down; it also happened with one stream),
        and fewer streams waiting on a failed collective is the simpler state to fail from."""
        kernels = Kernels.compiled() if enabled else PLAIN_KERNELS
        if not cpu_streams:
            kernels = replace(kernels, swiglu=swiglu, attention=scaled_dot_product_attention)
        for _, m in self.named_modules():
            if isinstance(m, (Attention, FeedForward, TransformerBlock)):
                m.kernels = kernels

    def fuse_projections(self) -> int:
        """q/k/v and w1/w3 as one matmul each (module-level `fuse_projections`); the pipeline does it after loading.
        The fused model's parameters carry the fused names: save (convert) an unfused model."""
        return fuse_projections(self)

    def sanitize(self, weights: dict) -> dict:
        """Checkpoint keys -> module keys. Diffusers/official names pass through unchanged; ComfyUI single-file
        names (ComfyUI's `comfy/ldm/lumina/model.py`) are mapped: prefix stripped, fused qkv split, out/q_norm/k_norm renamed,
        x_embedder/final_layer moved under the "2-1" patch key, the unused norm_final dropped."""
        out = {}
        for k in list(weights):
            v = weights.pop(k)
            if k.startswith("model.diffusion_model."):
                k = k[len("model.diffusion_model."):]
            if k == "norm_final.weight":
                continue
            if k.startswith("x_embedder."):
                k = "all_x_embedder.2-1." + k[len("x_embedder."):]
            elif k.startswith("final_layer."):
                k = "all_final_layer.2-1." + k[len("final_layer."):]
            if k.endswith(".attention.qkv.weight"):
                if v.shape[0] % 3:
                    raise WeightError(f"tensor {k} has shape {tuple(v.shape)}; a fused qkv needs 3 equal row blocks")
                prefix = k[: -len("qkv.weight")]
                for name, part in zip(("to_q", "to_k", "to_v"), mx.split(v, 3, axis=0)):
                    out[f"{prefix}{name}.weight"] = part
                continue
            k = k.replace(".attention.out.", ".attention.to_out.0.")
            k = k.replace(".attention.q_norm.", ".attention.norm_q.").replace(".attention.k_norm.", ".attention.norm_k.")
            out[k] = v
        return out

    def _rope_cos_sin(self, pos: np.ndarray):
        """pos: (S, 3) int positions -> the (S, head_dim) float32 tables `apply_rope` takes: cos repeated for both
        members of a pair, sin as (−sin, +sin)."""
        for a, n in enumerate(self.config.axes_lens):
            if pos[:, a].max() >= n:
                raise ValueError(
                    f"position {int(pos[:, a].max())} on RoPE axis {a} exceeds axes_lens[{a}] = {n} "
                    "(caption or image too large for this model)"
                )
        cos = np.concatenate([t[0][pos[:, a]] for a, t in enumerate(self._rope)], axis=-1)
        sin = np.concatenate([t[1][pos[:, a]] for a, t in enumerate(self._rope)], axis=-1)
        return mx.array(np.repeat(cos, 2, axis=-1)), mx.array(np.stack([-sin, sin], axis=-1).reshape(len(pos), -1))

    def prepare(self, cap_feats: list, height: int, width: int) -> "Captions":
        """The work of one generation that no step changes: caption embedding and the (unmodulated) context
        refiner, positions and RoPE tables of both streams, for latents of height × width. Samples whose padded
        caption lengths agree share one group (run as one batch, no masks needed); others run apart, which equals
        diffusers' key-padding-masked batch. CFG's two branches are simply two entries of `cap_feats`."""
        cfg = self.config
        p = cfg.all_patch_size[0]
        if height % p or width % p:
            raise ValueError(f"latent height and width must be multiples of {p}, got {height}x{width}")
        for c in cap_feats:
            if c.ndim != 2 or c.shape[1] != cfg.cap_feat_dim or c.shape[0] == 0:
                raise ValueError(f"caption features must be (L>0, {cfg.cap_feat_dim}), got {tuple(c.shape)}")
        ht, wt = height // p, width // p
        n_img = ht * wt
        n_img_pad = _round_up(n_img) - n_img
        by_length: dict[int, list[int]] = {}
        for i, c in enumerate(cap_feats):
            by_length.setdefault(_round_up(c.shape[0]), []).append(i)
        groups = []
        for lc, idx in by_length.items():
            # Positions: caption j -> (1+j, 0, 0) incl. pads; image (r, c) -> (lc+1, r, c); image pads -> (0, 0, 0).
            cap_pos = np.zeros((lc, 3), dtype=np.int64)
            cap_pos[:, 0] = np.arange(1, lc + 1)
            img_pos = np.zeros((n_img + n_img_pad, 3), dtype=np.int64)
            rows, cols = np.meshgrid(np.arange(ht), np.arange(wt), indexing="ij")
            img_pos[:n_img] = np.stack([np.full(n_img, lc + 1), rows.reshape(-1), cols.reshape(-1)], axis=-1)
            img_cos, img_sin = self._rope_cos_sin(img_pos)
            cap_cos, cap_sin = self._rope_cos_sin(cap_pos)
            cap = mx.stack([self._embed_caption(cap_feats[i], lc) for i in idx])
            for layer in self.context_refiner:
                cap = layer(cap, cap_cos, cap_sin)
            cos, sin = mx.concatenate([img_cos, cap_cos]), mx.concatenate([img_sin, cap_sin])
            mx.eval(cap, cos, sin)
            groups.append(CaptionGroup(idx, cap, cos, sin, n_img + n_img_pad))
        return Captions(groups, len(cap_feats), (height, width))

    def _embed_caption(self, c: mx.array, lc: int) -> mx.array:
        dtype = self.dtype
        c = self.cap_embedder[1](self.cap_embedder[0](c.astype(dtype)))
        if lc > c.shape[0]:
            pad = mx.broadcast_to(self.cap_pad_token.astype(dtype), (lc - c.shape[0], self.config.dim))
            c = mx.concatenate([c, pad], axis=0)
        return c

    def __call__(self, latents: mx.array, timestep: mx.array, cap_feats: "list | Captions", control=None) -> mx.array:
        """cap_feats: a list of (L_i, cap_feat_dim) arrays, or what `prepare` made of them for this latent size
        (the pipeline prepares once per generation and reuses it at every step).
        control: optional ControlNet hook (controlnet.ControlConditioning): its `refiner_hints` and `layer_hints`
        return {layer index: array} added after those noise-refiner / main layers."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, {cfg.in_channels}, h, w), got {tuple(latents.shape)}")
        B, _, h, w = latents.shape
        captions = cap_feats if isinstance(cap_feats, Captions) else None
        if captions is None:
            if len(cap_feats) != B:
                raise ValueError(f"got {len(cap_feats)} caption feature arrays for a batch of {B}")
            captions = self.prepare(cap_feats, h, w)
        elif captions.batch != B or captions.latent_size != (h, w):
            raise ValueError(f"captions were prepared for {captions.batch} latents of {captions.latent_size}, "
                             f"got {B} of {(h, w)}")
        timestep = mx.broadcast_to(mx.array(timestep).reshape(-1), (B,))
        if len(captions.groups) == 1:
            return self._forward(latents, timestep, captions.groups[0], control)
        out = [None] * B
        for g in captions.groups:
            y = self._forward(latents[mx.array(g.index)], timestep[mx.array(g.index)], g,
                              control.select(g.index) if control is not None else None)
            for j, i in enumerate(g.index):
                out[i] = y[j]
        return mx.stack(out)

    def _forward(self, latents, timestep, g: "CaptionGroup", control=None):
        u, temb = self.stream_in(latents, timestep, g, control)
        hints = control.layer_hints(u, g.cos, g.sin, temb) if control is not None else {}
        return self.stream_out(self.main_layers(u, g, temb, hints), temb, latents.shape)

    # The forward in three parts (_forward = stream_in -> main_layers -> stream_out), so a caller can run main layer
    # 0 alone and decide about the rest (pipeline/step_cache.py; docs/step-cache.md).
    def stream_in(self, latents, timestep, g: "CaptionGroup", control=None) -> tuple[mx.array, mx.array]:
        """Timestep embedding, patch embedding and noise refiner (+ the ControlNet's refiner hints) of one caption
        group: (the unified [image ; caption] sequence entering the main layers, the timestep embedding)."""
        cfg = self.config
        dtype = self.dtype
        B, C, h, w = latents.shape
        p = cfg.all_patch_size[0]
        ht, wt = h // p, w // p
        n_img = ht * wt

        temb = self.t_embedder(timestep.astype(mx.float32) * cfg.t_scale).astype(dtype)

        # Patchify: (B,C,h,w) -> (B, ht*wt, p*p*C), features ordered (ph, pw, c).
        x = latents.astype(dtype).reshape(B, C, ht, p, wt, p).transpose(0, 2, 4, 3, 5, 1)
        x = self.all_x_embedder[self._patch_key](x.reshape(B, n_img, p * p * C))
        if g.n_img > n_img:
            pad = mx.broadcast_to(self.x_pad_token.astype(dtype), (B, g.n_img - n_img, cfg.dim))
            x = mx.concatenate([x, pad], axis=1)

        img_cos, img_sin = g.cos[: g.n_img], g.sin[: g.n_img]
        hints = control.refiner_hints(self, x, img_cos, img_sin, temb) if control is not None else {}
        for i, layer in enumerate(self.noise_refiner):
            x = layer(x, img_cos, img_sin, temb)
            if i in hints:
                x = x + hints[i]
        return mx.concatenate([x, g.cap], axis=1), temb

    def main_layers(self, u, g: "CaptionGroup", temb, hints: dict, start: int = 0) -> mx.array:
        """Main layers start.. over the unified sequence; hints {layer index: array} are added after those layers."""
        for i in range(start, len(self.layers)):
            u = self.layers[i](u, g.cos, g.sin, temb)
            if i in hints:
                u = u + hints[i]
        return u

    def stream_out(self, u, temb, shape) -> mx.array:
        """Final layer over the image tokens and unpatchify: the float32 (B, C, h, w) velocity."""
        B, C, h, w = shape
        p = self.config.all_patch_size[0]
        ht, wt = h // p, w // p
        y = self.all_final_layer[self._patch_key](u[:, : ht * wt], temb)
        y = y.reshape(B, ht, wt, p, p, C).transpose(0, 5, 1, 3, 2, 4).reshape(B, C, h, w)
        return y.astype(mx.float32)

    @property
    def _patch_key(self) -> str:
        return f"{self.config.all_patch_size[0]}-{self.config.all_f_patch_size[0]}"


@dataclass
class CaptionGroup:
    """Samples sharing a padded caption length: their refined captions and the unified sequence's RoPE tables."""

    index: list[int]          # positions in the batch
    cap: mx.array             # (len(index), lc, dim), after the context refiner
    cos: mx.array             # (n_img_padded + lc, head_dim) float32 (apply_rope's tables): image tokens, then caption
    sin: mx.array
    n_img: int                # image tokens including padding


@dataclass
class Captions:
    """`ZImageTransformer.prepare`'s result: valid for `batch` latents of `latent_size`."""

    groups: list[CaptionGroup]
    batch: int
    latent_size: tuple[int, int]

    def select(self, index) -> "Captions":
        """The captions of batch entries `index` (e.g. CFG's positive half), renumbered 0..len(index)-1."""
        new = {i: k for k, i in enumerate(index)}
        groups = []
        for g in self.groups:
            keep = [j for j, i in enumerate(g.index) if i in new]
            if keep:
                cap = g.cap if len(keep) == len(g.index) else g.cap[mx.array(keep)]
                groups.append(CaptionGroup([new[g.index[j]] for j in keep], cap, g.cos, g.sin, g.n_img))
        return Captions(groups, len(new), self.latent_size)
