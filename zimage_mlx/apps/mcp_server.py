"""The MCP server (`zimage-mlx mcp`, docs/mcp.md): Z-Image as tools for AI assistants over the Model Context Protocol.

Built on the official `mcp` SDK's low-level `Server` (explicit tool schemas; stdio, or streamable HTTP on 127.0.0.1).
Tools: generate_image, edit_image, list_loras, enhance_prompt. A tool call becomes a pipeline request
(`GenerationRequest.from_dict(..., source="json").validate(pipe.limits)`, checked before it queues) run by the HTTP
server's worker: one thread owns the pipeline and runs calls one at a time, in arrival order. Image k of seed s is
`pipe(prompt, seed=s + k)`'s, as the HTTP server makes it; each is saved as a PNG with its parameters and returned as
MCP image content plus a text with the path and the parameters. Steps are reported as MCP progress notifications.
Every failure is an MCP tool error with a one-line message; the server goes on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import secrets
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from PIL import Image

from .. import __version__
from ..pipeline.pipeline import ZImagePipeline
from ..pipeline.request import MAX_SEED, GenerationRequest, RequestError
from .pngfile import png_params, save_png
from .jobs import Worker
from .openai_request import ServerConfig

MAX_N = 8                       # images per call
MAX_INPUT_BYTES = 50 * 2**20    # an input image file or its base64 text
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF", b"GIF8", b"BM")
COMMON = {
    "prompt": {"type": "string", "description": "What to draw."},
    "width": {"type": "integer", "description": "Pixels, a multiple of 16 (default 1024, or the input image's)."},
    "height": {"type": "integer", "description": "Pixels, a multiple of 16 (default 1024, or the input image's)."},
    "num_inference_steps": {"type": "integer", "description": "Denoising steps (default: the model's, Turbo 8)."},
    "seed": {"type": "integer", "description": "Image k uses seed + k; random when left out."},
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_N, "description": "How many images (default 1)."},
    "negative_prompt": {"type": "string", "description": "What to avoid (used with guidance_scale > 0)."},
    "guidance_scale": {"type": "number", "description": "Classifier-free guidance (Turbo: 0, Base: 4)."},
    "loras": {"type": "object", "additionalProperties": {"type": "number"},
              "description": "LoRA adapter name -> weight, from list_loras (others weigh 0)."},
    "enhance_prompt": {"type": "boolean", "description": "Rewrite the prompt first into a detailed one with the "
                                                         "model's own Qwen3 (the result is reported)."},
}
IMAGE_ARG = "a file path inside the server's allowed folders, or a base64 PNG/JPEG (a data: URL too)"
TOOLS = [
    types.Tool(name="generate_image", description="Generate images from a text prompt with Z-Image.",
               input_schema={"type": "object", "properties": COMMON, "required": ["prompt"],
                             "additionalProperties": False}),
    types.Tool(name="edit_image", description="Image-to-image, or inpainting with a mask (white, or transparent in "
                                              "an RGBA mask, = repaint).",
               input_schema={"type": "object", "required": ["prompt", "image"], "additionalProperties": False,
                             "properties": {**COMMON, "image": {"type": "string", "description": IMAGE_ARG},
                                            "mask": {"type": "string", "description": IMAGE_ARG},
                                            "strength": {"type": "number", "description": "0-1: how much changes "
                                                         "(default 0.6, with a mask 1.0)."}}}),
    types.Tool(name="list_loras", description="The LoRA adapters this server loaded, with their default weights.",
               input_schema={"type": "object", "properties": {}, "additionalProperties": False}),
    types.Tool(name="enhance_prompt", description="Rewrite a short prompt into a detailed one with the model's own "
                                                  "Qwen3 text encoder.",
               input_schema={"type": "object", "required": ["prompt"], "additionalProperties": False,
                             "properties": {"prompt": COMMON["prompt"], "seed": COMMON["seed"]}}),
]
SCHEMAS = {t.name: t.input_schema for t in TOOLS}


class ToolError(Exception):
    """A call the server refuses or could not complete: one line for the client."""


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_arguments(name: str, args: Any) -> dict:
    """The call's arguments: an object with only the tool's names and its required ones."""
    if name not in SCHEMAS:
        raise ToolError(f"unknown tool {name!r}; the tools are {', '.join(SCHEMAS)}")
    if not isinstance(args, dict):
        raise ToolError(f"{name}: the arguments must be an object")
    schema = SCHEMAS[name]
    unknown = [k for k in args if k not in schema["properties"]]
    if unknown:
        raise ToolError(f"{name}: unknown argument(s) {', '.join(map(repr, unknown))}; expected "
                        f"{', '.join(schema['properties']) or 'none'}")
    missing = [k for k in schema.get("required", []) if args.get(k) is None]
    if missing:
        raise ToolError(f"{name}: missing required argument(s) {', '.join(map(repr, missing))}")
    return args


class ImageReader:
    """Input images from base64 or from files inside the allowed folders only (symlinks resolved first)."""

    def __init__(self, allow_dirs):
        self.allow_dirs = [Path(d).expanduser().resolve() for d in allow_dirs]

    def __call__(self, value: Any, name: str, mode: str | None = "RGB") -> Image.Image:
        if not isinstance(value, str) or not value.strip():
            raise ToolError(f"'{name}' must be {IMAGE_ARG}")
        if len(value) > MAX_INPUT_BYTES * 4 // 3 + 4:
            raise ToolError(f"'{name}' is larger than {MAX_INPUT_BYTES // 2**20} MB")
        data = self._base64(value)
        source = "the base64 data"
        if data is None:
            path = self._path(value, name)
            source = str(path)
            if path.stat().st_size > MAX_INPUT_BYTES:
                raise ToolError(f"'{name}': {path} is larger than {MAX_INPUT_BYTES // 2**20} MB")
            data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.convert(mode) if mode and im.mode != mode else im.copy()
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a file that is no image
            raise ToolError(f"'{name}': {source} is not a readable image (PNG, JPEG, WebP): {one_line(e)}") from None

    @staticmethod
    def _base64(value: str) -> bytes | None:
        text = value.strip()
        if text.startswith("data:"):
            head, _, text = text.partition(",")
            if not head.endswith(";base64"):
                raise ToolError("a data: URL image must be base64-encoded")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return None
        return data if data.startswith(IMAGE_MAGIC) or value.startswith("data:") else None

    def _path(self, value: str, name: str) -> Path:
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else Path.cwd() / path).resolve()
        if not any(path.is_relative_to(d) for d in self.allow_dirs):
            raise ToolError(f"'{name}': {value} is outside the allowed folders ({', '.join(map(str, self.allow_dirs))}"
                            "); start the server with --allow-dir FOLDER to allow another")
        if not path.is_file():
            raise ToolError(f"'{name}': no file {path}")
        return path


class ZImageMCP:
    """The tools over one pipeline and one worker (the HTTP server's `Worker`: a call runs after those queued)."""

    def __init__(self, pipe: ZImagePipeline, *, output_dir, allow_dirs=(".",), model: str = "z-image-turbo",
                 lora_weights: dict[str, float] | None = None, worker: Worker | None = None):
        self.pipe, self.model = pipe, model
        self.output_dir = Path(output_dir).expanduser()
        self.read_image = ImageReader(allow_dirs)
        self.lora_weights = dict(lora_weights or {})
        self.worker = worker or Worker(pipe, ServerConfig(model=model, loras=self.lora_weights))

    def server(self) -> Server:
        return Server("zimage-mlx", version=__version__, on_list_tools=self._list_tools, on_call_tool=self._call_tool,
                      instructions="Z-Image text-to-image on this Mac: generate_image, edit_image, list_loras, "
                                   "enhance_prompt. Images are saved on the server; the text result names the file.")

    async def _list_tools(self, ctx, params) -> types.ListToolsResult:
        return types.ListToolsResult(tools=TOOLS)

    async def _call_tool(self, ctx, params) -> types.CallToolResult:
        try:
            args = check_arguments(params.name, params.arguments if params.arguments is not None else {})
            content = await self.call(params.name, args, _progress(ctx))
            return types.CallToolResult(content=content)
        except Exception as e:  # noqa: BLE001 - every failure is a tool error with one line; the server goes on
            msg = one_line(e) if isinstance(e, (ToolError, RequestError, ValueError)) else \
                f"{params.name} failed: {one_line(e)}"
            return types.CallToolResult(content=[types.TextContent(type="text", text=msg)], is_error=True)

    async def call(self, name: str, args: dict, progress=None) -> list:
        """Run one tool call (arguments already checked by name) on the worker; returns its MCP content."""
        if name == "list_loras":
            text = json.dumps([{"name": k, "weight": w} for k, w in self.lora_weights.items()])
            return [types.TextContent(type="text", text=text)]
        if name == "enhance_prompt":
            seed = _int(args, "seed", 0, MAX_SEED)
            out = await self._on_worker(lambda pipe: pipe.enhance_prompt(_str(args, "prompt"), seed=seed))
            return [types.TextContent(type="text", text=out)]
        n, enhance = _int(args, "n", 1, MAX_N) or 1, args.get("enhance_prompt", False)
        if not isinstance(enhance, bool):
            raise ToolError(f"'enhance_prompt' must be true or false, got {json.dumps(enhance)[:40]}")
        req = self.request(name, args)
        seed = secrets.randbelow(MAX_SEED - MAX_N) if req.seed is None else req.seed
        if seed + n - 1 > MAX_SEED:
            raise ToolError(f"'seed' + n - 1 must be at most {MAX_SEED}")
        loop = asyncio.get_running_loop()

        def step(done: int, total: int, message: str) -> None:
            if progress is not None:
                asyncio.run_coroutine_threadsafe(progress(done, total, message), loop)

        results = await self._on_worker(lambda pipe: self._generate(pipe, req, seed, n, enhance, step))
        return self._content(req, results)

    def request(self, name: str, args: dict) -> GenerationRequest:
        """The pipeline request of a generate/edit call, validated against the model before it queues."""
        body = {k: v for k, v in args.items() if k not in ("n", "enhance_prompt", "image", "mask")}
        _str(args, "prompt")
        if name == "edit_image":
            body["image"] = self.read_image(args["image"], "image")
            if args.get("mask") is not None:
                body["mask_image"] = self.read_image(args["mask"], "mask", mode=None)
        try:
            return GenerationRequest.from_dict(body, source="json").validate(self.pipe.limits)
        except RequestError as e:
            raise ToolError(one_line(e)) from None

    def _generate(self, pipe, req: GenerationRequest, seed: int, n: int, enhance: bool, step) -> list:
        """On the worker: the images of one call, saved with their parameters; [(image, path, params)]."""
        original = req.prompt[0]
        if enhance:
            req = req.replace(prompt=[pipe.enhance_prompt(original, seed=seed)])
        out, done, steps = [], [0], req.steps_to_run
        negative = req.negative_prompt[0] if req.do_cfg and req.negative_prompt else None
        loras = pipe.loras if req.loras is None else \
            [dict(lo, weight=req.loras.get(lo["name"], 0.0)) for lo in pipe.loras]   # this call's weights
        for k in range(n):
            def on_step(record, k=k):
                done[0] += 1
                step(done[0], n * steps, f"image {k + 1}/{n}: step {done[0] - k * steps}/{steps}")
            img = pipe.generate(req.replace(seed=seed + k, on_step=on_step)).images[0]
            params = png_params(req.prompt[0], negative, seed + k, req.num_inference_steps, req.guidance_scale,
                                f"{img.width}x{img.height}", self.model, pipe.quantization, pipe.dtype_name,
                                image="input" if req.image is not None else None, strength=req.strength,
                                loras=loras, extra={"original_prompt": original} if enhance else None)
            path = save_png(img, self.output_dir / f"zimage-{seed + k}.png", params)
            out.append((img, path, params))
        return out

    @staticmethod
    def _content(req: GenerationRequest, results: list) -> list:
        content = []
        for img, _, _ in results:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            content.append(types.ImageContent(type="image", data=base64.b64encode(buf.getvalue()).decode(),
                                              mime_type="image/png"))
        summary = [{"path": str(path), **{k: v for k, v in params.items() if k not in ("parameters", "version")}}
                   for _, path, params in results]
        content.append(types.TextContent(type="text", text=json.dumps(summary, ensure_ascii=False, indent=1)))
        return content

    async def _on_worker(self, fn):
        """fn(pipe) on the worker thread, after the calls queued before it."""
        return await anyio.to_thread.run_sync(self.worker.call, fn)


def _progress(ctx):
    session = getattr(ctx, "session", None)
    if session is None:
        return None
    return lambda done, total, message: session.report_progress(done, total, message)


def _str(args: dict, name: str) -> str:
    v = args.get(name)
    if not isinstance(v, str) or not v.strip():
        raise ToolError(f"'{name}' must be a non-empty string")
    return v


def _int(args: dict, name: str, lo: int, hi: int) -> int | None:
    v = args.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ToolError(f"'{name}' must be an integer from {lo} to {hi}, got {json.dumps(v)[:40]}")
    return v


def run_stdio(app: ZImageMCP) -> None:
    """Serve on this process's stdin/stdout (what an MCP client that starts the command speaks)."""
    from mcp.server.stdio import stdio_server

    async def serve():
        server = app.server()
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
    anyio.run(serve)


def http_app(app: ZImageMCP, host: str = "127.0.0.1"):
    """The ASGI app of MCP's streamable HTTP at /mcp (the SDK's DNS-rebinding protection for a loopback host)."""
    return app.server().streamable_http_app(host=host)
