"""`zimage-mlx serve`: OpenAI's images API over one loaded ZImagePipeline, plus a small web page at `/`.

Endpoints (shapes follow OpenAI's Images API, so the official SDKs work with base_url=http://127.0.0.1:8000/v1):
  POST /v1/images/generations   JSON: prompt, n (1-10), size "WxH" | "auto", response_format b64_json | url,
                                output_format png | jpeg | webp, output_compression, stream, partial_images, and
                                our extras (seed, num_inference_steps, guidance_scale, negative_prompt, loras,
                                cache, cache_threshold), which the SDK sends through extra_body
  POST /v1/images/edits         multipart: image, optional mask (transparent = edit: inpainting), prompt, n, size,
                                strength, ... (image-to-image without a mask)
  GET  /v1/models, GET /health, GET /files/NAME (url responses), GET / (the web page)

Image k of a request with seed s uses seed s + k and is the image `pipe(prompt, seed=s + k, ...)` gives. Requests
run one at a time, in arrival order, on one worker thread that owns every MLX call; a full queue answers 429; a
client that disconnects cancels its job at the next denoising step (the pipeline callback returns False). Errors
have OpenAI's shape {"error": {"message", "type", "param", "code"}}.

Starlette is imported here only (the optional `zimage-mlx[serve]` extra); only the CLI imports this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import math
import os
import queue
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from ..pipeline.pipeline import (DEFAULT_INPAINT_STRENGTH, DEFAULT_STRENGTH, MAX_SEED, GenerationCancelled, GenerationError,
                       ZImagePipeline)
from .pngfile import png_params
from ..pipeline.images import mask_image_to_l
from ..pipeline.preview import Previewer
from ..pipeline.step_cache import RULES as CACHE_RULES
from ..loading.weights import WeightError

FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
MAX_N = 10
MAX_PARTIALS = 50        # OpenAI allows 0-3; the web page asks for one per step
MAX_STEPS = 200
TEXT_FIELDS = ("prompt", "negative_prompt", "size", "response_format", "output_format", "model", "user")


@dataclass
class ServerConfig:
    model: str = "z-image-turbo"               # the id /v1/models lists and PNG metadata records
    api_key: str | None = None                 # when set, /v1/* needs `Authorization: Bearer KEY`
    max_queue: int = 16                        # requests accepted and not finished (the running one included)
    url_ttl: float = 3600.0                    # seconds a `url` response stays downloadable
    max_side: int = 4096                       # pixels per side
    max_pixels: int = 2048 * 2048
    max_body: int = 25 * 1024 * 1024           # bytes (edits upload images)
    default_size: int = 1024
    loras: dict[str, float] = field(default_factory=dict)   # adapters loaded at start: name -> default weight
    preview_decoder: Any = None                # preview.LatentRGB (default) or a TinyDecoder (TAEF1)


class APIError(Exception):
    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class ImageRequest:
    prompt: str
    n: int = 1
    width: int = 1024
    height: int = 1024
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int = 90
    stream: bool = False
    partial_images: int = 0
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    loras: dict[str, float] | None = None
    image: Image.Image | None = None           # edits
    mask: Image.Image | None = None
    strength: float | None = None
    cache: str | None = None                   # step caching (docs/step-cache.md)
    cache_threshold: float | None = None
    enhance_prompt: bool = False               # rewrite the prompt first (docs/enhance.md); "revised_prompt" answers


def _typed(body: dict, name: str, kind, default=None, lo=None, hi=None):
    """body[name] checked for type (bool is not an int) and range, else APIError 400 naming the parameter."""
    v = body.get(name, default)
    if v is None:
        return default
    ok = {int: lambda x: isinstance(x, int) and not isinstance(x, bool),
          float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
          bool: lambda x: isinstance(x, bool), str: lambda x: isinstance(x, str)}[kind](v)
    if not ok:
        raise APIError(400, f"'{name}' must be {({int: 'an integer', float: 'a number', bool: 'a boolean', str: 'a string'})[kind]}, "
                            f"got {json.dumps(v)[:40]}", param=name, code="invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {v}", param=name, code="invalid_value")
    return float(v) if kind is float else v


def _choice(body: dict, name: str, choices, default):
    v = _typed(body, name, str, default)
    if v not in choices:
        raise APIError(400, f"'{name}' must be one of {', '.join(choices)}, got {v!r}", param=name, code="invalid_value")
    return v


def _size(value, cfg: ServerConfig, default: tuple[int, int] | None) -> tuple[int, int] | None:
    if value is None or value == "auto":
        return default
    m = re.fullmatch(r"\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*", value) if isinstance(value, str) else None
    if m is None:
        raise APIError(400, f"'size' must be \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or \"auto\", got {json.dumps(value)[:40]}",
                       param="size", code="invalid_value")
    w, h = int(m[1]), int(m[2])
    for side in (w, h):
        if side <= 0 or side % 16 or side > cfg.max_side:
            raise APIError(400, f"'size' {w}x{h}: width and height must be positive multiples of 16, at most "
                                f"{cfg.max_side}", param="size", code="invalid_value")
    if w * h > cfg.max_pixels:
        raise APIError(400, f"'size' {w}x{h} has more than {cfg.max_pixels} pixels", param="size", code="invalid_value")
    return w, h


def parse_request(body: Any, cfg: ServerConfig, edit: bool = False) -> ImageRequest:
    """A JSON (or form) body → ImageRequest, or APIError 400 naming the first bad parameter."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    prompt = _typed(body, "prompt", str)
    if not prompt.strip():
        raise APIError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
    size = _size(body.get("size"), cfg, None if edit else (cfg.default_size, cfg.default_size))
    loras = body.get("loras")
    if loras is not None:
        if isinstance(loras, list):   # [{"name": ..., "weight": ...}] or ["name", ...]
            loras = {(x["name"] if isinstance(x, dict) else x): (x.get("weight", 1.0) if isinstance(x, dict) else 1.0)
                     for x in loras if isinstance(x, (dict, str)) and (isinstance(x, str) or "name" in x)}
        if not isinstance(loras, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in loras.values()):
            raise APIError(400, "'loras' must map adapter names to weights, e.g. {\"style\": 0.8}", param="loras")
        unknown = [k for k in loras if k not in cfg.loras]
        if unknown:
            known = ", ".join(cfg.loras) or "none (start the server with --lora PATH[:WEIGHT])"
            raise APIError(400, f"unknown LoRA adapter(s) {', '.join(map(str, unknown))}; loaded: {known}",
                           param="loras", code="invalid_value")
        loras = {k: float(v) for k, v in loras.items()}
    return ImageRequest(
        prompt=prompt,
        n=_typed(body, "n", int, 1, 1, MAX_N),
        width=size[0] if size else None, height=size[1] if size else None,
        response_format=_choice(body, "response_format", ("b64_json", "url"), "b64_json"),
        output_format=_choice(body, "output_format", tuple(FORMATS), "png"),
        output_compression=_typed(body, "output_compression", int, 90, 0, 100),
        stream=_typed(body, "stream", bool, False),
        partial_images=_typed(body, "partial_images", int, 0, 0, MAX_PARTIALS),
        seed=_typed(body, "seed", int, None, 0, MAX_SEED - MAX_N),
        num_inference_steps=_typed(body, "num_inference_steps", int, None, 1, MAX_STEPS),
        guidance_scale=_typed(body, "guidance_scale", float, None, 0.0, 100.0),
        negative_prompt=_typed(body, "negative_prompt", str, None),
        loras=loras,
        strength=_typed(body, "strength", float, None, 0.0, 1.0),
        **_cache_fields(body),
        enhance_prompt=_typed(body, "enhance_prompt", bool, False),
    )


