"""`zimage-mlx serve`: OpenAI's images API over one loaded ZImagePipeline, plus a small web page at `/`.

Endpoints (shapes follow OpenAI's Images API, so the official SDKs work with base_url=http://127.0.0.1:8000/v1):
  POST /v1/images/generations   JSON (or multipart, to upload a control_image): prompt, n (1-10), size "WxH" |
                                "auto", response_format b64_json | url, output_format png | jpeg | webp,
                                output_compression, stream, partial_images, and
                                our extras (seed, num_inference_steps, guidance_scale, negative_prompt, loras,
                                cache, cache_threshold, enhance_prompt, history, control_type,
                                controlnet_conditioning_scale), which the SDK sends through extra_body
  POST /v1/images/edits         multipart: image, optional mask, optional control_image, prompt, n, size, strength, ...
                                (image-to-image without a mask, inpainting with one, ControlNet inpainting with both)
  GET  /info                    the model, its defaults and the server's limits (what the web page builds its form from)
  GET  /history, GET /history/ID.EXT, DELETE /history/ID   the images kept on disk (history.py)
  GET  /v1/models, GET /health, GET /files/NAME (url responses), GET / (the web page)

Masks follow OpenAI's rule: a mask with an alpha channel marks the area to edit as transparent (alpha 0); a mask
without one is read as the pipeline reads masks, white = repaint (openai_request.openai_mask).
Bodies are read under `max_body` bytes whatever their transfer encoding (http_body.py); every parameter is checked
where it enters (openai_request.py) and a bad one is a 400 naming it; requests run one at a time on the worker
thread (jobs.py); a client that disconnects cancels its job at the next step and leaves no traceback in the log.
Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}.

Starlette is imported here only (the optional `zimage-mlx[serve]` extra); only the CLI imports this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import secrets
import tempfile
import time
from importlib import resources
from pathlib import Path

from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..pipeline.control_maps import CONTROL_TYPES
from ..pipeline.pipeline import ZImagePipeline
from ..pipeline.request import DEFAULT_INPAINT_STRENGTH, DEFAULT_STRENGTH, GenerationRequest
from .history import History
from .http_body import parse_form, parse_json, read_body
from .jobs import Job, Worker
from .openai_request import (FORMATS, MAX_N, MAX_STEPS, APIError, ImageRequest, ServerConfig, openai_mask,
                             parse_request, validate)

__all__ = ["ServerConfig", "APIError", "create_app"]
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}


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


def _read_image(data: bytes, name: str, max_pixels: int, mode: str | None = "RGB") -> Image.Image:
    """An upload as a PIL image; its header is read first, so a huge image is refused before it is decoded."""
    try:
        img = Image.open(io.BytesIO(data))
        too_big = img.width * img.height > max_pixels
        if not too_big:
            img.load()
    except Exception:  # noqa: BLE001 - anything PIL cannot read
        raise APIError(400, f"'{name}' is not an image PIL can read (PNG, JPEG, WebP)", param=name,
                       code="invalid_image") from None
    if too_big:
        raise APIError(400, f"'{name}' is {img.width}x{img.height}: more than {max_pixels} pixels", param=name,
                       code="invalid_image")
    return img.convert(mode) if mode else img


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ImagesAPI:
    """The endpoints: each handler reads its body, builds an ImageRequest, and hands it to the worker."""

    def __init__(self, pipe: ZImagePipeline, cfg: ServerConfig, history: History | None = None):
        self.pipe, self.cfg, self.history = pipe, cfg, history
        self.worker = Worker(pipe, cfg, history)
        self.files = FileStore(cfg.url_ttl)
        self.static = {p.name: p.read_bytes() for p in resources.files("zimage_mlx.apps").joinpath("static").iterdir()
                       if p.name.endswith(tuple(STATIC_TYPES))}

    def check_key(self, request: Request) -> None:
        if self.cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.cfg.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def generations(self, request: Request):
        """A JSON body, or a multipart one (the same fields as text, and an optional `control_image` file)."""
        self.check_key(request)
        content_type = request.headers.get("content-type", "")
        raw = await read_body(request, self.cfg.max_body)
        if not content_type.startswith("multipart/form-data"):
            return await self.run(request, parse_request(parse_json(raw), self.cfg))
        body, uploads = parse_form(raw, content_type)
        req = parse_request(body, self.cfg)
        req.gen = req.gen.replace(control_image=self.control_image(body, uploads))
        return await self.run(request, req)

    def control_image(self, body: dict, uploads: dict[str, bytes]) -> Image.Image | None:
        """The optional `control_image` upload of a multipart body, as RGB."""
        if "control_image" in body:
            raise APIError(400, "'control_image' must be a file (a multipart part with a filename)",
                           param="control_image", code="invalid_type")
        if "control_image" not in uploads:
            return None
        return _read_image(uploads["control_image"], "control_image", 4 * self.cfg.max_pixels)

    async def edits(self, request: Request):
        self.check_key(request)
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise APIError(400, "send the edit as multipart/form-data (image, prompt, ...)", code="invalid_content_type")
        body, uploads = parse_form(await read_body(request, self.cfg.max_body), content_type)
        if "image" not in uploads:
            raise APIError(400, "'image' (a file) is required", param="image", code="missing_required_parameter")
        req = parse_request(body, self.cfg, edit=True)
        image = _read_image(uploads["image"], "image", 4 * self.cfg.max_pixels)
        control = self.control_image(body, uploads)
        mask = None
        if "mask" in uploads:
            mask = openai_mask(_read_image(uploads["mask"], "mask", 4 * self.cfg.max_pixels, mode=None))
            if mask.size != image.size:
                raise APIError(400, f"'mask' is {mask.width}x{mask.height} but 'image' is "
                                    f"{image.width}x{image.height}: they must have the same size",
                               param="mask", code="invalid_value")
        req.gen = req.gen.replace(image=image, mask_image=mask, control_image=control)
        return await self.run(request, req)

    def check(self, req: ImageRequest) -> None:
        """The pipeline's request checks, then the memory plan for its size: arithmetic on the configs (of a loaded
        or injected model: no MLX call, so safe off the worker thread) and the images' sizes."""
        validate(req, self.pipe.limits, self.cfg)
        try:
            self.pipe.check_size(req.gen.height, req.gen.width)
        except (ValueError, MemoryError) as e:
            raise APIError(400, f"'size' {req.size}: {e}", param="size", code="invalid_value") from None

    async def run(self, request: Request, req: ImageRequest):
        self.check(req)
        job = Job(req, asyncio.get_running_loop())
        self.worker.submit(job)
        if req.stream:
            return StreamingResponse(self.stream(request, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        created, data = int(time.time()), []
        async with contextlib.aclosing(self.events(request, job)) as evs:
            async for ev in evs:
                if ev[0] == "image":
                    _, k, seed, size, blob, history_id = ev
                    item = {"seed": seed, **({"revised_prompt": job.revised_prompt} if job.revised_prompt else {}),
                            "history_id": history_id}
                    if req.response_format == "url":
                        name = self.files.put(blob, req.output_format)
                        item["url"] = f"{str(request.base_url).rstrip('/')}/files/{name}"
                    else:
                        item["b64_json"] = base64.b64encode(blob).decode()
                    data.append(item)
                elif ev[0] == "error":
                    return ev[1].response()
        return JSONResponse({"created": created, "data": data, "size": req.size,
                             "output_format": req.output_format, "quality": "auto", "background": "opaque"})

    async def stream(self, request: Request, job: Job):
        req = job.req
        common = {"size": req.size, "output_format": req.output_format, "quality": "auto",
                  "background": "opaque"}
        async with contextlib.aclosing(self.events(request, job)) as evs:
            async for ev in evs:
                if ev[0] == "partial":
                    _, k, index, blob, step, num_steps = ev
                    payload = {"type": "image_generation.partial_image", "b64_json": base64.b64encode(blob).decode(),
                               "partial_image_index": index, "image_index": k, "created_at": int(time.time()),
                               "step": step, "num_steps": num_steps, **common}
                elif ev[0] == "image":
                    _, k, seed, size, blob, history_id = ev
                    payload = {"type": "image_generation.completed", "b64_json": base64.b64encode(blob).decode(),
                               "image_index": k, "seed": seed, "created_at": int(time.time()),
                               "history_id": history_id, **common}
                    if job.revised_prompt:
                        payload["revised_prompt"] = job.revised_prompt
                elif ev[0] == "error":
                    payload = {"type": "error", **ev[1].body()}
                else:
                    continue
                yield f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"

    async def events(self, request: Request, job: Job):
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

    async def models(self, request: Request):
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.cfg.model, "object": "model", "created": 0, "owned_by": "zimage-mlx"}]})

    async def health(self, request: Request):
        w = self.worker
        return JSONResponse({"status": "ok", "model": self.cfg.model, "auth": self.cfg.api_key is not None,
                             "queue": w.active, "running": w.running, "max_queue": self.cfg.max_queue,
                             "url_ttl": self.cfg.url_ttl, **w.stats})

    async def info(self, request: Request):
        """The model, its defaults and this server's limits: config arithmetic only (no MLX call off the worker)."""
        self.check_key(request)
        pipe, cfg = self.pipe, self.cfg
        limits = pipe.limits
        steps, guidance = pipe.defaults()
        h = self.history
        return JSONResponse({
            "model": cfg.model, "variant": pipe.variant,
            "defaults": {"num_inference_steps": steps, "guidance_scale": guidance, "strength": DEFAULT_STRENGTH,
                         "inpaint_strength": DEFAULT_INPAINT_STRENGTH, "size": cfg.default_size,
                         "controlnet_conditioning_scale": GenerationRequest.controlnet_conditioning_scale},
            "size_multiple": limits.size_multiple,
            "max_side": min(cfg.max_side, min(limits.max_patches) * limits.size_multiple),
            "max_pixels": cfg.max_pixels, "max_body": cfg.max_body, "max_n": MAX_N, "max_steps": MAX_STEPS,
            "loras": [{"name": name, "weight": w} for name, w in cfg.loras.items()],
            "controlnet": None if limits.control_in_dim is None else
            {"control_types": list(CONTROL_TYPES), "inpaint": limits.control_in_dim != 16},
            "history": {"enabled": h is not None, "max_items": h.max_items if h else 0},
            "enhance": True,
        })

    async def history_list(self, request: Request):
        self.check_key(request)
        limit = request.query_params.get("limit")
        if limit is not None and not (limit.isdigit() and int(limit) > 0):
            raise APIError(400, f"'limit' must be a positive integer, got {limit[:40]!r}", param="limit",
                           code="invalid_value")
        entries = self.history.list(int(limit) if limit else None) if self.history else []
        return JSONResponse({"object": "list", "data": [
            {"id": e["id"], "created": e["created"], "url": f"/history/{e['file']}", "params": e["params"]}
            for e in entries]})

    async def history_file(self, request: Request):
        self.check_key(request)
        name = request.path_params["name"]
        p = self.history.file(name) if self.history else None
        if p is None:
            raise APIError(404, f"no image {name[:80]!r} in the history", code="not_found")
        return FileResponse(p, media_type=FORMATS[p.suffix[1:]][1])

    async def history_delete(self, request: Request):
        self.check_key(request)
        id = request.path_params["name"]
        if self.history is None or not self.history.delete(id):
            raise APIError(404, f"no entry {id[:80]!r} in the history", code="not_found")
        return JSONResponse({"id": id, "deleted": True})

    async def file(self, request: Request):
        p = self.files.path(request.path_params["name"])
        if p is None:
            raise APIError(404, f"no such file (url responses are kept for {self.cfg.url_ttl:.0f} s)",
                           code="not_found")
        return FileResponse(p, media_type=FORMATS[p.suffix[1:]][1])

    async def index(self, request: Request):
        return HTMLResponse(self.static["index.html"], headers={"Cache-Control": "no-cache"})

    async def static_file(self, request: Request):
        """The page's scripts and style sheet (apps/static/), read once at start."""
        name = request.path_params["name"]
        if name not in self.static:
            raise APIError(404, f"no such page file {name!r}", code="not_found")
        return Response(self.static[name], media_type=STATIC_TYPES[Path(name).suffix],
                        headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------------------------- errors
async def _api_error(request: Request, exc: APIError):
    return exc.response()


async def _http_error(request: Request, exc: HTTPException):
    msg = {404: f"unknown path {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
    return APIError(exc.status_code, msg.get(exc.status_code, str(exc.detail)),
                    code={404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)).response()


async def _client_gone(request: Request, exc: ClientDisconnect):
    """A client that closed the connection mid-body is not an error: nobody reads this answer, nothing is logged."""
    return Response(status_code=400)


async def _server_error(request: Request, exc: Exception):
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()


def open_history(cfg: ServerConfig) -> History | None:
    """The history the config asks for (None when off); history.HistoryError when its folder cannot be written."""
    if cfg.history_dir is None or cfg.history_items <= 0:
        return None
    return History(cfg.history_dir, cfg.history_items, cfg.history_bytes)


def create_app(pipe: ZImagePipeline, config: ServerConfig | None = None, history: History | None = None) -> Starlette:
    """The ASGI app. `app.state.worker` runs the jobs; `app.state.files` holds `url` responses; `app.state.history`
    the images kept on disk (`history`, else the one `config.history_dir` names, else None)."""
    config = config or ServerConfig()
    api = ImagesAPI(pipe, config, history if history is not None else open_history(config))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        api.worker.stop()
        api.files.close()

    app = Starlette(
        routes=[
            Route("/", api.index), Route("/static/{name}", api.static_file), Route("/health", api.health),
            Route("/files/{name}", api.file),
            Route("/v1/models", api.models), Route("/v1/images/generations", api.generations, methods=["POST"]),
            Route("/v1/images/edits", api.edits, methods=["POST"]), Route("/info", api.info),
            Route("/history", api.history_list), Route("/history/{name}", api.history_file),
            Route("/history/{name}", api.history_delete, methods=["DELETE"]),
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, ClientDisconnect: _client_gone,
                            Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.worker, app.state.files, app.state.config = api.worker, api.files, api.cfg
    app.state.history = api.history
    return app
