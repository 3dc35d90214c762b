"""OpenAI's Images API request → our ImageRequest: every parameter checked where it enters, a bad one answered 400
with OpenAI's error shape naming it (`param`). Shared by the JSON (/v1/images/generations) and the multipart
(/v1/images/edits) bodies; the worker (jobs.py) turns an ImageRequest into `pipe(...)` calls."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.responses import JSONResponse

from ..pipeline.control_maps import CONTROL_TYPES
from ..pipeline.images import mask_image_to_l
from ..pipeline.request import MAX_SEED, GenerationRequest, ModelLimits, RequestError, is_finite_number

FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
MAX_N = 10
MAX_PARTIALS = 50        # OpenAI allows 0-3; the web page asks for one per step
MAX_STEPS = 200
# the pipeline's names of the parameters whose OpenAI names differ (a RequestError's field → `param`)
PARAMS = {"mask_image": "mask", "height": "size", "width": "size", "num_images_per_prompt": "n"}
TEXT_FIELDS = ("prompt", "negative_prompt", "size", "response_format", "output_format", "model", "user")
LORAS_SHAPE = "'loras' must map adapter names to weights, e.g. {\"style\": 0.8}"


@dataclass
class ServerConfig:
    model: str = "z-image-turbo"               # the id /v1/models lists and PNG metadata records
    api_key: str | None = None                 # when set, /v1/* needs `Authorization: Bearer KEY`
    max_queue: int = 16                        # requests accepted and not finished (the running one included)
    url_ttl: float = 3600.0                    # seconds a `url` response stays downloadable
    max_side: int = 4096                       # pixels per side
    max_pixels: int = 2048 * 2048
    max_body: int = 25 * 1024 * 1024           # bytes of a request body, whatever its transfer encoding
    default_size: int = 1024
    loras: dict[str, float] = field(default_factory=dict)   # adapters loaded at start: name -> default weight
    preview_decoder: Any = None                # preview.LatentRGB (default) or a TinyDecoder (TAEF1)
    history_dir: Path | None = None            # where completed images are kept (history.py); None: no history
    history_items: int = 200                   # images kept at most (the oldest go first)
    history_bytes: int = 2 * 1024**3           # bytes kept at most (images and their parameters)


class APIError(Exception):
    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        # a client's text quoted back may hold lone surrogates, which no JSON response can encode
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@dataclass
class ImageRequest:
    """OpenAI's answer-shaping fields; `gen` holds the pipeline's parameters (pipeline.request.GenerationRequest),
    validated against the model's limits by `validate` before the request is queued."""

    gen: GenerationRequest
    n: int = 1
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int = 90
    stream: bool = False
    partial_images: int = 0
    enhance_prompt: bool = False               # rewrite the prompt first (docs/enhance.md); "revised_prompt" answers
    history: bool = True                       # keep the images in the server's history (when it has one)

    @property
    def size(self) -> str:
        return f"{self.gen.width}x{self.gen.height}"


def _show(v) -> str:
    return json.dumps(v, ensure_ascii=True, default=str)[:40]


def _typed(body: dict, name: str, kind, default=None, lo=None, hi=None):
    """body[name] checked for type (bool is not an int), finiteness and range, else APIError 400 naming it."""
    v = body.get(name, default)
    if v is None:
        return default
    ok = {int: lambda x: isinstance(x, int) and not isinstance(x, bool),
          float: is_finite_number,
          bool: lambda x: isinstance(x, bool), str: lambda x: isinstance(x, str)}[kind](v)
    if not ok:
        what = {int: "an integer", float: "a finite number", bool: "a boolean", str: "a string"}[kind]
        raise APIError(400, f"'{name}' must be {what}, got {_show(v)}", param=name, code="invalid_type")
    if kind is str:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"'{name}' is not valid Unicode text (a lone surrogate at character {e.start})",
                           param=name, code="invalid_value") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise APIError(400, f"'{name}' must be {bound}, got {v}", param=name, code="invalid_value")
    return float(v) if kind is float else v


def _choice(body: dict, name: str, choices, default):
    v = _typed(body, name, str, default)
    if v not in choices:
        raise APIError(400, f"'{name}' must be one of {', '.join(choices)}, got {v!r}", param=name,
                       code="invalid_value")
    return v


def _size(value, cfg: ServerConfig, default: tuple[int, int] | None) -> tuple[int, int] | None:
    """"WxH" → (w, h) within the server's limits (the size multiple and the model's range: `validate`)."""
    if value is None or value == "auto":
        return default
    m = re.fullmatch(r"\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*", value) if isinstance(value, str) else None
    if m is None:
        raise APIError(400, f"'size' must be \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or \"auto\", got {_show(value)}",
                       param="size", code="invalid_value")
    w, h = int(m[1]), int(m[2])
    check_limits(w, h, cfg)
    return w, h