def _cache_fields(body: dict) -> dict:
    """"cache": "teacache" | "first_block" and "cache_threshold" (>= 0), checked as the pipeline checks them."""
    cache = None if body.get("cache") is None else _choice(body, "cache", CACHE_RULES, None)
    threshold = _typed(body, "cache_threshold", float, None, 0.0)
    if threshold is not None and not math.isfinite(threshold):
        raise APIError(400, "'cache_threshold' must be a finite number", param="cache_threshold")
    if threshold is not None and cache is None:
        raise APIError(400, "'cache_threshold' needs 'cache' (teacache or first_block)", param="cache_threshold")
    return {"cache": cache, "cache_threshold": threshold}


def _form_value(v: str):
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


# ---------------------------------------------------------------------------------------------- the worker
class Job:
    """One request's generation: run on the worker thread, its events delivered to the request's event loop."""

    def __init__(self, req: ImageRequest, loop: asyncio.AbstractEventLoop | None = None,
                 fn: Callable[[ZImagePipeline], Any] | None = None):
        self.req, self.fn = req, fn
        self.loop = loop
        self.events: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.revised_prompt: str | None = None     # the enhanced prompt (enhance_prompt: true)

    def emit(self, event: tuple) -> None:
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:   # the request's loop has gone
                pass


