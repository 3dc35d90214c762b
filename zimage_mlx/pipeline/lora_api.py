"""The LoRA API of diffusers' ZImageLoraLoaderMixin (loaders/lora_pipeline.py) on the pipeline:
load_lora_weights, set_adapters, get_active_adapters, unload_lora_weights, fuse_lora / unfuse_lora. The adapters
themselves live in lora/ (a LoRAState attached to the transformer). A mixin of ZImagePipeline."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import mlx.core as mx

from ..loading.components import build_model
from ..loading.hub import resolve_file
from ..lora.adapters import LoRAError, check_lora_args, load_adapter


class LoRAMixin:
    """Needs from the class: _lora (a LoRAState), _models, parallel, world_size, dtype, _config, transformer."""

    # ----------------------------------------------------------------- LoRA (diffusers' ZImageLoraLoaderMixin API)
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None) -> str:
        """Add a LoRA with weight 1.0 and return its adapter name (default "default_N", as diffusers names them).

        As in diffusers, the newly loaded adapter becomes the active one; combine adapters with `set_adapters`.
        Accepts a .safetensors path, a hub file "owner/repo/file.safetensors", or a {key: array} dict, in any
        Z-Image LoRA format (lora/formats.py). A LoRA for another model, keys that match no layer, or bad shapes raise
        LoRAError and change nothing. Before the transformer is loaded, the LoRA is applied when it loads.
        """
        check_lora_args(pretrained_model_name_or_path_or_dict, adapter_name)
        if self.parallel == "tensor" and self.world_size > 1:
            raise LoRAError("LoRAs are not supported with tensor parallelism yet (its layers are split across "
                            "processes); use parallel='data' or 'cfg'")
        name = adapter_name
        n = len(self._lora.adapters)
        while name is None or (adapter_name is None and name in self._lora.adapters):
            name, n = f"default_{n}", n + 1
        loaded = self._models.get("transformer")
        reference = loaded if loaded is not None else build_model("transformer", self._config("transformer"))
        source = pretrained_model_name_or_path_or_dict
        if not isinstance(source, dict):
            source = resolve_file(source)
        adapter = load_adapter(source, reference, self._lora_dtype(), name)
        if loaded is not None and self._lora.model is not loaded:
            self._lora.attach(loaded)
        self._lora.add(adapter)
        return name

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights=None) -> None:
        """Activate these adapters with these weights (one float for all, or one per name; default 1.0); the
        other loaded adapters get weight 0. Never reloads the base model."""
        self._lora.set_adapters(adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return [n for n, a in self._lora.adapters.items() if a.weight != 0.0]

    def unload_lora_weights(self) -> None:
        """Remove every LoRA: the transformer is exactly the base model again."""
        self._lora.clear()

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> None:
        """Merge the active LoRAs into the (float) weights for slightly faster steps; `unfuse_lora` undoes it.
        Quantized layers are refused: their LoRAs stay side branches."""
        self.transformer  # noqa: B018 - load (and attach) first
        self._lora.fuse(adapter_names, lora_scale)

    def unfuse_lora(self) -> None:
        self._lora.unfuse()

    @property
    def loras(self) -> list[dict]:
        """The loaded LoRAs: name, file, sha256 and weight (what PNG metadata records)."""
        return [{"name": a.name, "file": a.source, "sha256": a.sha256, "weight": a.weight}
                for a in self._lora.adapters.values()]

    def _lora_dtype(self) -> mx.Dtype:
        loaded = self._models.get("transformer")
        return loaded.dtype if loaded is not None else self.dtype

    @contextmanager
    def lora_weights(self, weights: dict[str, float] | None):
        """Within: the adapters weighted as `weights` (the others 0, as set_adapters); after: as before."""
        if weights is None:
            yield
            return
        before = {n: a.weight for n, a in self._lora.adapters.items()}
        self._lora.set_weights(weights)
        try:
            yield
        finally:
            self._lora.set_weights(before)
