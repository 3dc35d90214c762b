"""MLX Qwen3 text encoder vs diffusers' ZImagePipeline.encode_prompt on a tiny random Qwen3 (float32, CPU)."""


import mlx.core as mx
import numpy as np
import pytest
import torch

from conftest import rel_err, to_numpy
from make_text_encoder import make_tiny_qwen3, save_tiny_text_encoder, text_encoder_config_dict
from zimage_mlx.loading.components import load_component
from zimage_mlx.models.text_encoder import Qwen3EncoderConfig, Qwen3Encoder, encode_prompts
from zimage_mlx.models.tokenizer import ZImageTokenizer
from zimage_mlx.loading.weights import WeightError

PROMPTS = [
    "A photo of a red fox sitting in the snow, golden hour.",
    "一只猫坐在窗台上，阳光明媚，高清摄影",
    "",
    "mixed 中文 and English with emoji 🦊✨ and a long tail " + "of many words " * 160,
    "Hi",
]
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_qwen3(seed=3)


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return ZImageTokenizer.from_dir(qwen_tokenizer_dir)


def diffusers_embeds(model, tokenizer_dir, prompts, max_sequence_length=512):
    from diffusers import ZImagePipeline
    from transformers import AutoTokenizer

    pipe = ZImagePipeline(
        scheduler=None,
        vae=None,
        text_encoder=model,
        tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir)),
        transformer=None,
    )
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(
            list(prompts), device="cpu", do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
        )
    assert neg == []
    return [e.float().numpy() for e in pos]


@pytest.fixture(scope="module")
def reference(tiny, qwen_tokenizer_dir):
    return diffusers_embeds(tiny, qwen_tokenizer_dir, PROMPTS)


@pytest.mark.parametrize(
    "with_model_prefix,shard,with_lm_head",
    [(True, True, True), (False, True, False), (True, False, False)],
)
def test_matches_diffusers(tmp_path, tiny, tokenizer, reference, with_model_prefix, shard, with_lm_head):
    d = save_tiny_text_encoder(
        tmp_path / "text_encoder", tiny, with_model_prefix=with_model_prefix, shard=shard, with_lm_head=with_lm_head
    )
    assert (d / "model.safetensors.index.json").is_file() == shard
    encoder = load_component("text_encoder", d, mx.float32)
    ours = encode_prompts(tokenizer, encoder, PROMPTS)
    assert len(ours) == len(reference)
    errs = []
    for o, r in zip(ours, reference):
        assert o.dtype == mx.float32
        assert tuple(o.shape) == r.shape  # same L_i: only the real tokens
        errs.append(rel_err(to_numpy(o), r))
    print(f"max rel err per prompt: {[f'{e:.2e}' for e in errs]}")
    assert max(errs) <= TOL, errs
    assert ours[2].shape[0] == 8  # empty prompt: just the template tokens


def test_truncated_prompt_matches_diffusers(tmp_path, tiny, tokenizer, qwen_tokenizer_dir):
    prompts = ["a castle on a hill, " * 200, "short"]
    ref = diffusers_embeds(tiny, qwen_tokenizer_dir, prompts, max_sequence_length=96)
    encoder = load_component("text_encoder", save_tiny_text_encoder(tmp_path / "te", tiny), mx.float32)
    with pytest.warns(UserWarning, match="were cut"):
        ours = encode_prompts(tokenizer, encoder, prompts, max_length=96)
    assert ours[0].shape == (96, 64)
    for o, r in zip(ours, ref):
        assert rel_err(to_numpy(o), r) <= TOL


def test_bfloat16(tmp_path, tiny, tokenizer, reference):
    save_tiny_text_encoder(tmp_path / "text_encoder", tiny, dtype=torch.bfloat16)
    encoder = load_component("text_encoder", tmp_path / "text_encoder", mx.bfloat16)
    assert encoder.dtype == mx.bfloat16
    ours = encode_prompts(tokenizer, encoder, PROMPTS[:3])
    for o, r in zip(ours, reference):
        assert o.dtype == mx.bfloat16
        assert rel_err(to_numpy(o), r) < 0.05


