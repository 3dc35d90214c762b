"""End-to-end parity with diffusers' ZImagePipeline / ZImageImg2ImgPipeline on a tiny random checkpoint.

Both sides get the same start latents (torch's RNG cannot be reproduced in MLX); MLX runs in float32.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import psnr, rel_err, to_numpy
from make_pipeline import diffusers_pipelines, save_tiny_pipeline

from zimage_mlx import ZImagePipeline

H, W = 64, 48          # latent 8×6 → 12 image tokens (not a multiple of 32)
CHINESE = "一只戴着红色围巾的橘猫坐在窗台上，窗外下着雪"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen_tokenizer_dir):
    root, models = save_tiny_pipeline(tmp_path_factory.mktemp("zimage") / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    t2i, i2i = diffusers_pipelines(models, qwen_tokenizer_dir)
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32", quantize=None, keep_text_encoder=True)
    return root, pipe, t2i, i2i


def _noise(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 16, 2 * (H // 16), 2 * (W // 16)), generator=g)


def _fresh(kw):
    # diffusers' encode_prompt rewrites a prompt list in place (it templates each item): pass copies.
    return {k: list(v) if isinstance(v, list) else v for k, v in kw.items()}


def _compare(pipe, ref, **kw):
    lat = _noise(kw.pop("batch"), kw.pop("noise_seed", 0))
    ref_lat = ref(latents=lat.clone(), height=H, width=W, output_type="latent", **_fresh(kw)).images
    ours_lat = pipe(latents=lat.numpy(), height=H, width=W, output_type="latent", **_fresh(kw)).images
    err = rel_err(to_numpy(ours_lat), to_numpy(ref_lat))
    ref_img = ref(latents=lat.clone(), height=H, width=W, output_type="np", **_fresh(kw)).images
    ours_img = pipe(latents=lat.numpy(), height=H, width=W, output_type="np", **_fresh(kw)).images
    return err, psnr(ours_img, ref_img)


def test_one_prompt_turbo_defaults(tiny):
    root, pipe, t2i, _ = tiny
    assert pipe.variant == "turbo"
    err, db = _compare(pipe, t2i, batch=1, prompt="a red fox in the snow", num_inference_steps=8, guidance_scale=0.0)
    print(f"one prompt: latent rel err {err:.2e}, image PSNR {db:.1f} dB")
    assert err <= 1e-3 and db >= 40


def test_batch_of_two_prompts_one_chinese(tiny):
    _, pipe, t2i, _ = tiny
    err, db = _compare(pipe, t2i, batch=2, prompt=["a lighthouse at dusk, oil painting", CHINESE],
                       num_inference_steps=4, guidance_scale=0.0, noise_seed=1)
    print(f"batch of two: latent rel err {err:.2e}, image PSNR {db:.1f} dB")
    assert err <= 1e-3 and db >= 40


def test_prompt_over_512_tokens(tiny):
    _, pipe, t2i, _ = tiny
    long_prompt = " ".join(["a very detailed castle with towers and flags"] * 80)
    with pytest.warns(UserWarning):
        err, db = _compare(pipe, t2i, batch=1, prompt=long_prompt, num_inference_steps=3, guidance_scale=0.0)
    print(f">512 tokens: latent rel err {err:.2e}, image PSNR {db:.1f} dB")
    assert err <= 1e-3 and db >= 40


@pytest.mark.parametrize("normalization", [False, 0.9])
def test_cfg_with_negative_prompt_and_truncation(tiny, normalization):
    _, pipe, t2i, _ = tiny
    err, db = _compare(pipe, t2i, batch=1, prompt="a portrait of an astronaut", negative_prompt="blurry, low quality",
                       num_inference_steps=6, guidance_scale=4.0, cfg_truncation=0.5,
                       cfg_normalization=normalization, noise_seed=2)
    print(f"CFG (normalization={normalization}): latent rel err {err:.2e}, image PSNR {db:.1f} dB")
    assert err <= 1e-3 and db >= 40


def test_img2img_matches_diffusers(tiny):
    from diffusers.utils.torch_utils import randn_tensor

    _, pipe, _, i2i = tiny
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (H + 5, W + 7, 3), dtype=np.uint8))   # floored to 64×48
    shape = (1, 16, 2 * (H // 16), 2 * (W // 16))
    g = torch.Generator().manual_seed(7)
    eps_vae = randn_tensor(shape, generator=g, dtype=torch.float32)   # drawn by latent_dist.sample
    eps = randn_tensor(shape, generator=g, dtype=torch.float32)       # then the start noise
    kw = dict(prompt="a watercolor of a harbour", image=init, strength=0.6, num_inference_steps=8, guidance_scale=0.0)
    ref = i2i(generator=torch.Generator().manual_seed(7), output_type="np", **kw).images
    ref_lat = i2i(generator=torch.Generator().manual_seed(7), output_type="latent", **kw).images
    ours = pipe(noise=eps.numpy(), image_noise=eps_vae.numpy(), output_type="np", **kw).images
    ours_lat = pipe(noise=eps.numpy(), image_noise=eps_vae.numpy(), output_type="latent", **kw).images
    err, db = rel_err(to_numpy(ours_lat), to_numpy(ref_lat)), psnr(ours, ref)
    print(f"img2img: latent rel err {err:.2e}, image PSNR {db:.1f} dB")
    assert ours.shape == (1, H, W, 3)
    assert err <= 1e-3 and db >= 40


def test_encode_prompt_and_pil_output(tiny):
    _, pipe, t2i, _ = tiny
    feats = pipe.encode_prompt(["hello", ""])
    ref, _ = t2i.encode_prompt(["hello", ""], do_classifier_free_guidance=False)
    assert [f.shape[0] for f in feats] == [r.shape[0] for r in ref]
    out = pipe(prompt="a cat", height=H, width=W, seed=3, num_inference_steps=2)
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (W, H)
    assert out.seeds == [3] and out.peak_memory_gb > 0 and "denoise" in out.timings
    again = pipe(prompt="a cat", height=H, width=W, seed=3, num_inference_steps=2, output_type="np").images
    np.testing.assert_array_equal(np.asarray(out.images[0]), (again[0] * 255).round().astype(np.uint8))


def test_callback_sees_every_step_and_can_cancel(tiny):
    from zimage_mlx.pipeline.pipeline import GenerationCancelled

    _, pipe, _, _ = tiny
    seen = []
    pipe(prompt="x", height=H, width=W, seed=0, num_inference_steps=3, output_type="latent",
         callback=lambda i, s, lat: seen.append((i, s, lat.shape)))
    assert [s[0] for s in seen] == [0, 1, 2] and seen[-1][1] == 0.0
    with pytest.raises(GenerationCancelled):
        pipe(prompt="x", height=H, width=W, seed=0, num_inference_steps=3, callback=lambda i, s, lat: i < 1)


def test_bad_arguments(tiny):
    root, pipe, _, _ = tiny
    for half in ("float16", mx.float16):
        with pytest.raises(ValueError, match="float16 is not supported.*black images"):
            ZImagePipeline.from_pretrained(root, dtype=half)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe(prompt="x", height=60, width=W)
    with pytest.raises(ValueError, match="latents have shape"):
        pipe(prompt="x", height=H, width=W, latents=np.zeros((1, 16, 4, 4), np.float32))


def test_text_encoder_freed_unless_kept(tiny):
    root, _, _, _ = tiny
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32")
    pipe(prompt="x", height=H, width=W, seed=0, num_inference_steps=1, output_type="latent")
    assert pipe._models["text_encoder"] is None
    pipe(prompt="y", height=H, width=W, seed=0, num_inference_steps=1, output_type="latent")   # reloads


def test_nan_latents_are_an_error_not_a_black_image(tiny, monkeypatch):
    from zimage_mlx.pipeline.pipeline import GenerationError

    root, _, _, _ = tiny
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32")
    real = pipe.transformer

    class NaNTransformer:       # the real transformer whose output is NaN
        dtype = real.dtype
        prepare = real.prepare

        def __call__(self, x, t, c, **kw):
            return real(x, t, c, **kw) * mx.array(float("nan"))

    monkeypatch.setattr(pipe, "_models", {**pipe._models, "transformer": NaNTransformer()})
    with pytest.raises(GenerationError, match="NaN"):
        pipe(prompt="x", height=H, width=W, seed=0, num_inference_steps=1)


def test_img2img_vae_noise_is_independent_of_start_noise(tiny, monkeypatch):
    """With one seed, the VAE-sample ε and the start noise must be different draws (not the same key twice)."""
    _, pipe, _, _ = tiny
    seen = {}
    real_encode = pipe.vae.encode

    def encode(images, seed=None, key=None, noise=None):
        seen["seed"], seen["key"] = seed, key
        return real_encode(images, seed=seed, key=key, noise=noise)

    monkeypatch.setattr(pipe.vae, "encode", encode)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8))
    pipe(prompt="x", image=init, strength=0.5, seed=11, num_inference_steps=2, output_type="latent")
    shape = (1, 16, 2 * (H // 16), 2 * (W // 16))
    key = seen["key"] if seen["key"] is not None else mx.random.key(seen["seed"])
    vae_eps = np.array(mx.random.normal(shape, key=key))
    start = np.array(ZImagePipeline.noise([11], shape))
    assert abs(np.corrcoef(vae_eps.ravel(), start.ravel())[0, 1]) < 0.3


# diffusers' own Z-Image pipeline test configuration (tests/pipelines/z_image/test_z_image.py): dim 32, 2 heads,
# one refiner layer, a 2-block VAE (spatial factor 2, sizes in multiples of 4), Qwen3 with head_dim 128 larger than
# hidden/heads, scheduler shift 1.0. Latents are (B, 16, 2·(H // 4), 2·(W // 4)).
DIFFUSERS_TEST_CONFIG = dict(
    transformer_overrides=dict(dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, axes_dims=[8, 4, 4],
                               axes_lens=[256, 32, 32]),
    text_encoder_overrides=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                head_dim=128, intermediate_size=16),
    vae_kwargs=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32),
    scheduler_overrides=dict(shift=1.0),
)


@pytest.fixture(scope="module")
def diffusers_test_config(tmp_path_factory, qwen_tokenizer_dir):
    root, models = save_tiny_pipeline(tmp_path_factory.mktemp("dtc") / "tiny-2-block-vae", qwen_tokenizer_dir,
                                      seed=5, **DIFFUSERS_TEST_CONFIG)
    t2i, _ = diffusers_pipelines(models, qwen_tokenizer_dir, DIFFUSERS_TEST_CONFIG["scheduler_overrides"])
    return ZImagePipeline.from_pretrained(root, dtype="float32", keep_text_encoder=True), t2i


@pytest.mark.parametrize("height, width", [(32, 32), (32, 48)])
def test_vae_factor_from_config_matches_diffusers(diffusers_test_config, height, width):
    pipe, t2i = diffusers_test_config
    assert pipe.vae_scale_factor == 2 and pipe.size_multiple == 4
    shape = (1, 16, 2 * (height // 4), 2 * (width // 4))
    assert pipe.latent_shape(1, height, width) == shape
    lat = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    kw = dict(prompt="a dog", negative_prompt="cartoon", height=height, width=width, num_inference_steps=3,
              guidance_scale=3.0)
    ref_lat = t2i(latents=lat.clone(), output_type="latent", **kw).images
    ref_img = t2i(latents=lat.clone(), output_type="np", **kw).images
    ours_lat = pipe(latents=lat.numpy(), output_type="latent", **kw).images
    ours_img = pipe(latents=lat.numpy(), output_type="np", **kw).images
    err, db = rel_err(to_numpy(ours_lat), to_numpy(ref_lat)), psnr(ours_img, ref_img)
    print(f"diffusers test config {width}x{height}, CFG: latent rel err {err:.2e}, image PSNR {db:.1f} dB")
    assert ours_img.shape == (1, height, width, 3)
    assert err <= 1e-3 and db >= 40
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe(prompt="x", height=30, width=32)


def test_converted_bfloat16_loads_as_the_dtype_asked_for(tiny, tmp_path):
    from zimage_mlx.loading.convert import convert

    root, ref_pipe, _, _ = tiny
    out = convert(tmp_path / "bf16", root, dtype="bfloat16", log=lambda m: None, hash_sources=False)
    as_saved = ZImagePipeline.from_pretrained(out)
    assert as_saved.dtype_name == "bfloat16" and as_saved.encode_prompt("a cat")[0].dtype == mx.bfloat16
    pipe = ZImagePipeline.from_pretrained(out, dtype="float32")
    assert pipe.dtype_name == "float32"
    assert pipe.encode_prompt("a cat")[0].dtype == mx.float32
    assert pipe.transformer.dtype == mx.float32 and pipe.vae.dtype == mx.float32
    # the float32 copy of bf16 weights computes like the float32 model up to the bf16 rounding of the weights
    lat = _noise(1).numpy()
    a = pipe(prompt="a cat", height=H, width=W, latents=lat, num_inference_steps=2, output_type="latent").images
    b = ref_pipe(prompt="a cat", height=H, width=W, latents=lat, num_inference_steps=2, output_type="latent").images
    assert a.dtype == mx.float32 and rel_err(to_numpy(a), to_numpy(b)) < 0.05


def test_public_names():
    import zimage_mlx

    for name in zimage_mlx.__all__:
        assert getattr(zimage_mlx, name) is not None, name
    assert zimage_mlx.GenerationError.__name__ == "GenerationError"
