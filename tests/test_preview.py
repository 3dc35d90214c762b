"""Previews: x̂0 math against the sampler's Euler step, the linear RGB map and its least-squares fit,
TAEF1 against diffusers' AutoencoderTiny, and the callback helper on a tiny pipeline."""

import importlib.util
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturb_, rel_err, to_numpy
from make_pipeline import save_tiny_pipeline
from make_vae import make_tiny_vae, save_tiny_vae, save_tiny_vae_ldm

from zimage_mlx import ZImagePipeline, sampler
from zimage_mlx.pipeline.preview import (FLUX_RGB_BIAS, FLUX_RGB_FACTORS, LatentRGB, Previewer, fit_latent_rgb,
                                load_tiny_decoder, predicted_x0, x0_from_steps)
from zimage_mlx.loading.weights import WeightError

ROOT = Path(__file__).resolve().parents[1]


def _rand(seed, shape=(1, 16, 6, 4)):
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_predicted_x0_sign_on_exact_flow():
    # x_σ = (1−σ)·x0 + σ·ε and the velocity the pipeline's Euler step uses is v = x0 − ε: x̂0 must be x0.
    x0, eps, sigma = _rand(0), _rand(1), 0.7
    x = (1 - sigma) * x0 + sigma * eps
    assert rel_err(to_numpy(predicted_x0(x, x0 - eps, sigma)), to_numpy(x0)) < 1e-6
    # ... and one Euler step along that velocity lands on the same line: x̂0 from the two states agrees.
    x_next = sampler.euler_step(x, x0 - eps, sigma, 0.4)
    assert rel_err(to_numpy(x0_from_steps(x, sigma, x_next, 0.4)), to_numpy(x0)) < 1e-5


def test_last_step_x0_is_the_final_latents():
    x, v, sigma = _rand(2), _rand(3), 0.3
    final = sampler.euler_step(x, v, sigma, 0.0)
    assert np.array_equal(to_numpy(predicted_x0(x, v, sigma)), to_numpy(final))
    assert rel_err(to_numpy(x0_from_steps(x, sigma, final, 0.0)), to_numpy(final)) < 1e-6


def test_latent_rgb_matches_numpy_and_clips():
    x = _rand(4, (2, 16, 5, 3)) * 8
    out = to_numpy(LatentRGB()(x))
    f, b = np.array(FLUX_RGB_FACTORS), np.array(FLUX_RGB_BIAS)
    ref = np.clip((np.einsum("bchw,ck->bhwk", to_numpy(x), f) + b + 1) / 2, 0, 1)
    assert out.shape == (2, 5, 3, 3)
    assert np.abs(out - ref).max() < 1e-5
    assert out.min() == 0.0 and out.max() == 1.0   # the scaled input saturates somewhere


def test_fit_latent_rgb_recovers_a_linear_map():
    rng = np.random.default_rng(5)
    f, b = rng.normal(0, 0.1, (16, 3)), rng.normal(0, 0.1, 3)
    lat = rng.standard_normal((3, 16, 4, 5))
    img = np.einsum("nchw,ck->nhwk", lat, f) + b
    f_fit, b_fit = fit_latent_rgb(lat, img)
    assert np.abs(f_fit - f).max() < 1e-5 and np.abs(b_fit - b).max() < 1e-5
    with pytest.raises(ValueError, match="latent grid"):
        fit_latent_rgb(lat, img[:, :2])


