"""Optimizers with PyTorch's semantics, so a run here and a run with diffusers' training script agree.

"adamw" is `torch.optim.AdamW` (decoupled weight decay p·(1 − lr·wd), bias-corrected moments): MLX's
`optim.AdamW` with `bias_correction=True` (its default is off). "sgd" is p ← p − lr·g. Clipping is
`torch.nn.utils.clip_grad_norm_`: one 2-norm over all LoRA gradients together, scaled by max_norm / (norm + 1e-6)
when that is below 1.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(name: str, learning_rate: float, betas=(0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 1e-4) -> optim.Optimizer:
    if name == "adamw":
        return optim.AdamW(learning_rate=learning_rate, betas=list(betas), eps=eps, weight_decay=weight_decay,
                           bias_correction=True)
    if name == "sgd":
        return optim.SGD(learning_rate=learning_rate)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def grad_norm(grads) -> mx.array:
    """The 2-norm of all gradients together (float32)."""
    return mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))


def clip_grad_norm(grads, max_norm: float | None):
    """(clipped grads, total norm before clipping), as `torch.nn.utils.clip_grad_norm_`."""
    total = grad_norm(grads)
    if max_norm is None:
        return grads, total
    coef = mx.minimum(mx.array(max_norm, mx.float32) / (total + 1e-6), 1.0)
    return tree_map(lambda g: (g * coef).astype(g.dtype), grads), total
