"""The Qwen3-4B text encoder of Z-Image in MLX (diffusers `pipelines/z_image/pipeline_z_image.py`, `_encode_prompt`).

Ports what diffusers' `ZImagePipeline._encode_prompt` takes from transformers' `Qwen3Model`:
`hidden_states[-2]`, i.e. the raw output of decoder layer num_layers-2 (index 34 of 36), before the final
RMSNorm. So encoding runs num_layers-1 decoder layers. The module also holds the last layer and the final norm when
the weights have them (`final_layers`, docs/enhance.md): never run to encode, they complete the checkpoint's Qwen3-4B
chat model (embedding tied as the output head; `lm_head.*` is never read), which `causal_lm` hands to mlx-lm for
prompt enhancement. They cost one layer of 36 (2.8 % of the encoder's weights).

The decoder layers are mlx-lm's `qwen3.TransformerBlock` (same module names as the checkpoint, so the key map
is only "strip a leading `model.`"). Its numerics match transformers within float32 round-off: `nn.RMSNorm`
(`mx.fast.rms_norm`, statistics in float32), q/k RMSNorm per head before RoPE, `nn.RoPE` (half-split,
`traditional=False`, base = rope_theta), causal SDPA with scale 1/sqrt(head_dim), GQA by `mx.fast` SDPA.
In bfloat16 it rounds once per RMSNorm where transformers rounds twice — a sub-ulp difference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3 as mlx_qwen3

from ..loading.weights import strip_prefix

if TYPE_CHECKING:
    from .tokenizer import ZImageTokenizer


@dataclass
class Qwen3EncoderConfig:
    """`text_encoder/config.json` of Z-Image (defaults: the real Qwen3-4B values)."""

    hidden_size: int = 2560
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 9728
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    vocab_size: int = 151936
    max_position_embeddings: int = 40960
    final_layers: bool = True   # hold the last decoder layer + final norm (set from the weights: has_final_layers)

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3EncoderConfig":
        d = dict(d)
        # transformers >= 5 writes rope_theta inside rope_parameters; 4.x writes it at the top with rope_scaling.
        rope = d.get("rope_parameters") or {}
        if d.get("rope_theta") is None and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        scaling = d.get("rope_scaling") or rope
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"text encoder config: RoPE scaling {rope_type!r} is not supported (Qwen3-4B has none)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"text encoder config: hidden_act {d['hidden_act']!r} is not supported (expected silu)")
        if d.get("attention_bias", False):
            raise ValueError("text encoder config: attention_bias=true is not supported (Qwen3 has none)")
        if d.get("use_sliding_window", False):
            raise ValueError("text encoder config: sliding-window attention is not supported")
        if d.get("head_dim") is None and "hidden_size" in d and "num_attention_heads" in d:
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        if cfg.num_hidden_layers < 2:
            raise ValueError("text encoder config: needs at least 2 layers (the second-to-last one is the output)")
        return cfg

    @property
    def num_encoder_layers(self) -> int:
        """Layers actually run: the output is hidden_states[-2], the output of layer index num_layers-2."""
        return self.num_hidden_layers - 1

    @property
    def num_stored_layers(self) -> int:
        """Layers the module holds: all of them with `final_layers`, else only those the encoder runs."""
        return self.num_hidden_layers if self.final_layers else self.num_encoder_layers

    def mlx_lm_args(self, num_layers: int | None = None) -> mlx_qwen3.ModelArgs:
        return mlx_qwen3.ModelArgs(
            model_type="qwen3",
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_encoder_layers if num_layers is None else num_layers,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            rms_norm_eps=self.rms_norm_eps,
            vocab_size=self.vocab_size,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            head_dim=self.head_dim,
            tie_word_embeddings=True,
            rope_theta=float(self.rope_theta),
            rope_scaling=None,
        )


_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")


def has_final_layers(keys, num_hidden_layers: int) -> bool:
    """Whether checkpoint / MLX-layout keys hold the last decoder layer and the final norm (a Hugging Face or
    ComfyUI checkpoint does; an MLX conversion made before zimage_mlx kept them does not)."""
    keys = {k.removeprefix("model.") for k in keys}
    last = f"layers.{num_hidden_layers - 1}."
    return "norm.weight" in keys and any(k.startswith(last) for k in keys)


class Qwen3Encoder(nn.Module):
    """Embedding + the first num_layers-1 Qwen3 decoder layers; returns the last one's raw output (causal).
    With `config.final_layers` it also holds the last layer and the final `norm` (unused by `__call__`)."""

    def __init__(self, config: Qwen3EncoderConfig):
        super().__init__()
        self.config = config
        args = config.mlx_lm_args()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [mlx_qwen3.TransformerBlock(args) for _ in range(config.num_stored_layers)]
        if config.final_layers:
            self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @property
    def dtype(self) -> mx.Dtype:
        # a quantized embedding stores uint32 weights; its scales carry the activation dtype
        return getattr(self.embed_tokens, "scales", self.embed_tokens.weight).dtype

    def __call__(self, input_ids: mx.array) -> mx.array:
        """(B, L) int ids -> (B, L, hidden) = transformers' `hidden_states[-2]` (right padding is harmless)."""
        h = self.embed_tokens(input_ids)
        mask = "causal" if h.shape[1] > 1 else None
        for layer in self.layers[: self.config.num_encoder_layers]:
            h = layer(h, mask)
        return h

    def sanitize(self, weights: dict) -> dict:
        """Checkpoint keys -> module keys: a leading `model.` (Qwen3ForCausalLM) stripped; `lm_head.*` (tied to
        the embedding) dropped unread, and so are `norm.weight` and the last layer without `final_layers`."""
        weights = strip_prefix(weights, ["model."])
        n = self.config.num_stored_layers
        for key in list(weights):
            m = _LAYER_KEY.match(key)
            if (key.startswith("lm_head.") or key.endswith("rotary_emb.inv_freq")
                    or (key == "norm.weight" and not self.config.final_layers)
                    or (m is not None and int(m.group(1)) >= n)):
                del weights[key]
        return weights


