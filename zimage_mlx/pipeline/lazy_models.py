"""The pipeline's models, loaded lazily: each component loads on first use (so the text encoder can run and be
freed before the transformer occupies memory), prepared for this backend, and freed when the memory plan says so;
plus the optional ControlNet (load_controlnet / unload_controlnet). A mixin of ZImagePipeline."""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx

from ..loading.hub import resolve_file
from ..loading.quantize import dequantize_matmuls
from ..memory import component_weight_bytes
from ..models.controlnet import SEMANTICS, controlnet_config, load_controlnet
from ..models.fused_projections import fuse_projections
from ..models.transformer import ZImageTransformerConfig


def check_semantics(semantics: str) -> str:
    if semantics not in SEMANTICS:
        raise ValueError(f"controlnet_semantics must be one of {SEMANTICS}, got {semantics!r}")
    return semantics


class LazyModels:
    """Needs from the class: _models, _loaders, configs, dtype, plan, fused_projections, dequantize_matmuls,
    compile, group, controlnet_semantics, timings and the LoRA state `_lora`."""

    def load_controlnet(self, path: str | Path, semantics: str | None = None, config: dict | None = None) -> None:
        """Use a ControlNet Union (2.1, 2.1-lite, 2.0 or v1): a published .safetensors file (variant read from its
        keys; `config` entries override), a diffusers-layout or converted MLX directory, or a hub file written
        "owner/repo/file.safetensors". Checked now against the transformer (dim, heads, layer places); the weights
        load on first use, in the pipeline's dtype and the transformer's quantization."""
        if semantics is not None:
            self.controlnet_semantics = check_semantics(semantics)
        path = resolve_file(path)
        cfg = controlnet_config(path, config)
        cfg.check_matches(ZImageTransformerConfig.from_dict(self._config("transformer")), source=f"ControlNet {path}")
        self.configs["controlnet"] = cfg.to_dict()
        bits = self.plan.bits.get("transformer") if self.plan is not None else None
        group = self.plan.group_size if self.plan is not None else 64
        if self.plan is not None:   # its weights now count in every size check
            self.plan.stages["weights_controlnet"] = component_weight_bytes("controlnet", self.configs["controlnet"],
                                                                            self.dtype, bits, group)
        self._models["controlnet"] = None
        self._loaders["controlnet"] = lambda: load_controlnet(path, self.dtype, config=config, bits=bits,
                                                              group_size=group)

    def unload_controlnet(self) -> None:
        """Forget the ControlNet (and free its weights)."""
        self._models["controlnet"] = None
        self._loaders.pop("controlnet", None)
        self.configs.pop("controlnet", None)
        if self.plan is not None:
            self.plan.stages.pop("weights_controlnet", None)
        mx.clear_cache()

    @property
    def has_controlnet(self) -> bool:
        return self._models.get("controlnet") is not None or "controlnet" in self._loaders

    def _component(self, name: str):
        model = self._models.get(name)
        if model is None:
            if name not in self._loaders:
                raise RuntimeError(f"this pipeline has no {name}")
            t0 = time.perf_counter()
            model = self._prepare_model(name, self._loaders[name]())
            self.timings[f"load_{name}"] = self.timings.get(f"load_{name}", 0.0) + time.perf_counter() - t0
            self._models[name] = model
        if name == "transformer" and self._lora.model is not model and self._lora.adapters:
            self._lora.attach(model)   # LoRAs loaded before the transformer
        return model

    def _prepare_model(self, name: str, model):
        """What this backend runs: fused projections (q/k/v and w1/w3 as one matmul each; LoRAs address the row
        slices), float matmuls for quantized layers on the CPU, compiled elementwise chains."""
        if name in ("transformer", "controlnet") and self.fused_projections:
            fuse_projections(model)
        if self.dequantize_matmuls:
            dequantize_matmuls(model)
        if name in ("transformer", "controlnet"):
            model.set_compile(self.compile, cpu_streams=self.group is None)
        return model

    @property
    def transformer(self):
        return self._component("transformer")

    @property
    def text_encoder(self):
        return self._component("text_encoder")

    @property
    def vae(self):
        return self._component("vae")

    @property
    def controlnet(self):
        return self._component("controlnet")

    def free_text_encoder(self) -> None:
        """Drop the text encoder's weights (it reloads on the next encode). Already encoded prompts stay cached."""
        self._free("text_encoder")

    def _free(self, name: str) -> None:
        if name in self._loaders:     # injected models (no loader) stay
            self._models[name] = None
            mx.clear_cache()

    def _config(self, name: str):
        """A component's config dict without loading it (an injected model's own config otherwise)."""
        if name in self.configs:
            return self.configs[name]
        return vars(self._component(name).config)

    # ----------------------------------------------------------------- sizes
