"""Inpainting, ControlNet and ControlNet inpainting end to end against diffusers 0.42.1's ZImageInpaintPipeline,
ZImageControlNetPipeline and ZImageControlNetInpaintPipeline on a tiny random checkpoint (float32, CPU).

diffusers draws its VAE samples from the generator; as docs/numerics.md#noise says, we replace them by the posterior
mean (patching the pipeline module's `retrieve_latents`) and give MLX the same ε, drawn from a seeded generator.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import psnr, rel_err, to_numpy
from make_controlnet import make_tiny_controlnet, save_tiny_controlnet
from make_pipeline import SCHEDULER, save_tiny_pipeline

from zimage_mlx import ZImagePipeline
from zimage_mlx.pipeline.conditioning import control_context

PROMPT = "a red bicycle leaning on a blue wall"


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k[0] != "_"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen_tokenizer_dir):
    from diffusers import (ZImageControlNetInpaintPipeline, ZImageControlNetModel, ZImageControlNetPipeline,
                           ZImageInpaintPipeline)
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("inpaint")
    root, models = save_tiny_pipeline(tmp / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    cn = make_tiny_controlnet(5, "2.1")
    save_tiny_controlnet(tmp / "controlnet-2.1", cn)
    save_tiny_controlnet(tmp / "controlnet-v1", make_tiny_controlnet(6, "v1"))
    cn = ZImageControlNetModel.from_transformer(cn, models["transformer"])
    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    parts = dict(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tok,
                 transformer=models["transformer"])
    ref = {"inpaint": ZImageInpaintPipeline(scheduler=_scheduler(), **parts),
           "control": ZImageControlNetPipeline(scheduler=_scheduler(), controlnet=cn, **parts),
           "control_inpaint": ZImageControlNetInpaintPipeline(scheduler=_scheduler(), controlnet=cn, **parts)}
    for p in ref.values():
        p.set_progress_bar_config(disable=True)
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32", keep_text_encoder=True,
                                          controlnet=tmp / "controlnet-2.1", controlnet_semantics="diffusers")
    return {"root": root, "tmp": tmp, "pipe": pipe, **ref}


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers' VAE sample → posterior mean (no RNG drawn), in every Z-Image pipeline module."""
    import diffusers.pipelines.z_image.pipeline_z_image_controlnet_inpaint as cni
    import diffusers.pipelines.z_image.pipeline_z_image_inpaint as inp

    def mode(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    for module in (inp, cni):
        monkeypatch.setattr(module, "retrieve_latents", mode)


def _image(h, w, seed):
    """A smooth random picture (a blurred noise field, so the VAE sees structure)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def _mask(h, w, box):
    m = np.zeros((h, w), np.uint8)
    y0, x0, y1, x1 = box
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m)


def _eps(shape, seed):
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _both(ref_pipe, ours, ref_kw, our_kw):
    """(latent rel err, image PSNR) of one configuration run on both sides."""
    ref_lat = ref_pipe(output_type="latent", **ref_kw()).images
    ref_img = ref_pipe(output_type="np", **ref_kw()).images
    our_lat = ours(output_type="latent", **our_kw).images
    our_img = ours(output_type="np", **our_kw).images
    return rel_err(to_numpy(our_lat), to_numpy(ref_lat)), psnr(our_img, ref_img), to_numpy(our_lat)


@pytest.mark.parametrize("strength,size,cfg", [(1.0, (64, 64), 0.0), (0.6, (64, 48), 3.0),
                                               (1.0, (48, 64), 3.0), (0.6, (64, 64), 0.0)])
def test_inpaint_matches_diffusers(tiny, posterior_mean, strength, size, cfg):
    H, W = size
    img = _image(H + 5, W + 7, seed=H + W)          # floored to H x W by both processors
    mask = _mask(H + 5, W + 7, (8, 8, 40, 30))
    eps = _eps((1, 16, H // 8, W // 8), seed=11)
    common = dict(prompt=PROMPT, image=img, mask_image=mask, strength=strength, num_inference_steps=5,
                  guidance_scale=cfg)
    err, db, lat = _both(tiny["inpaint"], tiny["pipe"],
                         lambda: dict(common, generator=torch.Generator().manual_seed(11)),
                         dict(common, noise=eps.numpy(), image_noise=np.zeros_like(eps.numpy())))
    print(f"inpaint strength {strength} {W}x{H} cfg {cfg}: latent rel err {err:.2e}, image PSNR {db:.1f} dB")
    assert lat.shape == (1, 16, H // 8, W // 8)
    assert err <= 1e-3 and db >= 40


@pytest.mark.parametrize("scale,cfg", [(0.75, 3.0), (0.0, 0.0)])
def test_controlnet_matches_diffusers(tiny, scale, cfg):
    H, W = 64, 48
    control = _image(H, W, seed=3)
    lat = _eps((1, 16, H // 8, W // 8), seed=4)
    common = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=4, guidance_scale=cfg)
    err, db, ours = _both(tiny["control"], tiny["pipe"],
                          lambda: dict(common, control_image=control, controlnet_conditioning_scale=scale,
                                       latents=lat.clone()),
                          dict(common, control_image=control, controlnet_conditioning_scale=scale,
                               latents=lat.numpy()))
    base = to_numpy(tiny["pipe"](output_type="latent", latents=lat.numpy(), **common).images)
    moved = rel_err(ours, base)
    print(f"ControlNet scale {scale} cfg {cfg}: latent rel err {err:.2e}, image PSNR {db:.1f} dB, "
          f"moved {moved:.0%} from the base model")
    assert err <= 1e-3 and db >= 40
    if scale == 0.0:
        np.testing.assert_array_equal(ours, base)
    else:
        assert moved >= 0.05


def test_controlnet_inpaint_matches_diffusers(tiny, posterior_mean):
    H, W = 48, 64
    img, control = _image(H, W, seed=8), _image(H, W, seed=9)
    mask = _mask(H, W, (4, 10, 30, 50))
    lat = _eps((1, 16, H // 8, W // 8), seed=10)
    common = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=4, guidance_scale=0.0, image=img,
                  mask_image=mask, control_image=control, controlnet_conditioning_scale=0.7)
    err, db, _ = _both(tiny["control_inpaint"], tiny["pipe"], lambda: dict(common, latents=lat.clone()),
                       dict(common, latents=lat.numpy()))
    print(f"ControlNet inpaint: latent rel err {err:.2e}, image PSNR {db:.1f} dB")
    assert err <= 1e-3 and db >= 40


def test_control_context_per_semantics(tiny):
    """t2i control context: [control latent, 0, latent of a mid-gray image] (reference) or 17 zeros (diffusers)."""
    pipe = tiny["pipe"]
    control = _image(32, 32, seed=1)
    ctrl_latent = np.array(pipe.vae.encode(mx.array(np.asarray(control, np.float32)[None] / 127.5 - 1)))
    gray = np.array(pipe.vae.encode(mx.zeros((1, 32, 32, 3))))
    for semantics in ("reference", "diffusers"):
        ctx = np.array(control_context(pipe.controlnet, pipe.vae, semantics, [control], [0.5], None, None, 32, 32, 1,
                                       pipe.size_multiple).inputs[0].context)
        np.testing.assert_allclose(ctx[:, :16], ctrl_latent, atol=1e-5)
        assert (ctx[:, 16] == 0).all()
        if semantics == "reference":
            np.testing.assert_allclose(ctx[:, 17:], gray, atol=1e-6)
            assert np.abs(gray).max() > 0.01
        else:
            assert (ctx[:, 17:] == 0).all()


def test_all_black_and_all_white_masks(tiny):
    """All black: nothing is repainted (the result is the image's latent); all white: plain text-to-image from ε."""
    pipe = tiny["pipe"]
    H, W = 32, 48
    img = _image(H, W, seed=12)
    eps = np.random.default_rng(0).standard_normal((1, 16, H // 8, W // 8)).astype(np.float32)
    kw = dict(prompt=PROMPT, image=img, num_inference_steps=3, guidance_scale=0.0, noise=eps,
              image_noise=np.zeros_like(eps), output_type="latent")
    black = np.array(pipe(mask_image=Image.new("L", (W, H), 0), **kw).images)
    z0 = np.array(pipe.vae.encode(mx.array(np.asarray(img, np.float32)[None] / 127.5 - 1)))
    np.testing.assert_allclose(black, z0, atol=1e-6)
    white = np.array(pipe(mask_image=Image.new("L", (W, H), 255), **kw).images)
    t2i = np.array(pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=3, guidance_scale=0.0,
                        latents=eps, output_type="latent").images)
    np.testing.assert_array_equal(white, t2i)


def test_paste_back_and_feathered_mask(tiny):
    pipe = tiny["pipe"]
    H, W = 32, 32
    img = _image(H, W, seed=13)
    mask = _mask(H, W, (8, 8, 24, 24))
    kw = dict(prompt=PROMPT, image=img, mask_image=mask, num_inference_steps=2, guidance_scale=0.0, seed=1,
              output_type="np")
    plain = pipe(**kw).images[0]
    pasted = pipe(paste_back=True, **kw).images[0]
    keep = np.asarray(mask) < 128
    original = np.asarray(img, np.float32) / 255.0
    np.testing.assert_allclose(pasted[keep], original[keep], atol=1e-6)
    np.testing.assert_array_equal(pasted[~keep], plain[~keep])
    assert np.abs(plain[keep] - original[keep]).max() > 1e-3          # without paste-back the VAE round trip shows
    feathered = pipe(mask_blur=4, paste_back=True, **kw).images[0]
    assert np.abs(feathered - pasted).max() > 1e-3


def test_several_control_images_with_their_own_scales(tiny):
    pipe = tiny["pipe"]
    a, b = _image(32, 32, seed=20), _image(32, 32, seed=21)
    kw = dict(prompt=PROMPT, num_inference_steps=2, guidance_scale=0.0, seed=0, output_type="latent")
    one = np.array(pipe(control_image=a, controlnet_conditioning_scale=0.6, **kw).images)
    two = np.array(pipe(control_image=[a, b], controlnet_conditioning_scale=[0.6, 0.4], **kw).images)
    same = np.array(pipe(control_image=[a, b], controlnet_conditioning_scale=[0.6, 0.0], **kw).images)
    np.testing.assert_array_equal(same, one)
    assert rel_err(two, one) > 0.01
    canny = np.array(pipe(control_image=a, control_type="canny", **kw).images)
    assert canny.shape == (1, 16, 4, 4)


def test_bad_inputs(tiny):
    pipe = tiny["pipe"]
    img = _image(32, 48, seed=0)
    with pytest.raises(ValueError, match="mask_image needs image"):
        pipe(prompt="x", mask_image=_mask(32, 48, (0, 0, 8, 8)))
    with pytest.raises(ValueError, match="mask_image is 32x32 but the image is 48x32"):
        pipe(prompt="x", image=img, mask_image=_mask(32, 32, (0, 0, 8, 8)), num_inference_steps=1)
    with pytest.raises(ValueError, match="strength must be between 0.0 and 1.0"):
        pipe(prompt="x", image=img, mask_image=_mask(32, 48, (0, 0, 8, 8)), strength=1.5)
    with pytest.raises(ValueError, match="takes no strength"):
        pipe(prompt="x", image=img, mask_image=_mask(32, 48, (0, 0, 8, 8)), control_image=img, strength=0.5)
    with pytest.raises(ValueError, match="needs mask_image"):
        pipe(prompt="x", image=img, control_image=img)
    with pytest.raises(ValueError, match="2 controlnet_conditioning_scale values for 1 control images"):
        pipe(prompt="x", control_image=img, controlnet_conditioning_scale=[0.5, 0.5])
    plain = ZImagePipeline.from_pretrained(tiny["root"], dtype="float32")
    with pytest.raises(ValueError, match="no ControlNet: load one with"):
        plain(prompt="x", control_image=img)
    with pytest.raises(ValueError, match="controlnet_semantics must be one of"):
        plain.load_controlnet(tiny["tmp"] / "controlnet-2.1", semantics="comfy")
    plain.load_controlnet(tiny["tmp"] / "controlnet-v1")
    with pytest.raises(ValueError, match="needs a 2.x ControlNet"):
        plain(prompt="x", image=img, mask_image=_mask(32, 48, (0, 0, 8, 8)), control_image=img)
    wide = make_tiny_controlnet(0, "2.1", {"dim": 128, "n_heads": 2, "axes_dims": [16, 24, 24]})
    save_tiny_controlnet(tiny["tmp"] / "controlnet-wide", wide)
    with pytest.raises(ValueError, match="controlnet-wide does not fit this Z-Image transformer: dim 128 != "
                                         "the transformer's 96"):
        plain.load_controlnet(tiny["tmp"] / "controlnet-wide")


def test_cli_inpaint_and_controlnet(tiny, tmp_path):
    from click.testing import CliRunner

    from zimage_mlx.apps.cli import generate
    from zimage_mlx.apps.pngfile import read_png_params

    img, mask, control = tmp_path / "img.png", tmp_path / "mask.png", tmp_path / "control.png"
    _image(48, 64, seed=1).save(img)
    _mask(48, 64, (8, 8, 40, 30)).save(mask)
    _image(48, 64, seed=2).save(control)
    fast = ["--quantize", "none", "--dtype", "float32", "--steps", "2", "-m", str(tiny["root"]), "--seed", "3"]

    def run(*args):
        return CliRunner().invoke(generate, [str(a) for a in args])

    r = run("a door", "--image", img, "--mask", mask, "--mask-blur", 2, "--paste-back", "-o", tmp_path / "a.png",
            *fast)
    assert r.exit_code == 0, r.output + repr(r.exception)
    params = read_png_params(tmp_path / "a.png")
    assert params["mask"] == str(mask) and params["strength"] == "1.0" and params["size"] == "64x48"
    r = run("a door", "--controlnet", tiny["tmp"] / "controlnet-2.1", "--control-image", control,
            "--control-type", "canny", "--control-scale", 0.5, "-o", tmp_path / "b.png", *fast)
    assert r.exit_code == 0, r.output + repr(r.exception)
    params = read_png_params(tmp_path / "b.png")
    assert params["control_type"] == "canny" and params["control_scale"] == "0.5" and params["size"] == "64x48"
    r = run("a door", "--controlnet", tiny["tmp"] / "controlnet-2.1", "--control-image", control, "--image", img,
            "--mask", mask, "-o", tmp_path / "c.png", *fast)
    assert r.exit_code == 0, r.output + repr(r.exception)
    for args, message in [(("--control-image", control), "--control-image needs --controlnet"),
                          (("--mask", mask), "--mask needs --image"),
                          (("--controlnet", tiny["tmp"] / "controlnet-2.1", "--control-image", control,
                            "--control-scale", 0.5, "--control-scale", 0.2, "--control-scale", 0.1),
                           "3 --control-scale values for 1 control images"),
                          (("--controlnet", tiny["tmp"] / "controlnet-2.1", "--control-image", control, "--image",
                            img), "needs --mask")]:
        r = run("x", *args, *fast)
        assert r.exit_code == 2 and message in r.output, r.output


def test_convert_controlnet_and_memory_plan(tiny, tmp_path):
    import mlx.nn as nn

    from zimage_mlx.loading.convert import convert_controlnet
    from zimage_mlx.memory import component_weight_bytes
    from zimage_mlx.loading.weights import WeightError

    pipe = ZImagePipeline.from_pretrained(tiny["root"], dtype="float32", quantize=None, keep_text_encoder=True,
                                          fused_projections=True)
    kw = dict(prompt=PROMPT, num_inference_steps=2, guidance_scale=0.0, seed=5, output_type="latent",
              control_image=_image(32, 32, seed=30))
    pipe.load_controlnet(tiny["tmp"] / "controlnet-2.1")
    want = pipe.plan.stages["weights_controlnet"]
    assert want == component_weight_bytes("controlnet", pipe.configs["controlnet"], mx.float32, None, 64) > 0
    ref = np.array(pipe(**kw).images)
    out = convert_controlnet(tmp_path / "cn-mlx", tiny["tmp"] / "controlnet-2.1", dtype="float32", log=print)
    pipe.load_controlnet(out)
    np.testing.assert_array_equal(np.array(pipe(**kw).images), ref)
    q8 = convert_controlnet(tmp_path / "cn-q8", tiny["tmp"] / "controlnet-2.1", dtype="float32", bits=8,
                            group_size=32, log=print)
    pipe.load_controlnet(q8)
    got = np.array(pipe(**kw).images)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in pipe.controlnet.named_modules())
    # the control blocks run q/k/v and w1/w3 fused, like the transformer's (quantized here)
    block = pipe.controlnet.control_layers[0]
    assert isinstance(block.attention.to_qkv, nn.QuantizedLinear) and "to_q" not in block.attention
    assert "w13" in block.feed_forward
    assert 0 < rel_err(got, ref) < 0.05
    convert_controlnet(tmp_path / "cn-q8", tiny["tmp"] / "controlnet-2.1", dtype="float32", overwrite=True,
                       log=print)   # replaces an earlier conversion
    with pytest.raises(WeightError, match="given as a ControlNet, but it holds a FLUX 16-channel VAE"):
        convert_controlnet(tmp_path / "x", tiny["root"] / "vae" / "diffusion_pytorch_model.safetensors")
    from zimage_mlx.memory import predict_stages

    with_cn = predict_stages(pipe.configs, mx.float32, {}, 64, 512, 512)
    without = predict_stages({k: v for k, v in pipe.configs.items() if k != "controlnet"}, mx.float32, {}, 64, 512, 512)
    assert with_cn["denoise"] - without["denoise"] > with_cn["weights_controlnet"] > 0   # weights + hints
    pipe.unload_controlnet()
    assert "weights_controlnet" not in pipe.plan.stages and not pipe.has_controlnet
