"""Prompt enhancement with the text encoder's own Qwen3 (pipeline/enhance.py) vs transformers'
Qwen3ForCausalLM.generate on a tiny random encoder with tied embeddings (float32, CPU)."""

import math
import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from conftest import to_numpy
from make_pipeline import save_tiny_pipeline
from make_text_encoder import make_tiny_qwen3, save_tiny_text_encoder, text_encoder_config_dict
from zimage_mlx import ZImagePipeline
from zimage_mlx.loading.components import load_component
from zimage_mlx.loading.convert import convert
from zimage_mlx.memory import component_weight_bytes
from zimage_mlx.models.text_encoder import Qwen3Encoder, Qwen3EncoderConfig, causal_lm, encode_prompts
from zimage_mlx.models.tokenizer import ZImageTokenizer
from zimage_mlx.pipeline import enhance
from zimage_mlx.pipeline.enhance import chat_ids, generate_ids, strip_thinking

SYSTEM = "Rewrite the user's idea as a detailed image prompt."
PROMPTS = ["a cat", "一只猫坐在窗台上", 'a shop sign that says "OPEN 24/7"']


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_qwen3(seed=5)


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return ZImageTokenizer.from_dir(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, tiny):
    # with a random lm_head.weight in the file (untied): it must be ignored, the embedding is the head
    d = save_tiny_text_encoder(tmp_path_factory.mktemp("te") / "text_encoder", tiny, with_lm_head=True)
    return load_component("text_encoder", d, mx.float32)


@pytest.fixture(scope="module")
def reference(tiny):
    from transformers import Qwen3ForCausalLM

    lm = Qwen3ForCausalLM(tiny.config).to(torch.float32).eval()
    lm.model.load_state_dict(tiny.state_dict())
    lm.tie_weights()
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    return lm


@pytest.fixture(scope="module")
def hf_tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))


def hf_chat_ids(hf_tokenizer, prompt, system=SYSTEM):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False,
                                           tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, prompt):
    assert chat_ids(tokenizer, prompt, SYSTEM) == hf_chat_ids(hf_tokenizer, prompt)
    assert chat_ids(tokenizer, prompt, "") == hf_chat_ids(hf_tokenizer, prompt, system=None)
    assert chat_ids(tokenizer, prompt, SYSTEM)[-4:] == tokenizer.ids("<think>\n\n</think>\n\n")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_is_token_exact_vs_transformers(encoder, reference, tokenizer, hf_tokenizer, prompt):
    ids = hf_chat_ids(hf_tokenizer, prompt)
    stop = list(tokenizer.stop_ids)
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=24, do_sample=False, eos_token_id=stop, pad_token_id=stop[-1])
    expected = out[0, len(ids):].tolist()
    if expected and expected[-1] in stop:
        expected = expected[:-1]
    ours = generate_ids(causal_lm(encoder), ids, tokenizer.stop_ids, 24, temperature=0.0)
    assert ours == expected and len(expected) >= 8
    # the public function: the same tokens, decoded and cleaned
    text = enhance.enhance_prompt(tokenizer, encoder, prompt, system_prompt=SYSTEM, max_new_tokens=24,
                                  temperature=0)
    assert text == (strip_thinking(tokenizer.decode(expected)) or prompt)


def test_causal_lm_shares_the_encoders_arrays(encoder):
    lm = causal_lm(encoder)
    n = encoder.config.num_hidden_layers
    assert len(lm.model.layers) == n and lm.model.layers[n - 1] is encoder.layers[n - 1]
    assert lm.model.embed_tokens is encoder.embed_tokens and lm.model.norm is encoder.norm
    assert not hasattr(lm, "lm_head")   # tied: the embedding is the output head


def test_sampling_is_seeded(encoder, tokenizer):
    kw = dict(system_prompt=SYSTEM, max_new_tokens=12, temperature=0.7)
    a = enhance.enhance_prompt(tokenizer, encoder, "a red fox", seed=7, **kw)
    b = enhance.enhance_prompt(tokenizer, encoder, "a red fox", seed=7, **kw)
    assert a == b
    ids = chat_ids(tokenizer, "a red fox", SYSTEM)
    runs = {tuple(generate_ids(causal_lm(encoder), ids, (), 12, 0.7, seed=s)) for s in range(4)}
    assert len(runs) > 1            # the seed matters


