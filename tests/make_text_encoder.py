"""Tiny random Qwen3 text encoders (transformers, float32) saved in Z-Image's Hugging Face `text_encoder/` layout.

Used by the text-encoder tests and the pipeline tests: `model = make_tiny_qwen3(0)`,
`save_tiny_text_encoder(tmp / "text_encoder", model)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import perturb_

TINY = dict(
    hidden_size=64,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA 2:1 (the real model is 4:1)
    head_dim=16,
    intermediate_size=96,
    vocab_size=151936,  # the real tokenizer's ids go up to 151668
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
)


def make_tiny_qwen3(seed: int = 0, **overrides):
    """A float32 transformers `Qwen3Model` with every parameter randomized (norm weights != 1)."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    cfg = {**TINY, **overrides}
    config = Qwen3Config(
        **cfg,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    torch.manual_seed(seed)
    model = Qwen3Model(config).to(torch.float32).eval()
    perturb_(model, seed)
    return model


def text_encoder_config_dict(model) -> dict:
    """config.json as the real Z-Image `text_encoder/config.json` reads (transformers 4.51 style)."""
    c = model.config
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None))
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "max_window_layers": c.num_hidden_layers,
        "model_type": "qwen3",
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": theta,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": c.vocab_size,
    }


def save_tiny_text_encoder(
    directory,
    model,
    dtype=None,
    with_model_prefix: bool = True,
    shard: bool = True,
    with_lm_head: bool = True,
    config: dict | None = None,
) -> Path:
    """Write `model` as a Qwen3ForCausalLM save would: config.json + safetensors (sharded with an index).

    Keys get the `model.` prefix (unless with_model_prefix=False); with_lm_head adds a random `lm_head.weight`
    (the loader must ignore it). `config` overrides the generated config.json contents.
    """
    import torch
    from safetensors.torch import save_file

    dtype = dtype or torch.float32
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "model." if with_model_prefix else ""
    tensors = {prefix + k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}
    if with_lm_head:
        g = torch.Generator().manual_seed(1234)
        w = model.embed_tokens.weight
        tensors["lm_head.weight"] = (0.02 * torch.randn(w.shape, generator=g)).to(dtype)
    (directory / "config.json").write_text(json.dumps(config or text_encoder_config_dict(model), indent=2))
    meta = {"format": "pt"}
    if not shard:
        save_file(tensors, str(directory / "model.safetensors"), metadata=meta)
        return directory
    # Two shards, split in key order like save_pretrained does (embeddings/early layers first).
    keys = sorted(tensors, key=lambda k: (k != prefix + "embed_tokens.weight", k))
    half = len(keys) // 2
    shards = [keys[:half], keys[half:]]
    weight_map, total = {}, 0
    for i, part in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(directory / name), metadata=meta)
        for k in part:
            weight_map[k] = name
            total += tensors[k].numel() * tensors[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory
