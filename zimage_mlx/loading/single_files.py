"""Single checkpoint files (ComfyUI / original releases): which Z-Image part a file holds, from its tensor names,
and each part's config inferred from its tensor shapes (used by `convert --transformer/--text-encoder/--vae`)."""

from __future__ import annotations

import re
from pathlib import Path

from ..models.transformer import ZImageTransformerConfig
from ..models.vae import VAEConfig
from .weights import WeightError, safetensors_keys


# --------------------------------------------------------------------------- single-file kinds
KIND_NAMES = {
    "transformer": "a Z-Image transformer (S3-DiT)",
    "text_encoder": "a Qwen3 text encoder",
    "vae": "a FLUX 16-channel VAE",
    "controlnet": "a Z-Image ControlNet Union",
}


def _file_kind_from_keys(keys: dict[str, tuple]) -> str:
    """'transformer' | 'text_encoder' | 'vae' | 'controlnet', or a WeightError saying what the file looks like."""
    names = list(keys)

    def has(*fragments):
        return any(all(f in k for f in fragments) for k in names)

    if has("lora_") or has(".lora.") or has("lokr_") or has("hada_w"):
        raise WeightError("it looks like a LoRA (lora_A/lora_down keys); LoRAs are applied on top of a model, "
                          "they are not a model")
    if has("layers.0.adaLN_modulation.0.weight") and (has("cap_embedder") or has("x_pad_token")):
        return "transformer"
    if has("control_all_x_embedder.") and has("control_layers.0."):
        return "controlnet"
    if has("double_blocks.") or has("single_blocks."):
        raise WeightError("it looks like a FLUX transformer (double_blocks/single_blocks), not Z-Image")
    if has("input_blocks.") or has("conditioner.embedders") or has("down_blocks.0.attentions"):
        raise WeightError("it looks like a Stable Diffusion / SDXL UNet checkpoint, not Z-Image")
    if has("self_attn.q_norm.weight") and has("embed_tokens.weight"):
        return "text_encoder"
    if has("self_attn.q_proj") and has("embed_tokens.weight"):
        raise WeightError("it looks like a language model without q/k norms (Qwen2/Llama?), not the Qwen3 encoder")
    conv_in = next((v for k, v in keys.items() if k.endswith("decoder.conv_in.weight")), None)
    if conv_in is not None:
        if len(conv_in[0]) == 4 and conv_in[0][1] != 16:
            raise WeightError(f"it looks like a {conv_in[0][1]}-channel VAE (SD/SDXL); Z-Image needs the 16-channel "
                              "FLUX VAE (ae.safetensors)")
        return "vae"
    raise WeightError("it is not a Z-Image transformer, Qwen3 text encoder or FLUX VAE checkpoint "
                      f"(first keys: {', '.join(names[:3])})")


def detect_file_kind(path: str | Path) -> str:
    """Which Z-Image component a single checkpoint file holds, from its keys (never unpickles anything)."""
    path = Path(path)
    if not path.is_file():
        raise WeightError(f"{path}: file not found")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF" or path.suffix.lower() == ".gguf":
        raise WeightError(f"{path}: a GGUF file; zimage_mlx reads .safetensors checkpoints (convert it or use the "
                          "bf16 safetensors release)")
    safetensors = head[8:9] == b"{"   # an 8-byte header length (any first byte, 0x80 too), then the JSON header
    pickle = head[:2] == b"PK" or head[:1] == b"\x80"
    if (pickle and not safetensors) or path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise WeightError(f"{path}: a pickle checkpoint (.ckpt/.pt/.bin); these can run code when loaded and are "
                          "never opened: use the .safetensors release")
    try:
        return _file_kind_from_keys(safetensors_keys(path))
    except WeightError as e:
        if str(e).startswith(str(path)):
            raise
        raise WeightError(f"{path}: {e}") from None