def test_strip_thinking():
    assert strip_thinking("<think>\nplan it\n</think>\n\nA cat on a mat.") == "A cat on a mat."
    assert strip_thinking("A cat</think> on a mat <think>") == "A cat on a mat"


def test_thinking_in_reply_is_stripped(encoder, tokenizer, monkeypatch):
    reply = tokenizer.ids("<think>\nshort idea, expand it\n</think>\n\nA tabby cat asleep on a sunny windowsill.")
    monkeypatch.setattr(enhance, "generate_ids", lambda *a, **k: reply)
    assert enhance.enhance_prompt(tokenizer, encoder, "a cat") == "A tabby cat asleep on a sunny windowsill."
    monkeypatch.setattr(enhance, "generate_ids", lambda *a, **k: tokenizer.ids("<think>\n\n</think>"))
    with pytest.warns(UserWarning, match="reply was empty"):
        assert enhance.enhance_prompt(tokenizer, encoder, "a cat") == "a cat"


def test_long_prompt_is_cut_with_a_note(tokenizer, hf_tokenizer):
    prompt = "a very long description " * 200
    with pytest.warns(UserWarning, match=r"only its first 512 were enhanced"):
        ids = chat_ids(tokenizer, prompt, SYSTEM)
    assert len(ids) <= 512 + len(chat_ids(tokenizer, "", SYSTEM)) + 2


