"""The server's job queue: one worker thread owns every MLX call and runs requests one at a time, in arrival order;
a full queue answers 429; a job whose client has gone stops at its next denoising step. Image k of a request with
seed s is `pipe(prompt, seed=s + k, ...)`, the very call a Python API user makes. With a history (history.py) the
worker keeps each completed image of a request that asks for it (`history`, default true) with its parameters."""

from __future__ import annotations

import asyncio
import io
import logging
import queue
import secrets
import threading
from typing import Any, Callable

import mlx.core as mx
from PIL import Image

from ..loading.weights import WeightError
from ..pipeline.pipeline import GenerationCancelled, GenerationError, ZImagePipeline
from ..pipeline.preview import Previewer
from .history import History
from .openai_request import FORMATS, APIError, ImageRequest, ServerConfig
from .pngfile import png_params

log = logging.getLogger("zimage_mlx.server")


class Job:
    """One request's generation: run on the worker thread, its events delivered to the request's event loop."""

    def __init__(self, req: ImageRequest | None, loop: asyncio.AbstractEventLoop | None = None,
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

    def __init__(self, pipe: ZImagePipeline, cfg: ServerConfig, history: History | None = None):
        self.pipe, self.cfg, self.history = pipe, cfg, history
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
                raise APIError(429, f"the queue is full ({self.cfg.max_queue} requests waiting or running); retry "
                                    "later", code="queue_full")
            self.active += 1
        self.jobs.put(job)

    def call(self, fn: Callable[[ZImagePipeline], Any], timeout: float | None = None) -> Any:
        """Run fn(pipe) on the worker thread (after the queued jobs) and return its result."""
        job = Job(None, fn=fn)
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
                self._run(job)
            finally:
                self.stats["active_memory_mb"] = mx.get_active_memory() / 2**20
                self.running = False
                with self.lock:
                    self.active -= 1
                job.done.set()

    def _run(self, job: Job) -> None:
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
            job.emit(("error", as_api_error(e)))

    def _generate(self, job: Job) -> None:
        """Image k = pipe.generate(request with seed + k): the call a Python API user makes (prompts are cached by
        the pipeline, so the text encoder runs once per prompt). job.req.gen is validated (openai_request.validate)."""
        pipe, req, gen = self.pipe, job.req, job.req.gen
        seed = secrets.randbelow(2**31) if gen.seed is None else gen.seed
        extra = png_inputs(gen)
        if req.enhance_prompt:   # docs/enhance.md: the text encoder's own Qwen3 rewrites it (seeded by the seed)
            job.revised_prompt = pipe.enhance_prompt(gen.prompt[0], seed=seed)
            extra["original_prompt"] = gen.prompt[0]
            gen = gen.replace(prompt=[job.revised_prompt])
        partial_at = partial_steps(gen.steps_to_run, req.partial_images) if req.stream else set()
        negative = gen.negative_prompt[0] if gen.do_cfg and gen.negative_prompt else None
        loras = pipe.loras if gen.loras is None else \
            [dict(lo, weight=gen.loras.get(lo["name"], 0.0)) for lo in pipe.loras]   # this request's weights
        for k in range(req.n):
            if job.cancelled.is_set():
                raise GenerationCancelled("the client has gone")
            s = seed + k
            callback = StepCallback(job, k, partial_at, Previewer(self.cfg.preview_decoder) if partial_at else None,
                                    gen.steps_to_run)
            img = pipe.generate(gen.replace(seed=s, on_step=callback)).images[0]
            meta = png_params(gen.prompt[0], negative, s, gen.num_inference_steps, gen.guidance_scale,
                              f"{img.width}x{img.height}", self.cfg.model, pipe.quantization, pipe.dtype_name,
                              image="upload" if gen.image is not None else None, strength=gen.strength, loras=loras,
                              extra=extra)
            blob = encode(img, req, meta)
            job.emit(("image", k, s, img.size, blob, self._keep(job, blob, s, loras)))
            self.stats["images"] += 1

    def _keep(self, job: Job, blob: bytes, seed: int, loras: list[dict]) -> str | None:
        """Store a completed image in the history (when there is one and the request wants it): its ID, or None.
        A history that cannot be written is logged, never a failed request."""
        if self.history is None or not job.req.history:
            return None
        try:
            return self.history.add(blob, job.req.output_format,
                                    history_params(job, seed, {lo["name"]: lo["weight"] for lo in loras},
                                                   self.cfg.model))
        except OSError as e:
            log.warning("could not keep the image in the history (%s): %s", self.history.root, e)
            return None


def png_inputs(gen) -> dict:
    """PNG metadata of the uploaded inputs of a validated request: mask, control image, its type and scale."""
    controls = gen.controls
    return {"mask": "upload" if gen.mask_image is not None else None,
            "control_image": "upload" if controls else None,
            "control_type": (gen.control_type or "none") if controls else None,
            "control_scale": ", ".join(f"{s:g}" for s in gen.controlnet_conditioning_scale) if controls else None}


def generation_mode(gen) -> str:
    """text-to-image | image-to-image | inpaint | controlnet | controlnet-inpaint (a validated request)."""
    if gen.controls:
        return "controlnet-inpaint" if gen.mask_image is not None else "controlnet"
    if gen.image is None:
        return "text-to-image"
    return "inpaint" if gen.mask_image is not None else "image-to-image"


def history_params(job: Job, seed: int, loras: dict[str, float], model: str) -> dict:
    """The parameters a history entry keeps: the request's resolved values (defaults filled in by validate)."""
    req, gen = job.req, job.req.gen
    neg = gen.negative_prompt
    controls = bool(gen.controls)
    return {"prompt": gen.prompt[0], "negative_prompt": neg if isinstance(neg, str) or neg is None else neg[0],
            "size": f"{gen.width}x{gen.height}", "num_inference_steps": gen.num_inference_steps,
            "guidance_scale": gen.guidance_scale, "seed": seed, "strength": gen.strength, "loras": loras,
            "cache": gen.cache, "cache_threshold": gen.cache_threshold, "mode": generation_mode(gen),
            "control_type": (gen.control_type or "none") if controls else None,
            "controlnet_conditioning_scale": gen.controlnet_conditioning_scale[0] if controls else None,
            "enhance_prompt": req.enhance_prompt, "revised_prompt": job.revised_prompt,
            "output_format": req.output_format, "model": model}


class StepCallback:
    """The pipeline callback of one image: False once the client has gone; a partial image at the chosen steps,
    with the step it shows (1-based) of the `num_steps` this image runs (the page's progress)."""

    def __init__(self, job: Job, index: int, partial_at: set[int], previewer: Previewer | None, num_steps: int):
        self.job, self.index, self.partial_at, self.previewer = job, index, partial_at, previewer
        self.num_steps = num_steps
        self.step = self.partials = 0

    def __call__(self, record) -> bool:
        """record: the step's denoise.StepRecord (its x̂0 is the partial image)."""
        if self.job.cancelled.is_set():
            return False
        if self.previewer is not None:
            if self.step in self.partial_at:
                img = self.previewer.image(record)
                self.job.emit(("partial", self.index, self.partials, encode(img, self.job.req, None),
                               self.step + 1, self.num_steps))
                self.partials += 1
        self.step += 1
        return True


def partial_steps(run_steps: int, partial_images: int) -> set[int]:
    """Which steps (0-based, of those run) send a partial image: evenly spread, never the last (the final follows)."""
    p = min(partial_images, run_steps - 1)
    return {round(run_steps * (j + 1) / (p + 1)) - 1 for j in range(p)}


def encode(img: Image.Image, req: ImageRequest, meta: dict | None) -> bytes:
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


def as_api_error(e: BaseException) -> APIError:
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
