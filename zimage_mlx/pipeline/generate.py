"""One validated GenerationRequest run on this process: inputs → caption features → schedule → start latents →
denoise → decode. The steps of diffusers' ZImagePipeline.__call__ (and its Img2Img / Inpaint / ControlNet
siblings, pipelines/z_image/), each a call into conditioning.py, guidance.py and denoise.py."""

from __future__ import annotations

import time

import mlx.core as mx

from .. import sampler
from .conditioning import control_context, start_latents
from .control_maps import control_map
from .denoise import (DenoiseState, compose_predict, denoise, diffusers_callback, inpaint_blend, legacy_callback)
from .guidance import prepare_captions, step_predictor, with_control
from .images import load_image, mask_to_latent, preprocess_image, preprocess_mask, to_pil
from .request import GenerationRequest, PipelineOutput, expand_negative, expand_seeds
from .step_cache import StepCache


class GenerationError(RuntimeError):
    """The model produced unusable values (NaN/inf): never write a black image silently."""


def generate(pipe, req: GenerationRequest) -> PipelineOutput:
    """`pipe(**kwargs)` on this process for a request validated against `pipe.limits`."""
    t_start = time.perf_counter()
    pipe.timings = {k: v for k, v in pipe.timings.items() if k.startswith("load_")}
    mx.reset_peak_memory()
    batch = req.batch
    pipe.check_size(req.height, req.width, batch)       # the memory plan, for this batch
    seeds = expand_seeds(req.seed, batch)
    init_image, mask, control_pils = load_inputs(req, pipe.size_multiple)
    shape = pipe.latent_shape(batch, req.height, req.width)
    pos, neg = caption_features(pipe, req)
    sigmas = sampler.sigmas_for(req.num_inference_steps, pipe.scheduler_config,
                                image_seq_len=(shape[2] // 2) * (shape[3] // 2))
    timesteps = sampler.timesteps_for(sigmas, pipe.scheduler_config)
    start = start_latents(lambda: pipe.vae.encode, req, shape, seeds, sigmas, init_image, pos[0].dtype,
                          pipe.timings)
    control = None
    if req.controls:
        net, vae = pipe.controlnet, pipe.vae    # loaded first: control_encode times the encode alone
        t0 = time.perf_counter()
        control = control_context(net, vae, pipe.controlnet_semantics, control_pils,
                                  req.controlnet_conditioning_scale, init_image, mask, req.height, req.width, batch,
                                  pipe.size_multiple)
        pipe.timings["control_encode"] = time.perf_counter() - t0
    mx.eval(start.latents)
    after_step = []
    if req.inpaint:
        m_lat = mask_to_latent(mask, shape[2], shape[3], soft=req.mask_blur > 0)
        after_step.append(inpaint_blend(start.z0, start.eps, m_lat, sigmas))
    cache = step_cache(pipe, req)
    with pipe.lora_weights(req.loras):      # the adapters' weights this call asks for, restored after
        latents = run_denoise(pipe, req, DenoiseState(start.latents, sigmas, timesteps, req.first_step), pos, neg,
                              control, after_step, cache)
    images = decode(pipe, req, latents, init_image, mask)
    pipe.timings["total"] = time.perf_counter() - t_start
    reported = [None] * batch if req.latents is not None and req.seed is None else seeds
    return PipelineOutput(images=images, seeds=reported, timings=dict(pipe.timings),
                          peak_memory_gb=mx.get_peak_memory() / 1e9,
                          cache_stats=cache.stats.as_dict() if cache is not None else None)


def step_cache(pipe, req: GenerationRequest) -> StepCache | None:
    """The request's step cache (step_cache.py): decisions from the positive rows; under parallel "tensor" / "cfg"
    every process takes rank 0's signal."""
    if req.cache is None:
        return None
    group = pipe.group if pipe.parallel in ("tensor", "cfg") else None
    return StepCache(req.cache, req.cache_threshold, req.steps_to_run, positive_rows=range(req.batch), group=group)


def load_inputs(req: GenerationRequest, multiple: int):
    """(init image (1,H,W,3) in [−1,1] | None, pixel mask (H,W) | None, control maps as PIL images)."""
    init_image = mask = None
    control_pils = [control_map(load_image(c, name="control_image"), req.control_type) for c in req.controls]
    if req.image is not None:
        image_pil = load_image(req.image)
        init_image = preprocess_image(image_pil, req.height, req.width, multiple)
        if req.mask_image is not None:
            mask = preprocess_mask(req.mask_image, req.height, req.width, image_pil.size,
                                   blur=req.mask_blur if req.inpaint else 0.0)
    return init_image, mask, control_pils


def caption_features(pipe, req: GenerationRequest) -> tuple[list, list]:
    """(positive, negative) caption features, one per image (negative empty without guidance): from the prompts
    through the pipeline's prompt cache, or the given embeddings."""
    pos_embeds, neg_embeds = req.prompt_embeds, req.negative_prompt_embeds
    prompts = req.prompts
    if prompts is not None:
        negs = expand_negative(req.negative_prompt, len(prompts)) if req.do_cfg and neg_embeds is None else []
        feats = pipe.encode_prompt(prompts + negs, req.max_sequence_length)
        pos_embeds = feats[: len(prompts)]
        if negs:
            neg_embeds = feats[len(prompts):]
        if not pipe.keep_text_encoder:
            pipe.free_text_encoder()
    n = req.num_images_per_prompt
    pos = [e for e in pos_embeds for _ in range(n)]
    neg = [e for e in neg_embeds for _ in range(n)] if req.do_cfg else []
    return pos, neg


def step_callbacks(pipe, req: GenerationRequest) -> list:
    """The request's callbacks as StepRecord callbacks, in the order they run: diffusers' callback_on_step_end
    (it may replace the latents), then on_step, then the (step, sigma, latents) callback."""
    out = []
    if req.callback_on_step_end is not None:
        out.append(diffusers_callback(pipe, req.callback_on_step_end, req.callback_on_step_end_tensor_inputs))
    out += req.step_callbacks_given()
    if req.callback is not None:
        out.append(legacy_callback(req.callback))
    return out


def run_denoise(pipe, req: GenerationRequest, state: DenoiseState, pos, neg, control, after_step,
                cache: StepCache | None = None) -> mx.array:
    """The loop with predict composed once: transformer → ControlNet hook (→ step cache, which runs inside the
    transformer's forward) → guidance strategy → wrappers."""
    transformer = pipe.transformer
    t0 = time.perf_counter()
    caps = prepare_captions(transformer, pos, neg, state.latents.shape[2], state.latents.shape[3])
    split = pipe.group if pipe.parallel == "cfg" and pipe.group is not None else None
    model = cache.model_call(transformer, control) if cache is not None else with_control(transformer, control)
    predict = step_predictor(model, caps, state.timesteps, pipe.scheduler_config,
                             scale=req.guidance_scale, truncation=req.cfg_truncation,
                             normalization=req.cfg_normalization,
                             model_dtype=getattr(transformer, "dtype", mx.float32), split_group=split)
    predict = compose_predict(predict, pipe.predict_wrappers(req))
    latents = denoise(state, predict, after_step, step_callbacks(pipe, req))
    pipe.timings["denoise"] = time.perf_counter() - t0
    if not bool(mx.all(mx.isfinite(latents)).item()):
        raise GenerationError("the transformer produced NaN/inf latents (this would be a black image); "
                              "try --dtype float32 or a higher-precision quantization")
    return latents


def decode(pipe, req: GenerationRequest, latents: mx.array, init_image, mask):
    """The output as asked: latents, or decoded images (numpy in [0,1] or PIL), with `paste_back`."""
    if req.output_type == "latent":
        return latents
    if pipe.plan is not None and pipe.plan.free_transformer_before_decode:
        pipe._free("transformer")      # what makes this size fit (memory plan); it reloads next call
        pipe._free("controlnet")
    pipe.vae  # noqa: B018 - load first so decode times the decode alone
    t0 = time.perf_counter()
    images = pipe.decode_latents(latents)
    if req.paste_back and mask is not None:
        keep = 1.0 - mask[None, :, :, None]
        images = keep * (init_image + 1.0) / 2.0 + (1.0 - keep) * images
    pipe.timings["decode"] = time.perf_counter() - t0
    return to_pil(images) if req.output_type == "pil" else images

