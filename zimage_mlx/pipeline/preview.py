"""Cheap previews of a generation in progress: the predicted clean latent x̂0, turned into RGB.

The pipeline's Euler step is x ← x + (σ_next − σ)·(−v) with v the transformer's output (sampler.euler_step, as
diffusers' ZImagePipeline negates the model output), so with x_σ = (1 − σ)·x0 + σ·ε and v ≈ x0 − ε the clean
latent predicted at σ is x̂0 = x_σ + σ·v. At the last step (σ_next = 0) that is exactly the final latents.

Two ways to show x̂0 (both take the DiT latents, i.e. (z − shift_factor)·scaling_factor of the FLUX VAE):
* `LatentRGB`: a 16×3 linear map + bias per latent pixel (H/8 × W/8), then (rgb + 1)/2 clipped. The default
  numbers are ComfyUI's for the FLUX.1 VAE (comfy/latent_formats.py, class `Flux`: latent_rgb_factors and
  latent_rgb_factors_bias), applied there to the same scaled latents; `convert/fit_preview.py` refits them by
  least squares against any VAE (`fit_latent_rgb`). Costs well under a millisecond at 1024².
* `TinyDecoder`: TAEF1, madebyollin/taesd's MIT-licensed tiny decoder for FLUX latents (taesd.py `Decoder`:
  3·tanh(x/3), conv 16→64, ReLU, 3 stages of 3 residual blocks + ×2 nearest upsample + conv, a block, conv 64→3),
  full resolution, output ≈ [0, 1]. Loaded from taesd's `taef1_decoder.safetensors` or diffusers'
  `AutoencoderTiny` layout (madebyollin/taef1).

`Previewer.image(record)` turns a step's denoise.StepRecord (the pipeline's `on_step` callback) into a PIL image of
its x̂0. The older (step, sigma, latents) callback sees only the latents after each step; for it `Previewer(...)`
recovers the velocity from two consecutive states (`x0_from_steps`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from ..loading.hub import resolve_file
from ..loading.weights import WeightError, fill_model, read_safetensors

# ComfyUI comfy/latent_formats.py `Flux.latent_rgb_factors` (rows: latent channel; columns: R, G, B) and
# `latent_rgb_factors_bias`, for the FLUX.1 VAE's scaled latents — the VAE Z-Image uses.
FLUX_RGB_FACTORS = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)
FLUX_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


# ------------------------------------------------------------------------------------------------- x̂0
def predicted_x0(latents: mx.array, velocity: mx.array, sigma: float) -> mx.array:
    """x̂0 = x_σ + σ·v for the transformer output v that sampler.euler_step uses (float32)."""
    return latents.astype(mx.float32) + float(sigma) * velocity.astype(mx.float32)


def x0_from_steps(prev: mx.array, sigma_prev: float, latents: mx.array, sigma: float) -> mx.array:
    """x̂0 at σ_prev from the latents before (σ_prev) and after (σ) one Euler step.

    The step was latents = prev + (σ_prev − σ)·v, so v = (latents − prev)/(σ_prev − σ) and x̂0 = prev + σ_prev·v.
    When σ = 0 this is `latents` itself.
    """
    prev = prev.astype(mx.float32)
    v = (latents.astype(mx.float32) - prev) / float(sigma_prev - sigma)
    return prev + float(sigma_prev) * v


# ------------------------------------------------------------------------------------------------- linear map
@dataclass
class LatentRGB:
    """rgb = x̂0ᵀ·F + b per latent pixel, then (rgb + 1)/2 clipped to [0, 1]: an (H/8, W/8) preview."""

    factors: np.ndarray = field(default_factory=lambda: np.array(FLUX_RGB_FACTORS, np.float32))   # (C, 3)
    bias: np.ndarray = field(default_factory=lambda: np.array(FLUX_RGB_BIAS, np.float32))         # (3,)

    def __call__(self, x0: mx.array) -> mx.array:
        """(B, C, h, w) latents → (B, h, w, 3) float32 in [0, 1]."""
        f = mx.array(np.asarray(self.factors, np.float32))
        rgb = x0.astype(mx.float32).transpose(0, 2, 3, 1) @ f + mx.array(np.asarray(self.bias, np.float32))
        return mx.clip((rgb + 1.0) / 2.0, 0.0, 1.0)


def fit_latent_rgb(latents: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares F (C, 3) and b (3,) with images ≈ latentsᵀ·F + b.

    latents: (N, C, h, w) DiT latents; images: (N, h, w, 3) in [−1, 1] on the latent grid (the decoded images
    averaged over 8×8 pixel blocks).
    """
    c = latents.shape[1]
    x = np.asarray(latents, np.float64).transpose(0, 2, 3, 1).reshape(-1, c)
    y = np.asarray(images, np.float64).reshape(-1, 3)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} latent pixels but {y.shape[0]} image pixels: images must be on the latent grid")
    a = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    sol, *_ = np.linalg.lstsq(a, y, rcond=None)
    return sol[:c].astype(np.float32), sol[c].astype(np.float32)


# ------------------------------------------------------------------------------------------------- TAEF1
class _Clamp(nn.Module):
    def __call__(self, x):
        return mx.tanh(x / 3) * 3


