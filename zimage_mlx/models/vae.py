"""The FLUX.1 16-channel VAE (diffusers `AutoencoderKL`) in MLX, NHWC, with a strip-tiled decode.

Ports diffusers 0.42.1 `autoencoders/autoencoder_kl.py`, `autoencoders/vae.py` (Encoder/Decoder),
`resnet.py` (ResnetBlock2D, Upsample2D, Downsample2D) and the VAE's mid-block attention. Module names follow the
diffusers checkpoint, so loading is only `sanitize` (LDM renames + the conv transpose [O,I,kh,kw] -> [O,kh,kw,I]).

The tiled decode (`decode(..., tile=rows)`) gives the same result as the untiled one up to float rounding: it runs
the decoder op by op on whole activations, with each convolution in horizontal strips with halo rows, so every
GroupNorm takes its statistics from the stored whole input (`_WholeDecoder`). With a `checkpoint_bytes` limit
below the largest activation it instead recomputes strips from the last activation kept, gathering GroupNorm
statistics in a first pass over strips and applying them in a second (`_StripDecoder`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np


GN_EPS = 1e-6


@dataclass
class VAEConfig:
    """`vae/config.json` (defaults = the real FLUX.1 / Z-Image VAE)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    mid_block_add_attention: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    act_fn: str = "silu"
    down_block_types: tuple = field(default=None, repr=False)
    up_block_types: tuple = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.block_out_channels = tuple(cfg.block_out_channels)
        cfg.shift_factor = float(cfg.shift_factor or 0.0)
        n = len(cfg.block_out_channels)
        for name, ok in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(cfg, name)
            if types is not None and (len(types) != n or any(t != ok for t in types)):
                raise ValueError(f"VAE config: {name} must be {n} x {ok}, got {types}")
        if cfg.act_fn != "silu" or cfg.use_quant_conv or cfg.use_post_quant_conv:
            raise ValueError("VAE config: only act_fn 'silu' without quant_conv/post_quant_conv is supported (FLUX VAE)")
        return cfg

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class GroupNorm(nn.GroupNorm):
    """PyTorch-compatible GroupNorm (channel groups x all positions) with two-pass float32 statistics.

    mx.fast.layer_norm over a whole group (up to 1M elements) loses ~1e-4 to cancellation; mean first, then the
    centered variance, tracks PyTorch to float32 rounding.
    """

    def __call__(self, x):
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        xg = x.reshape(b, -1, g, c // g).astype(mx.float32)
        mean = mx.mean(xg, axis=(1, 3), keepdims=True)
        xc = xg - mean
        rstd = mx.rsqrt(mx.mean(mx.square(xc), axis=(1, 3), keepdims=True) + self.eps)
        return (xc * rstd).reshape(x.shape).astype(x.dtype) * self.weight + self.bias


def _group_norm(groups: int, channels: int) -> GroupNorm:
    return GroupNorm(groups, channels, eps=GN_EPS, pytorch_compatible=True)


def upsample_nearest(x: mx.array) -> mx.array:
    b, h, w, c = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _group_norm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def __call__(self, x):
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions (query-chunked so the score matrix stays bounded)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x, max_score_elems: int = 1 << 24):
        b, h, w, c = x.shape
        n = h * w
        y = self.group_norm(x).reshape(b, 1, n, c)
        q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
        chunk = max(1, max_score_elems // (n * b))
        if chunk >= n:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=c**-0.5)
        else:
            mx.eval(k, v)
            parts = []
            for s in range(0, n, chunk):
                part = mx.fast.scaled_dot_product_attention(q[:, :, s : s + chunk], k, v, scale=c**-0.5)
                mx.eval(part)
                parts.append(part)
            out = mx.concatenate(parts, axis=2)
        return x + self.to_out[0](out).reshape(b, h, w, c)


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x):
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))  # right/bottom only


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x):
        return self.conv(upsample_nearest(x))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, cin, cout, layers, groups, add_downsample):
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)]
        self.downsamplers = [Downsample2D(cout)] if add_downsample else []

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, cin, cout, layers, groups, add_upsample):
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)]
        self.upsamplers = [Upsample2D(cout)] if add_upsample else []

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels, groups, add_attention):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups) for _ in range(2)]
        self.attentions = [Attention(channels, groups)] if add_attention else []

    def __call__(self, x):
        x = self.resnets[0](x)
        for a in self.attentions:
            x = a(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1) for i in range(len(ch))
        ]
        self.mid_block = UNetMidBlock2D(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = _group_norm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x, eval_steps: bool = False):
        x = self.conv_in(x)
        for blk in [*self.down_blocks, self.mid_block]:
            if eval_steps:
                mx.eval(x)  # bound the lazy graph: one block's activations alive at a time
            x = blk(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1) for i in range(len(ch))
        ]
        self.conv_norm_out = _group_norm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


