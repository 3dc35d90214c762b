"""Classifier-free guidance strategies: how one denoising step's velocity is predicted from the transformer.

The loop of diffusers' ZImagePipeline.__call__ (pipelines/z_image/pipeline_z_image.py): at each step the time
input is t = (1000 − timestep)/1000, the guidance scale drops to 0 past `cfg_truncation`, and with guidance the
positive and negative branches give pos + g·(pos − neg) (optionally renormalized: sampler.guidance). Three ways to
run the two branches:
* none: guidance off (Turbo), or this step past the truncation: one transformer call on the positive captions;
* batched: both branches as one batch of 2B (diffusers' way);
* split: parallel="cfg" under `mlx.launch`, the positive branch on rank 0 and the negative one on rank 1, their
  outputs exchanged with all_gather (distributed.py).
A `ModelCall` is the transformer with its hooks (the ControlNet's, `with_control`); `step_predictor` turns one
into the `predict(latents, step) -> v` that the denoise loop calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from .. import sampler

# (x, t, captions, doubled) -> the transformer's output v; doubled: x is the 2B batch of both branches
ModelCall = Callable[[mx.array, mx.array, Any, bool], mx.array]
GUIDANCE_MODES = ("none", "batched", "split")


def with_control(transformer, control) -> ModelCall:
    """The transformer, with the ControlNet hook for this call when there is one (its contexts doubled for the
    2B batch of batched guidance)."""
    def call(x, t, caps, doubled=False):
        if control is None:
            return transformer(x, t, caps)
        return transformer(x, t, caps, control=control.doubled() if doubled else control)
    return call


@dataclass
class Captions:
    """The caption features as the transformer takes them: `cond` (positive), `uncond` (negative, or None without
    guidance) and `both` (positive then negative, for the batched call)."""

    cond: Any
    uncond: Any
    both: Any
    batch: int


def prepare_captions(transformer, pos: list, neg: list, h: int, w: int) -> Captions:
    """The caption path and RoPE tables prepared once, for both guidance branches (transformer.prepare)."""
    batch = len(pos)
    both = transformer.prepare(list(pos) + list(neg), h, w)
    cond = both.select(range(batch)) if neg else both
    uncond = both.select(range(batch, 2 * batch)) if neg else None
    return Captions(cond, uncond, both, batch)


def guided_velocity(mode: str, model: ModelCall, caps: Captions, x: mx.array, t_model: float, scale: float,
                    normalization: float, group=None) -> mx.array:
    """The guided velocity of one step by strategy `mode` (the module docstring)."""
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    b = caps.batch
    if mode == "none":
        return model(x, mx.full((b,), t_model, dtype=mx.float32), caps.cond, False)
    if mode == "split":
        # the positive branch on rank 0, the negative one on rank 1; all_gather stacks them in that order
        v = model(x, mx.full((b,), t_model, dtype=mx.float32), caps.uncond if group.rank() else caps.cond, False)
        v = mx.distributed.all_gather(v, group=group)
        return sampler.guidance(v[:b], v[b:], scale, normalization)
    v = model(mx.concatenate([x, x]), mx.full((2 * b,), t_model, dtype=mx.float32), caps.both, True)   # batched
    return sampler.guidance(v[:b], v[b:], scale, normalization)


def step_predictor(model: ModelCall, caps: Captions, timesteps: np.ndarray, scheduler_config, *, scale: float,
                   truncation: float, normalization: float, model_dtype, split_group=None):
    """predict(latents, step) -> v: the step's time input and guidance scale (0 past the truncation: no second
    branch), the latents cast to the model's dtype, then the strategy: "split" over `split_group` when given,
    else "batched"; "none" whenever the step's scale is 0."""
    def predict(latents: mx.array, i: int) -> mx.array:
        t_model = float(sampler.model_time(timesteps[i], scheduler_config))
        g = sampler.guidance_for_step(scale, t_model, truncation) if scale > 0 else 0.0
        mode = "none" if g <= 0 else "split" if split_group is not None else "batched"
        return guided_velocity(mode, model, caps, latents.astype(model_dtype), t_model, g, normalization,
                               split_group)
    return predict
