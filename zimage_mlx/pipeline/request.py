"""One generation request: its parameters, their defaults and their checks, in one place.

`GenerationRequest` holds what `ZImagePipeline.__call__` takes (diffusers' ZImagePipeline / Img2Img / Inpaint /
ControlNet argument names, pipelines/z_image/). Build it from Python keywords (`from_kwargs`) or from a plain dict
of CLI options or a JSON body (`from_dict`), then `validate(limits)`: every default filled and every rule checked
against `ModelLimits` — numbers read from the model's configs, so the CLI and the server can refuse a request before
any weight is read. A bad value raises `RequestError` (a ValueError) whose `.field` names the parameter.

Adding a parameter: a field here (with its default and, in `validate`, its check), the line of `__call__`'s
signature, and the code that uses it. Fields marked `per="prompt"` / `per="image"` are split by data-parallel
sharding (`shard`) without naming them; `python_only` fields (arrays, callables) are refused by `from_dict`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..sampler import VARIANT_DEFAULTS, check_variant, img2img_start
from .images import check_min_size, image_size
from .step_cache import cache_rule, cache_threshold
from .values import RequestError, float_arg, int_arg, is_finite_number, prompts_arg  # noqa: F401 (API)

DEFAULT_SIZE = 1024
DEFAULT_STRENGTH = 0.6          # img2img (diffusers' ZImageImg2ImgPipeline default)
DEFAULT_INPAINT_STRENGTH = 1.0  # inpainting (diffusers' ZImageInpaintPipeline default)
MAX_SEED = 2**64 - 1            # MLX keys are 64-bit
MAX_CONTROL_SCALE = 100.0       # |controlnet_conditioning_scale|: published ControlNets use 0-2; beyond 100 is a typo
MAX_LORA_WEIGHT = 100.0         # |LoRA weight|: the same bound (diffusers' set_adapters takes any float)
OUTPUT_TYPES = ("pil", "np", "latent")
CALLBACK_TENSOR_INPUTS = ("latents",)   # what callback_on_step_end may read and replace


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against: numbers from the model's configs, no weights."""

    size_multiple: int = 16                         # VAE factor × patch size (memory.size_multiple)
    max_patches: tuple[int, int] = (512, 512)       # the transformer's axes_lens[1:] (height, width)
    variant: str = "turbo"                          # its steps/guidance defaults (sampler.VARIANT_DEFAULTS)
    control_in_dim: int | None = None               # the loaded ControlNet's channels; None: no ControlNet
    adapters: tuple[str, ...] | None = None         # loaded LoRA names (None: not checked)
    cfg_split: bool = False                         # parallel="cfg" under a launch: guidance must be on


def _per(kind: str, default=None, python_only: bool = False):
    return field(default=default, metadata={"per": kind, "python_only": python_only})


def _py(default=None):
    return field(default=default, metadata={"python_only": True})


