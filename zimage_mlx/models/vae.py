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

import re
from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .vae_blocks import Decoder, Encoder
from .vae_tiling import _StripDecoder, _WholeDecoder, auto_tile, largest_decoder_activation


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
