"""ZImagePipeline: text-to-image, image-to-image, inpainting and ControlNet with the MLX models.

Mirrors diffusers' `ZImagePipeline` / `ZImageImg2ImgPipeline` / `ZImageInpaintPipeline` /
`ZImageControlNetPipeline` / `ZImageControlNetInpaintPipeline` (pipelines/z_image/; argument names and meaning),
with MLX's RNG for the noise. Components load lazily on first use, so the text encoder can run (and be freed)
before the transformer ever occupies memory. Arguments are checked at this boundary: a bad value is a ValueError
naming the argument and what is allowed, before anything loads or computes.
"""

from __future__ import annotations

import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from .. import sampler
from .control_maps import control_map
from ..models.controlnet import SEMANTICS, ControlConditioning, ControlInput, controlnet_config, load_controlnet
from ..loading.components import MODEL_COMPONENTS, QUANTIZABLE, build_model, is_mlx_dir, load_component, read_manifest
from ..loading.convert import convert
from ..distributed import (barrier, check_mode, check_tensor_parallel, failed_ranks, gather_batches, init_group,
                          shared_random_seed, tensor_parallel_sizes)
from ..loading.hub import DEFAULT_REPO, cache_dir, find_cached, looks_like_repo_id, resolve_file, resolve_source
from ..lora.adapters import LoRAError, LoRAState, load_adapter
from ..memory import MemoryPlan, check_fits, component_weight_bytes, plan_memory, size_multiple
from ..loading.quantize import dequantize_matmuls, describe_bits, parse_quantize
from ..sampler import VARIANT_DEFAULTS, SchedulerConfig, check_variant, detect_variant
from ..models.text_encoder import encode_prompts
from ..models.tokenizer import ZImageTokenizer
from ..models.transformer import ZImageTransformerConfig, fuse_projections
from ..loading.weights import WeightError, component_files, default_dtype, dtype_name, parse_dtype, read_config, \
    safetensors_keys

LATENT_CHANNELS = 16
PATCH_SIZE = 2
DEFAULT_SIZE = 1024
DEFAULT_STRENGTH = 0.6          # img2img (diffusers' ZImageImg2ImgPipeline default)
DEFAULT_INPAINT_STRENGTH = 1.0  # inpainting (diffusers' ZImageInpaintPipeline default)
MAX_SEED = 2**64 - 1            # MLX keys are 64-bit
PROMPT_CACHE_SIZE = 32          # caption features kept per pipeline (CLI seeds, server requests)


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


