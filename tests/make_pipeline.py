"""A tiny random Z-Image checkpoint in the Hugging Face layout, and the diffusers pipeline built from the same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from make_text_encoder import make_tiny_qwen3, save_tiny_text_encoder
from make_transformer import make_tiny_transformer, save_tiny_transformer
from make_vae import make_tiny_vae, save_tiny_vae

SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
             "use_dynamic_shifting": False, "shift": 3.0}


def save_tiny_pipeline(root, tokenizer_dir, seed: int = 0, transformer_overrides: dict | None = None,
                       text_encoder_overrides: dict | None = None, vae_kwargs: dict | None = None,
                       scheduler_overrides: dict | None = None):
    """Write model_index.json, scheduler/, tokenizer/ (real Qwen3 files), text_encoder/, transformer/, vae/.

    Returns (root, torch models dict) so a diffusers oracle can be built from the very same weights.
    """
    root = Path(root)
    te = make_tiny_qwen3(seed, **(text_encoder_overrides or {}))
    tr = make_tiny_transformer(seed + 1, **{"cap_feat_dim": te.config.hidden_size, **(transformer_overrides or {})})
    vae = make_tiny_vae(seed + 2, **(vae_kwargs or {}))
    save_tiny_text_encoder(root / "text_encoder", te)
    save_tiny_transformer(root / "transformer", tr)
    save_tiny_vae(root / "vae", vae)
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULER, **(scheduler_overrides or {})}))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "ZImagePipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"], "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return root, {"text_encoder": te, "transformer": tr, "vae": vae}


def diffusers_pipelines(models: dict, tokenizer_dir, scheduler_overrides: dict | None = None):
    """(ZImagePipeline, ZImageImg2ImgPipeline) in float32 on the CPU, sharing the given torch models."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageImg2ImgPipeline, ZImagePipeline
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    sched = {k: v for k, v in {**SCHEDULER, **(scheduler_overrides or {})}.items() if k[0] != "_"}
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(**sched),
                 vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tok,
                 transformer=models["transformer"])
    t2i = ZImagePipeline(**parts)
    i2i = ZImageImg2ImgPipeline(**{**parts, "scheduler": FlowMatchEulerDiscreteScheduler(**sched)})
    for p in (t2i, i2i):
        p.set_progress_bar_config(disable=True)
    return t2i, i2i
