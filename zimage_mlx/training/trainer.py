"""LoRATrainer: one optimizer step of a LoRA on the Z-Image transformer, exactly as diffusers trains it.

The objective is diffusers' `examples/dreambooth/train_dreambooth_lora_z_image.py` (docs/training.md): x_t =
(1 − σ)·x0 + σ·ε, the transformer sees time (1000 − 1000σ)/1000, pred = −output, target = ε − x0, loss = mean over
samples of mean over elements of w(σ)·(pred − target)² in float32. The LoRA layers come from `lora.layers`
(trainable `lora_A` / `lora_B`, PEFT's init); the rest of the model, quantized or not, stays frozen.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..distributed import init_group
from ..lora.io import load_peft_lora, save_peft_lora
from ..lora.layers import add_trainable_lora, trainable_lora_state
from ..sampler import SchedulerConfig, WEIGHTING_SCHEMES, loss_weighting, sample_training_sigmas, add_noise
from .checkpointing import set_gradient_checkpointing
from .optim import OPTIMIZERS, clip_grad_norm, make_optimizer

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")


def model_time(sigmas: np.ndarray, num_train_timesteps: int = 1000) -> np.ndarray:
    """The transformer's time input for each σ: (N − σ·N)/N in float32, as the training script computes it from
    the scheduler's timesteps (timesteps = σ·N)."""
    n = np.float32(num_train_timesteps)
    t = (np.asarray(sigmas, np.float32) * n).astype(np.float32)
    return ((n - t) / n).astype(np.float32)


def flow_matching_loss(model, x0, cap_feats, noise, sigmas, weights) -> mx.array:
    """The training script's loss for a batch (sigmas, weights: numpy (B,) float32)."""
    xt = add_noise(x0, noise, mx.array(sigmas))
    out = model(xt, mx.array(model_time(sigmas)), cap_feats)
    target = noise.astype(mx.float32) - x0.astype(mx.float32)
    err = mx.array(weights).reshape(-1, 1, 1, 1) * (-out.astype(mx.float32) - target) ** 2
    return mx.mean(mx.mean(err.reshape(err.shape[0], -1), axis=1))


def step_key(seed: int, step: int) -> mx.array:
    """The RNG key of optimizer step `step` of a run with `seed`: a function of both only, so a resumed run draws
    what the uninterrupted one drew."""
    return mx.random.key(int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1)[0]))