class Worker:
    """The one thread that runs the pipeline (and every other MLX call), taking jobs in arrival order."""

    def __init__(self, pipe: ZImagePipeline, cfg: ServerConfig):
        self.pipe, self.cfg = pipe, cfg
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.active = 0          # accepted and not finished
        self.running = False
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "images": 0, "active_memory_mb": 0.0}
        self.thread = threading.Thread(target=self._loop, name="zimage-mlx-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.active >= self.cfg.max_queue:
                raise APIError(429, f"the queue is full ({self.cfg.max_queue} requests waiting or running); retry later",
                               code="queue_full")
            self.active += 1
        self.jobs.put(job)

    def call(self, fn: Callable[[ZImagePipeline], Any], timeout: float | None = None) -> Any:
        """Run fn(pipe) on the worker thread (after the queued jobs) and return its result."""
        job = Job(ImageRequest(prompt=""), fn=fn)
        with self.lock:
            self.active += 1
        self.jobs.put(job)
        if not job.done.wait(timeout):
            raise TimeoutError("the worker did not answer in time")
        if job.error is not None:
            raise job.error
        return job.result

    def stop(self) -> None:
        self.jobs.put(None)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.running = True
            try:
                if job.fn is not None:
                    job.result = job.fn(self.pipe)
                elif job.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    job.emit(("cancelled",))
                else:
                    self._generate(job)
                    self.stats["completed"] += 1
                    job.emit(("done",))
            except GenerationCancelled:
                self.stats["cancelled"] += 1
                job.emit(("cancelled",))
            except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error; the server goes on
                job.error = e
                self.stats["failed"] += 1
                job.emit(("error", _as_api_error(e)))
            finally:
                self.stats["active_memory_mb"] = mx.get_active_memory() / 2**20
                self.running = False
                with self.lock:
                    self.active -= 1
                job.done.set()

    def _generate(self, job: Job) -> None:
        """Image k = pipe(prompt, seed=seed + k, ...): the very call a Python API user makes (prompts are cached by
        the pipeline, so the text encoder runs once per prompt)."""
        pipe, req, cfg = self.pipe, job.req, self.cfg
        steps, g = pipe.defaults(req.num_inference_steps, req.guidance_scale)
        negative = req.negative_prompt if g > 0 else None
        seed = secrets.randbelow(2**31) if req.seed is None else req.seed
        default = DEFAULT_INPAINT_STRENGTH if req.mask is not None else DEFAULT_STRENGTH
        strength = (default if req.strength is None else req.strength) if req.image is not None else None
        run_steps = pipe.steps_to_run(steps, strength)
        if run_steps <= 0:
            raise APIError(400, f"strength {strength} with {steps} steps leaves no step to run", param="strength")
        partial_at = _partial_steps(run_steps, req.partial_images) if req.stream else set()
        extra = {}
        if req.image is not None:
            extra = {"image": req.image, "strength": strength}
            if req.mask is not None:
                extra["mask_image"] = req.mask
        prompt = req.prompt
        if req.enhance_prompt:
            prompt = job.revised_prompt = pipe.enhance_prompt(req.prompt, seed=seed)
        if req.loras is not None:
            pipe.set_adapters(list(cfg.loras), [req.loras.get(k, 0.0) for k in cfg.loras])
        try:
            for k in range(req.n):
                if job.cancelled.is_set():
                    raise GenerationCancelled("the client has gone")
                s = seed + k
                callback = _StepCallback(job, k, partial_at,
                                         Previewer(self.cfg.preview_decoder) if partial_at else None)
                out = pipe(prompt=prompt, negative_prompt=negative, height=req.height, width=req.width,
                           num_inference_steps=steps, guidance_scale=g, seed=s, on_step=callback,
                           cache=req.cache, cache_threshold=req.cache_threshold, **extra)
                img = out.images[0]
                meta = png_params(prompt, negative, s, steps, g, f"{img.width}x{img.height}", cfg.model,
                                  pipe.quantization, pipe.dtype_name,
                                  image="upload" if req.image is not None else None, strength=strength,
                                  loras=getattr(pipe, "loras", None),
                                  extra={"original_prompt": req.prompt} if req.enhance_prompt else None)
                job.emit(("image", k, s, img.size, _encode(img, req, meta)))
                self.stats["images"] += 1
        finally:
            if req.loras is not None:
                pipe.set_adapters(list(cfg.loras), list(cfg.loras.values()))


class _StepCallback:
    """The pipeline callback of one image: False once the client has gone; a partial image at the chosen steps."""

    def __init__(self, job: Job, index: int, partial_at: set[int], previewer: Previewer | None):
        self.job, self.index, self.partial_at, self.previewer = job, index, partial_at, previewer
        self.step = self.partials = 0

    def __call__(self, record) -> bool:
        """record: the step's denoise.StepRecord (its x̂0 is the partial image)."""
        if self.job.cancelled.is_set():
            return False
        if self.previewer is not None:
            if self.step in self.partial_at:
                img = self.previewer.image(record)
                self.job.emit(("partial", self.index, self.partials, _encode(img, self.job.req, None)))
                self.partials += 1
        self.step += 1
        return True


def _partial_steps(run_steps: int, partial_images: int) -> set[int]:
    """Which steps (0-based, of those run) send a partial image: evenly spread, never the last (the final follows)."""
    p = min(partial_images, run_steps - 1)
    return {round(run_steps * (j + 1) / (p + 1)) - 1 for j in range(p)}


def _encode(img: Image.Image, req: ImageRequest, meta: dict | None) -> bytes:
    fmt = FORMATS[req.output_format][0]
    buf = io.BytesIO()
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in (meta or {}).items():
            info.add_text(k, v)
        img.save(buf, format="PNG", pnginfo=info, compress_level=1 if meta is None else 6)
    else:
        img.save(buf, format=fmt, quality=req.output_compression)
    return buf.getvalue()


def openai_mask(mask: Image.Image) -> Image.Image:
    """An OpenAI edit mask (transparent = the area to edit) as the pipeline's (diffusers') mask: white = repaint;
    the pipeline's one mask rule (pipeline/images.py: a mask without transparency is read by its luminance)."""
    return mask_image_to_l(mask)


def _as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (ValueError, WeightError)):
        return APIError(400, msg)
    if isinstance(e, MemoryError) or "out of memory" in msg.lower() or "resource limit" in msg.lower():
        return APIError(500, f"out of memory: {msg}; try a smaller size or fewer images", code="out_of_memory")
    if isinstance(e, GenerationError):
        return APIError(500, msg, code="generation_failed")
    return APIError(500, f"generation failed: {msg}", code="generation_failed")


