"""The denoise loop's seams (zimage_mlx/pipeline/denoise.py, guidance.py): the composed predict equals the original
inline loop bit for bit (none / batched / split guidance, with and without ControlNet and the inpaint blend),
StepRecord's values against a recomputation, cancelling, the after_step order, and diffusers'
callback_on_step_end mapping against diffusers' own ZImagePipeline."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from conftest import rel_err, to_numpy
from make_lora import as_peft, random_lora
from make_controlnet import make_tiny_controlnet, save_tiny_controlnet
from make_pipeline import diffusers_pipelines, save_tiny_pipeline

from zimage_mlx import GenerationCancelled, ZImagePipeline, sampler
from zimage_mlx.models.controlnet import ControlConditioning, ControlInput
from zimage_mlx.pipeline import guidance as guidance_mod
from zimage_mlx.pipeline.denoise import DenoiseState, StepRecord, compose_predict, denoise, inpaint_blend
from zimage_mlx.pipeline.guidance import prepare_captions, step_predictor, with_control

H, W = 32, 48
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("denoise")
    root, models = save_tiny_pipeline(tmp / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    save_tiny_controlnet(tmp / "controlnet", make_tiny_controlnet(5, "2.1"))
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32", keep_text_encoder=True, controlnet=tmp / "controlnet")
    t2i, _ = diffusers_pipelines(models, qwen_tokenizer_dir)
    pipe.lora_source = as_peft(random_lora(models["transformer"], strength=0.3, seed=1))
    return pipe, t2i


# ---------------------------------------------------------------------------------------------- the old loop
def old_loop(pipe, latents, sigmas, timesteps, first, g, cfg_truncation, cfg_normalization, pos, neg, control,
             inpaint, cfg_split=False, rank=0, group=None):
    """The inline loop of ZImagePipeline._generate before the seams (commit 8b2f388), verbatim but for names."""
    transformer = pipe.transformer
    batch, steps, do_cfg = len(pos), len(sigmas) - 1, g > 0
    both = transformer.prepare(list(pos) + list(neg), latents.shape[2], latents.shape[3])
    cond = both.select(range(batch)) if neg else both
    uncond = both.select(range(batch, 2 * batch)) if neg else None
    for i in range(first, steps):
        t_model = float(sampler.model_time(timesteps[i], pipe.scheduler_config))
        g_i = sampler.guidance_for_step(g, t_model, cfg_truncation) if do_cfg else 0.0
        x_in = latents.astype(transformer.dtype)
        one = {"control": control} if control is not None else {}
        if g_i > 0 and cfg_split:
            v = transformer(x_in, mx.full((batch,), t_model, dtype=mx.float32), uncond if rank else cond, **one)
            v = mx.distributed.all_gather(v, group=group)
            v = sampler.guidance(v[:batch], v[batch:], g_i, cfg_normalization)
        elif g_i > 0:
            t = mx.full((2 * batch,), t_model, dtype=mx.float32)
            kw = {"control": control.doubled()} if control is not None else {}
            v = transformer(mx.concatenate([x_in, x_in]), t, both, **kw)
            v = sampler.guidance(v[:batch], v[batch:], g_i, cfg_normalization)
        else:
            v = transformer(x_in, mx.full((batch,), t_model, dtype=mx.float32), cond, **one)
        latents = sampler.euler_step(latents, v, sigmas[i], sigmas[i + 1])
        if inpaint is not None:
            z0, eps, m_lat = inpaint
            s_next = mx.array(sigmas[i + 1], dtype=mx.float32)
            proper = z0 if i == steps - 1 else s_next * eps + (1.0 - s_next) * z0
            latents = (1.0 - m_lat) * proper + m_lat * latents
        mx.eval(latents)
    return latents


class FakeGroup:
    """Rank 0 of a 2-process cfg split: the other rank's output (the negative branch) is computed here."""

    def rank(self):
        return 0

    def size(self):
        return 2