def test_bad_arguments(encoder, tokenizer):
    for kw, match in [(dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
                      (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens")]:
        with pytest.raises(ValueError, match=match):
            enhance.enhance_prompt(tokenizer, encoder, "a cat", **kw)
    with pytest.raises(ValueError, match="prompt must be a string"):
        enhance.enhance_prompt(tokenizer, encoder, None)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory, qwen_tokenizer_dir):
    root, _ = save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "hf", qwen_tokenizer_dir, seed=2)
    return root, ZImagePipeline.from_pretrained(root, dtype="float32")


def test_pipeline_method_and_encode_unchanged(tiny_pipe):
    root, pipe = tiny_pipe
    for empty in ("", "   "):
        assert pipe.enhance_prompt(empty) == empty
    assert pipe._models["text_encoder"] is None           # an empty prompt loads nothing
    with pytest.raises(ValueError, match="temperature"):
        pipe.enhance_prompt("a cat", temperature=5)
    assert pipe._models["text_encoder"] is None           # checked before loading
    out = pipe.enhance_prompt("a cat", max_new_tokens=10, temperature=0)
    assert isinstance(out, str) and out and pipe.timings["enhance"] > 0
    assert out == pipe.enhance_prompt("a cat", system_prompt=None, max_new_tokens=10, temperature=0)
    (feats,) = pipe.encode_prompt(out)                     # the enhanced prompt feeds the encoder as given
    (direct,) = encode_prompts(pipe.tokenizer, pipe.text_encoder, [out])
    assert np.array_equal(to_numpy(feats), to_numpy(direct))
    assert feats.shape[0] == len(pipe.tokenizer.encode([out])[0])


def test_conversion_keeps_the_last_layer_and_norm(tiny_pipe, tmp_path):
    root, _ = tiny_pipe
    out = convert(tmp_path / "mlx", root, dtype="float32", hash_sources=False, log=lambda m: None)
    pipe = ZImagePipeline.from_pretrained(out)
    assert pipe.configs["text_encoder"]["final_layers"] is True
    enc = pipe.text_encoder
    n = enc.config.num_hidden_layers
    assert len(enc.layers) == n and hasattr(enc, "norm")
    assert pipe.enhance_prompt("a cat", max_new_tokens=6, temperature=0) == \
        ZImagePipeline.from_pretrained(root, dtype="float32").enhance_prompt("a cat", max_new_tokens=6, temperature=0)


def test_old_conversion_without_final_layers_still_encodes(tiny, tmp_path, tokenizer):
    """An MLX conversion made before the last layer was kept: the encoder loads it (35 of 36 layers), encodes
    the same, and enhancement says to convert again."""
    full = load_component("text_encoder", save_tiny_text_encoder(tmp_path / "te", tiny), mx.float32)
    n = tiny.config.num_hidden_layers
    cut = {k: v for k, v in tree_flatten(full.parameters())
           if not (k.startswith(f"layers.{n - 1}.") or k == "norm.weight")}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(__import__("json").dumps(text_encoder_config_dict(tiny)))
    mx.save_safetensors(str(tmp_path / "old" / "model.safetensors"), cut)
    old = load_component("text_encoder", tmp_path / "old", mx.float32, saved={"dtype": "float32", "bits": None})
    assert len(old.layers) == n - 1 and not hasattr(old, "norm")
    a, = encode_prompts(tokenizer, old, ["a cat"])
    b, = encode_prompts(tokenizer, full, ["a cat"])
    assert np.array_equal(to_numpy(a), to_numpy(b))
    with pytest.raises(ValueError, match="convert the model again"):
        enhance.enhance_prompt(tokenizer, old, "a cat")


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_memory_plan_counts_one_layer_and_norm(bits):
    """The real Qwen3-4B config: the kept layer + norm add exactly one layer's and the norm's bytes."""
    cfg = Qwen3EncoderConfig()
    full = component_weight_bytes("text_encoder", {}, mx.bfloat16, bits, 64)
    part = component_weight_bytes("text_encoder", {"final_layers": False}, mx.bfloat16, bits, 64)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    matrices = 2 * h * q + 2 * h * kv + 3 * h * inter
    per_weight = (bits / 8 + 2 * 2 / 64) if bits else 2
    vectors = 2 * h + 2 * cfg.head_dim + h                 # the layer's two norms, q/k norms, the final norm
    assert full - part == pytest.approx(matrices * per_weight + vectors * 2, abs=1)
    assert (full - part) / 1e9 == pytest.approx({None: 0.2019, 8: 0.1072, 4: 0.0568}[bits], abs=1e-3)
    assert math.isclose((full - part) / part, 0.0257, abs_tol=5e-4)


@pytest.fixture
def short_replies(monkeypatch):
    """The random tiny model never says <|im_end|>: cap its replies at 8 tokens so the app tests stay quick."""
    full = ZImagePipeline.enhance_prompt
    monkeypatch.setattr(ZImagePipeline, "enhance_prompt",
                        lambda self, prompt, **kw: full(self, prompt, **{"max_new_tokens": 8, **kw}))


def test_cli_enhance_prints_and_stores_both_prompts(tiny_pipe, tmp_path, short_replies):
    from click.testing import CliRunner
    from PIL import Image

    from zimage_mlx.apps.cli import generate
    from zimage_mlx.apps.pngfile import read_png_params

    root, pipe = tiny_pipe
    out = tmp_path / "cat.png"
    r = CliRunner().invoke(generate, ["a cat", "--enhance", "--seed", "3", "-m", str(root), "-o", str(out),
                                      "--quantize", "none", "--dtype", "float32", "--steps", "1", "-W", "32",
                                      "-H", "32"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    expected = pipe.enhance_prompt("a cat", seed=3)
    assert f"enhanced prompt: {expected}" in r.output, r.output
    assert r.stdout.strip() == str(out)
    params = read_png_params(out)
    assert params["prompt"] == expected and params["original_prompt"] == "a cat"
    with Image.open(out) as im:
        assert im.size == (32, 32)


def test_server_enhance_prompt_field(tiny_pipe, short_replies):
    import base64
    import io

    from PIL import Image
    from starlette.testclient import TestClient

    from zimage_mlx.apps.server import ServerConfig, create_app

    _, pipe = tiny_pipe
    with TestClient(create_app(pipe, ServerConfig(default_size=32, model="tiny")),
                    raise_server_exceptions=False) as c:
        body = {"prompt": "a red fox", "size": "32x32", "num_inference_steps": 1, "seed": 4}
        r = c.post("/v1/images/generations", json={**body, "enhance_prompt": True})
        assert r.status_code == 200, r.text
        item = r.json()["data"][0]
        expected = c.app.state.worker.call(lambda p: p.enhance_prompt("a red fox", seed=4), 60)
        assert item["revised_prompt"] == expected
        with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as im:
            im.load()
            assert im.text["prompt"] == expected and im.text["original_prompt"] == "a red fox"
        plain = c.post("/v1/images/generations", json=body).json()["data"][0]
        assert "revised_prompt" not in plain
        bad = c.post("/v1/images/generations", json={**body, "enhance_prompt": "yes"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "enhance_prompt"
