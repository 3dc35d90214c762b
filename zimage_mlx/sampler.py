"""Flow-matching Euler sampling, as diffusers' `FlowMatchEulerDiscreteScheduler` runs it for Z-Image.

Pure functions. The schedule is computed in numpy float32 with the same operations as diffusers 0.42.1
(`get_default_z_image_sigmas` = torch.linspace(1, 1/N, N), then the shift), so sigmas and timesteps are
bit-identical; the Euler update and CFG run in float32.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None

    @classmethod
    def from_dict(cls, cfg: dict) -> "SchedulerConfig":
        unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                   "invert_sigmas", "stochastic_sampling") if cfg.get(k)]
        if unsupported:
            raise ValueError(f"scheduler_config.json asks for {', '.join(unsupported)}, which zimage_mlx does not support")
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg and cfg[k] is not None})

    @classmethod
    def from_file(cls, path: str | Path) -> "SchedulerConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps) in float32, reproduced bit for bit.

    torch fills the first half as start + step·i and the second as end − step·(steps−1−i), with the multiply-add
    fused (one rounding): emulated here in float64, exact for the products, then rounded once to float32.
    """
    if steps == 1:
        return np.array([start], dtype=np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps)
    lower = np.float64(start32) + step * idx
    upper = np.float64(end32) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, lower, upper).astype(np.float32)


def _image_shift_mu(image_seq_len: int, cfg: SchedulerConfig) -> float:
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return image_seq_len * m + b


def sigmas_for(num_steps: int, cfg: SchedulerConfig, image_seq_len: int | None = None) -> np.ndarray:
    """The N+1 sigmas (float32, last = 0) of an N-step Z-Image schedule.

    image_seq_len (= (h/2)·(w/2) latent patches) only matters when the config uses dynamic shifting.
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_steps}")
    s = _torch_linspace_f32(1.0, 1.0 / num_steps, num_steps)
    if cfg.use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError("dynamic shifting needs the image sequence length")
        mu = _image_shift_mu(image_seq_len, cfg)
        if cfg.time_shift_type == "linear":
            s = mu / (mu + (1 / s - 1) ** 1.0)
        else:
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
    else:
        s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
    if cfg.shift_terminal:
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    s = s.astype(np.float32)
    return np.concatenate([s, np.zeros(1, np.float32)])


def timesteps_for(sigmas: np.ndarray, cfg: SchedulerConfig) -> np.ndarray:
    """diffusers' timesteps (σ·1000, float32) for all but the final sigma."""
    return (sigmas[:-1] * np.float32(cfg.num_train_timesteps)).astype(np.float32)


def model_time(timestep: np.float32, cfg: SchedulerConfig) -> np.float32:
    """The transformer's time input t = (1000 − timestep)/1000, computed in float32 like the pipeline."""
    n = np.float32(cfg.num_train_timesteps)
    return np.float32((n - np.float32(timestep)) / n)