def test_fit_preview_script_on_tiny_vae(tmp_path):
    spec = importlib.util.spec_from_file_location("fit_preview", ROOT / "convert" / "fit_preview.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    oracle = make_tiny_vae(seed=7)                           # spatial factor 8 like the real VAE
    save_tiny_vae(tmp_path / "vae", oracle)
    save_tiny_vae_ldm(tmp_path / "ae.safetensors", oracle)   # FLUX single file: config from the shapes
    out = tmp_path / "rgb.json"
    result = script.main([str(tmp_path / "vae"), "--num", "3", "--size", "32", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert np.array(saved["factors"]).shape == (16, 3) and len(saved["bias"]) == 3
    assert saved == json.loads(json.dumps(result))
    # Least squares beats the FLUX numbers on this (random) VAE, and is exact on its own training pairs' fit.
    assert result["rms_fitted"] < result["rms_default"]
    lat, tgt = script.latent_pairs(script.load_vae(tmp_path / "vae"), script.synthetic_images(3, 32))
    single = script.main([str(tmp_path / "ae.safetensors"), "--vae-config", str(tmp_path / "vae" / "config.json"),
                          "--num", "3", "--size", "32"])
    assert single["factors"] == result["factors"] and single["bias"] == result["bias"]
    f, b = fit_latent_rgb(lat, tgt)
    resid = np.einsum("nchw,ck->nhwk", lat, f) + b - tgt
    assert np.abs(np.einsum("nhwk,nchw->ck", resid, lat)).max() < 1e-3   # normal equations hold


# ---------------------------------------------------------------------------------------------- TAEF1
@pytest.fixture(scope="module")
def taef1_oracle():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    model = AutoencoderTiny(latent_channels=16)   # madebyollin/taef1's config: 64 channels, 3-3-3-1 blocks
    return perturb_(model.float().eval(), 11, scale=0.05)


def _taesd_layout(oracle) -> dict:
    # taesd's taef1_decoder.safetensors: nn.Sequential indices, the clamp being index 0.
    sd = oracle.decoder.state_dict()
    return {f"{int(k.split('.')[1]) + 1}.{k.split('.', 2)[2]}": v.contiguous() for k, v in sd.items()}


@pytest.mark.parametrize("layout", ["taesd", "diffusers"])
def test_taef1_matches_diffusers_autoencoder_tiny(tmp_path, taef1_oracle, layout):
    from safetensors.torch import save_file

    if layout == "taesd":
        path = tmp_path / "taef1_decoder.safetensors"
        save_file(_taesd_layout(taef1_oracle), str(path))
    else:
        path = tmp_path / "taef1"
        taef1_oracle.save_pretrained(path, safe_serialization=True)
    dec = load_tiny_decoder(path)
    lat = torch.randn(1, 16, 6, 4, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        ref = (taef1_oracle.decoder(lat) + 1) / 2   # diffusers maps taesd's [0, 1] to [−1, 1]; undo it
    ours = dec(mx.array(lat.numpy()))
    assert ours.shape == (1, 48, 32, 3)
    assert rel_err(to_numpy(ours), ref.permute(0, 2, 3, 1).numpy()) < 1e-4


def test_taef1_bad_files(tmp_path, taef1_oracle):
    from safetensors.torch import save_file

    with pytest.raises(WeightError, match="not found"):
        load_tiny_decoder(tmp_path / "missing.safetensors")
    with pytest.raises(WeightError, match="safetensors"):
        load_tiny_decoder(tmp_path / "taef1_decoder.pth")
    sd = _taesd_layout(taef1_oracle)
    sd["1.weight"] = sd["1.weight"][:, :4].contiguous()   # a 4-channel (SD) taesd decoder
    save_file(sd, str(tmp_path / "taesd_decoder.safetensors"))
    with pytest.raises(WeightError, match="not a TAEF1 decoder"):
        load_tiny_decoder(tmp_path / "taesd_decoder.safetensors")
    sd = _taesd_layout(taef1_oracle)
    del sd["19.bias"]
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightError, match="layers.19.bias"):
        load_tiny_decoder(tmp_path / "partial.safetensors")


# ---------------------------------------------------------------------------------------------- callback helper
@pytest.fixture(scope="module")
def pipe(tmp_path_factory, qwen_tokenizer_dir):
    root, _ = save_tiny_pipeline(tmp_path_factory.mktemp("zimage") / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    return ZImagePipeline.from_pretrained(root, dtype="float32", quantize=None, keep_text_encoder=True)


def test_previewer_follows_the_pipeline(pipe):
    h, w, steps, seed = 64, 48, 4, 3
    shape = pipe.latent_shape(1, h, w)
    sigmas = sampler.sigmas_for(steps, pipe.scheduler_config)
    start = pipe.noise([seed], shape)
    prev = Previewer(start=start, start_sigma=sigmas[0])
    states, images = [], []

    def callback(i, sigma, latents):
        images.append(prev(i, sigma, latents))
        states.append(prev.prev)   # the latents after the step
        return True

    out = pipe(prompt="a red fox", height=h, width=w, num_inference_steps=steps, seed=seed,
               output_type="latent", callback=callback)
    assert [im.size for im in images] == [(w // 8, h // 8)] * steps
    # Step 0's x̂0 from the two states equals x + σ·v with the transformer's own velocity.
    feats = pipe.encode_prompt(["a red fox"])
    t = mx.full((1,), float(sampler.model_time(sampler.timesteps_for(sigmas, pipe.scheduler_config)[0],
                                               pipe.scheduler_config)), dtype=mx.float32)
    v = pipe.transformer(start, t, feats)
    x0_direct = predicted_x0(start, v, sigmas[0])
    x0_steps = x0_from_steps(start, sigmas[0], states[0], sigmas[1])
    assert rel_err(to_numpy(x0_steps), to_numpy(x0_direct)) < 1e-4
    # The last preview is the final latents' preview.
    final = Previewer().decoder(out.images)
    assert np.array_equal(np.asarray(images[-1]), (np.clip(to_numpy(final)[0], 0, 1) * 255).round().astype(np.uint8))
    # Previews change as the image forms.
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[-1]))


def test_previewer_without_start_and_with_tiny_decoder(pipe, taef1_oracle, tmp_path):
    from safetensors.torch import save_file

    save_file(_taesd_layout(taef1_oracle), str(tmp_path / "taef1.safetensors"))
    prev = Previewer(decoder=load_tiny_decoder(tmp_path / "taef1.safetensors"))
    sizes = []
    pipe(prompt="a red fox", height=32, width=32, num_inference_steps=2, seed=0, output_type="latent",
         callback=lambda i, s, lat: sizes.append(prev(i, s, lat).size))
    assert sizes == [(32, 32), (32, 32)]


# ---------------------------------------------------------------------------------------------- CLI --preview
def test_cli_preview_file_is_replaced_every_step(pipe, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import zimage_mlx.apps.cli as cli
    import zimage_mlx.apps.outputs as outputs

    replaced = []
    real_replace = os.replace

    def counting_replace(src, dst):
        if str(dst).endswith("live.png"):
            replaced.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", counting_replace)
    out, live = tmp_path / "out.png", tmp_path / "previews" / "live.png"
    r = CliRunner().invoke(cli.generate, ["a fox", "-m", pipe.source, "--quantize", "none", "--dtype", "float32",
                                          "--steps", "3", "-W", "64", "-H", "48", "--seed", "1", "-o", str(out),
                                          "--preview", str(live)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert len(replaced) == 3                                 # one atomic refresh per step
    with Image.open(live) as im:
        assert im.format == "PNG" and im.size == (64 // 8, 48 // 8)
    assert sorted(p.name for p in live.parent.iterdir()) == ["live.png"]   # no temporary files left