def test_identical_prompts_encoded_once(tmp_path, tiny, tokenizer, reference):
    encoder = load_component("text_encoder", save_tiny_text_encoder(tmp_path / "te", tiny), mx.float32)
    a, b, c = encode_prompts(tokenizer, encoder, ["Hi", "", "Hi"])
    assert a is c
    assert rel_err(to_numpy(b), reference[2]) <= TOL
    (single,) = encode_prompts(tokenizer, encoder, "Hi")
    assert np.array_equal(to_numpy(single), to_numpy(a))


def test_last_layer_and_norm_kept_only_when_stored(tmp_path, tiny, tokenizer, reference):
    n = tiny.config.num_hidden_layers
    full = Qwen3Encoder(Qwen3EncoderConfig.from_dict(text_encoder_config_dict(tiny)))
    assert len(full.layers) == n and "norm" in full     # kept for prompt enhancement, never run to encode
    encoder = Qwen3Encoder(Qwen3EncoderConfig.from_dict({**text_encoder_config_dict(tiny), "final_layers": False}))
    assert len(encoder.layers) == n - 1
    names = {k for k, _ in __import__("mlx.utils").utils.tree_flatten(encoder.parameters())}
    assert not any(k.startswith(f"layers.{n - 1}.") or k.startswith("norm") or "lm_head" in k for k in names)

    # A checkpoint without the last layer and the final norm loads and gives the same result.
    d = save_tiny_text_encoder(tmp_path / "te", tiny, shard=False)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    sd = {k: v for k, v in sd.items() if not (k.startswith(f"model.layers.{n - 1}.") or k == "model.norm.weight")}
    save_file(sd, str(d / "model.safetensors"))
    encoder = load_component("text_encoder", d, mx.float32)
    (out,) = encode_prompts(tokenizer, encoder, [PROMPTS[0]])
    assert rel_err(to_numpy(out), reference[0]) <= TOL


def _rewrite(d, fn):
    from safetensors.torch import load_file, save_file

    sd = fn(load_file(str(d / "model.safetensors")))
    save_file(sd, str(d / "model.safetensors"))


def test_missing_tensor(tmp_path, tiny):
    d = save_tiny_text_encoder(tmp_path / "te", tiny, shard=False)
    _rewrite(d, lambda sd: {k: v for k, v in sd.items() if k != "model.layers.2.mlp.up_proj.weight"})
    with pytest.raises(WeightError, match=r"layers\.2\.mlp\.up_proj\.weight"):
        load_component("text_encoder", d, mx.float32)


def test_wrong_shape(tmp_path, tiny):
    d = save_tiny_text_encoder(tmp_path / "te", tiny, shard=False)
    key = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(d, lambda sd: {**sd, key: sd[key].t().contiguous()})
    with pytest.raises(WeightError, match=r"layers\.1\.self_attn\.k_proj\.weight.*\(64, 32\).*\(32, 64\)"):
        load_component("text_encoder", d, mx.float32)


def test_config_from_dict_forms(tiny):
    legacy = Qwen3EncoderConfig.from_dict(text_encoder_config_dict(tiny))
    modern = Qwen3EncoderConfig.from_dict(tiny.config.to_dict())  # transformers 5: rope_parameters
    assert legacy == modern
    assert legacy.rope_theta == 1e6 and legacy.num_encoder_layers == 4
    real = Qwen3EncoderConfig.from_dict(
        {"hidden_size": 2560, "num_hidden_layers": 36, "rope_theta": 1000000, "rope_scaling": None, "head_dim": 128}
    )
    assert real == Qwen3EncoderConfig()
    with pytest.raises(ValueError, match="yarn"):
        Qwen3EncoderConfig.from_dict({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_config_missing(tmp_path):
    with pytest.raises(WeightError, match="config"):
        load_component("text_encoder", tmp_path, mx.float32)