def img2img_start(num_steps: int, strength: float) -> int:
    """Index of the first step run for img2img (diffusers' get_timesteps)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1, got {strength}")
    init = min(num_steps * strength, num_steps)
    return int(max(num_steps - init, 0))


def euler_step(latents: mx.array, velocity: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """x ← x + (σ_next − σ)·(−v), in float32 (the pipeline negates the model output)."""
    dt = mx.array(np.float32(sigma_next) - np.float32(sigma), dtype=mx.float32)
    return latents.astype(mx.float32) + dt * (-velocity.astype(mx.float32))


def guidance(pos: mx.array, neg: mx.array, scale: float, normalization: float | bool = False) -> mx.array:
    """CFG: pos + g·(pos − neg), optionally renormalized per sample to at most c·‖pos‖ (all float32)."""
    pos = pos.astype(mx.float32)
    pred = pos + scale * (pos - neg.astype(mx.float32))
    c = float(normalization or 0.0)
    if c > 0.0:
        axes = tuple(range(1, pred.ndim))
        pos_norm = mx.sqrt(mx.sum(pos * pos, axis=axes, keepdims=True))
        pred_norm = mx.sqrt(mx.sum(pred * pred, axis=axes, keepdims=True))
        limit = pos_norm * c
        pred = mx.where(pred_norm > limit, pred * (limit / pred_norm), pred)
    return pred


def guidance_for_step(scale: float, t_norm: float, cfg_truncation: float | None) -> float:
    """The guidance used at a step whose normalized time is t_norm: 0 once past cfg_truncation (diffusers)."""
    if scale > 0 and cfg_truncation is not None and float(cfg_truncation) <= 1 and t_norm > cfg_truncation:
        return 0.0
    return scale


# --------------------------------------------------------------------------- model variants
# Defaults per model family (diffusers' class defaults are generic; these are the models' own).
VARIANT_DEFAULTS = {
    "turbo": {"num_inference_steps": 8, "guidance_scale": 0.0},
    "base": {"num_inference_steps": 50, "guidance_scale": 4.0},
}


def detect_variant(src: str | Path, scheduler: SchedulerConfig) -> str:
    """'turbo' (8 steps, no CFG) or 'base' (the non-distilled Z-Image: 50 steps, CFG 4).

    A name containing "turbo" says Turbo; otherwise the scheduler decides: Turbo ships shift 3.0, Base 6.0.
    """
    if "turbo" in str(src).lower():
        return "turbo"
    return "base" if scheduler.shift >= 5.0 else "turbo"


def check_variant(variant: str) -> str:
    if variant not in VARIANT_DEFAULTS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANT_DEFAULTS))}, got {variant!r}")
    return variant


# --------------------------------------------------------------------------- training-time sampling
# diffusers' examples/dreambooth/train_dreambooth_lora_z_image.py with diffusers.training_utils'
# compute_density_for_timestep_sampling and compute_loss_weighting_for_sd3 (docs/training.md).
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def train_schedule(cfg: SchedulerConfig) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, timesteps) of the training scheduler, float32, index 0 = σ 1: `FlowMatchEulerDiscreteScheduler`
    at construction (np.linspace(1, N, N) reversed, / N, shifted; timesteps = σ·N)."""
    n = cfg.num_train_timesteps
    t = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
    s = t / np.float32(n)
    if not cfg.use_dynamic_shifting:
        shift = np.float32(cfg.shift)
        s = (shift * s / (np.float32(1) + (shift - np.float32(1)) * s)).astype(np.float32)
    return s, (s * np.float32(n)).astype(np.float32)


def timestep_density(scheme: str, normal: np.ndarray, uniform: np.ndarray, logit_mean: float = 0.0,
                     logit_std: float = 1.0, mode_scale: float = 1.29) -> np.ndarray:
    """u in [0, 1] per sample from standard-normal / uniform draws (`compute_density_for_timestep_sampling`)."""
    if scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, got {scheme!r}")
    if scheme == "logit_normal":
        return 1.0 / (1.0 + np.exp(-(logit_mean + logit_std * normal)))
    if scheme == "mode":
        return 1 - uniform - mode_scale * (np.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
    return uniform


def loss_weighting(scheme: str, sigmas: np.ndarray) -> np.ndarray:
    """Per-sample loss weight (`compute_loss_weighting_for_sd3`): σ⁻² for "sigma_sqrt", the cosmap, else 1."""
    sigmas = np.asarray(sigmas, np.float32)
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).astype(np.float32)
    if scheme == "cosmap":
        return (2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))).astype(np.float32)
    return np.ones_like(sigmas)


def sample_training_sigmas(key: mx.array, batch: int, cfg: SchedulerConfig, scheme: str = "none",
                           **density) -> tuple[np.ndarray, np.ndarray]:
    """(σ, timesteps) per sample: u from `timestep_density`, index = ⌊u·N⌋ into `train_schedule`."""
    k1, k2 = mx.random.split(key)
    normal = np.array(mx.random.normal((batch,), key=k1))
    uniform = np.array(mx.random.uniform(shape=(batch,), key=k2))
    u = timestep_density(scheme, normal, uniform, **density)
    sigmas, timesteps = train_schedule(cfg)
    index = np.clip((u * cfg.num_train_timesteps).astype(np.int64), 0, cfg.num_train_timesteps - 1)
    return sigmas[index], timesteps[index]


def add_noise(x0: mx.array, noise: mx.array, sigmas: mx.array) -> mx.array:
    """x_t = (1 − σ)·x0 + σ·ε, one σ per sample (flow matching), in float32."""
    s = sigmas.astype(mx.float32).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0.astype(mx.float32) + s * noise.astype(mx.float32)
