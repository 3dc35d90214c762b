"""The command line: `zimage-mlx generate|convert|info|serve|mcp|upload|train` (also `python -m zimage_mlx`, `python -m
zimage_mlx.generate`).

This module is the group only: each command lives in its own module (generate_cmd, convert_cmd, serve_cmd,
upload_cmd, train_cmd) and is
imported when it is called, so `zimage-mlx --help` and `info` start at once and a Ctrl-C that lands while the
models' libraries are still importing ends in the one line "interrupted" (exit 130) like one that lands later.
Bad arguments print one line and exit 2 (checked before any model loads); runtime failures print one line and exit 1
(`--verbose` adds the traceback).
"""

from __future__ import annotations

import importlib
import json
import sys

import click

from .. import __version__
from .command import Command, interrupted

# name -> "module:attribute" of the click command, imported on use
COMMANDS = {
    "generate": "zimage_mlx.apps.generate_cmd:generate",
    "info": "zimage_mlx.apps.cli:info",
    "convert": "zimage_mlx.apps.convert_cmd:convert_command",
    "serve": "zimage_mlx.apps.serve_cmd:serve",
    "mcp": "zimage_mlx.apps.mcp_cmd:mcp",
    "upload": "zimage_mlx.apps.upload_cmd:upload_command",
    "train": "zimage_mlx.apps.train_cmd:train",
}


def _load(spec: str) -> click.Command:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


class LazyGroup(click.Group):
    """A click group whose commands are imported when used; Ctrl-C anywhere below it is one line, exit 130."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        return _load(COMMANDS[name]) if name in COMMANDS else None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            interrupted()


# ---------------------------------------------------------------------------------------------- info
@click.command("info", cls=Command)
@click.argument("png", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the parameters as a JSON object.")
def info(png, as_json):
    """Print the generation parameters stored in a PNG made by zimage-mlx."""
    from .pngfile import read_png_params

    try:
        params = read_png_params(png)
    except Exception as e:  # noqa: BLE001 - not an image, truncated, ...
        click.echo(f"error: {png}: cannot read it as an image ({' '.join(str(e).split())})", err=True)
        sys.exit(1)
    if not params:
        click.echo(f"error: {png}: no zimage-mlx parameters in it", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(params, ensure_ascii=False, indent=2))
    else:
        for k, v in params.items():
            click.echo(f"{k}: {v}")


# ---------------------------------------------------------------------------------------------- the group
@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="zimage-mlx")
def cli():
    """Z-Image text-to-image on Apple Silicon with MLX."""


def _main(name: str, prog_name: str) -> None:
    try:
        command = _load(COMMANDS[name])
    except KeyboardInterrupt:
        interrupted()
    command(prog_name=prog_name)


def generate_main() -> None:
    """`python -m zimage_mlx.generate`."""
    _main("generate", "python -m zimage_mlx.generate")


def convert_main() -> None:
    """`python -m zimage_mlx.convert`."""
    _main("convert", "python -m zimage_mlx.convert")


def __getattr__(name):
    # `from zimage_mlx.apps.cli import generate` (and the other commands) keeps working, imported on use
    specs = {spec.rpartition(":")[2]: spec for spec in COMMANDS.values()}
    if name in specs and not specs[name].endswith(f"cli:{name}"):
        return _load(specs[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
