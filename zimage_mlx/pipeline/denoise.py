"""The denoising loop, with seams: `denoise(state, predict, after_step, callbacks)`.

Each step (diffusers' ZImagePipeline.__call__ loop, pipelines/z_image/pipeline_z_image.py):
    v = predict(latents, i)                       # the transformer's guided output (compose_predict)
    latents = euler_step(latents, v, σ_i, σ_i+1)  # x ← x + (σ_i+1 − σ_i)·(−v)   (sampler.euler_step)
    latents = hook(latents, i) for hook in after_step     # e.g. inpainting's blend (`inpaint_blend`)
    callback(StepRecord) for callback in callbacks        # previews, progress, cancelling
`predict` is composed once per call from the transformer, the ControlNet hook and the guidance strategy
(guidance.py); `compose_predict` applies further wrappers (a step cache) at one place.

Callbacks get a `StepRecord`. Returning False (or raising GenerationCancelled) cancels: the pipeline raises
GenerationCancelled. Returning a dict with "latents" replaces the latents (diffusers' callback_on_step_end).
`diffusers_callback` adapts diffusers' `callback_on_step_end(pipe, i, t, callback_kwargs)`: t is the scheduler
timestep diffusers passes (σ_i·1000 after the shift, not the model's (1000 − t)/1000), callback_kwargs["latents"]
the latents after the step in diffusers' (B, 16, h, w) layout; a returned dict's "latents" replace them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from .. import sampler

Predict = Callable[[mx.array, int], mx.array]
AfterStep = Callable[[mx.array, int], mx.array]


class GenerationCancelled(RuntimeError):
    """A step callback returned False."""


@dataclass
class DenoiseState:
    """Where the loop starts: the start latents, the schedule (σ_0 … σ_n = 0 and the scheduler timesteps) and the
    first step run (img2img starts later)."""

    latents: mx.array
    sigmas: np.ndarray
    timesteps: np.ndarray
    first: int = 0

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1


@dataclass(eq=False)
class StepRecord:
    """One finished step. `sample`: the latents the model saw (at σ); `latents`: the latents after the step and
    the after_step hooks (at σ_next; what the next step starts from); `model_output`: the transformer's guided
    output v. Derived: `velocity` = −v = dx/dσ (the flow velocity diffusers passes to scheduler.step) and `x0`,
    the clean latents predicted at this step, x̂0 = sample − σ·velocity (at the last step, without an inpainting
    blend, exactly the final latents)."""

    index: int
    num_steps: int
    sigma: float
    sigma_next: float
    timestep: float          # the scheduler timestep of diffusers' loop
    sample: mx.array
    latents: mx.array
    model_output: mx.array

    @cached_property
    def velocity(self) -> mx.array:
        return -self.model_output.astype(mx.float32)

    @cached_property
    def x0(self) -> mx.array:
        # the Euler step to σ = 0, computed as sampler.euler_step computes it
        dt = mx.array(np.float32(0.0) - np.float32(self.sigma), dtype=mx.float32)
        return self.sample.astype(mx.float32) + dt * self.velocity


def compose_predict(predict: Predict, wrappers: Sequence[Callable[[Predict], Predict]] = ()) -> Predict:
    """The step's predictor with its wrappers applied in order (each takes a predict and returns one): the one
    place a step cache or another per-step transformation plugs in."""
    for wrap in wrappers:
        predict = wrap(predict)
    return predict


def inpaint_blend(z0: mx.array, eps: mx.array, mask: mx.array, sigmas: np.ndarray) -> AfterStep:
    """diffusers' ZImageInpaintPipeline: after each step the kept region (mask 0) follows the image latent z0
    re-noised to σ_next with the start noise ε; the masked region (mask 1) keeps the denoised latents."""
    last = len(sigmas) - 2

    def blend(latents: mx.array, i: int) -> mx.array:
        s_next = mx.array(sigmas[i + 1], dtype=mx.float32)
        proper = z0 if i == last else s_next * eps + (1.0 - s_next) * z0
        return (1.0 - mask) * proper + mask * latents
    return blend


def legacy_callback(callback) -> Callable[[StepRecord], Any]:
    """`callback(step_index, sigma_next, latents)` (this port's original step callback) as a StepRecord callback."""
    return lambda r: callback(r.index, r.sigma_next, r.latents)


def diffusers_callback(pipe, callback_on_step_end, tensor_inputs: Sequence[str]) -> Callable[[StepRecord], Any]:
    """diffusers' `callback_on_step_end(pipe, i, t, callback_kwargs)` as a StepRecord callback (module docstring)."""
    def call(r: StepRecord):
        kwargs = {k: {"latents": r.latents}[k] for k in tensor_inputs}
        out = callback_on_step_end(pipe, r.index, r.timestep, kwargs)
        return {"latents": out["latents"]} if isinstance(out, dict) and "latents" in out else None
    return call


def denoise(state: DenoiseState, predict: Predict, after_step: Sequence[AfterStep] = (),
            callbacks: Sequence[Callable[[StepRecord], Any]] = ()) -> mx.array:
    """Run steps state.first … n−1 from state.latents; the final latents (float32)."""
    latents, sigmas = state.latents, state.sigmas
    for i in range(state.first, state.num_steps):
        v = predict(latents, i)
        new = sampler.euler_step(latents, v, sigmas[i], sigmas[i + 1])
        for hook in after_step:
            new = hook(new, i)
        mx.eval(new)
        record = StepRecord(i, state.num_steps, float(sigmas[i]), float(sigmas[i + 1]), float(state.timesteps[i]),
                            latents, new, v)
        for callback in callbacks:
            out = callback(record)
            if out is False:
                raise GenerationCancelled(f"cancelled by the callback after step {i + 1} of {state.num_steps}")
            if isinstance(out, dict) and out.get("latents") is not None:
                new = _replacement(out["latents"], new)
                record.latents = new
        latents = new
    return latents


def _replacement(value, current: mx.array) -> mx.array:
    a = value.astype(mx.float32) if isinstance(value, mx.array) else mx.array(np.asarray(value, dtype=np.float32))
    if a.shape != current.shape:
        raise ValueError(f"a step callback returned latents of shape {tuple(a.shape)}, expected {tuple(current.shape)}")
    return a