@pytest.mark.parametrize("mode", ["none", "batched", "split"])
@pytest.mark.parametrize("with_controlnet", [False, True])
@pytest.mark.parametrize("with_inpaint", [False, True])
def test_composed_predict_equals_the_old_loop(tiny, monkeypatch, mode, with_controlnet, with_inpaint):
    pipe, _ = tiny
    steps, g = 4, (0.0 if mode == "none" else 3.0)
    shape = pipe.latent_shape(2, H, W)
    rng = np.random.default_rng(0)
    start = mx.array(rng.standard_normal(shape).astype(np.float32))
    pos = pipe.encode_prompt(["a fox", "a cat"])
    neg = pipe.encode_prompt(["", "blurry"]) if g > 0 else []
    sigmas = sampler.sigmas_for(steps, pipe.scheduler_config, image_seq_len=shape[2] * shape[3] // 4)
    timesteps = sampler.timesteps_for(sigmas, pipe.scheduler_config)
    control = None
    if with_controlnet:
        ctx = mx.array(rng.standard_normal((2, 33, *shape[2:])).astype(np.float32))
        control = ControlConditioning(pipe.controlnet, [ControlInput(ctx, 0.7)], "reference")
    inpaint = None
    if with_inpaint:
        m = np.zeros((1, 1, *shape[2:]), np.float32)
        m[..., 1:3, :] = 1
        inpaint = (mx.array(rng.standard_normal(shape).astype(np.float32)),
                   mx.array(rng.standard_normal(shape).astype(np.float32)), mx.array(m))
    group = None
    if mode == "split":
        group = FakeGroup()
        other = {}
        real = pipe.transformer

        def gather(v, group=None):
            return mx.concatenate([v, other["v"]])

        class Recording:          # computes rank 1's output (the negative branch) beside rank 0's
            dtype, prepare = real.dtype, real.prepare

            def __call__(self, x, t, caps, **kw):
                other["v"] = real(x, t, other["uncond"], **kw)
                return real(x, t, caps, **kw)
        monkeypatch.setattr(mx.distributed, "all_gather", gather)
        monkeypatch.setattr(pipe, "_models", {**pipe._models, "transformer": Recording()})
        other["uncond"] = real.prepare(list(pos) + list(neg), shape[2], shape[3]).select(range(2, 4))
    first = 1
    t_norm = [float(sampler.model_time(t, pipe.scheduler_config)) for t in timesteps[:steps]]
    trunc = (t_norm[2] + t_norm[3]) / 2     # guidance on for steps 1-2, off for step 3 (one branch)
    ref = old_loop(pipe, start, sigmas, timesteps, first, g, trunc, 1.5, pos, neg, control, inpaint,
                   cfg_split=mode == "split", rank=0, group=group)
    transformer = pipe.transformer
    caps = prepare_captions(transformer, pos, neg, shape[2], shape[3])
    predict = compose_predict(step_predictor(with_control(transformer, control), caps, timesteps,
                                             pipe.scheduler_config, scale=g, truncation=trunc, normalization=1.5,
                                             model_dtype=transformer.dtype, split_group=group))
    after = [inpaint_blend(*inpaint, sigmas)] if inpaint else []
    ours = denoise(DenoiseState(start, sigmas, timesteps, first), predict, after)
    assert np.array_equal(to_numpy(ours), to_numpy(ref))
    assert t_norm[1] < t_norm[2] < trunc < t_norm[3]


def test_guidance_mode_names(tiny):
    pipe, _ = tiny
    with pytest.raises(ValueError, match="guidance mode must be one of"):
        guidance_mod.guided_velocity("cfg", None, None, None, 0.5, 1.0, 0.0)


# ---------------------------------------------------------------------------------------------- StepRecord
def test_step_records_match_a_recomputation(tiny):
    pipe, _ = tiny
    steps, seed = 3, 4
    records = []
    out = pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=steps, seed=seed, output_type="latent",
               on_step=records.append)
    shape = pipe.latent_shape(1, H, W)
    sigmas = sampler.sigmas_for(steps, pipe.scheduler_config, image_seq_len=shape[2] * shape[3] // 4)
    timesteps = sampler.timesteps_for(sigmas, pipe.scheduler_config)
    assert [r.index for r in records] == [0, 1, 2] and all(r.num_steps == steps for r in records)
    assert [r.sigma for r in records] == [float(s) for s in sigmas[:-1]]
    assert [r.sigma_next for r in records] == [float(s) for s in sigmas[1:]]
    assert [r.timestep for r in records] == [float(t) for t in timesteps[:steps]]
    # step 0 starts from the seed's noise; its velocity is −(the transformer's output) and x̂0 = x − σ·velocity
    r0 = records[0]
    assert np.array_equal(to_numpy(r0.sample), to_numpy(pipe.noise([seed], shape)))
    feats = pipe.encode_prompt([PROMPT])
    t = mx.full((1,), float(sampler.model_time(timesteps[0], pipe.scheduler_config)), dtype=mx.float32)
    v = pipe.transformer(r0.sample, t, feats)
    assert rel_err(to_numpy(r0.velocity), -to_numpy(v)) < 1e-5
    x0 = to_numpy(r0.sample) - float(sigmas[0]) * to_numpy(r0.velocity)
    assert rel_err(to_numpy(r0.x0), x0) < 1e-6
    # consecutive records chain, and the last x̂0 is exactly the final latents
    for a, b in zip(records, records[1:]):
        assert np.array_equal(to_numpy(a.latents), to_numpy(b.sample))
    assert np.array_equal(to_numpy(records[-1].x0), to_numpy(out.images))
    assert np.array_equal(to_numpy(records[-1].latents), to_numpy(out.images))


def test_cancel_by_returning_false_or_raising(tiny):
    pipe, _ = tiny
    seen = []
    with pytest.raises(GenerationCancelled, match="after step 2 of 3"):
        pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=3, seed=0,
             on_step=[seen.append, lambda r: r.index < 1])
    assert [r.index for r in seen] == [0, 1]

    def stop(r):
        raise GenerationCancelled("stop")
    with pytest.raises(GenerationCancelled, match="stop"):
        pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=3, seed=0, on_step=stop)
    with pytest.raises(GenerationCancelled):      # the (step, sigma, latents) callback cancels as before
        pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=3, seed=0, callback=lambda i, s, x: False)


