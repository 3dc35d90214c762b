"""Conversion to the MLX layout, ComfyUI single files, quantization, memory planning, hub caching, robustness."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import psnr, rel_err
from make_pipeline import save_tiny_pipeline
from make_vae import save_tiny_vae_ldm

from zimage_mlx import ZImagePipeline
from zimage_mlx.loading import components
from zimage_mlx import memory
from zimage_mlx.loading import quantize as q
from zimage_mlx.apps.cli import convert_command
from zimage_mlx.loading.convert import convert
from zimage_mlx.loading.single_files import detect_file_kind
from zimage_mlx.loading.weights import WeightError, read_component

H, W = 64, 48
PROMPT = "a small red boat on a calm lake"


def comfy_transformer_state(model) -> dict:
    """diffusers transformer tensors → ComfyUI single-file names (fused qkv, out, q_norm/k_norm, prefix)."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out = {}
    for k in list(sd):
        if ".attention.to_q." in k:
            stem = k.split(".attention.to_q.")[0]
            out[f"{stem}.attention.qkv.weight"] = torch.cat(
                [sd.pop(f"{stem}.attention.to_{x}.weight") for x in "qkv"], dim=0)
    for k, v in sd.items():
        k = k.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        k = k.replace(".attention.to_out.0.", ".attention.out.")
        k = k.replace(".attention.norm_q.", ".attention.q_norm.").replace(".attention.norm_k.", ".attention.k_norm.")
        out[k] = v
    out = {"model.diffusion_model." + k: v for k, v in out.items()}
    out["model.diffusion_model.norm_final.weight"] = torch.ones(model.config.dim)   # leftover in AIO files
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen_tokenizer_dir):
    base = tmp_path_factory.mktemp("convert")
    root, models = save_tiny_pipeline(base / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    comfy = base / "comfy"
    comfy.mkdir()
    save_file(comfy_transformer_state(models["transformer"]), str(comfy / "z_image_turbo_bf16.safetensors"))
    te_sd = {"model." + k: v.detach().clone().contiguous() for k, v in models["text_encoder"].state_dict().items()}
    save_file(te_sd, str(comfy / "qwen_3_4b.safetensors"))
    save_tiny_vae_ldm(comfy / "ae.safetensors", models["vae"])
    latents = torch.randn((1, 16, 2 * (H // 16), 2 * (W // 16)), generator=torch.Generator().manual_seed(0)).numpy()
    reference = _run(ZImagePipeline.from_pretrained(root, dtype="float32"), latents)
    return base, root, comfy, latents, reference


def _run(pipe, latents, steps=4):
    return pipe(prompt=PROMPT, height=H, width=W, latents=latents, num_inference_steps=steps,
                output_type="np").images


def test_hf_tree_converted_matches_unconverted(tiny, tmp_path):
    _, root, _, latents, reference = tiny
    out = convert(tmp_path / "mlx", root, dtype="float32", log=lambda m: None)
    manifest = json.loads((out / "zimage_mlx.json").read_text())
    assert manifest["format_version"] == components.FORMAT_VERSION and manifest["variant"] == "turbo"
    assert all(v.startswith("sha256:") for v in manifest["source"]["files"].values())
    assert manifest["components"]["transformer"] == {**manifest["components"]["transformer"], "dtype": "float32",
                                                     "bits": None}
    # MLX layout: conv weights already OHWI, no `model.` prefixes, no lm_head; the final norm and the last layer
    # are kept (prompt enhancement, docs/enhance.md).
    vae = read_component(out / "vae")
    assert vae["decoder.conv_in.weight"].shape[-1] == 16
    te_keys = set(read_component(out / "text_encoder"))
    assert not any(k.startswith(("model.", "lm_head")) for k in te_keys)
    assert "norm.weight" in te_keys
    images = _run(ZImagePipeline.from_pretrained(out), latents)
    db = psnr(images, reference)
    print(f"HF tree → MLX layout: {db:.1f} dB")
    assert db >= 60


def test_comfyui_single_files_match_hf_tree(tiny, tmp_path, qwen_tokenizer_dir):
    _, root, comfy, latents, reference = tiny
    files = dict(transformer=comfy / "z_image_turbo_bf16.safetensors", text_encoder=comfy / "qwen_3_4b.safetensors",
                 vae=comfy / "ae.safetensors", tokenizer=qwen_tokenizer_dir, dtype="float32", log=lambda m: None)
    with pytest.raises(WeightError, match="head_dim 48.*--transformer-config"):   # tiny head_dim: axes unknown
        convert(tmp_path / "mlx", **files)
    out = convert(tmp_path / "mlx", transformer_config=root / "transformer" / "config.json",
                  vae_config=root / "vae" / "config.json", **files)
    images = _run(ZImagePipeline.from_pretrained(out), latents)
    db = psnr(images, reference)
    print(f"ComfyUI files → MLX layout: {db:.1f} dB")
    assert db >= 60


def test_saved_quantized_model_reloads_bit_identical(tiny, tmp_path):
    _, root, _, latents, _ = tiny
    on_load = _run(ZImagePipeline.from_pretrained(root, dtype="float32", quantize=4), latents)
    out = convert(tmp_path / "q4", root, dtype="float32", quantize=4, log=lambda m: None)
    pipe = ZImagePipeline.from_pretrained(out)
    np.testing.assert_array_equal(_run(pipe, latents), on_load)
    assert q.quantized_layers(pipe.transformer) and q.quantized_layers(pipe.text_encoder)
    assert pipe.quantization == "transformer 4-bit, text encoder 4-bit"   # what PNG metadata records
    again = _run(ZImagePipeline.from_pretrained(out), latents)
    np.testing.assert_array_equal(again, on_load)


def test_quantization_policy_on_real_names():
    from zimage_mlx.models.transformer import ZImageTransformer, ZImageTransformerConfig

    model = ZImageTransformer(ZImageTransformerConfig(dim=256, n_heads=2, n_layers=1, n_refiner_layers=1,
                                                      cap_feat_dim=128, axes_dims=[32, 48, 48]))
    q.prepare_for_quantized_load(model, 8, 64)
    names = set(q.quantized_layers(model))
    assert "layers.0.attention.to_q" in names and "layers.0.adaLN_modulation.0" in names
    assert "context_refiner.0.feed_forward.w1" in names
    assert not any(n.startswith(q.KEEP_FLOAT) for n in names)
    # FFN hidden int(256/3*8) = 682 does not divide by 64: w2 stays float, w1/w3 (input 256) are quantized.
    assert "layers.0.feed_forward.w2" not in names and "layers.0.feed_forward.w1" in names


@pytest.fixture(scope="module")
def realistic(tmp_path_factory, qwen_tokenizer_dir):
    """Tiny but with every quantizable dim a multiple of 64 (dim 384 → FFN 1024, head_dim 128)."""
    root, _ = save_tiny_pipeline(tmp_path_factory.mktemp("realistic") / "Z-Image-Turbo-r", qwen_tokenizer_dir,
                                 transformer_overrides=dict(dim=384, n_heads=3, n_kv_heads=3, axes_dims=[32, 48, 48],
                                                            n_layers=3))
    latents = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(3)).numpy()
    return root, latents


def test_8bit_and_4bit_quality(realistic):
    root, latents = realistic

    def run(bits):
        pipe = ZImagePipeline.from_pretrained(root, dtype="float32", quantize=bits)
        return pipe(prompt=PROMPT, height=64, width=64, latents=latents, num_inference_steps=8,
                    output_type="np").images

    ref = run(None)
    db8, db4 = psnr(run(8), ref), psnr(run(4), ref)
    mixed = psnr(run({"transformer": 4, "text_encoder": 8}), ref)
    print(f"quantized vs float: 8-bit {db8:.1f} dB, 4-bit {db4:.1f} dB, DiT 4 / TE 8 {mixed:.1f} dB")
    assert db8 >= 30 and db4 >= 18 and mixed >= 18


@pytest.mark.parametrize("bits, bias", [(4, False), (8, True)])
def test_dequantizing_linear_is_the_quantized_matmul(bits, bias):
    """DequantizingLinear (the CPU backend's quantized layer) computes what QuantizedLinear's quantized_matmul does,
    up to float rounding, and holds the same packed parameters."""
    import mlx.nn as nn

    lin = nn.Linear(128, 96, bias=bias)
    lin.update({"weight": mx.random.normal((96, 128), key=mx.random.key(1)) * 0.1,
                **({"bias": mx.random.normal((96,), key=mx.random.key(2))} if bias else {})})
    ref = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=bits)
    layer = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=bits)
    model = nn.Sequential(layer)
    assert q.dequantize_matmuls(model) == 1 and type(model.layers[0]) is q.DequantizingLinear
    assert model.layers[0] is layer and q.quantized_layers(model) == ["layers.0"]   # same object, still quantized
    x = mx.random.normal((2, 5, 128), key=mx.random.key(3))
    want, got = np.array(ref(x)), np.array(layer(x))
    assert rel_err(got, want) <= 1e-5
    # the float weight it multiplies by is the dequantized one, not the original
    assert rel_err(got, np.array(lin(x))) > 1e-4


def test_quantized_pipeline_on_the_cpu_multiplies_in_float(realistic):
    """On MLX's CPU backend a quantized pipeline's layers dequantize (quantize.DequantizingLinear): the images equal
    those of MLX's quantized_matmul (the path Metal and CUDA keep) up to float rounding."""
    import mlx.nn as nn

    root, latents = realistic

    def run(dequantize):
        pipe = ZImagePipeline.from_pretrained(root, dtype="float32", quantize=4, fused_projections=True)
        pipe.dequantize_matmuls = dequantize          # before any model loads (they load on first use)
        images = pipe(prompt=PROMPT, height=64, width=64, latents=latents, num_inference_steps=2,
                      output_type="np").images
        kinds = {type(m) for name in ("transformer", "text_encoder")
                 for _, m in getattr(pipe, name).named_modules() if isinstance(m, nn.QuantizedLinear)}
        return images, kinds

    assert ZImagePipeline.from_pretrained(root, dtype="float32", quantize=4).dequantize_matmuls   # the CPU default
    floats, kinds = run(True)
    assert kinds == {q.DequantizingLinear}                      # fused to_qkv / w13 and the text encoder's layers
    quantized, kinds = run(False)
    assert kinds == {nn.QuantizedLinear}
    # models passed to the constructor are prepared as loaded ones are
    loaded = ZImagePipeline.from_pretrained(root, dtype="float32", quantize=4)
    loaded.dequantize_matmuls = False
    given = ZImagePipeline(tokenizer=loaded.tokenizer, scheduler_config=loaded.scheduler_config, vae=loaded.vae,
                           transformer=loaded.transformer, text_encoder=loaded.text_encoder)
    assert {type(m) for name in ("transformer", "text_encoder") for _, m in getattr(given, name).named_modules()
            if isinstance(m, nn.QuantizedLinear)} == {q.DequantizingLinear}
    print(f"dequantized vs quantized_matmul pipeline: rel err {rel_err(floats, quantized):.1e}")
    assert rel_err(floats, quantized) <= 2e-5


def test_dequantized_weights_in_flight_do_not_grow_with_depth():
    """The CPU's float copies of quantized weights are made when their matmul can run: the peak above the weights is
    the same for 8 and 16 layers (without the dependency on the input, the breadth-first schedule made it grow with
    depth), within memory.dequantized_weights_bytes; the plan adds that term on the CPU for quantized models only."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from zimage_mlx.models.text_encoder import Qwen3Encoder, Qwen3EncoderConfig

    def peak_above_weights(layers):
        cfg = Qwen3EncoderConfig(hidden_size=512, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=128, num_hidden_layers=layers, vocab_size=256)
        model = Qwen3Encoder(cfg)
        model.update(tree_unflatten([(k, mx.random.normal(v.shape, key=mx.random.key(i)) * 0.02)
                                     for i, (k, v) in enumerate(tree_flatten(model.parameters()))]))
        nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: q.should_quantize(p, m, 64))
        q.dequantize_matmuls(model)
        ids = mx.arange(16, dtype=mx.int32)[None]
        mx.eval(model.parameters(), ids)
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(model(ids))
        return mx.get_peak_memory() - before

    shallow, deep = peak_above_weights(8), peak_above_weights(16)
    bound = memory.dequantized_weights_bytes("text_encoder", {"hidden_size": 512, "intermediate_size": 2048},
                                             mx.float32)
    print(f"dequantized weights in flight: 8 layers {shallow / 1e6:.1f} MB, 16 layers {deep / 1e6:.1f} MB, "
          f"estimate {bound / 1e6:.1f} MB")
    assert deep <= 1.05 * shallow and deep <= bound        # (without the dependency: 44 MB, then 69 MB)
    configs, bits = _real_configs(), {"transformer": 4, "text_encoder": 8}
    cpu, gpu = (memory.predict_stages(configs, mx.float32, bits, 64, 512, 512, cpu=c) for c in (True, False))
    plain_cpu, plain_gpu = (memory.predict_stages(configs, mx.float32, {}, 64, 512, 512, cpu=c) for c in (True, False))
    assert cpu["encode"] - gpu["encode"] == memory.dequantized_weights_bytes(
        "text_encoder", configs["text_encoder"], mx.float32)
    assert plain_cpu["encode"] == plain_gpu["encode"]          # float models multiply as they are


# ---------------------------------------------------------------------------- robustness
def test_truncated_safetensors_is_a_clear_error(tiny, tmp_path):
    _, root, _, _, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    shard = sorted((bad / "transformer").glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightError, match="truncated or corrupt"):
        ZImagePipeline.from_pretrained(bad, dtype="float32").transformer
    shard.write_bytes(b"\x00" * 100)
    with pytest.raises(WeightError, match="not a safetensors file"):
        ZImagePipeline.from_pretrained(bad, dtype="float32").transformer


def test_missing_shard_listed_in_index(tiny, tmp_path):
    _, root, _, _, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    shard = sorted((bad / "text_encoder").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightError, match=f"lists shard.*{shard.name}.*missing"):
        ZImagePipeline.from_pretrained(bad, dtype="float32").text_encoder


def test_wrong_shape_and_dtype(tiny, tmp_path):
    _, root, _, _, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    vae_file = bad / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    sd = load_file(str(vae_file))
    sd["decoder.conv_out.bias"] = torch.zeros(5)
    save_file(sd, str(vae_file))
    with pytest.raises(WeightError, match=r"decoder\.conv_out\.bias.*\(5,\).*\(3,\)"):
        ZImagePipeline.from_pretrained(bad, dtype="float32").vae
    sd["decoder.conv_out.bias"] = torch.zeros(3, dtype=torch.int32)
    save_file(sd, str(vae_file))
    with pytest.raises(WeightError, match=r"decoder\.conv_out\.bias.*dtype"):
        ZImagePipeline.from_pretrained(bad, dtype="float32").vae


def test_non_empty_destination_needs_overwrite(tiny, tmp_path):
    _, root, _, _, _ = tiny
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(WeightError, match="--overwrite"):
        convert(dst, root, dtype="float32", log=lambda m: None)
    # --overwrite replaces only an earlier conversion: a folder of someone's files is never emptied
    with pytest.raises(WeightError, match="not a zimage_mlx conversion"):
        convert(dst, root, dtype="float32", overwrite=True, log=lambda m: None)
    assert (dst / "keep.txt").read_text() == "mine"
    (dst / "keep.txt").unlink()
    convert(dst, root, dtype="float32", log=lambda m: None, hash_sources=False)
    (dst / "stale.txt").write_text("left by an old conversion")
    convert(dst, root, dtype="float32", overwrite=True, log=lambda m: None, hash_sources=False)
    assert components.is_mlx_dir(dst) and not (dst / "stale.txt").exists()
    assert not list(tmp_path.glob(".dst.*")), "temporary directories left behind"


def test_failed_conversion_leaves_nothing(tiny, tmp_path, monkeypatch):
    _, root, _, _, _ = tiny
    import zimage_mlx.loading.convert as conv

    real = conv.save_component

    def boom(directory, model, config):
        if directory.name == "vae":
            raise KeyboardInterrupt
        return real(directory, model, config)

    monkeypatch.setattr(conv, "save_component", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "dst", root, dtype="float32", log=lambda m: None)
    assert not (tmp_path / "dst").exists() and not list(tmp_path.iterdir())


def test_killed_conversion_leaves_nothing_loadable(tiny, tmp_path):
    """SIGKILL in the middle (no cleanup runs): the destination does not exist, the leftover is not a model,
    and the next conversion removes it."""
    _, root, _, _, _ = tiny
    script = textwrap.dedent(f"""
        import os, signal
        import zimage_mlx.loading.convert as conv
        real = conv.save_component
        def die(directory, model, config):
            if directory.name == "transformer":
                os.kill(os.getpid(), signal.SIGKILL)
            return real(directory, model, config)
        conv.save_component = die
        conv.convert({str(tmp_path / 'dst')!r}, {str(root)!r}, dtype="float32")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -9
    assert not (tmp_path / "dst").exists()
    leftovers = list(tmp_path.glob(".dst.partial-*"))
    assert leftovers and not components.is_mlx_dir(leftovers[0])
    with pytest.raises(WeightError):
        ZImagePipeline.from_pretrained(leftovers[0])
    convert(tmp_path / "dst", root, dtype="float32", log=lambda m: None, hash_sources=False)
    assert not list(tmp_path.glob(".dst.partial-*"))


@pytest.mark.parametrize("kind,keys,message", [
    ("flux", {"double_blocks.0.img_attn.qkv.weight": (8, 4)}, "FLUX transformer"),
    ("sdxl", {"model.diffusion_model.input_blocks.0.0.weight": (4, 4)}, "SDXL"),
    ("lora", {"diffusion_model.layers.0.attention.to_q.lora_A.weight": (4, 8)}, "LoRA"),
    ("sdvae", {"decoder.conv_in.weight": (512, 4, 3, 3)}, "4-channel VAE"),
])
def test_wrong_kind_of_file_is_named(tmp_path, kind, keys, message):
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(WeightError, match=message):
        detect_file_kind(path)


def test_gguf_and_pickle_are_refused_without_unpickling(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(WeightError, match="GGUF"):
        detect_file_kind(gguf)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    ckpt = tmp_path / "model.ckpt"
    torch.save({"x": Evil()}, ckpt)
    with pytest.raises(WeightError, match="pickle"):
        detect_file_kind(ckpt)
    assert not marker.exists()


def test_safetensors_whose_header_length_starts_with_0x80_is_not_a_pickle(tmp_path):
    """The first byte of a safetensors file is the low byte of its header length: 0x80 is as valid as any."""
    import json
    import struct

    data = np.zeros((4, 16, 3, 3), np.float32).tobytes()
    header = json.dumps({"decoder.conv_in.weight": {"dtype": "F32", "shape": [4, 16, 3, 3],
                                                    "data_offsets": [0, len(data)]}}).encode()
    header += b" " * ((0x80 - len(header)) % 256)
    path = tmp_path / "ae.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    assert path.read_bytes()[0] == 0x80
    assert detect_file_kind(path) == "vae"


def test_component_given_in_the_wrong_slot(tiny, tmp_path, qwen_tokenizer_dir):
    _, _, comfy, _, _ = tiny
    with pytest.raises(WeightError, match="given as the transformer, but it holds a FLUX 16-channel VAE"):
        convert(tmp_path / "x", transformer=comfy / "ae.safetensors", text_encoder=comfy / "qwen_3_4b.safetensors",
                vae=comfy / "ae.safetensors", tokenizer=qwen_tokenizer_dir, log=lambda m: None)
    assert not (tmp_path / "x").exists()


def test_convert_cli(tiny, tmp_path):
    _, root, _, _, _ = tiny
    runner = CliRunner()
    res = runner.invoke(convert_command, [str(root), "-o", str(tmp_path / "m"), "--dtype", "float32",
                                          "--transformer-bits", "4", "--text-encoder-bits", "8"])
    assert res.exit_code == 0, res.output
    manifest = components.read_manifest(tmp_path / "m")
    assert manifest["components"]["transformer"]["bits"] == 4 and manifest["components"]["text_encoder"]["bits"] == 8
    assert manifest["components"]["vae"]["bits"] is None
    res = runner.invoke(convert_command, [str(root), "-o", str(tmp_path / "m")])
    assert res.exit_code == 2 and "--overwrite" in res.output and "Traceback" not in res.output
    res = runner.invoke(convert_command, [str(tmp_path / "nope"), "-o", str(tmp_path / "n")])
    assert res.exit_code == 1 and "no such directory" in res.output


# ---------------------------------------------------------------------------- memory planning
def _real_configs():
    from dataclasses import asdict

    from zimage_mlx.models.vae import VAEConfig

    return {"transformer": {}, "text_encoder": {}, "vae": asdict(VAEConfig())}


@pytest.mark.parametrize("gb,expect,free_first", [
    (96, {"transformer": None, "text_encoder": None}, False),
    (16, {"transformer": None, "text_encoder": None}, True),
    (9, {"transformer": 8, "text_encoder": 8}, True),
    (5.5, {"transformer": 4, "text_encoder": 8}, True),
])
def test_auto_plan_follows_available_memory(gb, expect, free_first):
    plan = memory.plan_memory(_real_configs(), mx.bfloat16, "auto", 512, 512, available=int(gb * 1e9), source="test")
    assert plan.bits == expect and plan.free_text_encoder_first == free_first, plan.summary()
    assert plan.predicted_peak <= gb * 1e9 * memory.HEADROOM
    assert "predicted peak" in plan.summary()


def test_four_bit_1024_fits_under_4_5_gb_on_a_gpu():
    """A 4-bit 1024² plan frees the transformer before the decode only when that is what makes it fit, and then
    predicts ≤ 4.5 GB (the text encoder's embedding table is quantized with the encoder)."""
    roomy = memory.plan_memory(_real_configs(), mx.bfloat16, 4, 1024, 1024, available=int(16e9), source="t", cpu=False)
    assert not roomy.free_transformer_before_decode
    resident, freed = (max(memory.predict_stages(_real_configs(), mx.bfloat16, {"transformer": 4, "text_encoder": 4},
                                                 64, 1024, 1024, free_transformer=f, cpu=False)[s]
                           for s in ("encode", "denoise", "decode")) for f in (False, True))
    assert freed < resident <= 4.5e9   # the tiled decode's activations: ~0.6 GB in bf16 at 1024²
    tight = memory.plan_memory(_real_configs(), mx.bfloat16, 4, 1024, 1024, source="t", cpu=False,
                               available=int((resident + freed) / 2 / memory.HEADROOM))
    assert tight.free_transformer_before_decode and tight.predicted_peak <= 4.5e9, tight.summary()
    assert "free the transformer before decoding" in tight.summary()
    float_te = memory.predict_stages(_real_configs(), mx.bfloat16, {"transformer": 4}, 64, 1024, 1024)
    assert tight.stages["weights_text_encoder"] < float_te["weights_text_encoder"] / 3


def test_plan_predicts_what_the_calls_do_with_the_text_encoder(tiny):
    """keep_text_encoder False (free it after encoding, the pipeline's default) / True / None (keep it when it fits,
    the server's choice): the plan's stage order, and so its predicted peak, is the one the calls run."""
    kw = dict(available=int(96e9), source="t", cpu=False)
    auto = memory.plan_memory(_real_configs(), mx.bfloat16, None, 1024, 1024, keep_text_encoder=None, **kw)
    freed = memory.plan_memory(_real_configs(), mx.bfloat16, None, 1024, 1024, keep_text_encoder=False, **kw)
    assert not auto.free_text_encoder_first and freed.free_text_encoder_first
    assert freed.predicted_peak < auto.predicted_peak
    kept = memory.plan_memory(_real_configs(), mx.bfloat16, "auto", 1024, 1024, keep_text_encoder=True,
                              available=int(16e9), source="t", cpu=False)
    assert not kept.free_text_encoder_first and kept.bits != {"transformer": None, "text_encoder": None}
    _, root, _, _, _ = tiny
    default = ZImagePipeline.from_pretrained(root, dtype="float32")
    assert default.plan.free_text_encoder_first and not default.keep_text_encoder
    planned = ZImagePipeline.from_pretrained(root, dtype="float32", keep_text_encoder=None)
    assert not planned.plan.free_text_encoder_first and planned.keep_text_encoder is True


def test_fused_projections_option(tiny):
    """Separate projections by default on the CPU backend (fusing measured slower there), fused on request: the
    same latents up to float32 rounding."""
    _, root, _, _, _ = tiny
    kw = dict(prompt="x", height=H, width=W, seed=0, num_inference_steps=2, output_type="latent")
    plain = ZImagePipeline.from_pretrained(root, dtype="float32")
    assert not plain.fused_projections and "to_q" in plain.transformer.layers[0].attention
    fused = ZImagePipeline.from_pretrained(root, dtype="float32", fused_projections=True)
    assert "to_qkv" in fused.transformer.layers[0].attention and "w13" in fused.transformer.layers[0].feed_forward
    assert rel_err(np.array(fused(**kw).images), np.array(plain(**kw).images)) <= 1e-6


def test_pipeline_frees_the_transformer_before_decoding_when_planned(tiny):
    _, root, _, _, _ = tiny
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32")
    pipe.plan.free_transformer_before_decode = True
    freed = {}
    real_decode = pipe.decode_latents
    pipe.decode_latents = lambda lat: (freed.setdefault("dit", pipe._models["transformer"]), real_decode(lat))[1]
    pipe(prompt="x", height=H, width=W, seed=0, num_inference_steps=1)
    assert freed["dit"] is None
    pipe(prompt="x", height=H, width=W, seed=0, num_inference_steps=1)     # reloads it for the next image


def test_auto_plan_refuses_when_nothing_fits():
    with pytest.raises(MemoryError, match="even at 4-bit"):
        memory.plan_memory(_real_configs(), mx.bfloat16, "auto", 1024, 1024, available=int(3e9), source="test")


def test_machine_memory_is_read():
    n, source = memory.machine_memory_bytes()
    assert n > 2**30 and source


# ---------------------------------------------------------------------------- hub
def _fake_hub_cache(hf_home: Path, repo: str, root: Path) -> str:
    """Lay out `root` as huggingface_hub's cache would after a download (blobs, snapshot, refs/main)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / revision
    shutil.copytree(root, snap)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return revision


def test_hub_download_then_cached_conversion(tiny, tmp_path):
    _, root, _, latents, reference = tiny
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", ZIMAGE_MLX_CACHE=str(tmp_path / "c"))
    _fake_hub_cache(tmp_path / "hf", "Tongyi-MAI/Z-Image-Turbo", root)
    script = textwrap.dedent(f"""
        import time, numpy as np, mlx.core as mx
        mx.set_default_device(mx.cpu)
        import zimage_mlx.pipeline.loader as pl
        from zimage_mlx import ZImagePipeline
        calls = []
        real = pl.convert
        pl.convert = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        t = time.time()
        pipe = ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", dtype="float32")
        lat = np.load({str(tmp_path / 'lat.npy')!r})
        img = pipe(prompt={PROMPT!r}, height={H}, width={W}, latents=lat, num_inference_steps=4, output_type="np").images
        np.save({str(tmp_path / 'img.npy')!r}, img)
        ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", dtype="float32")
        print("conversions", len(calls))
        import glob, os
        shard = sorted(glob.glob(os.path.join({str(tmp_path / 'c')!r}, "*", "transformer", "*.safetensors")))[0]
        open(shard, "r+b").truncate(os.path.getsize(shard) // 2)    # a corrupt cached conversion is rebuilt
        ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", dtype="float32").transformer
        print("after corruption", len(calls))
        import shutil
        shutil.rmtree({str(tmp_path / 'hf' / 'hub')!r})    # offline, hub snapshot gone: the MLX copy serves
        pipe = ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", dtype="float32")
        print("offline from cache", pipe.source, len(calls))
    """)
    np.save(tmp_path / "lat.npy", latents)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "conversions 1" in proc.stdout and "after corruption 2" in proc.stdout
    assert "offline from cache Tongyi-MAI/Z-Image-Turbo 2" in proc.stdout
    cached = list((tmp_path / "c").iterdir())
    assert len(cached) == 1 and "Tongyi-MAI--Z-Image-Turbo--0123456789ab--float32" in cached[0].name
    assert psnr(np.load(tmp_path / "img.npy"), reference) >= 60


def test_offline_without_cache_is_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", ZIMAGE_MLX_CACHE=str(tmp_path / "c"))
    proc = subprocess.run([sys.executable, "-m", "zimage_mlx.generate", "a cat", "--model", "Tongyi-MAI/Z-Image-Turbo",
                           "--quantize", "none"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not in the local Hugging Face cache" in lines[0], proc.stderr


@pytest.mark.parametrize("error, says", [
    ("LocalEntryNotFoundError", "not in the local Hugging Face cache with downloading off (offline or no network): "
                                "download it once online (`hf download someone/"),
    ("GatedRepoError", "gated repository; accept its licence"),
    ("RepositoryNotFoundError", "no such repository on the hub"),
    ("RevisionNotFoundError", "revision 'v9' not found on the hub"),
    ("RemoteEntryNotFoundError", "the hub repository has no file sub/lora.safetensors"),
    ("ConnectionError", "download failed (no route); check the network or pass a local"),
])
def test_hub_failures_are_one_line_each(monkeypatch, error, says):
    """Each failure of huggingface_hub's downloads (models and single files, e.g. LoRAs) becomes a WeightError
    naming what was asked for and the way out -- the subclasses (a gated repo is also "not found", a missing cache
    entry is also an OSError) caught before their bases."""
    import huggingface_hub
    from huggingface_hub import errors

    from zimage_mlx.loading.hub import resolve_file, resolve_source

    if error == "ConnectionError":
        exc = ConnectionError("no route")
    else:           # (the hub errors' constructors want an HTTP response; the mapping looks at the class only)
        cls = getattr(errors, error)
        exc = cls.__new__(cls)

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: SimpleNamespace(model_info=fail))  # the plan's query
    for call, spec in ((lambda: resolve_source("someone/model", revision="v9"), "someone/model"),
                       (lambda: resolve_file("someone/lora/sub/lora.safetensors"), "someone/lora/sub/lora.safetensors")):
        if error == "RevisionNotFoundError" and "lora" in spec:
            continue                                   # single files take no revision
        if error == "RemoteEntryNotFoundError" and "lora" not in spec:
            continue                                   # a snapshot asks for patterns, not one file
        with pytest.raises(WeightError) as info:
            call()
        assert str(info.value).startswith(f"{spec}: ") and says in str(info.value), str(info.value)
        assert info.value.__cause__ is None and "\n" not in str(info.value)


def test_maintainer_variants_script(tiny, tmp_path):
    _, root, _, _, _ = tiny
    script = Path(__file__).resolve().parents[1] / "convert" / "make_variants.py"
    proc = subprocess.run([sys.executable, str(script), str(root), "--out", str(tmp_path), "--variants", "8bit,bf16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    m8 = components.read_manifest(tmp_path / f"{root.name}-mlx-8bit")
    assert m8["components"]["transformer"]["bits"] == 8 and m8["components"]["transformer"]["dtype"] == "bfloat16"
    assert components.read_manifest(tmp_path / f"{root.name}-mlx-bf16")["components"]["text_encoder"]["bits"] is None