# --------------------------------------------------------------------------- configs from tensor shapes
def transformer_config_from_shapes(keys: dict[str, tuple[int, ...]]) -> dict:
    """A transformer config for a single-file checkpoint (ComfyUI layout or diffusers names), from tensor shapes.

    Everything not visible in the shapes takes the real Z-Image value (rope, axes, eps).
    """
    keys = {k.removeprefix("model.diffusion_model."): v for k, v in keys.items()}
    x_emb = keys.get("x_embedder.weight") or keys.get("all_x_embedder.2-1.weight")
    norm_q = keys.get("layers.0.attention.q_norm.weight") or keys.get("layers.0.attention.norm_q.weight")
    cap = keys.get("cap_embedder.1.weight")
    if x_emb is None or cap is None:
        raise WeightError("not a Z-Image transformer checkpoint (no x_embedder / cap_embedder tensors)")

    def count(prefix):
        return len({k.split(".")[1] for k in keys if k.startswith(prefix + ".")})

    dim = x_emb[0]
    head_dim = norm_q[0] if norm_q else 128
    if head_dim != 128:
        raise WeightError(f"head_dim {head_dim} is not Z-Image's 128: the RoPE axes cannot be inferred from the "
                          "file; pass the model's config.json (--transformer-config)")
    cfg = ZImageTransformerConfig(
        dim=dim, in_channels=x_emb[1] // 4, n_layers=count("layers"), n_refiner_layers=count("noise_refiner"),
        n_heads=dim // head_dim, n_kv_heads=dim // head_dim, cap_feat_dim=cap[1], qk_norm=norm_q is not None,
    )
    return {k: getattr(cfg, k) for k in ZImageTransformerConfig.__dataclass_fields__}


def text_encoder_config_from_shapes(keys: dict[str, tuple[int, ...]]) -> dict:
    """A Qwen3 config for a single-file text encoder (e.g. ComfyUI's qwen_3_4b.safetensors), from tensor shapes."""
    keys = {k.removeprefix("model."): v for k, v in keys.items()}
    try:
        vocab, hidden = keys["embed_tokens.weight"]
        head_dim = keys["layers.0.self_attn.q_norm.weight"][0]
        n_heads = keys["layers.0.self_attn.q_proj.weight"][0] // head_dim
        n_kv = keys["layers.0.self_attn.k_proj.weight"][0] // head_dim
        inter = keys["layers.0.mlp.gate_proj.weight"][0]
    except KeyError as e:
        raise WeightError(f"not a Qwen3 text encoder checkpoint (no {e.args[0]})") from None
    layers = len({k.split(".")[1] for k in keys if k.startswith("layers.")})
    return {"architectures": ["Qwen3ForCausalLM"], "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": head_dim,
            "intermediate_size": inter, "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
            "max_position_embeddings": 40960, "hidden_act": "silu", "attention_bias": False}


_VAE_BLOCK = re.compile(r"^encoder\.(?:down|down_blocks)\.(\d+)\.(?:block|resnets)\.(\d+)\.conv1\.weight$")


def vae_config_from_shapes(keys: dict[str, tuple[int, ...]]) -> dict:
    """A VAE config for a single-file VAE (FLUX/LDM or diffusers names), from tensor shapes.

    block_out_channels, layers_per_block, latent/in/out channels and the mid-block attention come from the shapes;
    the GroupNorm group count (32), scaling and shift factors cannot, and take the FLUX VAE's (the only 16-channel
    VAE Z-Image uses); a file they cannot fit is refused with a pointer to --vae-config.
    """
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in keys):
            keys = {k[len(prefix):]: v for k, v in keys.items() if k.startswith(prefix)}
            break
    blocks: dict[int, dict[int, tuple]] = {}
    for k, shape in keys.items():
        if m := _VAE_BLOCK.match(k):
            blocks.setdefault(int(m[1]), {})[int(m[2])] = shape
    conv_in = keys.get("decoder.conv_in.weight")
    enc_in = keys.get("encoder.conv_in.weight")
    conv_out = keys.get("decoder.conv_out.weight")
    if not blocks or conv_in is None or enc_in is None or conv_out is None \
            or sorted(blocks) != list(range(len(blocks))):
        raise WeightError("cannot infer the VAE's configuration from its tensors (encoder blocks or conv_in/"
                          "conv_out missing); pass its config.json with --vae-config")
    layers = {len(b) for b in blocks.values()}
    if len(layers) != 1:
        raise WeightError(f"the VAE's encoder blocks have different depths {sorted(layers)}; pass its config.json "
                          "with --vae-config")
    attention = any(".attn_1." in k or ".attentions.0." in k for k in keys if k.startswith("encoder.mid"))
    channels = [blocks[i][0][0] for i in range(len(blocks))]
    groups = VAEConfig().norm_num_groups
    if any(c % groups for c in channels):
        raise WeightError(f"the VAE's channels {channels} do not divide into {groups} GroupNorm groups, so its group "
                          "count cannot be inferred; pass its config.json with --vae-config")
    return {**{k: v for k, v in vars(VAEConfig()).items() if not k.endswith("_types")},
            "in_channels": enc_in[1], "out_channels": conv_out[0], "latent_channels": conv_in[1],
            "block_out_channels": channels, "layers_per_block": layers.pop(),
            "mid_block_add_attention": attention}


CONFIG_FROM_SHAPES = {"transformer": transformer_config_from_shapes, "text_encoder": text_encoder_config_from_shapes,
                      "vae": vae_config_from_shapes}
