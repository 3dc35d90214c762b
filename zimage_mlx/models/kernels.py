"""The S3-DiT's elementwise chains and attention as swappable kernels (`Kernels`): plain MLX functions, compiled ones
on a GPU (`Kernels.compiled`), and on MLX's CPU backend the attention and SwiGLU split over two CPU streams.
Ports the math of diffusers 0.42.1 `transformers/transformer_z_image.py` (apply_rotary_emb, the SwiGLU feed-forward,
the tanh-gated residual); docs/numerics.md has the float32 islands."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """diffusers' complex multiply on interleaved pairs, in float32, cast back to x's dtype.

    cos/sin are `rope_cos_sin_full` tables: (S, head_dim) with cos repeated per pair and sin as (−sin, +sin). With
    the pair-swapped x, out = x·cos + swap(x)·sin gives (x0·cos − x1·sin, x1·cos + x0·sin) — the same float32 products
    and sums as the complex multiply, so bit for bit the same result, in 3 elementwise passes instead of ~10.
    """
    xf = x.astype(mx.float32)
    swapped = xf.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    return (xf * cos + swapped * sin).astype(x.dtype)


def swiglu(a: mx.array, b: mx.array) -> mx.array:
    return nn.silu(a) * b


def gated_residual(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    return x + mx.tanh(gate) * y


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """(B, heads, S, head_dim) attention with the 1/sqrt(head_dim) scale."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)


_THREAD = threading.local()


def _cpu_streams() -> tuple:
    """Two CPU streams of the calling thread (MLX streams belong to the thread that made them)."""
    if not hasattr(_THREAD, "cpu_streams"):
        _THREAD.cpu_streams = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
    return _THREAD.cpu_streams


def _halves_on_two_cpu_streams(fn, axis: int, *arrays) -> mx.array:
    """fn over the two halves of `arrays` along `axis`, each half on its own CPU stream, concatenated.

    MLX's CPU backend runs each op on one thread, and the exponentials of softmax and SiLU dominate a step there;
    two streams keep both cores busy. The same ops on the same values: bit-identical results.
    """
    n = arrays[0].shape[axis] // 2
    out = []
    for part, stream in zip((slice(0, n), slice(n, None)), _cpu_streams()):
        index = (slice(None),) * axis + (part,)
        with mx.stream(stream):
            out.append(fn(*(a[index] for a in arrays)))
    return mx.concatenate(out, axis=axis)


def _split_on_cpu(fn, axis: int):
    """fn, or on MLX's CPU backend fn over two halves on two CPU streams (_halves_on_two_cpu_streams)."""
    def run(*arrays):
        if mx.default_device() != mx.cpu or arrays[0].shape[axis] < 2:
            return fn(*arrays)
        return _halves_on_two_cpu_streams(fn, axis, *arrays)
    return run


@dataclass(frozen=True)
class Kernels:
    """The elementwise chains and the attention of a block. `mx.compile` fuses each chain into one kernel on a GPU
    (shape-specialized: it recompiles only when the size or batch changes); on MLX's CPU backend compiling measured
    slower, so the plain functions are the default there (ZImageTransformer.set_compile). On the CPU backend the
    attention (over heads) and SwiGLU (over tokens) run as two halves on two CPU streams."""

    rope: Callable = apply_rope
    swiglu: Callable = _split_on_cpu(swiglu, axis=1)                              # over tokens
    gated_residual: Callable = gated_residual
    attention: Callable = _split_on_cpu(scaled_dot_product_attention, axis=1)     # over heads

    @classmethod
    def compiled(cls) -> "Kernels":
        return cls(mx.compile(apply_rope), mx.compile(swiglu), mx.compile(gated_residual),
                   _split_on_cpu(scaled_dot_product_attention, axis=1))


PLAIN_KERNELS = Kernels()
