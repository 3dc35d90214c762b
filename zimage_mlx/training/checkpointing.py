"""Gradient checkpointing: each transformer block recomputes its activations in the backward pass (`mx.checkpoint`)
instead of keeping them, so training memory grows with one block's activations instead of all 34 blocks'.

The blocks keep their names (the class of each block instance is swapped for a checkpointing subclass and back),
so LoRA module names, saved files and the inference path are unchanged.

The attention of a checkpointed block runs in query chunks, each under its own `mx.checkpoint`
(`chunked_attention`): the VJP of `mx.fast.scaled_dot_product_attention` materializes the (heads, queries, keys)
score matrix, so the backward of the block being differentiated holds one chunk's scores instead of all of them
(4.3 GB at 1024² for the full matrix; memory.training_activation_bytes plans one chunk). Inference never sees it: turning checkpointing off restores the kernels.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from dataclasses import replace

from ..memory import SCORE_CHUNK_BYTES
from ..models.transformer import Attention, TransformerBlock



def query_chunk(batch: int, heads: int, queries: int, keys: int, budget: int = SCORE_CHUNK_BYTES) -> int:
    """Queries per chunk so that one chunk's float32 scores fit `budget` bytes (at least 1, at most all)."""
    return max(1, min(queries, budget // (batch * heads * keys * 4)))


def _chunks(queries: int, n: int):
    return [slice(i, min(i + n, queries)) for i in range(0, queries, n)]


def _chunk_vjp(q, k, v, o, do, scale):
    """Gradients of one query chunk of softmax(q k^T * scale) v, in float32 (the backward of
    mx.fast.scaled_dot_product_attention written out, with its scores for these queries only)."""
    q, k, v, o, do = (a.astype(mx.float32) for a in (q, k, v, o, do))
    p = mx.softmax((q * scale) @ k.swapaxes(-1, -2), axis=-1)
    dp = do @ v.swapaxes(-1, -2)
    ds = p * (dp - (do * o).sum(axis=-1, keepdims=True)) * scale
    return ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ do


def chunked_attention(attention, budget: int = SCORE_CHUNK_BYTES):
    """`attention(q, k, v)` on (B, heads, S, head_dim) run over query chunks of `query_chunk` rows, forward and
    backward: the backward recomputes each chunk's scores, one chunk after the other (`mx.depends` orders them), so
    it holds one chunk's scores, probabilities and their gradients at a time. Every query row attends to all keys
    either way: the same values to float rounding."""

    @mx.custom_function
    def run(q, k, v):
        n = query_chunk(q.shape[0], q.shape[1], q.shape[2], k.shape[2], budget)
        out = []
        for part in _chunks(q.shape[2], n):
            out.append(attention(q[:, :, part] if not out else mx.depends(q[:, :, part], out[-1]), k, v))
        return mx.concatenate(out, axis=2)

    @run.vjp
    def run_vjp(primals, cotangent, output):
        q, k, v = primals
        n = query_chunk(q.shape[0], q.shape[1], q.shape[2], k.shape[2], budget)
        dq, dk, dv = [], 0.0, 0.0
        for part in _chunks(q.shape[2], n):
            qi = q[:, :, part] if not dq else mx.depends(q[:, :, part], [dq[-1], dk, dv])
            g = _chunk_vjp(qi, k, v, output[:, :, part], cotangent[:, :, part], q.shape[-1] ** -0.5)
            dq.append(g[0].astype(q.dtype))
            dk, dv = dk + g[1], dv + g[2]
        return mx.concatenate(dq, axis=2), dk.astype(k.dtype), dv.astype(v.dtype)

    def call(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        return run(q, k, v)

    call.plain = attention
    return call


def _checkpointed_call(self, *args):
    plain = self._plain_class.__call__

    def inner(params, *args):
        self.update(params)
        return plain(self, *args)

    return mx.checkpoint(inner)(self.trainable_parameters(), *args)


class CheckpointedBlock(TransformerBlock):
    """A TransformerBlock whose forward runs under `mx.checkpoint`."""

    _plain_class = TransformerBlock
    __call__ = _checkpointed_call


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Turn checkpointing of every TransformerBlock of `model` on or off; returns the number of blocks."""
    count = 0
    for _, m in model.named_modules():
        if isinstance(m, TransformerBlock):
            m.__class__ = CheckpointedBlock if enabled else TransformerBlock
            count += 1
        if isinstance(m, Attention):
            m.kernels = _with_chunked_attention(m.kernels, enabled)
    return count


def _with_chunked_attention(kernels, enabled: bool):
    """`kernels` with its attention wrapped in (or unwrapped from) `chunked_attention`; the same object if
    nothing changes, so inference keeps the very kernels it had."""
    plain = getattr(kernels.attention, "plain", None)
    if enabled and plain is None:
        return replace(kernels, attention=chunked_attention(kernels.attention))
    if not enabled and plain is not None:
        return replace(kernels, attention=plain)
    return kernels
