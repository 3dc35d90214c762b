"""`python -m zimage_mlx.generate` / `zimage-mlx generate`: the command line.

Prints one line per failure (exit 1; `--verbose` shows the traceback); bad arguments exit 2. PNGs carry
their generation parameters as text chunks (`zimage-mlx info FILE` prints them).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

from . import __version__

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
PNG_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "size", "model", "quantization",
            "dtype", "strength", "zimage_mlx_version")


def _multiple_of_16(ctx, param, value):
    if value is not None and (value <= 0 or value % 16):
        raise click.BadParameter(f"must be a positive multiple of 16 (got {value}); try {max(16, value // 16 * 16)}")
    return value


def _parse_quantize(value: str):
    """auto | none | 4 | 8 | transformer=4,text_encoder=8"""
    v = value.strip().lower()
    if v in ("none", "no", "0", ""):
        return None
    if v == "auto":
        return "auto"
    if v in ("4", "8"):
        return int(v)
    out = {}
    for part in v.split(","):
        name, _, bits = part.partition("=")
        name = {"dit": "transformer", "te": "text_encoder"}.get(name.strip(), name.strip())
        if name not in ("transformer", "text_encoder") or bits.strip() not in ("4", "8", "none", "16", "32"):
            raise click.BadParameter(f"cannot read {part!r}: use auto, none, 4, 8 or transformer=4,text_encoder=8")
        out[name] = int(bits) if bits.strip() in ("4", "8") else None
    return out


def output_paths(template: str, seeds: list[int], overwrite: bool = False) -> list[Path]:
    """Fill {seed}/{index} into the output template; never reuse an existing file unless overwrite is set."""
    paths = []
    multi = len(seeds) > 1 and "{seed}" not in template and "{index}" not in template
    for i, s in enumerate(seeds):
        p = Path(template.format(seed=s, index=i))
        if multi:
            p = p.with_name(f"{p.stem}-{i}{p.suffix}")
        if p.suffix.lower() != ".png":
            p = p.with_suffix(p.suffix + ".png") if p.suffix else p.with_suffix(".png")
        if not overwrite:
            k = 1
            base = p
            while p.exists() or p in paths:
                p = base.with_name(f"{base.stem}-{k}{base.suffix}")
                k += 1
        paths.append(p)
    return paths


def save_png(image, path: Path, params: dict) -> None:
    """Write a PNG with its parameters as tEXt/iTXt chunks, atomically (temp file, then rename)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in params.items():
        if v is not None:
            info.add_itxt(k, str(v))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_png_params(path: str | Path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    return {k: text[k] for k in PNG_KEYS if k in text}


class _Progress:
    """One-line progress on stderr: step i/N, a bar, seconds per step and ETA."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.t0 = time.perf_counter()
        self.done = 0

    def __call__(self, step, sigma, latents):
        self.done += 1
        if not self.enabled:
            return True
        el = time.perf_counter() - self.t0
        per = el / self.done
        eta = per * (self.total - self.done)
        width = 24
        fill = int(width * self.done / self.total)
        click.echo(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                   f"{per:.2f} s/step, ETA {eta:.0f} s ", nl=self.done == self.total, err=True)
        return True


def _generate(opts: dict) -> None:
    import mlx.core as mx

    from .pipeline import ZImagePipeline, _seeds, check_size

    prompt = opts["prompt"]
    if opts["prompt_file"]:
        prompt = Path(opts["prompt_file"]).read_text(encoding="utf-8").strip()
    quantize = _parse_quantize(opts["quantize"])
    dtype = None if opts["dtype"] == "auto" else opts["dtype"]
    t_load = time.perf_counter()
    pipe = ZImagePipeline.from_pretrained(opts["model"], dtype=dtype, quantize=quantize, verbose=True)
    steps = opts["steps"] if opts["steps"] is not None else None
    seeds = list(opts["seed"]) or _seeds(None, opts["num_images"])
    if len(seeds) == 1 and opts["num_images"] > 1:
        seeds = [seeds[0] + k for k in range(opts["num_images"])]
    if not opts["seed"]:
        click.echo(f"seed: {', '.join(map(str, seeds))}", err=True)
    height, width = opts["height"], opts["width"]
    if opts["image"] is None:
        height, width = height or 1024, width or 1024
        check_size(height, width)
    paths = output_paths(opts["output"], seeds, overwrite=opts["overwrite"])

    from .pipeline import VARIANT_DEFAULTS
    d = VARIANT_DEFAULTS[pipe.variant]
    n_steps = d["num_inference_steps"] if steps is None else steps
    guidance = d["guidance_scale"] if opts["guidance"] is None else opts["guidance"]
    click.echo("encoding prompt…", err=True)
    prompts = [prompt] + ([opts["negative_prompt"] or ""] if guidance > 0 else [])
    feats = pipe.encode_prompt(prompts)
    pipe.free_text_encoder()
    pos, neg = feats[:1], feats[1:] or None
    totals: dict[str, float] = {"load+encode": time.perf_counter() - t_load}
    peak = 0.0
    for i, (s, path) in enumerate(zip(seeds, paths)):
        label = f"image {i + 1}/{len(seeds)}" if len(seeds) > 1 else "denoising"
        n_run = n_steps
        if opts["image"] is not None:
            from .sampler import img2img_start
            n_run = n_steps - img2img_start(n_steps, opts["strength"])
        progress = _Progress(n_run, label, enabled=not opts["quiet"])
        out = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=height, width=width,
                   num_inference_steps=n_steps, guidance_scale=guidance, seed=s,
                   image=opts["image"], strength=opts["strength"], callback=progress,
                   cfg_truncation=opts["cfg_truncation"], cfg_normalization=opts["cfg_normalization"])
        img = out.images[0]
        params = {
            "prompt": prompt, "negative_prompt": opts["negative_prompt"] if guidance > 0 else None,
            "seed": s, "steps": n_steps, "guidance": guidance, "size": f"{img.width}x{img.height}",
            "model": str(opts["model"]), "quantization": _describe_quant(pipe), "dtype": str(pipe.dtype_name),
            "strength": opts["strength"] if opts["image"] is not None else None, "zimage_mlx_version": __version__,
        }
        save_png(img, path, params)
        click.echo(f"saved {path}", err=False)
        for k, v in out.timings.items():
            totals[k] = totals.get(k, 0.0) + v
        peak = max(peak, out.peak_memory_gb)
    summary = ", ".join(f"{k} {v:.1f} s" for k, v in totals.items() if k != "total")
    click.echo(f"done: {summary}; peak memory {max(peak, mx.get_peak_memory() / 1e9):.2f} GB", err=True)


def _describe_quant(pipe) -> str:
    plan = getattr(pipe, "plan", None)
    return plan.describe() if plan is not None and hasattr(plan, "describe") else "none"


GENERATE_OPTIONS = [
    click.argument("prompt", required=False),
    click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), help="Read the prompt from a file."),
    click.option("--negative-prompt", default="", help="Negative prompt (used when guidance > 0)."),
    click.option("--steps", type=click.IntRange(1, 1000), default=None,
                 help="Denoising steps [default: 8 for Turbo, 50 for Base]."),
    click.option("--guidance", type=float, default=None, help="CFG scale, 0 = off [default: 0 Turbo, 4 Base]."),
    click.option("--cfg-truncation", type=float, default=1.0, show_default=True,
                 help="Stop CFG once the normalized time exceeds this."),
    click.option("--cfg-normalization", type=float, default=0.0, show_default=True,
                 help="Cap ‖pred‖ at this multiple of ‖positive‖ (0 = off)."),
    click.option("--width", "-W", type=int, default=None, callback=_multiple_of_16,
                 help="Width in pixels, a multiple of 16 [default: 1024, or the input image's]."),
    click.option("--height", "-H", type=int, default=None, callback=_multiple_of_16,
                 help="Height in pixels, a multiple of 16 [default: 1024, or the input image's]."),
    click.option("--seed", "-s", type=int, multiple=True, help="Seed (repeat for several images); random if absent."),
    click.option("--num-images", "-n", type=click.IntRange(1, 1000), default=1, show_default=True),
    click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
                 help="Hub id, Hugging Face-layout directory or zimage_mlx (MLX) directory."),
    click.option("--quantize", "-q", default="auto", show_default=True,
                 help="auto | none | 4 | 8 | transformer=4,text_encoder=8."),
    click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True),
    click.option("--image", "-i", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="Input image for image-to-image."),
    click.option("--strength", type=click.FloatRange(0.0, 1.0), default=0.6, show_default=True,
                 help="Image-to-image strength (1 = ignore the input)."),
    click.option("--output", "-o", default="zimage-{seed}.png", show_default=True,
                 help="Output path or template with {seed} and {index}."),
    click.option("--overwrite", is_flag=True, help="Replace existing files instead of picking a new name."),
    click.option("--quiet", is_flag=True, help="No progress bar."),
    click.option("--verbose", "-v", is_flag=True, help="Show tracebacks on errors."),
]


def _with_options(f):
    for opt in reversed(GENERATE_OPTIONS):
        f = opt(f)
    return f


def run_guarded(fn, verbose: bool) -> None:
    """Run fn; a runtime failure prints one line and exits 1 (traceback only with --verbose)."""
    try:
        fn()
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the CLI's one-line error contract
        if verbose:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


@click.command("generate")
@_with_options
def generate(**opts):
    """Generate images from PROMPT with Z-Image."""
    if opts["prompt"] is None and not opts["prompt_file"]:
        raise click.UsageError("give a PROMPT or --prompt-file")
    run_guarded(lambda: _generate(opts), opts["verbose"])


@click.command("info")
@click.argument("png", type=click.Path(exists=True, dir_okay=False))
def info(png):
    """Print the generation parameters stored in a PNG made by zimage-mlx."""
    params = read_png_params(png)
    if not params:
        click.echo(f"{png}: no zimage-mlx parameters found", err=True)
        sys.exit(1)
    for k, v in params.items():
        click.echo(f"{k}: {v}")


@click.group()
@click.version_option(__version__, prog_name="zimage-mlx")
def cli():
    """Z-Image text-to-image on Apple Silicon with MLX."""


cli.add_command(generate)
cli.add_command(info)

if __name__ == "__main__":
    generate(prog_name="python -m zimage_mlx.generate")