# --------------------------------------------------------------------------- argument checks
def _int_arg(name: str, value, low: int = 1, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _float_arg(name: str, value, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return float(value)


def _prompts_arg(name: str, value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError(f"{name} is an empty list; give at least one prompt")
    raise ValueError(f"{name} must be a string or a list of strings, got {type(value).__name__}")


def expand_seeds(seed, batch: int) -> list[int]:
    """One seed per image: an int counts up (seed + k), a list gives each image its own, None picks a random base."""
    if seed is None:
        base = int(np.random.default_rng().integers(0, 2**32))
        return [base + k for k in range(batch)]
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"{len(seed)} seeds for {batch} images")
        return [_int_arg("seed", s, 0, MAX_SEED) for s in seed]
    base = _int_arg("seed", seed, 0, MAX_SEED - (batch - 1))
    return [base + k for k in range(batch)]


# --------------------------------------------------------------------------- images
def load_image(image, mode: str = "RGB", name: str = "image") -> Image.Image:
    """PIL image / path / HW(C) uint8 or [0,1] float array → PIL image in `mode`."""
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL image, a path or an HxWx3 array, got {type(image).__name__}")
    return image.convert(mode)


def preprocess_image(image, height: int | None, width: int | None, multiple: int) -> np.ndarray:
    """PIL image / path / HWC uint8 or [0,1] float array → (1,H,W,3) float32 in [−1,1].

    Without height/width the image keeps its size floored to a multiple of `multiple` (diffusers'
    VaeImageProcessor with vae_scale_factor·2); resizing uses Lanczos.
    """
    image = load_image(image)
    if (width is None and image.width < multiple) or (height is None and image.height < multiple):
        raise ValueError(f"the input image is {image.width}x{image.height} pixels; it must be at least "
                         f"{multiple}x{multiple} (or give height and width to resize it)")
    w = image.width - image.width % multiple if width is None else width
    h = image.height - image.height % multiple if height is None else height
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.LANCZOS)
    arr = np.asarray(image).astype(np.float32) / 255.0
    return (arr * 2.0 - 1.0)[None]


def preprocess_mask(mask, height: int, width: int, image_size: tuple[int, int] | None = None,
                    blur: float = 0.0) -> np.ndarray:
    """Mask (white = repaint; PIL / path / array) → (H, W) float32 in {0, 1} as diffusers' mask processor makes it
    (VaeImageProcessor with do_binarize and do_convert_grayscale): grayscale, resized to height×width with
    Lanczos, /255, binarized at 0.5.

    image_size: the (width, height) of the image the mask belongs to; a mask of another size is resized when its
    aspect ratio agrees within 2 %, refused otherwise. blur > 0: a Gaussian blur of that radius (pixels) and no
    binarization (a feathered mask).
    """
    m = load_image(mask, "L", "mask_image")
    if image_size is not None and m.size != tuple(image_size):
        if abs((m.width / m.height) / (image_size[0] / image_size[1]) - 1) > 0.02:
            raise ValueError(f"mask_image is {m.width}x{m.height} but the image is {image_size[0]}x{image_size[1]}: "
                             "give a mask of the image's size (or at least its aspect ratio)")
    if m.size != (width, height):
        m = m.resize((width, height), resample=Image.LANCZOS)
    if blur > 0:
        from PIL import ImageFilter

        return np.asarray(m.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32) / 255.0
    return (np.asarray(m, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)


def mask_to_latent(mask: np.ndarray, h: int, w: int, soft: bool = False) -> mx.array:
    """(H, W) pixel mask → (1, 1, h, w) on the latent grid: torch's `interpolate(mode="nearest")` (source index
    floor(i·H/h)), or the area average for a feathered mask."""
    H, W = mask.shape
    if soft:
        return mx.array(mask.reshape(h, H // h, w, W // w).mean(axis=(1, 3))[None, None])
    rows = np.minimum(np.floor(np.arange(h) * np.float32(H / h)).astype(np.int64), H - 1)
    cols = np.minimum(np.floor(np.arange(w) * np.float32(W / w)).astype(np.int64), W - 1)
    return mx.array(mask[rows][:, cols][None, None])


def postprocess(decoded: mx.array) -> np.ndarray:
    """Decoder output NHWC in [−1,1] → float32 numpy in [0,1]."""
    return np.array(mx.clip(decoded.astype(mx.float32) / 2 + 0.5, 0.0, 1.0))


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray((img * 255).round().astype(np.uint8)) for img in images]


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
        self.controlnet_semantics = _check_semantics(controlnet_semantics)
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
        self._prompt_cache: OrderedDict[tuple[str, int], mx.array] = OrderedDict()
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

    # ----------------------------------------------------------------- construction
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
        parallel = check_mode(parallel)
        group = init_group() if parallel else None
        world = group.size() if group is not None else 1
        if parallel == "cfg" and world > 2:
            raise ValueError(f"parallel='cfg' runs the two guidance branches on 2 processes; this launch has {world} "
                             "(use parallel='data' or 'tensor')")
        mx_dtype = parse_dtype(dtype) if dtype is not None else None
        requested = parse_quantize(quantize)
        if variant is not None:
            check_variant(variant)
        hub_id = str(src) if looks_like_repo_id(str(src)) else None
        try:
            root = resolve_source(src, revision=revision)
        except WeightError:
            # Offline with the hub snapshot gone: a converted copy in our cache still serves.
            root = find_cached(hub_id, revision, mx_dtype) if hub_id else None
            if root is None:
                raise
        manifest = _read_layout(root)
        tensor = parallel == "tensor" and world > 1
        if mx_dtype is None:
            mx_dtype = parse_dtype(manifest["components"]["transformer"]["dtype"]) if manifest else default_dtype()
        configs = {n: read_config(root / n) for n in MODEL_COMPONENTS}
        _check_semantics(controlnet_semantics)
        if controlnet is not None:
            controlnet = resolve_file(controlnet)
            configs["controlnet"] = controlnet_config(controlnet).to_dict()

        saved_bits = {n: manifest["components"][n].get("bits") for n in QUANTIZABLE} if manifest else {}
        if any(saved_bits.values()):
            requested = saved_bits          # already quantized on disk: load (and plan) as saved
        if tensor:
            check_tensor_parallel(configs["transformer"], world)
        # The text encoder is split too when its heads allow it; otherwise every process holds all of it.
        shards = {n: world for n in QUANTIZABLE
                  if tensor and world in tensor_parallel_sizes(n, configs[n], up_to=world)}
        plan = plan_memory(configs, mx_dtype, requested=requested, height=height, width=width, shards=shards,
                           keep_text_encoder=keep_text_encoder)
        if keep_text_encoder is None:
            keep_text_encoder = not plan.free_text_encoder_first     # keep it between calls when that fits
        bits, group_size = plan.bits, plan.group_size
        if tensor:
            check_tensor_parallel(configs["transformer"], world, bits["transformer"], group_size)
            shards = {n: k for n, k in shards.items()
                      if world in tensor_parallel_sizes(n, configs[n], bits.get(n), group_size, up_to=world)}

        if hub_id is not None and manifest is None:
            cached = cache_dir(hub_id, root, mx_dtype, bits)
            verbose = verbose and (group is None or group.rank() == 0)
            # Processes take turns, so the first on each machine converts and the others sharing its disk reuse it.
            for turn in range(world):
                if (group is None or group.rank() == turn) and not _usable_conversion(cached):
                    if verbose:
                        print(f"converting {hub_id} to MLX (once) into {cached} …", file=sys.stderr)
                    convert(cached, root, dtype=dtype_name(mx_dtype), quantize=bits, group_size=group_size,
                            overwrite=True, log=(lambda m: print(m, file=sys.stderr)) if verbose else (lambda m: None))
                if group is not None:
                    barrier(group)
            root, manifest = cached, read_manifest(cached)

        sched_file = root / "scheduler" / "scheduler_config.json"
        scheduler = SchedulerConfig.from_file(sched_file) if sched_file.is_file() else SchedulerConfig()
        saved = manifest["components"] if manifest else {}
        loaders = {n: (lambda n=n: load_component(n, root / n, mx_dtype, bits.get(n), group_size, saved=saved.get(n),
                                                  group=group if n in shards else None))
                   for n in MODEL_COMPONENTS}
        variant = variant or (manifest or {}).get("variant") or detect_variant(src, scheduler)
        pipe = cls(tokenizer=ZImageTokenizer.from_dir(root / "tokenizer"), scheduler_config=scheduler,
                   loaders=loaders, configs=configs, variant=variant, keep_text_encoder=keep_text_encoder,
                   source=str(src), dtype=mx_dtype, quantization=describe_bits(bits), plan=plan, compile=compile,
                   fused_projections=fused_projections, parallel=parallel, group=group, controlnet_semantics=controlnet_semantics)
        if controlnet is not None:
            pipe.load_controlnet(controlnet)
        return pipe

    def load_controlnet(self, path: str | Path, semantics: str | None = None, config: dict | None = None) -> None:
        """Use a ControlNet Union (2.1, 2.1-lite, 2.0 or v1): a published .safetensors file (variant read from its
        keys; `config` entries override), a diffusers-layout or converted MLX directory, or a hub file written
        "owner/repo/file.safetensors". Checked now against the transformer (dim, heads, layer places); the weights
        load on first use, in the pipeline's dtype and the transformer's quantization."""
        if semantics is not None:
            self.controlnet_semantics = _check_semantics(semantics)
        path = resolve_file(path)
        cfg = controlnet_config(path, config)
        cfg.check_matches(ZImageTransformerConfig.from_dict(self._config("transformer")), source=f"ControlNet {path}")
        self.configs["controlnet"] = cfg.to_dict()
        bits = self.plan.bits.get("transformer") if self.plan is not None else None
        group = self.plan.group_size if self.plan is not None else 64
        if self.plan is not None:   # its weights now count in every size check
            self.plan.stages["weights_controlnet"] = component_weight_bytes("controlnet", self.configs["controlnet"],
                                                                            self.dtype, bits, group)
        self._models["controlnet"] = None
        self._loaders["controlnet"] = lambda: load_controlnet(path, self.dtype, config=config, bits=bits,
                                                              group_size=group)

    def unload_controlnet(self) -> None:
        """Forget the ControlNet (and free its weights)."""
        self._models["controlnet"] = None
        self._loaders.pop("controlnet", None)
        self.configs.pop("controlnet", None)
        if self.plan is not None:
            self.plan.stages.pop("weights_controlnet", None)
        mx.clear_cache()

    @property
    def has_controlnet(self) -> bool:
        return self._models.get("controlnet") is not None or "controlnet" in self._loaders

    def _component(self, name: str):
        model = self._models.get(name)
        if model is None:
            if name not in self._loaders:
                raise RuntimeError(f"this pipeline has no {name}")
            t0 = time.perf_counter()
            model = self._prepare_model(name, self._loaders[name]())
            self.timings[f"load_{name}"] = self.timings.get(f"load_{name}", 0.0) + time.perf_counter() - t0
            self._models[name] = model
        if name == "transformer" and self._lora.model is not model and self._lora.adapters:
            self._lora.attach(model)   # LoRAs loaded before the transformer
        return model

    def _prepare_model(self, name: str, model):
        """What this backend runs: fused projections (q/k/v and w1/w3 as one matmul each; LoRAs address the row
        slices), float matmuls for quantized layers on the CPU, compiled elementwise chains."""
        if name in ("transformer", "controlnet") and self.fused_projections:
            fuse_projections(model)
        if self.dequantize_matmuls:
            dequantize_matmuls(model)
        if hasattr(model, "set_compile"):
            model.set_compile(self.compile, cpu_streams=self.group is None)
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

    @property
    def controlnet(self):
        return self._component("controlnet")

    def free_text_encoder(self) -> None:
        """Drop the text encoder's weights (it reloads on the next encode). Already encoded prompts stay cached."""
        self._free("text_encoder")

    def _free(self, name: str) -> None:
        if name in self._loaders:     # injected models (no loader) stay
            self._models[name] = None
            mx.clear_cache()

    def _config(self, name: str):
        """A component's config dict without loading it (an injected model's own config otherwise)."""
        if name in self.configs:
            return self.configs[name]
        return vars(self._component(name).config)

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

    def check_size(self, height, width, batch: int = 1) -> tuple[int, int]:
        """Refuse, before any work, a size that is not a positive multiple, exceeds the model's position range,
        or cannot fit this machine's memory (saying the largest size that fits)."""
        m = self.size_multiple
        for name, v in (("height", height), ("width", width)):
            _int_arg(name, v, 1)
            if v % m:
                raise ValueError(f"{name} must be a positive multiple of {m}, got {v} (try {max(m, round(v / m) * m)})")
        axes = self._config("transformer").get("axes_lens", [1536, 512, 512])
        for name, v, n in (("height", height, axes[1]), ("width", width, axes[2])):
            if v // m > n:
                raise ValueError(f"{name} {v} exceeds the model's position range: at most {n * m} pixels "
                                 f"({n} latent patches of {m} pixels)")
        if self.plan is not None:
            check_fits(self.configs, self.dtype, self.plan, height, width, batch)
        return int(height), int(width)

    # ----------------------------------------------------------------- LoRA (diffusers' ZImageLoraLoaderMixin API)
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None) -> str:
        """Add a LoRA with weight 1.0 and return its adapter name (default "default_N", as diffusers names them).

        As in diffusers, the newly loaded adapter becomes the active one; combine adapters with `set_adapters`.
        Accepts a .safetensors path, a hub file "owner/repo/file.safetensors", or a {key: array} dict, in any
        Z-Image LoRA format (lora.py). A LoRA for another model, keys that match no layer, or bad shapes raise
        LoRAError and change nothing. Before the transformer is loaded, the LoRA is applied when it loads.
        """
        if self.parallel == "tensor" and self.world_size > 1:
            raise LoRAError("LoRAs are not supported with tensor parallelism yet (its layers are split across "
                            "processes); use parallel='data' or 'cfg'")
        name = adapter_name
        n = len(self._lora.adapters)
        while name is None or (adapter_name is None and name in self._lora.adapters):
            name, n = f"default_{n}", n + 1
        loaded = self._models.get("transformer")
        reference = loaded if loaded is not None else build_model("transformer", self._config("transformer"))
        source = pretrained_model_name_or_path_or_dict
        if not isinstance(source, dict):
            source = resolve_file(source)
        adapter = load_adapter(source, reference, self._lora_dtype(), name)
        if loaded is not None and self._lora.model is not loaded:
            self._lora.attach(loaded)
        self._lora.add(adapter)
        return name

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights=None) -> None:
        """Activate these adapters with these weights (one float for all, or one per name; default 1.0); the
        other loaded adapters get weight 0. Never reloads the base model."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None or isinstance(adapter_weights, (int, float)):
            weights = [1.0 if adapter_weights is None else float(adapter_weights)] * len(names)
        else:
            weights = [float(w) for w in adapter_weights]
            if len(weights) != len(names):
                raise ValueError(f"{len(weights)} adapter weights for {len(names)} adapters")
        self._lora.set_weights(dict(zip(names, weights)))

    def get_active_adapters(self) -> list[str]:
        return [n for n, a in self._lora.adapters.items() if a.weight != 0.0]

    def unload_lora_weights(self) -> None:
        """Remove every LoRA: the transformer is exactly the base model again."""
        self._lora.clear()

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> None:
        """Merge the active LoRAs into the (float) weights for slightly faster steps; `unfuse_lora` undoes it.
        Quantized layers are refused: their LoRAs stay side branches."""
        self.transformer  # noqa: B018 - load (and attach) first
        self._lora.fuse(adapter_names, lora_scale)

    def unfuse_lora(self) -> None:
        self._lora.unfuse()

    @property
    def loras(self) -> list[dict]:
        """The loaded LoRAs: name, file, sha256 and weight (what PNG metadata records)."""
        return [{"name": a.name, "file": a.source, "sha256": a.sha256, "weight": a.weight}
                for a in self._lora.adapters.values()]

    def _lora_dtype(self) -> mx.Dtype:
        loaded = self._models.get("transformer")
        return loaded.dtype if loaded is not None else self.dtype

    # ----------------------------------------------------------------- text
    def encode_prompt(self, prompts: str | Sequence[str], max_sequence_length: int = 512) -> list[mx.array]:
        """Prompt(s) → list of (L_i, D) caption features: only the real tokens (diffusers' encode_prompt).

        The last PROMPT_CACHE_SIZE prompts are cached: the same prompt is never encoded twice (and needs no text
        encoder once cached).
        """
        prompts = _prompts_arg("prompt", prompts)
        todo = list(dict.fromkeys(p for p in prompts if (p, max_sequence_length) not in self._prompt_cache))
        if todo:
            encoder = self.text_encoder   # (its load time is counted under load_text_encoder)
            t0 = time.perf_counter()
            feats = encode_prompts(self.tokenizer, encoder, todo, max_length=max_sequence_length)
            mx.eval(feats)
            self.timings["encode"] = self.timings.get("encode", 0.0) + time.perf_counter() - t0
            for p, f in zip(todo, feats):
                self._prompt_cache[(p, max_sequence_length)] = f
        out = []
        for p in prompts:
            self._prompt_cache.move_to_end((p, max_sequence_length))
            out.append(self._prompt_cache[(p, max_sequence_length)])
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return out

    # ----------------------------------------------------------------- latents
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

    def defaults(self, num_inference_steps=None, guidance_scale=None) -> tuple[int, float]:
        """(steps, guidance): the given values checked, or the model variant's defaults (Turbo 8/0, Base 50/4)."""
        d = VARIANT_DEFAULTS[self.variant]
        steps = d["num_inference_steps"] if num_inference_steps is None else \
            _int_arg("num_inference_steps", num_inference_steps, 1, 1000)
        g = d["guidance_scale"] if guidance_scale is None else _float_arg("guidance_scale", guidance_scale, 0.0)
        return steps, g

    @staticmethod
    def steps_to_run(steps: int, strength: float | None) -> int:
        """How many denoising steps a call runs: all of them, or img2img's share (diffusers' get_timesteps)."""
        return steps - (sampler.img2img_start(steps, strength) if strength is not None else 0)

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
        callback(step_index, sigma, latents): called after every step; return False to cancel.
        output_type: "pil" | "np" | "latent".
        Under `mlx.launch` (`from_pretrained`'s `parallel`) every process makes this same call and gets the whole
        result; in data-parallel mode a failure on one process is raised on all of them.
        """
        args = dict(locals())
        del args["self"]
        if self.group is None:
            return self._generate(**args)
        if args["seed"] is None and args["latents"] is None:
            args["seed"] = shared_random_seed(self.group)     # every process must draw the same noise
        if self.parallel == "data":
            return self._generate_data_parallel(args)
        return self._generate(**args)

    def _generate_data_parallel(self, args: dict) -> PipelineOutput:
        """Image k of the batch on process k mod N, with the seed it has in a one-process run; gathered at the end."""
        n, rank = self.world_size, self.rank
        n_per = _int_arg("num_images_per_prompt", args["num_images_per_prompt"], 1)
        key = "prompt_embeds" if args["prompt_embeds"] is not None else "prompt"
        if args[key] is None:
            return self._generate(**args)          # refused the same way on every process
        per_prompt = list(args[key]) if key == "prompt_embeds" else _prompts_arg("prompt", args[key])
        batch = len(per_prompt) * n_per
        seeds = expand_seeds(args["seed"], batch)
        mine = list(range(rank, batch, n))
        sub = dict(args, num_images_per_prompt=1, seed=None if args["seed"] is None else [seeds[k] for k in mine],
                   output_type="np" if args["output_type"] == "pil" else args["output_type"], image_seed=seeds[0])
        sub[key] = [per_prompt[k // n_per] for k in mine]
        neg = args["negative_prompt"]
        if isinstance(neg, (list, tuple)) and len(neg) == len(per_prompt) > 1:
            sub["negative_prompt"] = [neg[k // n_per] for k in mine]
        if args["negative_prompt_embeds"] is not None:
            sub["negative_prompt_embeds"] = [args["negative_prompt_embeds"][k // n_per] for k in mine]
        for name in ("latents", "noise"):
            if args[name] is not None:
                sub[name] = np.asarray(args[name], dtype=np.float32)[mine]
        error, out = None, None
        try:
            if mine:
                out = self._generate(**sub)
        except Exception as e:  # noqa: BLE001 - shared with the other processes below, then re-raised
            error = e
        failed = failed_ranks(error is not None, self.group)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"process {', '.join(map(str, failed))} of {n} failed (see its message)")
        local = mx.zeros((0, 1, 1, 1)) if out is None else mx.array(out.images)
        images = gather_batches(local, self.group)
        if args["output_type"] != "latent":
            images = np.array(images)
            if args["output_type"] == "pil":
                images = to_pil(images)
        return PipelineOutput(images=images, seeds=[None] * batch if args["seed"] is None else seeds,
                              timings=dict(out.timings if out else self.timings),
                              peak_memory_gb=mx.get_peak_memory() / 1e9)

    def _generate(self, *, prompt, height, width, num_inference_steps, guidance_scale, negative_prompt,
                  cfg_normalization, cfg_truncation, num_images_per_prompt, seed, latents, prompt_embeds,
                  negative_prompt_embeds, image, strength, output_type, callback, max_sequence_length, noise,
                  image_noise, mask_image, mask_blur, paste_back, control_image, control_type,
                  controlnet_conditioning_scale, image_seed=None) -> PipelineOutput:
        """`__call__` on this process, every argument of `__call__` given (its defaults live there only);
        image_seed: the seed of img2img's VAE-sample key (default: the first image's)."""
        t_start = time.perf_counter()
        self.timings = {k: v for k, v in self.timings.items() if k.startswith("load_")}
        mx.reset_peak_memory()
        steps, g = self.defaults(num_inference_steps, guidance_scale)
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        n_per = _int_arg("num_images_per_prompt", num_images_per_prompt, 1)
        cfg_truncation = _float_arg("cfg_truncation", cfg_truncation)
        cfg_normalization = _float_arg("cfg_normalization", float(cfg_normalization or 0.0), 0.0)
        mask_blur = _float_arg("mask_blur", mask_blur, 0.0)
        controls, scales = self._check_control_args(image, mask_image, strength, control_image,
                                                    controlnet_conditioning_scale)
        inpaint = mask_image is not None and not controls
        if image is not None and not controls:
            default = DEFAULT_INPAINT_STRENGTH if inpaint else DEFAULT_STRENGTH
            strength = default if strength is None else _float_arg("strength", strength, 0.0, 1.0)
            first = sampler.img2img_start(steps, strength)
            if first >= steps:
                raise ValueError(f"strength {strength} with {steps} steps leaves no step to run")
        elif strength is not None and image is None:
            raise ValueError("strength needs an image (image-to-image or inpainting)")
        else:
            first = 0
        do_cfg = g > 0
        cfg_split = self.parallel == "cfg" and self.group is not None
        if cfg_split and not do_cfg:
            raise ValueError("parallel='cfg' splits classifier-free guidance, which is off (guidance_scale 0, as "
                             "Turbo uses); use parallel='data' or 'tensor'")
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give a prompt or prompt_embeds")
            prompts = _prompts_arg("prompt", prompt)
        else:
            prompts = None
            if do_cfg and negative_prompt_embeds is None:
                raise ValueError("with prompt_embeds and guidance_scale > 0, pass negative_prompt_embeds too")
        batch = (len(prompts) if prompts is not None else len(prompt_embeds)) * n_per
        seeds = expand_seeds(seed, batch)
        reported_seeds = seeds
        # Size: height/width, else the image's (or first control image's) own size floored to the size multiple.
        init_image = mask = None
        control_pils = [control_map(load_image(c, name="control_image"), control_type) for c in controls]
        if image is not None:
            image_pil = load_image(image)
            init_image = preprocess_image(image_pil, height, width, self.size_multiple)
            height, width = init_image.shape[1], init_image.shape[2]
            if mask_image is not None:
                mask = preprocess_mask(mask_image, height, width, image_pil.size, blur=mask_blur if inpaint else 0.0)
        elif control_pils:
            m = self.size_multiple
            height = height or max(m, control_pils[0].height - control_pils[0].height % m)
            width = width or max(m, control_pils[0].width - control_pils[0].width % m)
        height, width = self.check_size(DEFAULT_SIZE if height is None else height,
                                        DEFAULT_SIZE if width is None else width, batch)
        shape = self.latent_shape(batch, height, width)
        eps = None if noise is None else _as_mx(noise, shape, "noise")

        # 1. prompts → caption features
        if prompts is not None:
            negs = _expand_negative(negative_prompt, len(prompts)) if do_cfg and negative_prompt_embeds is None else []
            feats = self.encode_prompt(prompts + negs, max_sequence_length)
            prompt_embeds, neg_from_text = feats[: len(prompts)], feats[len(prompts):]
            if negs:
                negative_prompt_embeds = neg_from_text
            if not self.keep_text_encoder:
                self.free_text_encoder()
        pos = [e for e in prompt_embeds for _ in range(n_per)]
        neg = [e for e in negative_prompt_embeds for _ in range(n_per)] if do_cfg else []

        # 2. schedule
        sigmas = sampler.sigmas_for(steps, self.scheduler_config, image_seq_len=(shape[2] // 2) * (shape[3] // 2))
        timesteps = sampler.timesteps_for(sigmas, self.scheduler_config)

        # 3. start latents (inpainting also keeps the clean latent z0, the noise ε and the latent-grid mask)
        if latents is not None:
            latents = _as_mx(latents, shape, "latents")
            reported_seeds = [None] * batch if seed is None else seeds
        if init_image is not None and not controls and (latents is None or inpaint):
            self.vae  # noqa: B018 - load first so vae_encode times the encode alone
            t0 = time.perf_counter()
            enc_noise = None if image_noise is None else mx.array(np.asarray(image_noise, dtype=np.float32))
            enc_dtype = prompt_embeds[0].dtype
            # The VAE sample needs its own key: key(seed) itself draws image 0's start noise below.
            z0 = self.vae.encode(mx.array(init_image).astype(enc_dtype),
                                 key=self.image_noise_key(seeds[0] if image_seed is None else image_seed),
                                 noise=enc_noise)
            z0 = mx.broadcast_to(z0.astype(mx.float32), shape)
            eps = self.noise(seeds, shape) if eps is None else eps
            if latents is None:
                s0 = mx.array(sigmas[first], dtype=mx.float32)
                latents = s0 * eps + (1.0 - s0) * z0
            self.timings["vae_encode"] = time.perf_counter() - t0
        elif latents is None:
            latents = self.noise(seeds, shape) if eps is None else eps
        m_lat = mask_to_latent(mask, shape[2], shape[3], soft=mask_blur > 0) if inpaint else None
        control = self._control(control_pils, scales, init_image, mask, height, width, batch) if controls else None
        mx.eval(latents)

        # 4. denoise (the caption path and RoPE tables are prepared once, for both CFG branches)
        transformer = self.transformer
        t0 = time.perf_counter()
        both = list(pos) + list(neg)
        if hasattr(transformer, "prepare"):
            both = transformer.prepare(both, shape[2], shape[3])
            cond = both.select(range(batch)) if neg else both
            uncond = both.select(range(batch, 2 * batch)) if neg else None
        else:
            cond, uncond = list(pos), list(neg)
        for i in range(first, steps):
            t_model = float(sampler.model_time(timesteps[i], self.scheduler_config))
            g_i = sampler.guidance_for_step(g, t_model, cfg_truncation) if do_cfg else 0.0
            x_in = latents.astype(_model_dtype(transformer))
            one = {"control": control} if control is not None else {}
            if g_i > 0 and cfg_split:
                # the positive branch on rank 0, the negative one on rank 1; all_gather stacks them in that order
                v = transformer(x_in, mx.full((batch,), t_model, dtype=mx.float32), uncond if self.rank else cond,
                                **one)
                v = mx.distributed.all_gather(v, group=self.group)
                v = sampler.guidance(v[:batch], v[batch:], g_i, cfg_normalization)
            elif g_i > 0:
                t = mx.full((2 * batch,), t_model, dtype=mx.float32)
                kw = {"control": control.doubled()} if control is not None else {}
                v = transformer(mx.concatenate([x_in, x_in]), t, both, **kw)
                v = sampler.guidance(v[:batch], v[batch:], g_i, cfg_normalization)
            else:
                v = transformer(x_in, mx.full((batch,), t_model, dtype=mx.float32), cond, **one)
            latents = sampler.euler_step(latents, v, sigmas[i], sigmas[i + 1])
            if inpaint:
                # diffusers ZImageInpaintPipeline: the kept region follows the image re-noised with the same ε.
                s_next = mx.array(sigmas[i + 1], dtype=mx.float32)
                proper = z0 if i == steps - 1 else s_next * eps + (1.0 - s_next) * z0
                latents = (1.0 - m_lat) * proper + m_lat * latents
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
            if self.plan is not None and self.plan.free_transformer_before_decode:
                self._free("transformer")      # what makes this size fit (memory plan); it reloads next call
                self._free("controlnet")
            self.vae  # noqa: B018 - load first so decode times the decode alone
            t0 = time.perf_counter()
            images = self.decode_latents(latents)
            if paste_back and mask is not None:
                keep = 1.0 - mask[None, :, :, None]
                images = keep * (init_image + 1.0) / 2.0 + (1.0 - keep) * images
            self.timings["decode"] = time.perf_counter() - t0
            if output_type == "pil":
                images = to_pil(images)
        self.timings["total"] = time.perf_counter() - t_start
        return PipelineOutput(images=images, seeds=reported_seeds, timings=dict(self.timings),
                              peak_memory_gb=mx.get_peak_memory() / 1e9)

    def _check_control_args(self, image, mask_image, strength, control_image, scales) -> tuple[list, list[float]]:
        """Validate the image / mask / control arguments together: (control images, one scale each)."""
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image (the picture to inpaint)")
        if control_image is None:
            return [], []
        controls = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
        if not self.has_controlnet:
            raise ValueError("control_image given but this pipeline has no ControlNet: load one with "
                             "ZImagePipeline.from_pretrained(..., controlnet=PATH) or pipe.load_controlnet(PATH)")
        if isinstance(scales, (list, tuple)):
            if len(scales) != len(controls):
                raise ValueError(f"{len(scales)} controlnet_conditioning_scale values for {len(controls)} "
                                 "control images")
            scales = [_float_arg("controlnet_conditioning_scale", s) for s in scales]
        else:
            scales = [_float_arg("controlnet_conditioning_scale", scales)] * len(controls)
        if image is not None and mask_image is None:
            raise ValueError("image with control_image needs mask_image (ControlNet inpainting); ControlNet "
                             "image-to-image is not supported")
        if mask_image is not None:
            if self._config("controlnet")["control_in_dim"] == LATENT_CHANNELS:
                raise ValueError("ControlNet inpainting needs a 2.x ControlNet (33-channel control context); "
                                 "this one is v1 (16 channels)")
            if strength is not None and float(strength) != 1.0:
                raise ValueError("ControlNet inpainting starts from pure noise and takes no strength "
                                 "(as diffusers' ZImageControlNetInpaintPipeline)")
        return controls, scales

    def _control(self, control_pils, scales, init_image, mask, height, width, batch):
        """The ControlNet hook for this call: one (B, control_in_dim, h, w) context per control image.

        Context channels (diffusers' ZImageControlNet(Inpaint)Pipeline; VideoX-Fun's ZImageControlPipeline):
        v1: [control latent (16)]; 2.x: [control latent, 1 − mask (1), latent of image·(mask < 0.5) (16)] when
        inpainting, else [control latent, 0, latent of a mid-gray image] ("reference": VideoX-Fun encodes a zero
        image in [−1, 1]) or [control latent, 17 zeros] ("diffusers"). Latents are VAE posterior means.
        """
        net, vae = self.controlnet, self.vae
        cin = net.config.control_in_dim
        t0 = time.perf_counter()

        def encode(pixels):
            return vae.encode(mx.array(pixels).astype(vae.dtype)).astype(mx.float32)

        extra = None
        if cin != LATENT_CHANNELS:
            if mask is not None:
                masked = encode(init_image * (mask < 0.5)[None, :, :, None])
                extra = mx.concatenate([1.0 - mask_to_latent(mask, *masked.shape[2:]), masked], axis=1)
            elif self.controlnet_semantics == "reference":
                gray = encode(np.zeros((1, height, width, 3), np.float32))
                extra = mx.concatenate([mx.zeros((1, 1, *gray.shape[2:])), gray], axis=1)
        inputs = []
        for pil, scale in zip(control_pils, scales):
            if scale == 0.0:
                continue   # a zero hint: skip the work (the result is identical)
            ctx = encode(preprocess_image(pil, height, width, self.size_multiple))
            if cin != LATENT_CHANNELS:
                ctx = mx.concatenate([ctx, extra if extra is not None else
                                      mx.zeros((1, cin - LATENT_CHANNELS, *ctx.shape[2:]))], axis=1)
            inputs.append(ControlInput(mx.broadcast_to(ctx, (batch, *ctx.shape[1:])), scale))
        mx.eval([i.context for i in inputs])
        self.timings["control_encode"] = time.perf_counter() - t0
        return ControlConditioning(net, inputs, self.controlnet_semantics) if inputs else None




def _read_layout(root: Path) -> dict | None:
    """The manifest of an MLX-layout directory, or None for a Hugging Face-layout one; every weight file's header
    is checked here, so a truncated or corrupt shard is reported before anything loads or computes."""
    manifest = read_manifest(root) if is_mlx_dir(root) else None
    for part in (*MODEL_COMPONENTS, "tokenizer"):
        if not (root / part).is_dir():
            raise WeightError(
                f"{root}: not a Z-Image model directory (no {part}/ folder); expected the Hugging Face layout of "
                f"{DEFAULT_REPO} or a directory made by `zimage-mlx convert`"
            )
    for part in MODEL_COMPONENTS:
        for f in component_files(root / part):
            safetensors_keys(f)
    return manifest


def _usable_conversion(path: Path) -> bool:
    """A cached conversion that reads as one (manifest and every header intact); a corrupt one is rebuilt."""
    if not is_mlx_dir(path):
        return False
    try:
        _read_layout(path)
    except WeightError:
        return False
    return True


def _as_mx(a, shape, name: str) -> mx.array:
    a = a.astype(mx.float32) if isinstance(a, mx.array) else mx.array(np.asarray(a, dtype=np.float32))
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} have shape {tuple(a.shape)}, expected {tuple(shape)} for this size and batch")
    return a


def _check_semantics(semantics: str) -> str:
    if semantics not in SEMANTICS:
        raise ValueError(f"controlnet_semantics must be one of {SEMANTICS}, got {semantics!r}")
    return semantics


def _model_dtype(model) -> mx.Dtype:
    return getattr(model, "dtype", mx.float32)


def _expand_negative(negative_prompt, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    negs = _prompts_arg("negative_prompt", negative_prompt)
    if len(negs) == 1:
        return negs * n
    if len(negs) != n:
        raise ValueError(f"{len(negs)} negative prompts for {n} prompts")
    return negs
