"""`zimage-mlx mcp`: load the pipeline once and serve it to AI assistants over the Model Context Protocol
(mcp_server.py, docs/mcp.md): stdio by default (the client starts this command), or streamable HTTP on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import click

from .command import Command, note, run_guarded
from .options import lora_option, model_options
from .serve_cmd import _pipeline, bind, serve_forever

DEFAULT_OUTPUT_DIR = "~/Pictures/zimage-mlx"


@click.command("mcp", cls=Command)
@model_options
@click.option("--http", "http", is_flag=True,
              help="Serve MCP's streamable HTTP at http://127.0.0.1:PORT/mcp instead of stdio.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="With --http.")
@click.option("--allow-dir", "allow_dirs", multiple=True, type=click.Path(file_okay=False),
              help="A folder edit_image may read input images from; repeat for several (default: the current "
                   "directory). Paths elsewhere are refused.")
@click.option("--output-dir", default=DEFAULT_OUTPUT_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Where the images are saved (PNG with their parameters).")
@click.option("--lora", multiple=True, callback=lora_option,
              help="LoRA file to load at start, PATH or PATH:WEIGHT; repeat for several. Tools pick them by name "
                   "(the file's stem) with loras={NAME: WEIGHT}; list_loras lists them.")
@click.option("--verbose", "-v", is_flag=True, help="Show the traceback when something fails.")
def mcp(model, http, port, allow_dirs, output_dir, quantize, dtype, lora, verbose):
    """Serve Z-Image to AI assistants over MCP: tools generate_image, edit_image, list_loras, enhance_prompt."""
    try:
        from . import mcp_server
    except ImportError as e:
        raise click.UsageError(f"the MCP server needs the mcp extra: pip install 'zimage-mlx[mcp]' ({e})") from None

    def start():
        sock = bind("127.0.0.1", port) if http else None
        try:
            pipe, names = _pipeline(model, quantize, dtype, lora)   # notes go to stderr: stdout is the protocol
            app = mcp_server.ZImageMCP(pipe, output_dir=output_dir, allow_dirs=allow_dirs or (".",),
                                       model=Path(model).name if Path(model).exists() else model, lora_weights=names)
            if sock is None:
                note("serving MCP on stdio")
                mcp_server.run_stdio(app)
            else:
                note(f"serving MCP on http://127.0.0.1:{sock.getsockname()[1]}/mcp")
                serve_forever(mcp_server.http_app(app), sock, verbose)
        finally:
            if sock is not None:
                sock.close()

    run_guarded(start, verbose)