def check_limits(w: int, h: int, cfg: ServerConfig) -> None:
    """The server's own limits on an image size (max_side, max_pixels)."""
    if w > cfg.max_side or h > cfg.max_side:
        raise APIError(400, f"'size' {w}x{h}: width and height must be at most {cfg.max_side}", param="size",
                       code="invalid_value")
    if w * h > cfg.max_pixels:
        raise APIError(400, f"'size' {w}x{h} has more than {cfg.max_pixels} pixels", param="size",
                       code="invalid_value")


def _loras(value) -> dict | None:
    """The server's spellings of `loras` ({"name": weight}, [{"name": ..., "weight": ...}], ["name", ...]) as the
    pipeline's {name: weight}; names and weights are checked by the pipeline's request (`validate`)."""
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, list):
        raise APIError(400, LORAS_SHAPE, param="loras")
    pairs = []
    for x in value:
        if isinstance(x, str):
            pairs.append((x, 1.0))
        elif isinstance(x, dict) and isinstance(x.get("name"), str):
            pairs.append((x["name"], x.get("weight", 1.0)))
        else:
            raise APIError(400, f"{LORAS_SHAPE}; got the item {_show(x)}", param="loras")
    return dict(pairs)


def parse_request(body: Any, cfg: ServerConfig, edit: bool = False) -> ImageRequest:
    """A JSON (or form) body → ImageRequest, or APIError 400 naming the first bad parameter. The types are checked
    here (OpenAI's error codes); the pipeline's rules (defaults, ranges, the size multiple, LoRA names and weights,
    strength) when `validate` checks the request against the model."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if body.get("prompt") is None:
        raise APIError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    prompt = _typed(body, "prompt", str)
    if not prompt.strip():
        raise APIError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
    size = _size(body.get("size"), cfg, None if edit else (cfg.default_size, cfg.default_size))
    gen = GenerationRequest(
        prompt=prompt, height=size[1] if size else None, width=size[0] if size else None,
        seed=_typed(body, "seed", int, None, 0, MAX_SEED - MAX_N),
        num_inference_steps=_typed(body, "num_inference_steps", int, None, 1, MAX_STEPS),
        guidance_scale=_typed(body, "guidance_scale", float, None, 0.0, 100.0),
        negative_prompt=_typed(body, "negative_prompt", str, None),
        loras=_loras(body.get("loras")),
        strength=_typed(body, "strength", float, None, 0.0, 1.0),
        cache=_typed(body, "cache", str, None),                      # names and threshold: the pipeline's rule
        cache_threshold=_typed(body, "cache_threshold", float, None, 0.0),
        control_type=None if body.get("control_type") is None else _choice(body, "control_type", CONTROL_TYPES, None),
        **_given(controlnet_conditioning_scale=_typed(body, "controlnet_conditioning_scale", float)),
    )
    return ImageRequest(
        gen=gen,
        n=_typed(body, "n", int, 1, 1, MAX_N),
        response_format=_choice(body, "response_format", ("b64_json", "url"), "b64_json"),
        output_format=_choice(body, "output_format", tuple(FORMATS), "png"),
        output_compression=_typed(body, "output_compression", int, 90, 0, 100),
        stream=_typed(body, "stream", bool, False),
        partial_images=_typed(body, "partial_images", int, 0, 0, MAX_PARTIALS),
        enhance_prompt=_typed(body, "enhance_prompt", bool, False),
        history=_typed(body, "history", bool, True),
    )


def _given(**kw) -> dict:
    """The keywords that were given (the others keep GenerationRequest's defaults)."""
    return {k: v for k, v in kw.items() if v is not None}


def validate(req: ImageRequest, limits: ModelLimits, cfg: ServerConfig) -> None:
    """The pipeline's request checked against the model (defaults filled in): a RequestError is a 400 naming the
    parameter by its OpenAI name; then the server's own size limits on the size it settled on."""
    try:
        req.gen = req.gen.validate(limits)
    except RequestError as e:
        raise APIError(400, str(e), param=PARAMS.get(e.field, e.field), code="invalid_value") from None
    check_limits(req.gen.width, req.gen.height, cfg)
    if req.gen.seed is not None and req.gen.seed + req.n - 1 > MAX_SEED:
        raise APIError(400, f"'seed' + n - 1 must be at most {MAX_SEED}", param="seed", code="invalid_value")


def form_value(v: str):
    """Multipart fields arrive as text: read numbers and booleans the way a JSON body would carry them."""
    if v in ("true", "false"):
        return v == "true"
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    if v.startswith(("{", "[")):
        try:
            return json.loads(v)
        except ValueError:
            pass
    return v


def openai_mask(mask: Image.Image) -> Image.Image:
    """An OpenAI edit mask (transparent = the area to edit) as the pipeline's (diffusers') mask: white = repaint;
    the pipeline's one mask rule (pipeline/images.py: a mask without transparency is read by its luminance)."""
    return mask_image_to_l(mask)