# ---------------------------------------------------------------------------------------------------------------
# Strip-recompute decode (`checkpoint_bytes` below the largest activation). The decoder after its mid block is a flat list of row-local ops; output rows [o0, o1) of an
# op need input rows `need(o0, o1, h)`. Residuals use a stack (Save ... Add). GroupNorm+SiLU ops get whole-image
# statistics computed beforehand by streaming their input in strips. Activations are materialized ("checkpoints",
# kept as lists of row chunks and released as soon as no later strip needs them) after each resnet when they fit
# `checkpoint_bytes`; otherwise the next strips are recomputed from the last checkpoint (memory stays bounded for
# any image size, at the cost of recomputation).


class _Save:
    def need(self, o0, o1, h):
        return o0, o1

    def out_h(self, h):
        return h

    def __call__(self, x, r_in, r_out, h, stack):
        stack.append((x, r_in))
        return x


class _Add:
    def __init__(self, shortcut):
        self.shortcut = shortcut

    need, out_h = _Save.need, _Save.out_h

    def __call__(self, x, r_in, r_out, h, stack):
        skip, (s0, _) = stack.pop()
        skip = skip[:, r_out[0] - s0 : r_out[1] - s0]
        if self.shortcut is not None:
            skip = self.shortcut(skip)
        return skip + x


class _Conv3:
    def __init__(self, conv):
        self.conv = conv

    def need(self, o0, o1, h):
        return max(o0 - 1, 0), min(o1 + 1, h)

    def out_h(self, h):
        return h

    def __call__(self, x, r_in, r_out, h, stack):
        top, bottom = int(r_out[0] == 0), int(r_out[1] == h)  # zero padding only at the image border
        x = mx.pad(x, [(0, 0), (top, bottom), (1, 1), (0, 0)])
        return mx.conv2d(x, self.conv.weight) + self.conv.bias


class _Up:
    def need(self, o0, o1, h):
        return o0 // 2, (o1 + 1) // 2

    def out_h(self, h):
        return 2 * h

    def __call__(self, x, r_in, r_out, h, stack):
        return upsample_nearest(x)[:, r_out[0] - 2 * r_in[0] : r_out[1] - 2 * r_in[0]]


