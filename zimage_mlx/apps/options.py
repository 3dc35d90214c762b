"""Click option callbacks the commands share: each turns one option's text into a checked value or a one-line
usage error naming the option (exit 2), before any model loads."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ..loading.hub import DEFAULT_REPO
from ..loading.quantize import VOCABULARY, parse_quantize


def quantize_option(ctx, param, value):
    """The CLI spelling of quantize.parse_quantize's vocabulary (one parser for generate, convert and the API)."""
    if value is None:
        return None
    try:
        return parse_quantize(value)
    except ValueError as e:
        raise click.BadParameter(f"{e}") from None


def finite(ctx, param, value):
    """NaN and ±inf pass click's range checks; refuse them (also in each value of a repeated option)."""
    for v in value if isinstance(value, (tuple, list)) else (value,):
        if v is not None and not math.isfinite(v):
            raise click.BadParameter(f"must be a finite number, got {v}")
    return value


def lora_option(ctx, param, values) -> list[tuple[str, float]]:
    """--lora PATH[:WEIGHT] -> [(path, weight)]: the weight (default 1) follows the last colon; PATH is a local
    file or a hub file owner/repo/file.safetensors."""
    out = []
    for v in values:
        path, sep, weight = v.rpartition(":")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            sep = ""
        if not sep:
            path, w = v, 1.0
        if not math.isfinite(w):
            raise click.BadParameter(f"{v!r}: the weight must be a finite number")
        hub_file = len(path.split("/")) >= 3 and not path.startswith(("/", ".", "~"))
        if not Path(path).expanduser().exists() and not hub_file:
            raise click.BadParameter(f"{path}: no such file")
        out.append((path, w))
    return out


def model_options(fn):
    """--model, --quantize and --dtype, spelled and checked alike by every command that loads the pipeline."""
    fn = click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True,
                      callback=lambda ctx, p, v: None if v == "auto" else v,
                      help="Compute dtype; auto = bfloat16 on a GPU, float32 on the CPU.")(fn)
    fn = click.option("--quantize", "-q", default="auto", show_default=True, callback=quantize_option,
                      help=f"auto (fit the machine's memory) | {VOCABULARY.replace('auto, ', '')}")(fn)
    return click.option("--model", "-m", default=DEFAULT_REPO, show_default=True,
                        help="Hub id, Hugging Face-layout directory, or a directory made by `zimage-mlx convert`.")(fn)