@dataclass(frozen=True)
class GenerationRequest:
    """The parameters of one `ZImagePipeline.__call__` (see its docstring for their meaning)."""

    prompt: str | Sequence[str] | None = _per("prompt")
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | Sequence[str] | None = _per("prompt")
    cfg_normalization: float | bool = False
    cfg_truncation: float = 1.0
    num_images_per_prompt: int = 1
    seed: int | Sequence[int] | None = None
    latents: Any = _per("image", python_only=True)
    prompt_embeds: Sequence[Any] | None = _per("prompt", python_only=True)
    negative_prompt_embeds: Sequence[Any] | None = _per("prompt", python_only=True)
    image: Any = None
    strength: float | None = None
    output_type: str = "pil"
    callback: Callable[[int, float, Any], Any] | None = _py()
    max_sequence_length: int = 512
    noise: Any = _per("image", python_only=True)
    image_noise: Any = _py()
    mask_image: Any = None
    mask_blur: float = 0.0
    paste_back: bool = False
    control_image: Any = None
    control_type: str | None = None
    controlnet_conditioning_scale: float | Sequence[float] = 0.75
    loras: dict[str, float] | None = None
    on_step: Callable | Sequence[Callable] | None = _py()
    callback_on_step_end: Callable | None = _py()
    callback_on_step_end_tensor_inputs: Sequence[str] = _py(("latents",))
    cache: str | None = None              # step caching: "teacache" | "first_block" (step_cache.py)
    cache_threshold: float | None = None
    image_seed: int | None = _py()        # internal: img2img's VAE-sample key (data-parallel shards keep image 0's)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_kwargs(cls, **kwargs) -> "GenerationRequest":
        """The Python API's keywords (those of `ZImagePipeline.__call__`)."""
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise RequestError(unknown[0], f"unknown parameter {unknown[0]!r}")
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, d: dict, source: str = "json") -> "GenerationRequest":
        """A plain dict of CLI options or a JSON body (source "cli" | "json"): only JSON-like values; arrays and
        callables (latents, noise, prompt embeddings, callbacks) are Python-API only. Numbers are type-checked
        here (an integral float such as 512.0 counts as an integer), ranges in `validate`."""
        if not isinstance(d, dict):
            raise RequestError("", f"a {source} request must be an object of parameters, got {type(d).__name__}")
        allowed = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("python_only")}
        kw = {}
        for key, value in d.items():
            if key not in allowed:
                what = "a Python-API-only" if key in cls.field_names() else "an unknown"
                raise RequestError(str(key), f"{key!r} is {what} parameter for a {source} request")
            if isinstance(value, float) and value.is_integer() and key in _INT_FIELDS:
                value = int(value)
            kw[key] = value
        return cls(**kw)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived values (after validate)
    @property
    def prompts(self) -> list[str] | None:
        return None if self.prompt_embeds is not None else list(self.prompt)

    @property
    def batch(self) -> int:
        n = len(self.prompt_embeds) if self.prompt_embeds is not None else len(self.prompt)
        return n * self.num_images_per_prompt

    @property
    def controls(self) -> list:
        return list(self.control_image or [])

    @property
    def inpaint(self) -> bool:
        """Inpainting with the per-step blend (ControlNet inpainting has none)."""
        return self.mask_image is not None and not self.controls

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 0

    @property
    def first_step(self) -> int:
        return img2img_start(self.num_inference_steps, self.strength) if self.strength is not None else 0

    @property
    def steps_to_run(self) -> int:
        return self.num_inference_steps - self.first_step

    # ------------------------------------------------------------------ validation
    def validate(self, limits: ModelLimits = ModelLimits()) -> "GenerationRequest":
        """Every default filled and every rule checked: a new request (validating it again changes nothing).
        Reads input images' headers for their sizes, no model weights."""
        steps, g = step_defaults(limits.variant, self.num_inference_steps, self.guidance_scale)
        r = self.replace(num_inference_steps=steps, guidance_scale=g)
        if r.output_type not in OUTPUT_TYPES:
            raise RequestError("output_type", f"output_type must be 'pil', 'np' or 'latent', got {r.output_type!r}")
        r = r.replace(num_images_per_prompt=int_arg("num_images_per_prompt", r.num_images_per_prompt, 1),
                      cfg_truncation=float_arg("cfg_truncation", r.cfg_truncation),
                      cfg_normalization=float_arg("cfg_normalization", float(r.cfg_normalization or 0.0), 0.0),
                      mask_blur=float_arg("mask_blur", r.mask_blur, 0.0),
                      max_sequence_length=int_arg("max_sequence_length", r.max_sequence_length, 1))
        r.check_combinations(controlnet=limits.control_in_dim is not None)
        r = r._check_control(limits)._check_strength()._check_loras(limits)._check_cache()
        if limits.cfg_split and not r.do_cfg:
            raise RequestError("guidance_scale", "parallel='cfg' splits classifier-free guidance, which is off "
                               "(guidance_scale 0, as Turbo uses); use parallel='data' or 'tensor'")
        r = r._check_prompts()
        if r.seed is not None:
            expand_seeds(r.seed, r.batch)
        r._check_callbacks()
        return r._check_size(limits)

    def _check_prompts(self) -> "GenerationRequest":
        if self.prompt_embeds is None:
            if self.prompt is None:
                raise RequestError("prompt", "give a prompt or prompt_embeds")
            prompts = prompts_arg("prompt", self.prompt)
        else:
            prompts = self.prompt
            if self.do_cfg and self.negative_prompt_embeds is None:
                raise RequestError("negative_prompt_embeds",
                                   "with prompt_embeds and guidance_scale > 0, pass negative_prompt_embeds too")
        neg = self.negative_prompt
        if neg is not None and self.do_cfg and self.negative_prompt_embeds is None:   # else unused
            neg = prompts_arg("negative_prompt", neg)
            if prompts is not None and len(neg) not in (1, len(prompts)):
                raise RequestError("negative_prompt", f"{len(neg)} negative prompts for {len(prompts)} prompts")
        return self.replace(prompt=prompts, negative_prompt=neg)

    def _check_strength(self) -> "GenerationRequest":
        if self.image is not None and not self.controls:
            default = DEFAULT_INPAINT_STRENGTH if self.mask_image is not None else DEFAULT_STRENGTH
            strength = default if self.strength is None else float_arg("strength", self.strength, 0.0, 1.0)
            if img2img_start(self.num_inference_steps, strength) >= self.num_inference_steps:
                raise RequestError("strength", f"strength {strength} with {self.num_inference_steps} steps leaves "
                                   "no step to run")
            return self.replace(strength=strength)
        return self

    def check_combinations(self, controlnet: bool | None = None) -> None:
        """Which parameters need or exclude which: the rules that read no model config, so that a request can be
        refused before its pipeline exists (the CLI does); `validate` checks them too. controlnet: whether a
        ControlNet is loaded (None: not known, not checked)."""
        image, mask = self.image is not None, self.mask_image is not None
        controls = self.control_image if isinstance(self.control_image, (list, tuple)) else \
            [] if self.control_image is None else [self.control_image]
        if self.strength is not None and not image:
            raise RequestError("strength", "strength needs an image (image-to-image or inpainting)", needs="image")
        if mask and not image:
            raise RequestError("mask_image", "mask_image needs image (the picture to inpaint)", needs="image")
        for name in ("mask_blur", "paste_back"):
            if getattr(self, name) and not mask:
                raise RequestError(name, f"{name} needs mask_image (it shapes the inpainting)", needs="mask_image")
        if self.control_type not in (None, "none") and not controls:
            raise RequestError("control_type", "control_type needs control_image (the picture it turns into a map)",
                               needs="control_image")
        self._check_cache()
        if not controls:
            return
        if controlnet is False:
            raise RequestError("control_image", "control_image given but this pipeline has no ControlNet: load one "
                               "with ZImagePipeline.from_pretrained(..., controlnet=PATH) or pipe.load_controlnet(PATH)",
                               needs="controlnet")
        scales = self.controlnet_conditioning_scale
        if isinstance(scales, (list, tuple)) and len(scales) != len(controls):
            raise RequestError("controlnet_conditioning_scale", f"{len(scales)} controlnet_conditioning_scale "
                               f"values for {len(controls)} control images")
        if image and not mask:
            raise RequestError("image", "image with control_image needs mask_image (ControlNet inpainting); "
                               "ControlNet image-to-image is not supported", needs="mask_image", given="control_image")
        if mask and self.strength is not None and self.strength != 1:
            raise RequestError("strength", "ControlNet inpainting starts from pure noise and takes no strength "
                               "(as diffusers' ZImageControlNetInpaintPipeline)")

    def _check_control(self, limits: ModelLimits) -> "GenerationRequest":
        """control_image as a list, one scale per control image (after check_combinations)."""
        if self.control_image is None or (isinstance(self.control_image, (list, tuple)) and not self.control_image):
            if limits.control_in_dim is not None:
                warnings.warn("a ControlNet is loaded but no control_image was given: the base model runs alone",
                              UserWarning, stacklevel=5)   # the caller of pipe(...)
            return self.replace(control_image=None)
        controls = list(self.control_image) if isinstance(self.control_image, (list, tuple)) else [self.control_image]
        scales = self.controlnet_conditioning_scale
        scales = list(scales) if isinstance(scales, (list, tuple)) else [scales] * len(controls)
        scales = [float_arg("controlnet_conditioning_scale", s, -MAX_CONTROL_SCALE, MAX_CONTROL_SCALE) for s in scales]
        if self.mask_image is not None and limits.control_in_dim == 16:
            raise RequestError("mask_image", "ControlNet inpainting needs a 2.x ControlNet (33-channel control "
                               "context); this one is v1 (16 channels)")
        return self.replace(control_image=controls, controlnet_conditioning_scale=scales)

    def _check_loras(self, limits: ModelLimits) -> "GenerationRequest":
        """{adapter name: weight} for this call (the other loaded adapters weigh 0, as with set_adapters)."""
        if self.loras is None:
            return self
        if not isinstance(self.loras, dict) or not all(isinstance(k, str) for k in self.loras):
            raise RequestError("loras", "'loras' must map adapter names to weights, e.g. {\"style\": 0.8}")
        for name, w in self.loras.items():
            if not is_finite_number(w) or abs(float(w)) > MAX_LORA_WEIGHT:
                raise RequestError("loras", f"'loras' weight of {name!r} must be a finite number between "
                                   f"-{MAX_LORA_WEIGHT:g} and {MAX_LORA_WEIGHT:g}, got {w!r}")
        unknown = [n for n in self.loras if limits.adapters is not None and n not in limits.adapters]
        if unknown:
            loaded = ", ".join(map(repr, limits.adapters)) or "none (load one with load_lora_weights)"
            raise RequestError("loras", f"no LoRA named {unknown[0]!r}; loaded: {loaded}")
        return self.replace(loras={k: float(v) for k, v in self.loras.items()})

    def _check_cache(self) -> "GenerationRequest":
        """The step cache's rule and threshold (its default when not given); see step_cache.py."""
        try:
            rule = cache_rule(self.cache, self.cache_threshold)
        except ValueError as e:
            if self.cache is None:
                raise RequestError("cache_threshold", str(e), needs="cache") from None
            raise RequestError("cache", str(e)) from None
        try:
            return self.replace(cache=rule, cache_threshold=cache_threshold(rule, self.cache_threshold))
        except ValueError as e:
            raise RequestError("cache_threshold", str(e)) from None

    def _check_callbacks(self) -> None:
        for name in ("callback", "callback_on_step_end"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise RequestError(name, f"{name} must be callable, got {type(getattr(self, name)).__name__}")
        for fn in self.step_callbacks_given():
            if not callable(fn):
                raise RequestError("on_step", f"on_step must be a callable or a list of them, got {fn!r}")
        bad = [k for k in self.callback_on_step_end_tensor_inputs if k not in CALLBACK_TENSOR_INPUTS]
        if bad:
            raise RequestError("callback_on_step_end_tensor_inputs", f"callback_on_step_end_tensor_inputs "
                               f"{bad} not in {list(CALLBACK_TENSOR_INPUTS)}")

    def step_callbacks_given(self) -> list:
        if self.on_step is None:
            return []
        return list(self.on_step) if isinstance(self.on_step, (list, tuple)) else [self.on_step]

    def _check_size(self, limits: ModelLimits) -> "GenerationRequest":
        """height/width: given, else the input image's (or first control image's) own size floored to the size
        multiple, else DEFAULT_SIZE; then a positive multiple within the transformer's position range."""
        m = limits.size_multiple
        height, width = self.height, self.width
        source = ("image", self.image) if self.image is not None else \
            ("control_image", self.controls[0]) if self.controls else None
        if source is not None and (height is None or width is None):
            try:
                w, h = image_size(source[1], source[0])
                check_min_size(source[0], (w, h), height, width, m)
            except ValueError as e:
                raise RequestError(source[0], str(e)) from None
            height = h - h % m if height is None else height
            width = w - w % m if width is None else width
        height, width = check_size(DEFAULT_SIZE if height is None else height,
                                   DEFAULT_SIZE if width is None else width, limits)
        return self.replace(height=height, width=width)

    # ------------------------------------------------------------------ data-parallel
    def shard(self, rank: int, world: int) -> tuple["GenerationRequest", list[int]]:
        """This process's share of a validated request (image k of the batch on process k mod world, with the
        seed it has in a one-process run) and the batch indices it holds. Fields marked per="prompt" are split
        by prompt, per="image" arrays by image."""
        n_per, batch = self.num_images_per_prompt, self.batch
        seeds = expand_seeds(self.seed, batch) if self.seed is not None else None
        mine = list(range(rank, batch, world))
        n_prompts = batch // n_per
        changes = {}
        for f in dataclasses.fields(self):
            value, per = getattr(self, f.name), f.metadata.get("per")
            if value is None or per is None:
                continue
            if per == "prompt" and isinstance(value, (list, tuple)) and len(value) == n_prompts and \
                    (n_prompts > 1 or f.name in ("prompt", "prompt_embeds", "negative_prompt_embeds")):
                changes[f.name] = [value[k // n_per] for k in mine]
            elif per == "image":
                changes[f.name] = np.asarray(value, dtype=np.float32)[mine]
        sub = self.replace(num_images_per_prompt=1, seed=None if seeds is None else [seeds[k] for k in mine],
                           output_type="np" if self.output_type == "pil" else self.output_type,
                           image_seed=None if seeds is None else seeds[0], **changes)
        return sub, mine


_INT_FIELDS = {f.name for f in dataclasses.fields(GenerationRequest)
               if f.type in ("int", "int | None")} | {"seed"}


# --------------------------------------------------------------------------- argument checks
def check_size(height, width, limits: ModelLimits) -> tuple[int, int]:
    """A positive multiple of the size multiple, within the transformer's position range."""
    m = limits.size_multiple
    for name, v, n in (("height", height, limits.max_patches[0]), ("width", width, limits.max_patches[1])):
        int_arg(name, v, 1)
        if v % m:
            raise RequestError(name, f"{name} must be a positive multiple of {m}, got {v} "
                               f"(try {max(m, round(v / m) * m)})")
    for name, v, n in (("height", height, limits.max_patches[0]), ("width", width, limits.max_patches[1])):
        if v // m > n:
            raise RequestError(name, f"{name} {v} exceeds the model's position range: at most {n * m} pixels "
                               f"({n} latent patches of {m} pixels)")
    return int(height), int(width)


def step_defaults(variant: str, num_inference_steps=None, guidance_scale=None) -> tuple[int, float]:
    """(steps, guidance): the given values checked, or the model variant's defaults (Turbo 8/0, Base 50/4)."""
    d = VARIANT_DEFAULTS[check_variant(variant)]
    steps = d["num_inference_steps"] if num_inference_steps is None else \
        int_arg("num_inference_steps", num_inference_steps, 1, 1000)
    g = d["guidance_scale"] if guidance_scale is None else float_arg("guidance_scale", guidance_scale, 0.0)
    return steps, g


def expand_seeds(seed, batch: int) -> list[int]:
    """One seed per image: an int counts up (seed + k), a list gives each image its own, None picks a random base."""
    if seed is None:
        base = int(np.random.default_rng().integers(0, 2**32))
        return [base + k for k in range(batch)]
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise RequestError("seed", f"{len(seed)} seeds for {batch} images")
        return [int_arg("seed", s, 0, MAX_SEED) for s in seed]
    base = int_arg("seed", seed, 0, MAX_SEED - (batch - 1))
    return [base + k for k in range(batch)]


def expand_negative(negative_prompt: list[str] | None, n: int) -> list[str]:
    """The (validated) negative prompts for n prompts: "" each when none, one repeated, or one per prompt."""
    if negative_prompt is None:
        return [""] * n
    return list(negative_prompt) * n if len(negative_prompt) == 1 else list(negative_prompt)


@dataclass
class PipelineOutput:
    """What a generation returns (diffusers' ZImagePipelineOutput, plus seeds, timings and the peak memory)."""

    images: Any                      # list of PIL images | (B,H,W,3) float32 numpy in [0,1] | (B,16,h,w) mx latents
    seeds: list[int | None] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage
    peak_memory_gb: float = 0.0
    cache_stats: dict | None = None  # with a step cache: steps, computed, skipped, the per-step signal (step_cache.py)
