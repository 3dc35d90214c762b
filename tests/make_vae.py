"""Tiny random FLUX-style VAE checkpoints (diffusers `AutoencoderKL`, the oracle) in both on-disk layouts."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import perturb_


def tiny_vae_config(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8) -> dict:
    n = len(block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=list(block_out_channels),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        act_fn="silu",
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
        force_upcast=True,
        sample_size=64,
    )


def make_tiny_vae(seed: int = 0, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8):
    """A float32 diffusers AutoencoderKL (16 latent channels, FLUX scaling/shift, spatial factor
    2**(len(block_out_channels)-1)) with every parameter perturbed (norm weights != 1, biases != 0)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**tiny_vae_config(block_out_channels, layers_per_block, norm_num_groups))
    return perturb_(model.float().eval(), seed)


def save_tiny_vae(directory, model) -> Path:
    """diffusers layout: `directory/config.json` + `directory/diffusion_pytorch_model.safetensors`."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def ldm_state_dict(model, prefix: str = "") -> dict:
    """The model's tensors under FLUX/LDM (`ae.safetensors`) names: the inverse of diffusers' convert_ldm_vae_checkpoint."""
    n_up = len(model.config.up_block_types)
    rules = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    out = {}
    for k, v in model.state_dict().items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        if ".mid.attn_1." in k and k.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM attention projections are 1x1 convs
        out[prefix + k] = v.detach().clone().contiguous()
    return out


def save_tiny_vae_ldm(path, model, prefix: str = "") -> Path:
    """FLUX/ComfyUI single-file layout (`ae.safetensors`), optionally under a prefix such as `first_stage_model.`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(ldm_state_dict(model, prefix), str(path))
    return path
