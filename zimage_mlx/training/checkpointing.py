"""Gradient checkpointing: each transformer block recomputes its activations in the backward pass (`mx.checkpoint`)
instead of keeping them, so training memory grows with one block's activations instead of all 34 blocks'.

The blocks keep their names (the class of each block instance is swapped for a checkpointing subclass and back),
so LoRA module names, saved files and the inference path are unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..models.transformer import TransformerBlock


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
    return count