def test_after_step_hooks_run_in_order_before_the_callbacks():
    order = []
    sigmas = np.array([1.0, 0.5, 0.0], np.float32)

    def hook(name, k):
        def h(latents, i):
            order.append((name, i))
            return latents * k
        return h

    seen = []
    out = denoise(DenoiseState(mx.ones((1, 2)), sigmas, sigmas * 1000), lambda x, i: mx.zeros_like(x),
                  after_step=[hook("a", 2.0), hook("b", 3.0)],
                  callbacks=[lambda r: seen.append((r.index, float(r.latents[0, 0])))])
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert seen == [(0, 6.0), (1, 36.0)] and float(out[0, 0]) == 36.0


def test_a_callback_may_replace_the_latents():
    sigmas = np.array([1.0, 0.5, 0.0], np.float32)
    out = denoise(DenoiseState(mx.ones((1, 2)), sigmas, sigmas * 1000), lambda x, i: mx.zeros_like(x),
                  callbacks=[lambda r: {"latents": np.full((1, 2), 5.0 + r.index)}])
    assert float(out[0, 0]) == 6.0
    with pytest.raises(ValueError, match=r"latents of shape \(3,\), expected \(1, 2\)"):
        denoise(DenoiseState(mx.ones((1, 2)), sigmas, sigmas), lambda x, i: mx.zeros_like(x),
                callbacks=[lambda r: {"latents": np.zeros(3)}])


def test_step_record_is_a_dataclass_of_the_step():
    r = StepRecord(0, 1, 0.5, 0.0, 500.0, mx.ones((1, 1)), mx.zeros((1, 1)), mx.full((1, 1), 2.0))
    assert float(r.velocity[0, 0]) == -2.0 and float(r.x0[0, 0]) == 2.0     # 1 − 0.5·(−2)


# ---------------------------------------------------------------------------------------------- diffusers callback
def test_callback_on_step_end_matches_diffusers(tiny):
    """Same start latents, the same callback on both sides: the same (i, t), the same latents, and a returned
    {"latents": ...} (scaled by 0.9 after step 1) changes both runs the same way."""
    pipe, t2i = tiny
    steps = 4
    lat = torch.randn((1, 16, H // 8, W // 8), generator=torch.Generator().manual_seed(3))

    def make(store, to_native, scale):
        def cb(p, i, t, kw):
            store.append((i, float(t), np.asarray(to_native(kw["latents"]), np.float32)))
            return {"latents": kw["latents"] * scale} if i == 1 else {}
        return cb

    ref, ours = [], []
    ref_out = t2i(prompt=PROMPT, height=H, width=W, num_inference_steps=steps, guidance_scale=0.0,
                  latents=lat.clone(), output_type="latent", callback_on_step_end=make(ref, lambda x: x.numpy(), 0.9),
                  callback_on_step_end_tensor_inputs=["latents"]).images
    out = pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=steps, guidance_scale=0.0, latents=lat.numpy(),
               output_type="latent", callback_on_step_end=make(ours, np.array, 0.9))
    assert [(i, t) for i, t, _ in ours] == [(i, pytest.approx(t, rel=1e-6)) for i, t, _ in ref]
    for (_, _, a), (_, _, b) in zip(ours, ref):
        assert rel_err(a, b) < 1e-3
    assert rel_err(to_numpy(out.images), ref_out.numpy()) < 1e-3


# ---------------------------------------------------------------------------------------------- loras=
def test_loras_weight_the_adapters_for_one_call(tiny):
    pipe, _ = tiny
    kw = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=2, seed=5, output_type="latent")
    base = to_numpy(pipe(**kw).images)
    pipe.load_lora_weights(pipe.lora_source, adapter_name="style")
    try:
        pipe.set_adapters("style", 0.5)
        ref = to_numpy(pipe(**kw).images)
        pipe.set_adapters("style", 0.0)
        assert np.array_equal(to_numpy(pipe(**kw).images), base)
        got = to_numpy(pipe(**kw, loras={"style": 0.5}).images)
        assert np.array_equal(got, ref) and not np.array_equal(got, base)
        assert pipe.loras[0]["weight"] == 0.0                  # restored after the call
        with pytest.raises(ValueError, match="no LoRA named 'other'; loaded: 'style'"):
            pipe(**kw, loras={"other": 1.0})
    finally:
        pipe.unload_lora_weights()
