"""Training's chunked attention (zimage_mlx/training/checkpointing.py) against the unchunked kernel and torch."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from zimage_mlx.models.transformer import PLAIN_KERNELS, Attention, ZImageTransformer, ZImageTransformerConfig
from zimage_mlx.training.checkpointing import chunked_attention, query_chunk, set_gradient_checkpointing


def rel_err(a, b) -> float:
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _qkv(heads=3, s=37, d=16, seed=0):
    return [mx.random.normal((2, heads, s, d), key=mx.random.key(seed + i)) for i in range(3)]


def test_query_chunk_fits_budget():
    assert query_chunk(1, 30, 4224, 4224, budget=16 * 2**20) == 16 * 2**20 // (30 * 4224 * 4)
    assert query_chunk(1, 30, 4224, 4224, budget=1) == 1
    assert query_chunk(1, 2, 10, 10, budget=2**30) == 10


@pytest.mark.parametrize("budget_rows", [5, 1, 37])   # 37 = 7 chunks of 5 and a ragged one of 2; 1 row; one chunk
def test_chunked_attention_matches_unchunked_and_torch(budget_rows):
    q, k, v = _qkv()
    budget = 2 * 3 * 37 * 4 * budget_rows   # batch * heads * keys * 4 bytes per query row
    assert query_chunk(2, 3, 37, 37, budget) == budget_rows
    plain, chunked = PLAIN_KERNELS.attention, chunked_attention(PLAIN_KERNELS.attention, budget)
    w = mx.random.normal(q.shape, key=mx.random.key(9))

    def loss(f):
        return lambda q, k, v: (f(q, k, v) * w).sum()

    assert rel_err(chunked(q, k, v), plain(q, k, v)) <= 1e-5
    g_plain = mx.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    g_chunk = mx.grad(loss(chunked), argnums=(0, 1, 2))(q, k, v)
    tq, tk, tv = (torch.tensor(np.array(a), requires_grad=True) for a in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    (out * torch.tensor(np.array(w))).sum().backward()
    assert rel_err(chunked(q, k, v), out.detach().numpy()) <= 1e-5
    for a, b, t in zip(g_chunk, g_plain, (tq, tk, tv)):
        assert rel_err(a, b) <= 1e-5 and rel_err(a, t.grad.numpy()) <= 1e-5


def test_bfloat16_inputs_keep_their_dtype():
    q, k, v = (a.astype(mx.bfloat16) for a in _qkv())
    chunked = chunked_attention(PLAIN_KERNELS.attention, 2 * 3 * 37 * 4 * 5)
    dq, dk, dv = mx.grad(lambda q, k, v: chunked(q, k, v).astype(mx.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    assert chunked(q, k, v).dtype == dq.dtype == dk.dtype == dv.dtype == mx.bfloat16


def test_checkpointing_switches_attention_and_restores_inference_kernels():
    cfg = ZImageTransformerConfig(dim=32, n_heads=2, n_layers=1, n_refiner_layers=1, axes_dims=[4, 6, 6])
    model = ZImageTransformer(cfg)
    attentions = [m for _, m in model.named_modules() if isinstance(m, Attention)]
    before = [m.kernels for m in attentions]
    set_gradient_checkpointing(model, True)
    assert all(m.kernels.attention.plain is b.attention for m, b in zip(attentions, before))
    set_gradient_checkpointing(model, True)   # idempotent: wrapped once
    assert all(m.kernels.attention.plain is b.attention for m, b in zip(attentions, before))
    set_gradient_checkpointing(model, False)
    assert all(m.kernels == b for m, b in zip(attentions, before))
