"""What a generation is conditioned on: caption features (with a prompt cache), the start latents of
text-to-image / img2img / inpainting, and the ControlNet's control contexts.

Ports the corresponding steps of diffusers' ZImagePipeline (`encode_prompt`, `prepare_latents`),
ZImageImg2ImgPipeline / ZImageInpaintPipeline (`prepare_latents`: the image's VAE latent noised to the first
step's σ) and ZImageControlNet(Inpaint)Pipeline (the control context), pipelines/z_image/. Noise comes from MLX's
RNG with one key per image, so each image is reproducible from its own seed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from ..models.controlnet import ControlConditioning, ControlInput
from .images import as_mx, mask_to_latent, preprocess_image

LATENT_CHANNELS = 16
PROMPT_CACHE_SIZE = 32          # caption features kept per pipeline (CLI seeds, server requests)


class PromptCache:
    """The caption features of the last `size` (prompt, max_sequence_length) pairs: a prompt is never encoded
    twice, and once cached it needs no text encoder."""

    def __init__(self, size: int = PROMPT_CACHE_SIZE):
        self.size = size
        self._items: OrderedDict[tuple[str, int], mx.array] = OrderedDict()

    def missing(self, prompts: Sequence[str], max_length: int) -> list[str]:
        return list(dict.fromkeys(p for p in prompts if (p, max_length) not in self._items))

    def add(self, prompts: Sequence[str], feats: Sequence[mx.array], max_length: int) -> None:
        for p, f in zip(prompts, feats):
            self._items[(p, max_length)] = f

    def get(self, prompts: Sequence[str], max_length: int) -> list[mx.array]:
        out = []
        for p in prompts:
            self._items.move_to_end((p, max_length))
            out.append(self._items[(p, max_length)])
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._items)


def noise(seeds: Sequence[int], shape: tuple[int, ...]) -> mx.array:
    """Standard normal noise, one MLX key per image so each image is reproducible from its own seed."""
    return mx.concatenate([mx.random.normal((1, *shape[1:]), key=mx.random.key(int(s))) for s in seeds])


def image_noise_key(seed: int) -> mx.array:
    """The MLX key of img2img's VAE-sample noise: split from the seed, independent of the start noise."""
    return mx.random.split(mx.random.key(int(seed)))[1]


@dataclass
class StartLatents:
    """The latents the loop starts from; for img2img/inpainting also the clean image latent z0 and the noise ε
    (inpainting re-noises z0 with ε after every step)."""

    latents: mx.array
    z0: mx.array | None = None
    eps: mx.array | None = None


def start_latents(vae_encode: Callable[[], Callable], req, shape, seeds: list[int], sigmas: np.ndarray,
                  init_image: np.ndarray | None, enc_dtype, timings: dict) -> StartLatents:
    """Text-to-image: the noise (or `noise` / `latents` as given). img2img / inpainting: z0 = a VAE sample of the
    image (its own key, image_noise_key: key(seed) draws image 0's start noise), latents = σ_first·ε + (1 − σ_first)
    ·z0 unless `latents` are given (inpainting still needs z0 and ε for its blend). vae_encode() returns the loaded
    VAE's encode (the load is timed apart from the encode)."""
    eps = None if req.noise is None else as_mx(req.noise, shape, "noise")
    latents = None if req.latents is None else as_mx(req.latents, shape, "latents")
    if init_image is None or req.controls or (latents is not None and not req.inpaint):
        return StartLatents(noise(seeds, shape) if latents is None and eps is None else
                            latents if latents is not None else eps)
    encode = vae_encode()
    t0 = time.perf_counter()
    enc_noise = None if req.image_noise is None else mx.array(np.asarray(req.image_noise, dtype=np.float32))
    key = image_noise_key(seeds[0] if req.image_seed is None else req.image_seed)
    z0 = encode(mx.array(init_image).astype(enc_dtype), key=key, noise=enc_noise)
    z0 = mx.broadcast_to(z0.astype(mx.float32), shape)
    eps = noise(seeds, shape) if eps is None else eps
    if latents is None:
        s0 = mx.array(sigmas[req.first_step], dtype=mx.float32)
        latents = s0 * eps + (1.0 - s0) * z0
    timings["vae_encode"] = time.perf_counter() - t0
    return StartLatents(latents, z0, eps)


def control_context(net, vae, semantics: str, control_pils, scales, init_image, mask, height: int, width: int,
                    batch: int, multiple: int) -> ControlConditioning | None:
    """The ControlNet hook for this call: one (B, control_in_dim, h, w) context per control image (None when
    every scale is 0: exactly the base model).

    Context channels (diffusers' ZImageControlNet(Inpaint)Pipeline; VideoX-Fun's ZImageControlPipeline):
    v1: [control latent (16)]; 2.x: [control latent, 1 − mask (1), latent of image·(mask < 0.5) (16)] when
    inpainting, else [control latent, 0, latent of a mid-gray image] ("reference": VideoX-Fun encodes a zero
    image in [−1, 1]) or [control latent, 17 zeros] ("diffusers"). Latents are VAE posterior means.
    """
    cin = net.config.control_in_dim

    def encode(pixels):
        return vae.encode(mx.array(pixels).astype(vae.dtype)).astype(mx.float32)

    extra = None
    if cin != LATENT_CHANNELS:
        if mask is not None:
            masked = encode(init_image * (mask < 0.5)[None, :, :, None])
            extra = mx.concatenate([1.0 - mask_to_latent(mask, *masked.shape[2:]), masked], axis=1)
        elif semantics == "reference":
            gray = encode(np.zeros((1, height, width, 3), np.float32))
            extra = mx.concatenate([mx.zeros((1, 1, *gray.shape[2:])), gray], axis=1)
    inputs = []
    for pil, scale in zip(control_pils, scales):
        if scale == 0.0:
            continue   # a zero hint: skip the work (the result is identical)
        ctx = encode(preprocess_image(pil, height, width, multiple))
        if cin != LATENT_CHANNELS:
            ctx = mx.concatenate([ctx, extra if extra is not None else
                                  mx.zeros((1, cin - LATENT_CHANNELS, *ctx.shape[2:]))], axis=1)
        inputs.append(ControlInput(mx.broadcast_to(ctx, (batch, *ctx.shape[1:])), scale))
    mx.eval([i.context for i in inputs])
    return ControlConditioning(net, inputs, semantics) if inputs else None