def causal_lm(encoder: Qwen3Encoder) -> mlx_qwen3.Model:
    """mlx-lm's Qwen3 chat model (`mlx_lm.models.qwen3.Model`, tied embeddings) on the encoder's own arrays: all
    layers, the final norm and the embedding as the output head. Nothing is copied or read again."""
    cfg = encoder.config
    if not cfg.final_layers:
        raise ValueError(
            "this text encoder was loaded without its last layer and final norm (an MLX conversion made before "
            "zimage_mlx stored them); convert the model again to use prompt enhancement"
        )
    model = mlx_qwen3.Model(cfg.mlx_lm_args(cfg.num_hidden_layers))   # its own parameters stay lazy, never made
    model.model.embed_tokens = encoder.embed_tokens
    model.model.layers = encoder.layers
    model.model.norm = encoder.norm
    return model


def encode_prompts(
    tokenizer: "ZImageTokenizer",
    encoder: Qwen3Encoder,
    prompts: Sequence[str] | str,
    max_length: int = 512,
) -> list[mx.array]:
    """Caption features: one (L_i, hidden) array per prompt, only its real tokens, in the encoder's dtype.

    Equals diffusers' `ZImagePipeline._encode_prompt` (padded batch + mask, then `embeds[i][mask[i]]`): the encoder
    is causal and the reference pads on the right, so each prompt is encoded unpadded — no compute is spent on
    padding (a 512-token prompt next to the empty CFG negative costs 520 tokens, not 1024). Identical prompts are
    encoded once.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = tokenizer.encode(list(prompts), max_length=max_length)
    cache: dict[tuple[int, ...], mx.array] = {}
    out = []
    for seq in ids:
        key = tuple(seq)
        if key not in cache:
            cache[key] = encoder(mx.array([seq], dtype=mx.int32))[0]
        out.append(cache[key])
    mx.eval(out)
    return out