class _Block(nn.Module):
    """taesd's Block(64, 64): ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x) (no skip conv when channels match)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                     nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                     nn.Conv2d(channels, channels, 3, padding=1)]

    def __call__(self, x):
        h = x
        for layer in self.conv:
            h = layer(h)
        return nn.relu(h + x)


class TinyDecoder(nn.Module):
    """TAEF1's decoder. Parameter names follow taesd's nn.Sequential indices (`layers.1.weight` = taesd `1.weight`)."""

    def __init__(self, latent_channels: int = 16, channels: int = 64):
        super().__init__()
        c = channels
        layers = [_Clamp(), nn.Conv2d(latent_channels, c, 3, padding=1), nn.ReLU()]
        for _ in range(3):
            layers += [_Block(c), _Block(c), _Block(c), nn.Upsample(2.0, mode="nearest"),
                       nn.Conv2d(c, c, 3, padding=1, bias=False)]
        layers += [_Block(c), nn.Conv2d(c, 3, 3, padding=1)]
        self.layers = layers

    @property
    def dtype(self):
        return self.layers[1].weight.dtype

    def __call__(self, x0: mx.array) -> mx.array:
        """(B, 16, h, w) DiT latents → (B, 8h, 8w, 3) float32, about [0, 1] (not clipped)."""
        x = x0.astype(self.dtype).transpose(0, 2, 3, 1)
        for layer in self.layers:
            x = layer(x)
        return x.astype(mx.float32)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """taesd (`1.weight`, optional `decoder.` prefix) or diffusers AutoencoderTiny (`decoder.layers.0.weight`,
        one index lower: its clamp is not a layer) → `layers.N.…`; encoder tensors dropped; convs to NHWC."""
        out = {}
        diffusers = any(k.startswith("decoder.layers.") for k in weights)
        for k, w in weights.items():
            if diffusers:
                if not k.startswith("decoder.layers."):
                    continue
                i, rest = k[len("decoder.layers."):].split(".", 1)
                k = f"layers.{int(i) + 1}.{rest}"
            else:
                if k.startswith("encoder."):
                    continue
                k = "layers." + k.removeprefix("decoder.")
            out[k] = w.transpose(0, 2, 3, 1) if w.ndim == 4 else w
        return out


def load_tiny_decoder(path: str | Path, dtype=mx.float32) -> TinyDecoder:
    """TAEF1 from taesd's `taef1_decoder.safetensors`, or a diffusers `AutoencoderTiny` directory/file."""
    path = resolve_file(path)      # a local path or a hub file (madebyollin/taef1/…safetensors)
    if path.is_dir():
        path = path / "diffusion_pytorch_model.safetensors"
    if path.suffix != ".safetensors":
        raise WeightError(f"{path}: TAEF1 weights must be a .safetensors file (taesd ships taef1_decoder.safetensors)")
    if not path.is_file():
        raise WeightError(f"{path}: not found")
    weights = TinyDecoder.sanitize(read_safetensors(path))
    conv_in = weights.get("layers.1.weight")
    if conv_in is None or conv_in.shape[-1] != 16:
        found = None if conv_in is None else tuple(conv_in.shape)
        raise WeightError(f"{path}: not a TAEF1 decoder (layers.1.weight is {found}, expected (64, 3, 3, 16))")
    return fill_model(TinyDecoder(), weights, dtype, str(path))


# ------------------------------------------------------------------------------------------------- callback helper
def to_pil(rgb: mx.array | np.ndarray) -> Image.Image:
    """(h, w, 3) float in [0, 1] → PIL image."""
    arr = np.array(rgb, dtype=np.float32) if isinstance(rgb, mx.array) else np.asarray(rgb, np.float32)
    return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))


class Previewer:
    """Preview images of x̂0: `image(record)` from an `on_step` StepRecord (x̂0 is the record's own), or called with
    the (step, sigma, latents) callback's arguments.

    That callback sees the latents after each step; x̂0 needs the step's velocity, recovered from the previous
    latents. Give `start` (the start latents, e.g. ZImagePipeline.noise(seeds, shape)) and `start_sigma` (the
    schedule's first σ) for an x̂0 already at the first step; without them the first preview shows the latents
    themselves. `decoder`: a LatentRGB (default) or a TinyDecoder. Returns the first image of the batch.
    """

    def __init__(self, decoder=None, start=None, start_sigma: float = 1.0):
        self.decoder = decoder if decoder is not None else LatentRGB()
        self.prev = None if start is None else mx.array(np.asarray(start, np.float32)) \
            if not isinstance(start, mx.array) else start
        self.prev_sigma = float(start_sigma)

    def x0(self, sigma: float, latents: mx.array) -> mx.array:
        if self.prev is None or self.prev_sigma == sigma:
            x0 = latents.astype(mx.float32)
        else:
            x0 = x0_from_steps(self.prev, self.prev_sigma, latents, sigma)
        self.prev, self.prev_sigma = latents, float(sigma)
        return x0

    def __call__(self, step: int, sigma: float, latents: mx.array) -> Image.Image:
        rgb = self.decoder(self.x0(sigma, latents)[:1])
        return to_pil(rgb[0])

    def image(self, record) -> Image.Image:
        """The preview of a denoise.StepRecord: its x̂0 (first image of the batch) through the decoder."""
        return to_pil(self.decoder(record.x0[:1])[0])
