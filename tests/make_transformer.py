"""Tiny random Z-Image transformers (the diffusers torch model is the oracle) and their HF-layout checkpoints."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from conftest import perturb_

# dim 96 is not a multiple of 64; head_dim 48 = 16 + 16 + 16.
TINY_CONFIG = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=96,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=64,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[16, 16, 16],
    axes_lens=[1536, 512, 512],
)


def make_tiny_transformer(seed: int = 0, **config_overrides):
    """A float32 diffusers ZImageTransformer2DModel with every parameter randomized (pad tokens nonzero)."""
    from diffusers import ZImageTransformer2DModel

    cfg = {**TINY_CONFIG, **config_overrides}
    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**cfg).to(torch.float32).eval()
    perturb_(model, seed)
    assert model.x_pad_token.abs().min() > 0 and model.cap_pad_token.abs().min() > 0
    return model


def save_tiny_transformer(directory, model, dtype=torch.float32, shard: bool = True) -> Path:
    """Write the real HF layout: config.json + diffusion_pytorch_model(-0000k-of-0000n).safetensors (+ index).

    With shard=True the weights are split into about 3 shards. The caller's model is not modified.
    """
    directory = Path(directory)
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    max_shard = max(n_bytes // 3 + 1, 1) if shard else n_bytes * 2 + 1_000_000
    model.save_pretrained(directory, max_shard_size=max_shard, safe_serialization=True)
    if shard:
        index = directory / "diffusion_pytorch_model.safetensors.index.json"
        assert index.is_file(), "expected a sharded checkpoint"
        assert len(set(json.loads(index.read_text())["weight_map"].values())) >= 2
    return directory
