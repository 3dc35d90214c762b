"""`zimage-mlx serve`: load the pipeline once, bind the port, and serve OpenAI's images API (server.py) on it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click

from ..pipeline.pipeline import ZImagePipeline
from ..pipeline.preview import load_tiny_decoder
from .command import Command, note, run_guarded
from .options import lora_option, model_options


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is printed or loaded: a port in use is one line, exit 1."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve_forever(app, sock: socket.socket, verbose: bool) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="info" if verbose else "warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def state_dir() -> Path:
    """Where the server keeps state: $ZIMAGE_MLX_STATE, default ~/.local/state/zimage_mlx."""
    return Path(os.environ.get("ZIMAGE_MLX_STATE") or Path.home() / ".local" / "state" / "zimage_mlx")


def _pipeline(model, quantize, dtype, lora, controlnet=None) -> tuple[ZImagePipeline, dict[str, float]]:
    # keep_text_encoder=None: the plan keeps it warm between requests when that fits
    pipe = ZImagePipeline.from_pretrained(model, dtype=dtype, quantize=quantize, verbose=True, keep_text_encoder=None,
                                          controlnet=controlnet)
    note(f"Z-Image {pipe.variant.capitalize()}, {pipe.dtype_name}; {pipe.plan.summary()}")
    names = {}
    for path, weight in lora:
        name = Path(path).stem
        pipe.load_lora_weights(path, adapter_name=name)
        names[name] = weight
    if names:
        pipe.set_adapters(list(names), list(names.values()))
    return pipe, names


@click.command("serve", cls=Command)
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="ZIMAGE_MLX_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on /v1/* (also read from $ZIMAGE_MLX_API_KEY).")
@click.option("--max-queue", type=click.IntRange(1), default=16, show_default=True,
              help="Requests accepted at once (running and waiting); more are answered 429.")
@click.option("--lora", multiple=True, callback=lora_option,
              help="LoRA file to load at start, PATH or PATH:WEIGHT; repeat for several. Requests pick them by "
                   "name (the file's stem) with {\"loras\": {\"NAME\": WEIGHT}}.")
@click.option("--url-ttl", type=click.FloatRange(1), default=3600, show_default=True,
              help="Seconds a response_format=url image stays downloadable.")
@click.option("--taef1", default=None,
              help="TAEF1 weights (taef1_decoder.safetensors, a path or hub file) for full-size streamed previews.")
@click.option("--controlnet", default=None,
              help="ControlNet Union to load: .safetensors file, diffusers or converted directory, or owner/repo/file. "
                   "Requests then take a control_image (multipart), control_type and controlnet_conditioning_scale.")
@click.option("--history-dir", type=click.Path(file_okay=False), default=None,
              help="Folder of the image history  [default: $ZIMAGE_MLX_STATE/history, ~/.local/state/zimage_mlx/"
                   "history]")
@click.option("--history", "history_items", type=click.IntRange(0), default=200, show_default=True,
              help="Images the history keeps (the oldest go first); 0 turns the history off.")
@click.option("--history-mb", type=click.IntRange(1), default=2048, show_default=True,
              help="Megabytes the history keeps at most (the oldest go first).")
@click.option("--verbose", "-v", is_flag=True, help="Show the traceback when something fails.")
def serve(model, host, port, api_key, max_queue, quantize, dtype, lora, url_ttl, taef1, controlnet, history_dir,
          history_items, history_mb, verbose):
    """Serve OpenAI's images API (/v1/images/generations, /v1/images/edits) and a web page at http://HOST:PORT/."""
    try:
        import uvicorn  # noqa: F401 - checked here, used by serve_forever

        from . import server
    except ImportError as e:
        raise click.UsageError(f"the server needs the serve extra: pip install 'zimage-mlx[serve]' ({e})") from None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        note(f"warning: listening on {host} without --api-key: anyone who can reach this port can use it")

    def start():
        sock = bind(host, port)
        try:
            config = server.ServerConfig(model=Path(model).name if Path(model).exists() else model,
                                         api_key=api_key, max_queue=max_queue, url_ttl=url_ttl,
                                         history_dir=Path(history_dir) if history_dir else state_dir() / "history",
                                         history_items=history_items, history_bytes=history_mb * 2**20)
            history = server.open_history(config)   # an unwritable folder is one line before anything loads
            pipe, config.loras = _pipeline(model, quantize, dtype, lora, controlnet)
            config.preview_decoder = load_tiny_decoder(taef1) if taef1 else None
            app = server.create_app(pipe, config, history)
            note("loading the models …")
            app.state.worker.call(lambda p: (p.transformer, p.vae, p.text_encoder if p.keep_text_encoder else None))
            bound = sock.getsockname()[1]
            if history is not None:
                note(f"keeping the last {history_items} images ({history_mb} MB at most) in {history.root}")
            note(f"serving on http://{host}:{bound}/ (OpenAI base_url http://{host}:{bound}/v1)")
            serve_forever(app, sock, verbose)
        finally:
            sock.close()

    run_guarded(start, verbose)
