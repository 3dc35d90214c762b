"""Tiny random Z-Image ControlNets (diffusers `ZImageControlNetModel`, the oracle) for tests/make_transformer.py's
tiny transformer."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import perturb_
from make_transformer import TINY_CONFIG

# The tiny transformer has 2 layers and 1 noise-refiner layer; each variant keeps its published shape.
VARIANTS = {
    "2.1": dict(control_layers_places=[0, 1], control_refiner_layers_places=[0], control_in_dim=33,
                add_control_noise_refiner="control_noise_refiner"),
    "2.0": dict(control_layers_places=[0, 1], control_refiner_layers_places=[0], control_in_dim=33,
                add_control_noise_refiner="control_layers"),
    "v1": dict(control_layers_places=[0, 1], control_refiner_layers_places=None, control_in_dim=16,
               add_control_noise_refiner=None),
}


def tiny_controlnet_config(variant: str = "2.1", transformer_config: dict | None = None) -> dict:
    t = {**TINY_CONFIG, **(transformer_config or {})}
    return dict(**VARIANTS[variant], all_patch_size=t["all_patch_size"], all_f_patch_size=t["all_f_patch_size"],
                dim=t["dim"], n_refiner_layers=t["n_refiner_layers"], n_heads=t["n_heads"],
                n_kv_heads=t["n_kv_heads"], norm_eps=t["norm_eps"], qk_norm=t["qk_norm"])


def make_tiny_controlnet(seed: int = 0, variant: str = "2.1", transformer_config: dict | None = None):
    """A float32 diffusers ZImageControlNetModel with every parameter perturbed (its zero-initialised
    before_proj/after_proj included, so the hints are large enough to move the latents)."""
    from diffusers import ZImageControlNetModel

    torch.manual_seed(seed)
    model = ZImageControlNetModel(**tiny_controlnet_config(variant, transformer_config)).to(torch.float32).eval()
    perturb_(model, seed)
    assert model.control_layers[0].after_proj.weight.abs().min() > 0
    return model


def control_state_dict(model) -> dict:
    """Only the ControlNet's own tensors (after `from_transformer` the shared transformer modules hang off it too)."""
    own = ("control_layers.", "control_all_x_embedder.", "control_noise_refiner.")
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k.startswith(own)}


def save_tiny_controlnet(path, model, single_file: bool = False) -> Path:
    """diffusers layout (config.json + diffusion_pytorch_model.safetensors) or a published-style single file."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    if single_file:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(control_state_dict(model), str(path))
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_file(control_state_dict(model), str(path / "diffusion_pytorch_model.safetensors"))
    cfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
    (path / "config.json").write_text(json.dumps({"_class_name": "ZImageControlNetModel", **cfg}))
    return path
