"""The FLUX.1 VAE's building blocks in MLX (NHWC): GroupNorm, ResnetBlock2D, the mid-block Attention, Down/Upsample2D,
the encoder and decoder stacks. Ports diffusers 0.42.1 `autoencoders/vae.py` (Encoder/Decoder), `resnet.py`
(ResnetBlock2D, Upsample2D, Downsample2D) and `attention_processor.py` (the VAE's mid-block attention); module
names follow the diffusers checkpoint. The model (config, weights, encode/decode) is `models/vae.py`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


GN_EPS = 1e-6


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
    def __init__(self, cfg):  # cfg: models.vae.VAEConfig
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
    def __init__(self, cfg):  # cfg: models.vae.VAEConfig
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