# ---------------------------------------------------------------------------------------------- url responses
class FileStore:
    """Images of `url` responses: files with unguessable names in a private temporary folder, kept `ttl` seconds."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self.dir = Path(tempfile.mkdtemp(prefix="zimage-mlx-files-"))

    def put(self, data: bytes, ext: str) -> str:
        self.purge()
        name = f"{secrets.token_urlsafe(18)}.{ext}"
        tmp = self.dir / f".{name}.part"
        tmp.write_bytes(data)
        os.replace(tmp, self.dir / name)
        return name

    def path(self, name: str) -> Path | None:
        p = self.dir / name
        if not re.fullmatch(r"[A-Za-z0-9_-]+\.(png|jpeg|webp)", name) or not p.is_file():
            return None
        if time.time() - p.stat().st_mtime > self.ttl:
            p.unlink(missing_ok=True)
            return None
        return p

    def purge(self) -> None:
        now = time.time()
        for p in self.dir.iterdir():
            try:
                if now - p.stat().st_mtime > self.ttl:
                    p.unlink(missing_ok=True)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        for p in self.dir.iterdir():
            p.unlink(missing_ok=True)
        self.dir.rmdir()


# ---------------------------------------------------------------------------------------------- the app
def create_app(pipe: ZImagePipeline, config: ServerConfig | None = None) -> Starlette:
    """The ASGI app. `app.state.worker` runs the jobs; `app.state.files` holds `url` responses."""
    cfg = config or ServerConfig()
    worker = Worker(pipe, cfg)
    files = FileStore(cfg.url_ttl)

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body:
            raise APIError(413, f"request body over {cfg.max_body} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body:
                raise APIError(413, f"request body over {cfg.max_body} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def generations(request: Request):
        check_key(request)
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "could not parse the body as JSON", code="invalid_json") from None
        return await run(request, parse_request(body, cfg))

    async def edits(request: Request):
        check_key(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body:
            raise APIError(413, f"request body over {cfg.max_body} bytes", code="request_too_large")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "send the edit as multipart/form-data (image, prompt, ...)", code="invalid_content_type")
        try:
            form = await request.form(max_part_size=cfg.max_body)
        except Exception as e:  # noqa: BLE001 - malformed multipart
            raise APIError(400, f"could not read the multipart body ({e})") from None
        body, uploads = {}, {}
        for key, value in form.multi_items():
            key = key.removesuffix("[]")
            if hasattr(value, "read"):
                uploads.setdefault(key, value)
            else:
                body[key] = value if key in TEXT_FIELDS else _form_value(value)
        if "image" not in uploads:
            raise APIError(400, "'image' (a file) is required", param="image", code="missing_required_parameter")
        req = parse_request(body, cfg, edit=True)
        req.image = await _read_image(uploads["image"], "image")
        if "mask" in uploads:
            req.mask = openai_mask(await _read_image(uploads["mask"], "mask", mode=None))
            if req.mask.size != req.image.size:
                raise APIError(400, f"'mask' is {req.mask.width}x{req.mask.height} but 'image' is "
                                    f"{req.image.width}x{req.image.height}: they must have the same size",
                               param="mask", code="invalid_value")
        w, h = req.image.size
        if req.width is None:
            w, h = w - w % 16, h - h % 16
            if w <= 0 or h <= 0 or w > cfg.max_side or h > cfg.max_side or w * h > cfg.max_pixels:
                raise APIError(400, f"the image is {req.image.width}x{req.image.height}; pass 'size' to resize it "
                                    f"(multiples of 16, at most {cfg.max_side} per side)", param="size")
            req.width, req.height = w, h
        return await run(request, req)

    def check_size(req: ImageRequest) -> None:
        """The pipeline's own size check (multiple, position range, memory plan): pure arithmetic on the configs,
        so it is safe off the worker thread; skipped for injected models whose configs would need loading."""
        if not all(n in getattr(pipe, "configs", {}) for n in ("transformer", "vae")):
            return
        try:
            pipe.check_size(req.height, req.width)
        except (ValueError, MemoryError) as e:
            raise APIError(400, f"'size' {req.width}x{req.height}: {e}", param="size", code="invalid_value") from None

    async def run(request: Request, req: ImageRequest):
        check_size(req)
        if req.seed is not None and req.seed + req.n - 1 > MAX_SEED:
            raise APIError(400, f"'seed' + n - 1 must be at most {MAX_SEED}", param="seed", code="invalid_value")
        job = Job(req, asyncio.get_running_loop())
        worker.submit(job)
        created = int(time.time())
        if req.stream:
            return StreamingResponse(stream(request, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        data = []
        async with contextlib.aclosing(events(request, job)) as evs:
            async for ev in evs:
                if ev[0] == "image":
                    _, k, seed, size, blob = ev
                    item = {"seed": seed, **({"revised_prompt": job.revised_prompt} if job.revised_prompt else {})}
                    if req.response_format == "url":
                        name = files.put(blob, req.output_format)
                        item["url"] = f"{str(request.base_url).rstrip('/')}/files/{name}"
                    else:
                        item["b64_json"] = base64.b64encode(blob).decode()
                    data.append(item)
                elif ev[0] == "error":
                    return ev[1].response()
        return JSONResponse({"created": created, "data": data, "size": f"{req.width}x{req.height}",
                             "output_format": req.output_format, "quality": "auto", "background": "opaque"})

    async def stream(request: Request, job: Job):
        req = job.req
        common = {"size": f"{req.width}x{req.height}", "output_format": req.output_format, "quality": "auto",
                  "background": "opaque"}
        async with contextlib.aclosing(events(request, job)) as evs:
            async for ev in evs:
                if ev[0] == "partial":
                    _, k, index, blob = ev
                    payload = {"type": "image_generation.partial_image", "b64_json": base64.b64encode(blob).decode(),
                               "partial_image_index": index, "image_index": k, "created_at": int(time.time()), **common}
                elif ev[0] == "image":
                    _, k, seed, size, blob = ev
                    payload = {"type": "image_generation.completed", "b64_json": base64.b64encode(blob).decode(),
                               "image_index": k, "seed": seed, "created_at": int(time.time()), **common}
                elif ev[0] == "error":
                    payload = {"type": "error", **ev[1].body()}
                else:
                    continue
                yield f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"

    async def events(request: Request, job: Job):
        """The job's events until it ends; a client disconnect cancels the job (at its next step)."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                get = asyncio.ensure_future(job.events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    job.cancelled.set()
                    return
                ev = get.result()
                if ev[0] in ("done", "cancelled"):
                    return
                yield ev
                if ev[0] == "error":
                    return
        finally:
            if not job.done.is_set():   # the client went away (or the stream was closed): stop at the next step
                job.cancelled.set()
            gone.cancel()

    async def models(request: Request):
        check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": cfg.model, "object": "model", "created": 0, "owned_by": "zimage-mlx"}]})

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": cfg.model, "auth": cfg.api_key is not None,
                             "queue": worker.active, "running": worker.running, "max_queue": cfg.max_queue,
                             "url_ttl": cfg.url_ttl, **worker.stats})

    async def file(request: Request):
        p = files.path(request.path_params["name"])
        if p is None:
            raise APIError(404, "no such file (url responses are kept for "
                                f"{cfg.url_ttl:.0f} s)", code="not_found")
        return FileResponse(p, media_type=FORMATS[p.suffix[1:]][1])

    page = resources.files("zimage_mlx.apps").joinpath("static/index.html").read_text(encoding="utf-8")

    async def index(request: Request):
        return HTMLResponse(page)

    async def api_error(request: Request, exc: APIError):
        return exc.response()

    async def http_error(request: Request, exc: HTTPException):
        msg = {404: f"unknown path {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
        return APIError(exc.status_code, msg.get(exc.status_code, str(exc.detail)),
                        code={404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)).response()

    async def server_error(request: Request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()
        files.close()

    app = Starlette(
        routes=[
            Route("/", index), Route("/health", health), Route("/files/{name}", file),
            Route("/v1/models", models), Route("/v1/images/generations", generations, methods=["POST"]),
            Route("/v1/images/edits", edits, methods=["POST"]),
        ],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.worker, app.state.files, app.state.config = worker, files, cfg
    return app


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _read_image(upload, name: str, mode: str | None = "RGB") -> Image.Image:
    data = await upload.read()
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception:  # noqa: BLE001 - anything PIL cannot read
        raise APIError(400, f"'{name}' is not an image PIL can read (PNG, JPEG, WebP)", param=name,
                       code="invalid_image") from None
    return img.convert(mode) if mode else img
