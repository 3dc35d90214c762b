"""LoRA training for the Z-Image transformer (docs/training.md): `LoRATrainer` runs diffusers' DreamBooth-LoRA
objective; `zimage-mlx train` (apps/train_cmd.py) wraps it with a dataset, caches and checkpoints."""

from .trainer import DEFAULT_TARGETS, LoRATrainer

__all__ = ["DEFAULT_TARGETS", "LoRATrainer"]
