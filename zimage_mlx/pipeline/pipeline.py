"""ZImagePipeline: text-to-image, image-to-image, inpainting and ControlNet with the MLX models.

Mirrors diffusers' `ZImagePipeline` / `ZImageImg2ImgPipeline` / `ZImageInpaintPipeline` /
`ZImageControlNetPipeline` / `ZImageControlNetInpaintPipeline` (pipelines/z_image/; argument names and meaning),
with MLX's RNG for the noise. The facade: construction (loader.py), lazily loaded models (lazy_models.py), the
LoRA API (lora_api.py); a call is a GenerationRequest (request.py: defaults and checks, before anything loads or
computes) run by generate.py through conditioning.py, guidance.py and denoise.py (parallel.py under mlx.launch).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from .. import sampler
from ..distributed import check_mode, shared_random_seed
from ..loading.hub import DEFAULT_REPO
from ..loading.weights import dtype_name
from ..lora.adapters import LoRAState
from ..memory import MemoryPlan, check_fits, size_multiple
from ..metal_limits import applied_limits, runtime_limits
from ..models.text_encoder import encode_prompts
from ..sampler import SchedulerConfig, check_variant
from .conditioning import LATENT_CHANNELS, PROMPT_CACHE_SIZE, PromptCache, image_noise_key, noise
from .denoise import GenerationCancelled, StepRecord
from .enhance import check_args, enhance_prompt
from .generate import GenerationError
from .generate import generate as generate_one
from .images import load_image, mask_to_latent, postprocess, preprocess_image, preprocess_mask, to_pil
from .lazy_models import LazyModels, check_semantics
from .loader import load_pipeline
from .lora_api import LoRAMixin
from .parallel import generate_data_parallel
from .request import (DEFAULT_INPAINT_STRENGTH, DEFAULT_SIZE, DEFAULT_STRENGTH, MAX_SEED, GenerationRequest,
                      ModelLimits, PipelineOutput, RequestError, check_size, expand_seeds, prompts_arg,
                      step_defaults)

PATCH_SIZE = 2
__all__ = ["ZImagePipeline", "PipelineOutput", "GenerationCancelled", "GenerationError", "GenerationRequest",
           "RequestError", "StepRecord", "DEFAULT_SIZE", "DEFAULT_STRENGTH", "DEFAULT_INPAINT_STRENGTH", "MAX_SEED",
           "LATENT_CHANNELS", "PROMPT_CACHE_SIZE", "expand_seeds", "load_image", "preprocess_image",
           "preprocess_mask", "mask_to_latent", "postprocess", "to_pil"]


class ZImagePipeline(LazyModels, LoRAMixin):
    """Text → image with Z-Image. Build it with `from_pretrained`; call it like diffusers' pipeline."""

    def __init__(
        self,
        *,
        tokenizer,
        scheduler_config: SchedulerConfig,
        transformer=None,
        text_encoder=None,
        vae=None,
        loaders: dict[str, Callable[[], Any]] | None = None,
        configs: dict[str, dict] | None = None,
        variant: str = "turbo",
        keep_text_encoder: bool = False,
        source: str | None = None,
        dtype: mx.Dtype | None = None,
        quantization: str = "none",
        plan: MemoryPlan | None = None,
        compile: bool | None = None,
        fused_projections: bool | None = None,
        parallel: str | None = None,
        group=None,
        controlnet=None,
        controlnet_semantics: str = "reference",
    ):
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self._models = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae, "controlnet": controlnet}
        self._loaders = dict(loaders or {})
        self.configs = dict(configs or {})     # component configs (sizes and memory checks without loading)
        self.variant = check_variant(variant)
        self.keep_text_encoder = keep_text_encoder
        self.source = source
        self.dtype = dtype if dtype is not None else getattr(transformer, "dtype", mx.float32)
        self.quantization = quantization      # what the loaded weights are, e.g. "transformer 4-bit, text encoder 8-bit"
        self.plan = plan                      # the memory plan sizes are checked against (None: no check)
        self.controlnet_semantics = check_semantics(controlnet_semantics)
        self.parallel = check_mode(parallel)  # "data" | "cfg" | "tensor" | None (distributed.py)
        self.group = group if group is not None and group.size() > 1 else None   # None: one process
        # mx.compile the DiT's elementwise chains: on a GPU by default; on MLX's CPU backend it measured slower
        self.compile = (mx.default_device() == mx.gpu) if compile is None else bool(compile)
        # q/k/v and w1/w3 as one matmul each (transformer.fuse_projections): on a GPU by default (fewer, larger
        # matmuls, fewer launches); on MLX's CPU backend it measured no faster (benchmarks/fuse_ab.py: 0.99-1.00x),
        # so the CPU keeps the separate layers (and LoRA branches add to whole outputs, not row slices)
        self.fused_projections = (mx.default_device() == mx.gpu) if fused_projections is None \
            else bool(fused_projections)
        # quantized layers multiply by their dequantized weight on MLX's CPU backend, where quantized_matmul is
        # ~58x slower than a float matmul (quantize.DequantizingLinear); Metal and CUDA keep their quantized kernels
        self.dequantize_matmuls = mx.default_device() == mx.cpu
        for name, model in self._models.items():     # models passed in are prepared as loaded ones are
            if model is not None:
                self._prepare_model(name, model)
        self.timings: dict[str, float] = {}
        self._prompt_cache = PromptCache()
        self._lora = LoRAState()


    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def rank(self) -> int:
        """This process's rank in its `mlx.launch` group (0 for one process): rank 0 prints and writes files."""
        return self.group.rank() if self.group is not None else 0

    @property
    def world_size(self) -> int:
        return self.group.size() if self.group is not None else 1

    @classmethod
    def from_pretrained(
        cls,
        src: str | Path = DEFAULT_REPO,
        dtype: str | mx.Dtype | None = None,
        quantize=None,
        *,
        revision: str | None = None,
        keep_text_encoder: bool | None = False,
        variant: str | None = None,
        height: int = DEFAULT_SIZE,
        width: int = DEFAULT_SIZE,
        compile: bool | None = None,
        fused_projections: bool | None = None,
        verbose: bool = False,
        parallel: str | None = None,
        controlnet: str | Path | None = None,
        controlnet_semantics: str = "reference",
    ) -> "ZImagePipeline":
        """Load from a hub id (e.g. "Tongyi-MAI/Z-Image-Turbo"), a Hugging Face-layout directory, or an MLX directory.

        dtype: "bfloat16" | "float32" (default: as converted for an MLX directory, else bfloat16 on a GPU and
        float32 on the CPU backend). A converted directory is cast to the dtype asked for; its quantized layers
        keep their packed weights.
        quantize: None | 4 | 8 | "auto" | {"transformer": 4, "text_encoder": 8} (quantize.parse_quantize). "auto"
        plans bits from this machine's memory for a height x width image (memory.plan_memory); the plan is
        re-checked when a call asks for a larger image, and a size that cannot fit is refused before any work.
        A hub model is converted once to the MLX layout and cached (hub.py), so later starts skip the conversion.
        Nothing heavy is read here (every file's header is checked): each model loads on first use.
        compile: mx.compile the transformer's elementwise chains (default: on a GPU yes, on the CPU backend no).
        fused_projections: run the transformer's (and ControlNet's) q/k/v and w1/w3 as one matmul each, fused after
        loading (exact; LoRAs still address each projection). Default: on a GPU yes, on the CPU backend no.
        verbose: report the one-time conversion of a hub model on stderr. `pipe.plan.summary()` describes the plan.
        keep_text_encoder: False frees the text encoder after each call's encoding (the least memory); True keeps
        it loaded between calls; None keeps it when the memory plan says it fits (what the server does). The plan
        predicts the stages for that choice.
        parallel: under `mlx.launch` with N processes (one per Mac), "data" (image k of a batch on process k mod N),
        "cfg" (the two guidance branches on 2 processes) or "tensor" (the transformer and text encoder split across
        the processes: each holds and reads about 1/N of their weights); every process makes the same calls and
        gets the same results. With one process (or outside a launch) it changes nothing.
        controlnet: a ControlNet Union file, diffusers/MLX directory or hub file (see `load_controlnet`); it enters
        the memory plan and is quantized like the transformer. controlnet_semantics: "reference" (the training
        code, VideoX-Fun) or "diffusers" (diffusers 0.42.1's ZImageControlNetPipeline).
        """
        return load_pipeline(cls, src, dtype, quantize, revision=revision, keep_text_encoder=keep_text_encoder,
                             variant=variant, height=height, width=width, compile=compile,
                             fused_projections=fused_projections, verbose=verbose, parallel=parallel,
                             controlnet=controlnet, controlnet_semantics=controlnet_semantics)

    # ----------------------------------------------------------------- sizes
    @property
    def size_multiple(self) -> int:
        """Image sizes are multiples of the VAE factor × the patch size (16 for Z-Image)."""
        return size_multiple({"vae": self._config("vae")})

    @property
    def vae_scale_factor(self) -> int:
        """2 ** (len(block_out_channels) - 1), as diffusers' pipelines compute it (8 for the FLUX VAE)."""
        return self.size_multiple // PATCH_SIZE

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        m = self.size_multiple
        return (batch, LATENT_CHANNELS, PATCH_SIZE * (height // m), PATCH_SIZE * (width // m))

    @property
    def limits(self) -> ModelLimits:
        """What requests are checked against (request.ModelLimits), from the configs alone: no weights load."""
        axes = self._config("transformer").get("axes_lens", [1536, 512, 512])
        return ModelLimits(size_multiple=self.size_multiple, max_patches=(axes[1], axes[2]), variant=self.variant,
                           control_in_dim=self._config("controlnet")["control_in_dim"] if self.has_controlnet
                           else None, adapters=tuple(self._lora.adapters),
                           cfg_split=self.parallel == "cfg" and self.group is not None)

    def check_size(self, height, width, batch: int = 1) -> tuple[int, int]:
        """Refuse, before any work, a size that is not a positive multiple, exceeds the model's position range,
        or cannot fit this machine's memory (saying the largest size that fits)."""
        height, width = check_size(height, width, self.limits)
        if self.plan is not None:
            check_fits(self.configs, self.dtype, self.plan, height, width, batch)
        return height, width

    # ----------------------------------------------------------------- text
    def encode_prompt(self, prompts: str | Sequence[str], max_sequence_length: int = 512) -> list[mx.array]:
        """Prompt(s) → list of (L_i, D) caption features: only the real tokens (diffusers' encode_prompt).

        The last PROMPT_CACHE_SIZE prompts are cached: the same prompt is never encoded twice (and needs no text
        encoder once cached).
        """
        prompts = prompts_arg("prompt", prompts)
        todo = self._prompt_cache.missing(prompts, max_sequence_length)
        if todo:
            encoder = self.text_encoder   # (its load time is counted under load_text_encoder)
            t0 = time.perf_counter()
            feats = encode_prompts(self.tokenizer, encoder, todo, max_length=max_sequence_length)
            mx.eval(feats)
            self.timings["encode"] = self.timings.get("encode", 0.0) + time.perf_counter() - t0
            self._prompt_cache.add(todo, feats, max_sequence_length)
        return self._prompt_cache.get(prompts, max_sequence_length)

    def enhance_prompt(self, prompt: str, *, system_prompt: str | None = None, max_new_tokens: int = 512,
                       temperature: float = 0.7, seed: int | None = None) -> str:
        """`prompt` rewritten into a detailed one by the text encoder's own Qwen3 chat model (docs/enhance.md):
        system_prompt None = ours (pipeline/enhance.SYSTEM_PROMPT), "" = none; temperature 0 = greedy; seed fixes a
        sampled reply. An empty prompt is returned as is. The encoder stays loaded for the encoding that follows
        (a call frees it afterwards unless keep_text_encoder)."""
        if self.parallel == "tensor" and self.group is not None:
            raise ValueError("enhance_prompt does not run with parallel='tensor' (the text encoder is split)")
        check_args(prompt, max_new_tokens, temperature)     # before the encoder loads
        if not prompt.strip():
            return prompt
        t0 = time.perf_counter()
        out = enhance_prompt(self.tokenizer, self.text_encoder, prompt, system_prompt=system_prompt,
                             max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        self.timings["enhance"] = self.timings.get("enhance", 0.0) + time.perf_counter() - t0
        return out

    # ----------------------------------------------------------------- latents
    noise = staticmethod(noise)
    image_noise_key = staticmethod(image_noise_key)

    def decode_latents(self, latents: mx.array) -> np.ndarray:
        """(B,16,h,w) latents → (B,H,W,3) float32 images in [0,1]."""
        return np.concatenate([postprocess(self.vae.decode(latents[i: i + 1])) for i in range(latents.shape[0])])

    def defaults(self, num_inference_steps=None, guidance_scale=None) -> tuple[int, float]:
        """(steps, guidance): the given values checked, or the model variant's defaults (Turbo 8/0, Base 50/4)."""
        return step_defaults(self.variant, num_inference_steps, guidance_scale)

    @staticmethod
    def steps_to_run(steps: int, strength: float | None) -> int:
        """How many denoising steps a call runs: all of them, or img2img's share (diffusers' get_timesteps)."""
        return steps - (sampler.img2img_start(steps, strength) if strength is not None else 0)

    def predict_wrappers(self, request: GenerationRequest) -> list:
        """Wrappers of the step predictor for this call (denoise.compose_predict): none yet (a step cache plugs
        in here)."""
        return []

    # ----------------------------------------------------------------- generation
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        cfg_normalization: float | bool = False,
        cfg_truncation: float = 1.0,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        latents=None,
        prompt_embeds: Sequence[mx.array] | None = None,
        negative_prompt_embeds: Sequence[mx.array] | None = None,
        image=None,
        strength: float | None = None,
        output_type: str = "pil",
        callback: Callable[[int, float, mx.array], Any] | None = None,
        max_sequence_length: int = 512,
        noise=None,
        image_noise=None,
        mask_image=None,
        mask_blur: float = 0.0,
        paste_back: bool = False,
        control_image=None,
        control_type: str | None = None,
        controlnet_conditioning_scale: float | Sequence[float] = 0.75,
        loras: dict[str, float] | None = None,
        on_step: Callable[[StepRecord], Any] | Sequence[Callable[[StepRecord], Any]] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        cache: str | None = None,
        cache_threshold: float | None = None,
    ) -> PipelineOutput:
        """Generate images. Arguments mirror diffusers' ZImagePipeline (and ZImageImg2ImgPipeline with `image`,
        ZImageInpaintPipeline with `image` + `mask_image`, ZImageControlNet(Inpaint)Pipeline with `control_image`).

        seed: an int (image k of the batch uses seed + k) or one seed per image; random when None.
        latents: (B,16,h,w) numpy/mx start latents (text-to-image noise; for img2img/inpaint the already-noised start).
        image, strength: img2img (strength default 0.6); the image is encoded with a VAE sample and noised to the
        first step's sigma. With `mask_image` (white = repaint) it is inpainting (strength default 1.0): after every
        step the kept region is reset to the image's latent re-noised to the next sigma with the start noise. An
        all-black mask keeps the whole image (the output is its VAE round trip); an all-white one repaints it all.
        noise / image_noise: explicit start noise ε (also inpainting's re-noising ε) and VAE-sample noise (zeros
        give the posterior mean), for reproducing other runs.
        mask_blur: > 0 feathers the mask (Gaussian blur in pixels, no binarization, area-averaged on the latent
        grid). paste_back: copy the unmasked pixels of `image` into the output exactly. Both off by default (parity).
        control_image: one control map or a list (their hints sum); needs a ControlNet (`load_controlnet`).
        control_type: "canny" | "gray" | "none"/None, a built-in preprocessor applied to each control image.
        controlnet_conditioning_scale: one scale, or one per control image (0 = exactly the base model).
        control_image with image + mask_image is ControlNet inpainting (diffusers' ZImageControlNetInpaintPipeline:
        pure-noise start, no strength, no per-step blending; the masked image enters the 33-channel control context).
        loras: {adapter name: weight} for this call only (others weigh 0, as with set_adapters); restored after.
        on_step: a callable (or a list) called after every step with a denoise.StepRecord (step index, σ, σ_next,
        latents, the velocity and the predicted clean latents x0); return False to cancel (GenerationCancelled).
        callback(step_index, sigma_next, latents): the same, in this port's original form.
        callback_on_step_end(pipe, i, t, callback_kwargs), callback_on_step_end_tensor_inputs: diffusers' callback
        (t: the scheduler timestep; callback_kwargs["latents"]; a returned {"latents": ...} replaces them).
        output_type: "pil" | "np" | "latent".
        cache: "teacache" | "first_block" skips main layers 1-29 of the steps a rule finds close to the last computed
        one (docs/step-cache.md); cache_threshold: the rule's threshold (default 0.12 / 0.05). Off by default;
        `out.cache_stats` then reports the steps computed and skipped and the per-step signal.
        Under `mlx.launch` (`from_pretrained`'s `parallel`) every process makes this same call and gets the whole
        result; in data-parallel mode a failure on one process is raised on all of them.
        """
        kwargs = dict(locals())
        del kwargs["self"]
        return self.generate(GenerationRequest.from_kwargs(**kwargs))

    def generate(self, request: GenerationRequest) -> PipelineOutput:
        """Run a GenerationRequest: what `__call__` builds from its arguments, and what the CLI and the server
        build with `GenerationRequest.from_dict`. Validated here against `self.limits`."""
        req = request.validate(self.limits)
        with applied_limits(runtime_limits(self.plan)):     # Metal: the plan's peak wired, the cache capped
            if self.group is None:
                return generate_one(self, req)
            if req.seed is None and req.latents is None:
                req = req.replace(seed=shared_random_seed(self.group))   # every process must draw the same noise
            if self.parallel == "data":
                return generate_data_parallel(req, self.group, lambda r: generate_one(self, r), self.timings)
            return generate_one(self, req)
