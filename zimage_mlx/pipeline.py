"""ZImagePipeline: text-to-image and image-to-image with the three MLX models.

Mirrors diffusers' `ZImagePipeline` / `ZImageImg2ImgPipeline` (argument names and meaning), with MLX's RNG
for the noise. Components load lazily on first use, so the text encoder can run (and be freed) before the
transformer ever occupies memory.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from . import sampler
from .sampler import SchedulerConfig

# Defaults per model family (diffusers' class defaults are generic; these are the models' own).
VARIANT_DEFAULTS = {
    "turbo": {"num_inference_steps": 8, "guidance_scale": 0.0},
    "base": {"num_inference_steps": 50, "guidance_scale": 4.0},
}
LATENT_CHANNELS = 16
SIZE_MULTIPLE = 16  # VAE factor 8 × patch 2


class GenerationCancelled(RuntimeError):
    """A step callback returned False."""


class GenerationError(RuntimeError):
    """The model produced unusable values (NaN/inf): never write a black image silently."""


@dataclass
class PipelineOutput:
    images: Any                      # list of PIL images | (B,H,W,3) float32 numpy in [0,1] | (B,16,h,w) mx latents
    seeds: list[int | None] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage
    peak_memory_gb: float = 0.0


def dtype_name(d: mx.Dtype) -> str:
    """"bfloat16" / "float32" (what manifests, metadata and the converter's --dtype use)."""
    return str(d).replace("mlx.core.", "")


def parse_dtype(d) -> mx.Dtype:
    """bfloat16 or float32. float16 is refused: Z-Image's activations overflow its range (black images)."""
    names = {"bfloat16": mx.bfloat16, "bf16": mx.bfloat16, "float32": mx.float32, "fp32": mx.float32}
    if d in (mx.float16, "float16", "fp16", "half"):
        raise ValueError("float16 is not supported: Z-Image's activations overflow it (black images); "
                         "use bfloat16 (the default on a GPU) or float32")
    if isinstance(d, mx.Dtype) and d in names.values():
        return d
    if d not in names:
        raise ValueError(f"unknown dtype {d!r}; use bfloat16 or float32")
    return names[d]


def default_dtype() -> mx.Dtype:
    """bfloat16 on a GPU (Metal, CUDA); float32 on the CPU backend, whose bfloat16 matmul is slow."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def check_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % SIZE_MULTIPLE:
            raise ValueError(f"{name} must be a positive multiple of {SIZE_MULTIPLE} (got {v})")


def preprocess_image(image, height: int | None, width: int | None) -> np.ndarray:
    """PIL image / path / HWC uint8 or [0,1] float array → (1,H,W,3) float32 in [−1,1].

    Without height/width the image keeps its size floored to a multiple of 16 (as diffusers'
    VaeImageProcessor does); resizing uses Lanczos.
    """
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr)
    image = image.convert("RGB")
    w = width or image.width - image.width % SIZE_MULTIPLE
    h = height or image.height - image.height % SIZE_MULTIPLE
    check_size(h, w)
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.LANCZOS)
    arr = np.asarray(image).astype(np.float32) / 255.0
    return (arr * 2.0 - 1.0)[None]


def postprocess(decoded: mx.array) -> np.ndarray:
    """Decoder output NHWC in [−1,1] → float32 numpy in [0,1]."""
    return np.array(mx.clip(decoded.astype(mx.float32) / 2 + 0.5, 0.0, 1.0))


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray((img * 255).round().astype(np.uint8)) for img in images]


def detect_variant(src: Path, transformer_config: dict | None, scheduler: SchedulerConfig) -> str:
    """'turbo' or 'base' (the non-distilled Z-Image), from the name, the config, then the schedule shift."""
    name = str(src).lower()
    if "turbo" in name:
        return "turbo"
    if transformer_config is not None and "siglip_feat_dim" in transformer_config:
        return "base"
    return "base" if scheduler.shift >= 5.0 else "turbo"


class ZImagePipeline:
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
        variant: str = "turbo",
        keep_text_encoder: bool = False,
        source: str | None = None,
        plan=None,
    ):
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self._models = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}
        self._loaders = dict(loaders or {})
        self.variant = variant
        self.keep_text_encoder = keep_text_encoder
        self.source = source
        self.plan = plan
        self.timings: dict[str, float] = {}
        self.dtype_name = "float32"
        self.quantization = "none"   # what the loaded weights are, e.g. "transformer 4-bit, text encoder 8-bit"

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        src: str | Path,
        dtype: str | mx.Dtype | None = None,
        quantize=None,
        *,
        revision: str | None = None,
        keep_text_encoder: bool = False,
        variant: str | None = None,
        verbose: bool = False,
    ) -> "ZImagePipeline":
        """Load from a hub id (e.g. "Tongyi-MAI/Z-Image-Turbo"), a Hugging Face-layout directory, or an MLX directory.

        dtype: "bfloat16" | "float32" (default: bfloat16 on a GPU, float32 on the CPU backend).
        quantize: None | 4 | 8 | "auto" | {"transformer": 4, "text_encoder": 8}. "auto" plans bits from this
        machine's memory (zimage_mlx.quantize.plan_memory) and prints the plan when verbose.
        A hub model is converted once to the MLX layout and cached (keyed by repo, revision, dtype and bits) in
        $ZIMAGE_MLX_CACHE (default ~/.cache/zimage_mlx), so later starts skip the conversion.
        Nothing heavy is read here: each model loads on first use (the text encoder before the transformer).
        """
        from . import mlx_format, quantize as q, weights

        mx_dtype = parse_dtype(dtype) if dtype is not None else default_dtype()
        hub_id = str(src) if weights.looks_like_repo_id(str(src)) else None
        try:
            root = weights.resolve_source(src, revision=revision)
        except weights.WeightError:
            # Offline with the hub snapshot gone: a converted copy in our cache still serves.
            root = _find_cached(hub_id, revision, mx_dtype if dtype is not None else None) if hub_id else None
            if root is None:
                raise
        manifest = mlx_format.read_manifest(root) if mlx_format.is_mlx_dir(root) else None
        if manifest is None:
            for part in ("transformer", "text_encoder", "vae", "tokenizer"):
                if not (root / part).is_dir():
                    raise weights.WeightError(
                        f"{root}: not a Z-Image model directory (no {part}/ folder); expected the Hugging Face "
                        f"layout of {weights.DEFAULT_REPO} or a directory made by `zimage-mlx convert`"
                    )
        else:
            saved = manifest["components"]["transformer"]["dtype"]
            if dtype is None:
                mx_dtype = parse_dtype(saved)
        configs = {n: weights.read_config(root / n) for n in mlx_format.MODEL_COMPONENTS}

        plan = None
        if quantize is not None and quantize is not False:
            if manifest is not None and any(manifest["components"][n].get("bits") for n in q.COMPONENTS):
                plan = None   # already quantized on disk: load as saved
            else:
                plan = q.plan_memory(configs, mx_dtype, requested=quantize)
                if verbose:
                    print(plan.summary(), file=sys.stderr)
        bits = plan.bits if plan is not None else {}
        group = plan.group_size if plan is not None else 64

        if hub_id is not None and manifest is None:
            cached = _cache_dir(hub_id, root, mx_dtype, bits)
            if not mlx_format.is_mlx_dir(cached):
                from .convert import convert

                if verbose:
                    print(f"converting {hub_id} to MLX (once) into {cached} …", file=sys.stderr)
                convert(cached, root, dtype=dtype_name(mx_dtype), bits=bits, group_size=group,
                        overwrite=True, log=(lambda m: print(m, file=sys.stderr)) if verbose else (lambda m: None))
            root, manifest = cached, mlx_format.read_manifest(cached)

        sched_file = root / "scheduler" / "scheduler_config.json"
        scheduler = SchedulerConfig.from_file(sched_file) if sched_file.is_file() else SchedulerConfig()
        from .tokenizer import ZImageTokenizer

        tokenizer = ZImageTokenizer.from_dir(root / "tokenizer")
        loaders = _loaders(root, manifest, mx_dtype, bits, group)
        if variant is None:
            variant = manifest.get("variant") if manifest is not None else None
            variant = variant or detect_variant(Path(str(src)), configs["transformer"], scheduler)
        pipe = cls(tokenizer=tokenizer, scheduler_config=scheduler, loaders=loaders, variant=variant,
                   keep_text_encoder=keep_text_encoder, source=str(src), plan=plan)
        pipe.dtype_name = dtype_name(mx_dtype)
        pipe.configs = configs
        saved = {n: manifest["components"][n].get("bits") for n in q.COMPONENTS} if manifest is not None else {}
        pipe.quantization = q.describe_bits({n: saved.get(n) or bits.get(n) for n in q.COMPONENTS})
        return pipe

    def _component(self, name: str):
        model = self._models.get(name)
        if model is None:
            if name not in self._loaders:
                raise RuntimeError(f"this pipeline has no {name}")
            t0 = time.perf_counter()
            model = self._loaders[name]()
            self.timings[f"load_{name}"] = self.timings.get(f"load_{name}", 0.0) + time.perf_counter() - t0
            self._models[name] = model
        return model

    @property
    def transformer(self):
        return self._component("transformer")

    @property
    def text_encoder(self):
        return self._component("text_encoder")

    @property
    def vae(self):
        return self._component("vae")

    def free_text_encoder(self) -> None:
        """Drop the text encoder's weights (it reloads on the next encode if a loader is known)."""
        if "text_encoder" in self._loaders or self._models.get("text_encoder") is None:
            self._models["text_encoder"] = None
            mx.clear_cache()

    # ----------------------------------------------------------------- text
    def encode_prompt(self, prompts: str | Sequence[str], max_sequence_length: int = 512) -> list[mx.array]:
        """Prompt(s) → list of (L_i, D) caption features: only the real tokens (diffusers' encode_prompt)."""
        from .text_encoder import encode_prompts

        if isinstance(prompts, str):
            prompts = [prompts]
        encoder = self.text_encoder   # (its load time is counted under load_text_encoder)
        t0 = time.perf_counter()
        feats = encode_prompts(self.tokenizer, encoder, list(prompts), max_length=max_sequence_length)
        mx.eval(feats)
        self.timings["encode"] = self.timings.get("encode", 0.0) + time.perf_counter() - t0
        return feats

    # ----------------------------------------------------------------- latents
    @staticmethod
    def latent_shape(batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (batch, LATENT_CHANNELS, 2 * (height // SIZE_MULTIPLE), 2 * (width // SIZE_MULTIPLE))

    @staticmethod
    def noise(seeds: Sequence[int], shape: tuple[int, ...]) -> mx.array:
        """Standard normal noise, one MLX key per image so each image is reproducible from its own seed."""
        return mx.concatenate([mx.random.normal((1, *shape[1:]), key=mx.random.key(int(s))) for s in seeds])

    @staticmethod
    def image_noise_key(seed: int) -> mx.array:
        """The MLX key of img2img's VAE-sample noise: split from the seed, independent of the start noise."""
        return mx.random.split(mx.random.key(int(seed)))[1]

    def decode_latents(self, latents: mx.array) -> np.ndarray:
        """(B,16,h,w) latents → (B,H,W,3) float32 images in [0,1]."""
        out = []
        for i in range(latents.shape[0]):
            decoded = self.vae.decode(latents[i: i + 1])
            out.append(postprocess(decoded))
        return np.concatenate(out)

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
        strength: float = 0.6,
        output_type: str = "pil",
        callback: Callable[[int, float, mx.array], Any] | None = None,
        max_sequence_length: int = 512,
        noise=None,
        image_noise=None,
    ) -> PipelineOutput:
        """Generate images. Arguments mirror diffusers' ZImagePipeline (and ZImageImg2ImgPipeline with `image`).

        seed: an int (image k of the batch uses seed + k) or one seed per image; random when None.
        latents: (B,16,h,w) numpy/mx start latents (text-to-image noise; for img2img the already-noised start).
        image, strength: img2img; the image is encoded with a VAE sample and noised to the first step's sigma.
        noise / image_noise: explicit img2img start noise and VAE-sample noise (for reproducing other runs).
        callback(step_index, sigma, latents): called after every step; return False to cancel.
        output_type: "pil" | "np" | "latent".
        """
        t_start = time.perf_counter()
        self.timings = {k: v for k, v in self.timings.items() if k.startswith("load_")}
        mx.reset_peak_memory()
        defaults = VARIANT_DEFAULTS[self.variant]
        steps = defaults["num_inference_steps"] if num_inference_steps is None else int(num_inference_steps)
        g = defaults["guidance_scale"] if guidance_scale is None else float(guidance_scale)
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ValueError("num_images_per_prompt must be at least 1")

        # 1. prompts → caption features
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give a prompt or prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        else:
            prompts = None
        do_cfg = g > 0
        if prompts is not None:
            negs: list[str] = []
            if do_cfg and negative_prompt_embeds is None:
                negs = _expand_negative(negative_prompt, len(prompts))
            feats = self.encode_prompt(prompts + negs, max_sequence_length)
            prompt_embeds, neg_from_text = feats[: len(prompts)], feats[len(prompts):]
            if do_cfg and negative_prompt_embeds is None:
                negative_prompt_embeds = neg_from_text
            if not self.keep_text_encoder:
                self.free_text_encoder()
        elif do_cfg and negative_prompt_embeds is None:
            raise ValueError("with prompt_embeds and guidance_scale > 0, pass negative_prompt_embeds too")
        pos = [e for e in prompt_embeds for _ in range(num_images_per_prompt)]
        neg = [e for e in negative_prompt_embeds for _ in range(num_images_per_prompt)] if do_cfg else []
        batch = len(pos)

        # 2. schedule
        init_image = None
        if image is not None:
            init_image = preprocess_image(image, height, width)
            height, width = init_image.shape[1], init_image.shape[2]
        height = height or 1024
        width = width or 1024
        check_size(height, width)
        shape = self.latent_shape(batch, height, width)
        sigmas = sampler.sigmas_for(steps, self.scheduler_config, image_seq_len=(shape[2] // 2) * (shape[3] // 2))
        timesteps = sampler.timesteps_for(sigmas, self.scheduler_config)
        first = sampler.img2img_start(steps, strength) if init_image is not None else 0
        if first >= steps:
            raise ValueError(f"strength {strength} with {steps} steps leaves no step to run")

        # 3. start latents
        seeds = _seeds(seed, batch)
        if latents is not None:
            latents = mx.array(np.asarray(latents, dtype=np.float32)) if not isinstance(latents, mx.array) \
                else latents.astype(mx.float32)
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for {width}x{height}")
            seeds = [None] * batch if seed is None else seeds
        elif init_image is not None:
            self.vae  # noqa: B018 - load first so vae_encode times the encode alone
            t0 = time.perf_counter()
            enc_noise = None if image_noise is None else mx.array(np.asarray(image_noise, dtype=np.float32))
            enc_dtype = prompt_embeds[0].dtype
            # The VAE sample needs its own key: key(seed) itself draws image 0's start noise below.
            z = self.vae.encode(mx.array(init_image).astype(enc_dtype), key=self.image_noise_key(seeds[0]),
                                noise=enc_noise)
            z = mx.broadcast_to(z.astype(mx.float32), shape)
            eps = self.noise(seeds, shape) if noise is None else mx.array(np.asarray(noise, dtype=np.float32))
            s0 = mx.array(sigmas[first], dtype=mx.float32)
            latents = s0 * eps + (1.0 - s0) * z
            self.timings["vae_encode"] = time.perf_counter() - t0
        else:
            latents = self.noise(seeds, shape)
        mx.eval(latents)

        # 4. denoise
        transformer = self.transformer
        t0 = time.perf_counter()
        for i in range(first, steps):
            t_model = float(sampler.model_time(timesteps[i], self.scheduler_config))
            g_i = sampler.guidance_for_step(g, t_model, cfg_truncation) if do_cfg else 0.0
            x_in = latents.astype(_model_dtype(transformer))
            if g_i > 0:
                t = mx.full((2 * batch,), t_model, dtype=mx.float32)
                v = transformer(mx.concatenate([x_in, x_in]), t, list(pos) + list(neg))
                v = sampler.guidance(v[:batch], v[batch:], g_i, cfg_normalization)
            else:
                v = transformer(x_in, mx.full((batch,), t_model, dtype=mx.float32), list(pos))
            latents = sampler.euler_step(latents, v, sigmas[i], sigmas[i + 1])
            mx.eval(latents)
            if callback is not None and callback(i, float(sigmas[i + 1]), latents) is False:
                raise GenerationCancelled(f"cancelled by the callback after step {i + 1} of {steps}")
        self.timings["denoise"] = time.perf_counter() - t0
        if not bool(mx.all(mx.isfinite(latents)).item()):
            raise GenerationError(
                "the transformer produced NaN/inf latents (this would be a black image); "
                "try --dtype float32 or a higher-precision quantization"
            )

        # 5. decode
        if output_type == "latent":
            images = latents
        else:
            self.vae  # noqa: B018 - load first so decode times the decode alone
            t0 = time.perf_counter()
            images = self.decode_latents(latents)
            self.timings["decode"] = time.perf_counter() - t0
            if output_type == "pil":
                images = to_pil(images)
        self.timings["total"] = time.perf_counter() - t_start
        return PipelineOutput(images=images, seeds=seeds, timings=dict(self.timings),
                              peak_memory_gb=mx.get_peak_memory() / 1e9)


def _loaders(root: Path, manifest: dict | None, dtype: mx.Dtype, bits: dict, group: int) -> dict:
    """Callables that load each component on first use, from the MLX layout or the PyTorch (diffusers) layout."""
    if manifest is not None:
        from .mlx_format import load_component

        return {n: (lambda n=n: load_component(root, n, manifest, bits.get(n), group))
                for n in ("transformer", "text_encoder", "vae")}
    from .text_encoder import load_text_encoder
    from .transformer import load_transformer
    from .vae import load_vae

    return {
        "transformer": lambda: load_transformer(root / "transformer", dtype, bits.get("transformer"), group),
        "text_encoder": lambda: load_text_encoder(root / "text_encoder", dtype, bits.get("text_encoder"), group),
        "vae": lambda: load_vae(root / "vae", dtype),
    }


def cache_root() -> Path:
    return Path(os.environ.get("ZIMAGE_MLX_CACHE", Path.home() / ".cache" / "zimage_mlx"))


def _cache_dir(repo: str, snapshot: Path, dtype: mx.Dtype, bits: dict) -> Path:
    """Where the converted MLX copy of a hub snapshot lives: keyed by repo, revision, dtype and bits."""
    revision = snapshot.name if snapshot.parent.name == "snapshots" else "local"

    def b(n):
        return f"{bits[n]}bit" if bits.get(n) else "float"

    name = (f"{repo.replace('/', '--')}--{revision[:12]}--{str(dtype).replace('mlx.core.', '')}"
            f"--dit-{b('transformer')}--te-{b('text_encoder')}")
    return cache_root() / name


def _find_cached(repo: str, revision: str | None, dtype: mx.Dtype | None) -> Path | None:
    """The newest converted copy of `repo` in the cache (matching revision and dtype when given)."""
    from .mlx_format import is_mlx_dir

    pattern = f"{repo.replace('/', '--')}--{(revision or '')[:12] or '*'}--"
    pattern += f"{str(dtype).replace('mlx.core.', '')}--*" if dtype is not None else "*"
    found = [p for p in cache_root().glob(pattern) if is_mlx_dir(p)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _model_dtype(model) -> mx.Dtype:
    return getattr(model, "dtype", mx.float32)


def _expand_negative(negative_prompt, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    if isinstance(negative_prompt, str):
        return [negative_prompt] * n
    negative_prompt = list(negative_prompt)
    if len(negative_prompt) != n:
        raise ValueError(f"{len(negative_prompt)} negative prompts for {n} prompts")
    return negative_prompt


def _seeds(seed, batch: int) -> list[int]:
    if seed is None:
        base = int(np.random.default_rng().integers(0, 2**31 - 1))
        return [base + k for k in range(batch)]
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + k for k in range(batch)]
    seed = [int(s) for s in seed]
    if len(seed) != batch:
        raise ValueError(f"{len(seed)} seeds for {batch} images")
    return seed