class _NormSiLU:
    def __init__(self, norm):
        self.norm = norm
        self.stats = None  # (mean, rstd), each (B, 1, 1, G, 1) float32

    need, out_h = _Save.need, _Save.out_h

    def __call__(self, x, r_in, r_out, h, stack):
        b, r, w, c = x.shape
        g = self.norm.num_groups
        mean, rstd = self.stats
        y = ((x.reshape(b, r, w, g, c // g).astype(mx.float32) - mean) * rstd).reshape(b, r, w, c)
        return nn.silu(y.astype(x.dtype) * self.norm.weight + self.norm.bias)


class _Chunks:
    """A materialized activation (B, h, w, C) held as row chunks [(r0, r1, array)]; old chunks can be released."""

    def __init__(self, chunks, h: int = 0, w: int = 0):
        self.chunks, self.h, self.w = list(chunks), h, w

    def append(self, r0, r1, x):
        self.chunks.append((r0, r1, x))

    def rows(self, a, b):
        parts = [x[:, max(a, r0) - r0 : min(b, r1) - r0] for r0, r1, x in self.chunks if r0 < b and r1 > a]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)

    def release_below(self, a):
        self.chunks = [c for c in self.chunks if c[1] > a]

    def full(self):
        return self.rows(self.chunks[0][0], self.chunks[-1][1])

    @property
    def nbytes(self):
        return sum(x.nbytes for *_, x in self.chunks)


class _StripDecoder:
    def __init__(self, dec: Decoder, tile: int, checkpoint_bytes: int | None):
        self.tile, self.checkpoint_bytes = tile, checkpoint_bytes
        ops, self.boundaries = [], set()
        for blk in dec.up_blocks:
            for r in blk.resnets:
                ops += [_Save(), _NormSiLU(r.norm1), _Conv3(r.conv1), _NormSiLU(r.norm2), _Conv3(r.conv2)]
                ops.append(_Add(r.conv_shortcut if "conv_shortcut" in r else None))
                self.boundaries.add(len(ops))
            for u in blk.upsamplers:
                ops += [_Up(), _Conv3(u.conv)]
                self.boundaries.add(len(ops))
        ops += [_NormSiLU(dec.conv_norm_out), _Conv3(dec.conv_out)]
        self.ops = ops

    def _ranges(self, a, b, o0, o1):
        ranges = [(o0, o1)]
        for k in range(b - 1, a - 1, -1):
            ranges.append(self.ops[k].need(*ranges[-1], self.heights[k]))
        return ranges[::-1]

    def _run(self, src: _Chunks, a, b, o0, o1):
        ranges = self._ranges(a, b, o0, o1)
        x, stack = src.rows(*ranges[0]), []
        for k in range(a, b):
            x = self.ops[k](x, ranges[k - a], ranges[k - a + 1], self.heights[k], stack)
        return x

    def _strips(self, a, b):
        """Output row strips for ops[a:b], about `tile` image rows each."""
        h = self.heights[b]
        rows = max(8, math.ceil(self.tile * h / self.heights[-1]))
        return [(s, min(s + rows, h)) for s in range(0, h, rows)]

    def _stats(self, src, a, k):
        """Whole-image GroupNorm statistics of the input of ops[k], streamed in strips (Chan's parallel merge)."""
        norm = self.ops[k].norm
        g = norm.num_groups
        count, mean, m2 = 0, 0.0, 0.0
        for o0, o1 in self._strips(a, k):
            x = self._run(src, a, k, o0, o1).astype(mx.float32)
            b, r, w, c = x.shape
            x = x.reshape(b, r * w, g, c // g).transpose(0, 2, 1, 3).reshape(b, g, -1)
            m = mx.mean(x, axis=-1)
            s = mx.sum(mx.square(x - m[..., None]), axis=-1)
            m, s = np.array(m, dtype=np.float64), np.array(s, dtype=np.float64)
            n = x.shape[-1]
            delta = m - mean
            tot = count + n
            mean = mean + delta * n / tot
            m2 = m2 + s + delta**2 * count * n / tot
            count = tot
        var = m2 / count
        shape = (var.shape[0], 1, 1, g, 1)
        return (
            mx.array(mean.astype(np.float32)).reshape(shape),
            mx.array((1.0 / np.sqrt(var + norm.eps)).astype(np.float32)).reshape(shape),
        )

    def _materialize(self, src, a, b):
        out = []
        strips = self._strips(a, b)
        for i, (o0, o1) in enumerate(strips):
            x = self._run(src, a, b, o0, o1)
            mx.eval(x)
            out.append((o0, o1, x))
            if i + 1 < len(strips):
                src.release_below(self._ranges(a, b, *strips[i + 1])[0][0])
        return _Chunks(out)

    def __call__(self, x):
        self.heights = [x.shape[1]]
        for op in self.ops:
            self.heights.append(op.out_h(self.heights[-1]))
        src, a = _Chunks([(0, x.shape[1], x)]), 0
        for k, op in enumerate(self.ops):
            if isinstance(op, _NormSiLU):
                op.stats = self._stats(src, a, k)
                mx.eval(*op.stats)
            if k + 1 in self.boundaries and k + 1 < len(self.ops):
                if self.checkpoint_bytes is None or self._bytes_at(k + 1, x) <= self.checkpoint_bytes:
                    src, a = self._materialize(src, a, k + 1), k + 1
        out = self._materialize(src, a, len(self.ops)).full()
        for op in self.ops:
            if isinstance(op, _NormSiLU):
                op.stats = None
        return out

    def _bytes_at(self, k, x):
        """Size of the activation entering ops[k] (a resnet boundary: channels = the previous conv's outputs)."""
        channels = next(op for op in reversed(self.ops[:k]) if isinstance(op, _Conv3)).conv.weight.shape[0]
        width = x.shape[2] * self.heights[k] // self.heights[0]
        return x.shape[0] * self.heights[k] * width * channels * x.itemsize


# ---------------------------------------------------------------------------------------------------------------
# Whole-activation strip decode (the default tiled decode). The decoder runs op by op over the whole image and
# keeps each op's whole output, held as row chunks (_Chunks) so that an input is released strip by strip as its
# consumer passes; only the 3x3 convolutions run in row strips with one halo row each side, which bounds their
# temporaries. GroupNorm statistics are reductions over the stored whole input, so nothing is recomputed: the work
# is the untiled decode's. The 3x3 convolution is nine shifted matmuls over the zero-padded, flattened strip
# (no im2col copy), and a nearest 2x upsample followed by a 3x3 convolution (diffusers `Upsample2D`) is four 2x2
# convolutions at the input resolution, one per output phase, whose kernels sum the 3x3 taps that land on the same
# input pixel (4/9 of the multiply-adds, no upsampled input).


def _conv_taps(conv: nn.Conv2d) -> mx.array:
    """Conv weight (O, kh, kw, I) -> matmul taps (kh, kw, I, O)."""
    w = conv.weight.transpose(1, 2, 3, 0)
    mx.eval(w)
    return w


def _up_taps(conv: nn.Conv2d) -> mx.array:
    """Taps of a 3x3 conv applied after a nearest 2x upsample -> (2, 2, 2, 2, I, O) 2x2 taps per output phase:
    output pixel (2i+a, 2j+b) = sum over u, v of input pixel (i-1+a+u, j-1+b+v) @ taps[a, b, u, v]. Upsampled rows
    2i-1, 2i, 2i+1 are input rows i-1, i, i (a = 0) and 2i, 2i+1, 2i+2 are i, i, i+1 (a = 1); columns alike."""
    def phase(t, a):  # the 3 taps along axis 0 -> the 2 input positions they fall on
        return (t[0], t[1] + t[2]) if a == 0 else (t[0] + t[1], t[2])

    w = conv.weight.transpose(1, 2, 3, 0)
    taps = mx.stack([mx.stack([mx.stack([mx.stack(phase(rows, b)) for rows in phase(w, a)])
                                for b in range(2)]) for a in range(2)])  # (a, b, u, v, I, O)
    mx.eval(taps)
    return taps


def _shifted_matmuls(xp: mx.array, taps, offsets, n: int) -> mx.array:
    """sum_k xp[off_k : off_k + n] @ taps[k] for a flattened (positions, C) input."""
    out = None
    for w, off in zip(taps, offsets):
        xs = xp[off : off + n]
        out = xs @ w if out is None else mx.addmm(out, xs, w)
    return out


def _conv3x3_strip(x: mx.array, taps: mx.array, bias: mx.array, top: bool, bottom: bool) -> mx.array:
    """3x3 conv (stride 1, zero padding 1) of rows x (B, r, W, C) -> (B, r - 2 + top + bottom, W, O): rows that
    are not at the image border (top/bottom False) are halo rows, consumed and not output."""
    b, r, w, c = x.shape
    xp = mx.pad(x, [(0, 0), (int(top), int(bottom) + 1), (1, 1), (0, 0)])  # +1 row: the last shifts overrun
    rows = r - 2 + top + bottom
    n, wp = rows * (w + 2), w + 2
    flat = [tp for dy in range(3) for tp in taps[dy]]
    offsets = [dy * wp + dx for dy in range(3) for dx in range(3)]
    outs = [_shifted_matmuls(xp[i].reshape(-1, c), flat, offsets, n) for i in range(b)]
    out = mx.stack(outs).reshape(b, rows, wp, -1)[:, :, :w]
    return out + bias


def _upconv_strip(x: mx.array, taps: mx.array, bias: mx.array, top: bool, bottom: bool) -> mx.array:
    """conv3x3(upsample_nearest(x)) for input rows x (B, r, W, C) with halo rows like `_conv3x3_strip`: output
    2 * (r - 2 + top + bottom) rows."""
    b, r, w, c = x.shape
    xp = mx.pad(x, [(0, 0), (int(top), int(bottom) + 1), (1, 1), (0, 0)])
    rows = r - 2 + top + bottom
    n, wp = rows * (w + 2), w + 2
    out = []
    for i in range(b):
        flat = xp[i].reshape(-1, c)
        phases = [[_shifted_matmuls(flat, [taps[a, bb, u, v] for u in range(2) for v in range(2)],
                                    [(a + u) * wp + bb + v for u in range(2) for v in range(2)], n)
                   .reshape(rows, wp, -1)[:, :w] for bb in range(2)] for a in range(2)]
        out.append(mx.stack([mx.stack(p, axis=2) for p in phases], axis=1))  # (rows, 2, W, 2, O)
    return (mx.stack(out).reshape(b, 2 * rows, 2 * w, -1)) + bias


def _group_stats(x: "_Chunks", norm: GroupNorm) -> tuple[mx.array, mx.array]:
    """Mean and 1/std per (image, group) of the whole stored activation, two-pass like `GroupNorm`; one chunk at a
    time (evaluated per chunk, so the centered temporaries never exist for the whole image at once)."""
    g = norm.num_groups

    def grouped(a):
        return a.reshape(a.shape[0], -1, g, a.shape[-1] // g).astype(mx.float32)

    def total(f):
        acc = None
        for *_, a in x.chunks:
            acc = f(grouped(a)) if acc is None else acc + f(grouped(a))
            mx.eval(acc)
        return acc

    count = x.h * x.w * (x.chunks[0][2].shape[-1] // g)
    mean = total(lambda a: mx.sum(a, axis=(1, 3), keepdims=True)) / count
    var = total(lambda a: mx.sum(mx.square(a - mean), axis=(1, 3), keepdims=True)) / count
    stats = mean[:, None], mx.rsqrt(var + norm.eps)[:, None]  # (B, 1, 1, G, 1)
    mx.eval(*stats)
    return stats


def _norm_silu(x: mx.array, norm: GroupNorm, stats) -> mx.array:
    b, r, w, c = x.shape
    mean, rstd = stats
    y = ((x.reshape(b, r, w, norm.num_groups, -1).astype(mx.float32) - mean) * rstd).reshape(x.shape)
    return nn.silu(y.astype(x.dtype) * norm.weight + norm.bias)


class _WholeDecoder:
    """Runs `Decoder` op by op on whole activations; each convolution in row strips of about `elems` input
    elements (positions x input channels), so that a strip's temporaries are about the same size at every stage."""

    def __init__(self, dec: Decoder, elems: int):
        self.dec, self.elems = dec, elems

    def _strips(self, h, w, channels):
        rows = max(1, self.elems // (w * channels))
        return [(s, min(s + rows, h)) for s in range(0, h, rows)]

    def _conv(self, x: "_Chunks", conv, norm=None, up=False, residual: "_Chunks | None" = None,
              shortcut=None, release=True) -> "tuple[_Chunks, _Chunks | None]":
        """conv(silu(norm(x))) (+ residual), strip by strip; with `shortcut` (a 1x1 conv) also shortcut(x).
        Input rows (unless `release` is False) and residual rows are released once no later strip reads them."""
        h, w = x.h, x.w
        stats = _group_stats(x, norm) if norm is not None else None
        taps = _up_taps(conv) if up else _conv_taps(conv)
        f = 2 if up else 1
        out, sc = _Chunks([], f * h, f * w), (_Chunks([], h, w) if shortcut is not None else None)
        strips = self._strips(h, f * w, conv.weight.shape[-1])
        for i, (o0, o1) in enumerate(strips):
            a, b = max(o0 - 1, 0), min(o1 + 1, h)
            xs = x.rows(a, b)
            y = xs if norm is None else _norm_silu(xs, norm, stats)
            y = (_upconv_strip if up else _conv3x3_strip)(y, taps, conv.bias, o0 == 0, o1 == h)
            if residual is not None:
                y = residual.rows(f * o0, f * o1) + y
            new = [y]
            if shortcut is not None:
                s = x.rows(o0, o1)
                new.append(s @ shortcut.weight.reshape(shortcut.weight.shape[0], -1).T + shortcut.bias)
            mx.eval(*new)
            out.append(f * o0, f * o1, y)
            if sc is not None:
                sc.append(o0, o1, new[1])
            if i + 1 < len(strips):
                if release:
                    x.release_below(strips[i + 1][0] - 1)
                if residual is not None:
                    residual.release_below(f * strips[i + 1][0])
        return out, sc

    def _resnet(self, x: "_Chunks", r: ResnetBlock2D) -> "_Chunks":
        shortcut = r.conv_shortcut if "conv_shortcut" in r else None
        # identity shortcut: x stays until conv2's strips have added it
        h, sc = self._conv(x, r.conv1, r.norm1, shortcut=shortcut, release=shortcut is not None)
        sc = x if sc is None else sc
        out, _ = self._conv(h, r.conv2, r.norm2, residual=sc)
        return out

    def __call__(self, z: mx.array) -> mx.array:
        dec = self.dec
        x, _ = self._conv(_Chunks([(0, z.shape[1], z)], z.shape[1], z.shape[2]), dec.conv_in)
        mid = dec.mid_block
        x = self._resnet(x, mid.resnets[0])
        for att in mid.attentions:
            y = att(x.full())
            mx.eval(y)
            x = _Chunks([(0, y.shape[1], y)], y.shape[1], y.shape[2])
        x = self._resnet(x, mid.resnets[1])
        for blk in dec.up_blocks:
            for r in blk.resnets:
                x = self._resnet(x, r)
            for u in blk.upsamplers:
                x, _ = self._conv(x, u.conv, up=True)
        x, _ = self._conv(x, dec.conv_out, dec.conv_norm_out)
        return x.full()


# "auto" tiles images larger than this many pixels: on MLX's CPU backend the strip decode is faster from 128² up
# (0.81x the untiled time at 128², 0.66x at 256²; 1.40x at 64²) and holds a tenth of the activations at 256²
# (benchmarks/vae_bench.py); on Metal and CUDA, above 256² until measured there.
AUTO_TILE_ABOVE = {"cpu": 64 * 64, "gpu": 256 * 256}


def auto_tile(height: int, width: int, cpu: bool | None = None) -> int | None:
    """decode's "auto" strip height for a height x width image, or None (untiled). cpu: plan for MLX's CPU backend
    (default: whether it is the default device)."""
    cpu = (mx.default_device() == mx.cpu) if cpu is None else cpu
    if height * width <= AUTO_TILE_ABOVE["cpu" if cpu else "gpu"]:
        return None
    return max(8, 32768 // width)


def largest_decoder_activation(block_out_channels, batch: int, h: int, w: int, itemsize: int) -> int:
    """Bytes of the decoder's largest activation for (h, w) latents: the input of each up block's first resnet
    (the previous block's channels, upsampled) or its output."""
    ch = tuple(reversed(block_out_channels))
    return batch * itemsize * max(max(ch[max(i - 1, 0)], c) * (h << i) * (w << i) for i, c in enumerate(ch))


# ---------------------------------------------------------------------------------------------------------------
# LDM (FLUX ae.safetensors) key names -> diffusers'


_LDM_RULES = [
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
]


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig | dict | None = None):
        super().__init__()
        if config is None:
            config = VAEConfig()
        elif isinstance(config, dict):
            config = VAEConfig.from_dict(config)
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def dtype(self):
        return self.decoder.conv_in.weight.dtype

    def decode(self, latents, tile: int | str | None = "auto", checkpoint_bytes: int | None = None) -> mx.array:
        """DiT latents (B, C, h, w) -> images (B, H, W, 3) float32, raw decoder output (about [-1, 1]).

        tile: strip height in output pixels for the tiled decode (same result up to float rounding, bounded
        temporaries); None/0 = untiled; "auto" = `auto_tile`: tiled when the image is larger than 64x64 on MLX's
        CPU backend, 256x256 on a GPU, with strips of max(8, 32768 // width) rows. The tiled decode keeps every
        activation whole (FLUX's largest, the last up block's 256-channel input, is 1 GiB at 1024² in float32) and
        convolves it in strips of `tile` rows at the output's channel count (the first of `block_out_channels`);
        other stages use strips of the same number of elements (positions x input channels), so their temporaries
        are the same size.
        checkpoint_bytes: largest activation the tiled decode may keep whole (None = no limit). When a whole
        activation would be larger, the decode falls back to recomputing strips from the last activation kept
        (memory grows with the width only, not the area; several times the compute).
        """
        cfg = self.config
        z = mx.array(latents) if not isinstance(latents, mx.array) else latents
        z = z.astype(self.dtype).transpose(0, 2, 3, 1)
        z = z / cfg.scaling_factor + cfg.shift_factor
        f = cfg.scale_factor
        width = z.shape[2] * f
        if tile == "auto":
            tile = auto_tile(z.shape[1] * f, width)
        dec = self.decoder
        largest = largest_decoder_activation(cfg.block_out_channels, *z.shape[:3], z.itemsize)
        if not tile:
            out = dec(z)
        elif checkpoint_bytes is None or largest <= checkpoint_bytes:
            out = _WholeDecoder(dec, int(tile) * width * cfg.block_out_channels[0])(z)
        else:
            x = dec.mid_block(dec.conv_in(z))
            mx.eval(x)
            out = _StripDecoder(dec, int(tile), checkpoint_bytes)(x)
        out = out.astype(mx.float32)
        mx.eval(out)
        return out

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """diffusers or FLUX/LDM (`ae.safetensors`) VAE tensors -> this module's names and MLX layouts.

        Consumes `weights`. LDM: optional `first_stage_model.`/`vae.` prefix (other keys dropped), `down.i.block.j`,
        reversed `up.(n-1-k)` -> `up_blocks.k`, `mid.block_1/2`, `mid.attn_1.{norm,q,k,v,proj_out}` (1x1 convs
        squeezed), `nin_shortcut`, `norm_out`. Then every 4-D conv weight [O,I,kh,kw] -> [O,kh,kw,I].
        """
        for prefix in ("first_stage_model.", "vae."):
            if any(k.startswith(prefix) for k in weights):
                weights = {k[len(prefix) :]: weights.pop(k) for k in list(weights) if k.startswith(prefix)}
                break
        ldm = any(k.startswith(("decoder.up.", "encoder.down.", "decoder.mid.block_", "encoder.mid.block_")) for k in weights)
        if ldm:
            ups = [int(m[1]) for k in weights if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
            n_up = max(ups) + 1 if ups else 0
            rules = _LDM_RULES + [
                (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{n_up - 1 - int(m[1])}.resnets."),
                (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0."),
            ]
        out = {}
        for k in list(weights):
            w = weights.pop(k)
            if ldm:
                for pattern, repl in rules:
                    k = re.sub(pattern, repl, k)
            if ".attentions." in k and w.ndim > 2:
                w = w.reshape(w.shape[0], -1)  # 1x1 conv attention projections -> Linear
            if w.ndim == 4:
                w = w.transpose(0, 2, 3, 1)
            out[k] = w
        return out

    def encode(self, images, seed: int | None = None, key: mx.array | None = None, noise=None) -> mx.array:
        """Images (B, H, W, 3) in [-1, 1] -> DiT latents (B, C, h, w) = (z - shift) * scale.

        z is the posterior mean when no seed/key/noise is given, else mean + exp(0.5 * logvar) * eps with eps from
        `noise` ((B, C, h, w), e.g. torch's, for parity) or MLX's RNG with `seed` / `key`.
        """
        cfg = self.config
        x = mx.array(images) if not isinstance(images, mx.array) else images
        moments = self.encoder(x.astype(self.dtype), eval_steps=True).astype(mx.float32)
        c = cfg.latent_channels
        mean, logvar = moments[..., :c], mx.clip(moments[..., c:], -30.0, 20.0)
        z = mean.transpose(0, 3, 1, 2)
        if noise is not None or seed is not None or key is not None:
            if noise is not None:
                eps = mx.array(np.asarray(noise)) if not isinstance(noise, mx.array) else noise
                if tuple(eps.shape) != tuple(z.shape):
                    raise ValueError(f"noise has shape {tuple(eps.shape)}, expected {tuple(z.shape)}")
            else:
                eps = mx.random.normal(z.shape, key=key if key is not None else mx.random.key(seed))
            z = z + mx.exp(0.5 * logvar.transpose(0, 3, 1, 2)) * eps.astype(mx.float32)
        z = (z - cfg.shift_factor) * cfg.scaling_factor
        mx.eval(z)
        return z