class LoRATrainer:
    """Trains a LoRA on `pipe.transformer` (float or 4/8-bit): `step(...)` is one optimizer step, `save_lora` writes
    the diffusers/PEFT file."""

    def __init__(self, pipe, rank: int = 16, alpha: float | None = None, targets=DEFAULT_TARGETS,
                 init_lora: str | Path | None = None, optimizer: str = "adamw", learning_rate: float = 1e-4,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-4,
                 max_grad_norm: float | None = 1.0, gradient_checkpointing: bool | None = None,
                 parallel: str | None = None, weighting_scheme: str = "none", seed: int = 0):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, "
                             f"got {weighting_scheme!r}")
        if parallel not in (None, "data"):
            raise ValueError(f"parallel must be None or 'data' for training, got {parallel!r}")
        if not float(learning_rate) > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if max_grad_norm is not None and not float(max_grad_norm) > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        init = None
        if init_lora is not None:
            state, file_rank, file_alpha = load_peft_lora(init_lora)
            rank, alpha = file_rank, file_alpha
            init = {k: (mx.array(a), mx.array(b)) for k, (a, b) in state.items()}
            targets = tuple(state)
        if int(rank) != rank or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        if alpha is not None and not float(alpha) > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.rank, self.alpha = int(rank), float(rank if alpha is None else alpha)
        self.targets = tuple(targets)
        self.seed, self.weighting_scheme = int(seed), weighting_scheme
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.scheduler_config = getattr(pipe, "scheduler_config", None) or SchedulerConfig()
        self.model = model = pipe.transformer
        self.layers = add_trainable_lora(model, self.targets, self.rank, self.alpha, init=init,
                                         key=mx.random.key(self.seed))
        if init is not None and set(init) != set(self.layers):
            missing = sorted(set(init) - set(self.layers))
            raise ValueError(f"{init_lora}: {len(missing)} LoRA module(s) match no layer of this transformer: "
                             f"{', '.join(missing[:3])}")
        self.optimizer = make_optimizer(optimizer, learning_rate, betas, eps, weight_decay)
        self.optimizer_name = optimizer
        self.gradient_checkpointing = bool(gradient_checkpointing)
        set_gradient_checkpointing(model, self.gradient_checkpointing)
        self.group = init_group() if parallel == "data" else None
        if self.group is not None and self.group.size() == 1:
            self.group = None
        self.step_count = 0
        self._value_and_grad = nn.value_and_grad(model, lambda *a: flow_matching_loss(model, *a))

    # ------------------------------------------------------------------------------------------------ steps
    @property
    def world_size(self) -> int:
        return 1 if self.group is None else self.group.size()

    @property
    def rank_in_group(self) -> int:
        return 0 if self.group is None else self.group.rank()

    def draw(self, shape: tuple, step: int | None = None) -> tuple[mx.array, np.ndarray]:
        """(noise, σ) for a global batch of `shape` at `step` (default: the next): seeded by (seed, step)."""
        k1, k2 = mx.random.split(step_key(self.seed, self.step_count if step is None else step))
        sigmas, _ = sample_training_sigmas(k2, shape[0], self.scheduler_config, self.weighting_scheme)
        return mx.random.normal(shape, key=k1), sigmas

    def loss_and_grads(self, latents, prompt_embeds, noise=None, sigmas=None):
        """(loss, gradients of the LoRA parameters) for a global batch, averaged over the data-parallel group
        (each process computes its share of the batch)."""
        x0 = mx.array(latents).astype(mx.float32)
        if len(prompt_embeds) != x0.shape[0]:
            raise ValueError(f"got {len(prompt_embeds)} caption feature arrays for a batch of {x0.shape[0]}")
        if (noise is None) != (sigmas is None):
            raise ValueError("pass both noise and sigmas, or neither (the trainer then draws them)")
        if noise is None:
            noise, sigmas = self.draw(tuple(x0.shape))
        noise = mx.array(noise).astype(mx.float32)
        sigmas = np.asarray(sigmas, np.float32).reshape(-1)
        if noise.shape != x0.shape or sigmas.shape[0] != x0.shape[0]:
            raise ValueError(f"noise {tuple(noise.shape)} and sigmas {sigmas.shape} must match latents "
                             f"{tuple(x0.shape)}")
        if not np.all((sigmas >= 0) & (sigmas <= 1)):
            raise ValueError(f"sigmas must lie in [0, 1], got {sigmas.tolist()}")
        n, r = self.world_size, self.rank_in_group
        if x0.shape[0] % n:
            raise ValueError(f"a global batch of {x0.shape[0]} does not split over {n} processes")
        part = slice(r * x0.shape[0] // n, (r + 1) * x0.shape[0] // n)
        caps = [mx.array(c) for c in prompt_embeds[part]]
        weights = loss_weighting(self.weighting_scheme, sigmas[part])
        loss, grads = self._value_and_grad(x0[part], caps, noise[part], sigmas[part], weights)
        if self.group is not None:
            grads = tree_map(lambda g: mx.distributed.all_sum(g, group=self.group) / n, grads)
            loss = mx.distributed.all_sum(loss, group=self.group) / n
        return loss, grads

    def apply(self, grads) -> float:
        """Clip (over all LoRA parameters together) and take one optimizer step; returns the gradient norm."""
        grads, norm = clip_grad_norm(grads, self.max_grad_norm)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self.step_count += 1
        return float(norm)

    def step(self, latents, prompt_embeds, noise=None, sigmas=None) -> float:
        """One optimizer step on a batch: clean latents (B,16,h,w), one (L_i, D) caption-feature array per sample;
        noise (B,16,h,w) and sigmas (B,), or None for both to draw them (seeded). Returns the loss."""
        loss, grads = self.loss_and_grads(latents, prompt_embeds, noise, sigmas)
        mx.eval(loss, grads)
        self.apply(grads)
        return float(loss)

    # ------------------------------------------------------------------------------------------------ state
    def lora_state(self) -> dict:
        """{diffusers module name: (A (rank, in), B (out, rank))}."""
        return trainable_lora_state(self.model)

    def named_gradients(self, grads) -> dict:
        """{diffusers module name: (dL/dA, dL/dB)} of a gradient tree from `loss_and_grads`."""
        paths = {id(v): k for k, v in tree_flatten(self.model.trainable_parameters())}
        flat = dict(tree_flatten(grads))
        return {name: (flat[paths[id(a)]], flat[paths[id(b)]]) for name, (a, b) in self.lora_state().items()}

    def save_lora(self, path: str | Path, extra_metadata: dict | None = None) -> Path:
        """The diffusers/PEFT file (float32), written atomically."""
        return save_peft_lora(path, self.lora_state(), self.rank, self.alpha, extra_metadata)

    def state_arrays(self) -> dict:
        """Everything a resumed run needs besides the data position: LoRA parameters and optimizer state."""
        out = {f"lora.{k}": v for k, v in tree_flatten(self.model.trainable_parameters())}
        out.update({f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)})
        return out

    def load_state_arrays(self, arrays: dict, step: int) -> None:
        """Restore `state_arrays()` (and the step count): the run continues bit for bit."""
        self.model.update(_replace_leaves(self.model.trainable_parameters(), arrays, "lora."))
        self.optimizer.init(self.model.trainable_parameters())
        self.optimizer.state = _replace_leaves(self.optimizer.state, arrays, "optimizer.")
        self.step_count = int(step)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)


def _replace_leaves(tree, arrays: dict, prefix: str):
    """`tree` with each leaf replaced by arrays[prefix + its path]; the key sets and shapes must agree."""
    have = dict(tree_flatten(tree))
    given = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if set(have) != set(given):
        odd = sorted(set(have) ^ set(given))
        raise ValueError(f"the checkpoint's {prefix.rstrip('.')} state does not match this run (another model, "
                         f"rank, targets or optimizer): e.g. {odd[0]}")
    for k, v in given.items():
        if tuple(v.shape) != tuple(have[k].shape):
            raise ValueError(f"checkpoint tensor {prefix}{k} has shape {tuple(v.shape)}, this run's is "
                             f"{tuple(have[k].shape)} (another rank or model)")
    return tree_map_with_path(lambda path, _: given[path], tree)
