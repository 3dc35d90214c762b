"""The VAE decoder with bounded memory: strip-tiled decodes that equal the untiled one up to float rounding.

`_WholeDecoder` (the default tiled decode) runs the decoder op by op on whole activations, with each convolution in
horizontal strips with halo rows, so every GroupNorm takes its statistics from the stored whole input.
`_StripDecoder` (a `checkpoint_bytes` limit below the largest activation) recomputes strips from the last
activation kept, gathering GroupNorm statistics in a first pass over strips and applying them in a second.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .vae_blocks import Decoder, GroupNorm, ResnetBlock2D, upsample_nearest


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

