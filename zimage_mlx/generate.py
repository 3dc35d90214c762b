"""`python -m zimage_mlx.generate` / `zimage-mlx generate`: the command line.

Bad arguments print one line and exit 2; runtime failures print one line and exit 1 (`--verbose` adds the
traceback). Each PNG carries its generation parameters as text chunks (`zimage-mlx info FILE` prints them)
and is written atomically, never over an existing file unless `--overwrite` is given.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

from . import __version__
from .convert import convert_command

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
DEFAULT_OUTPUT = "zimage-{seed}.png"
PNG_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "size", "model", "quantization",
            "dtype", "image", "strength", "version")

EPILOG = """\b
Examples:
  zimage-mlx generate "a red fox in the snow, golden hour"
  zimage-mlx generate --prompt-file prompt.txt -W 1280 -H 720 --seed 1 --seed 2 -o "fox-{seed}.png"
  zimage-mlx generate "the same scene at night" --image fox-1.png --strength 0.5
  zimage-mlx info fox-1.png

\b
Output files: {seed} and {index} (0-based, formats such as {index:03d} work) are filled in; a
directory means DIR/zimage-{seed}.png. An existing file is never replaced: the next free name
(NAME-1.png, NAME-2.png, ...) is used and printed, unless --overwrite is given. Paths of the
saved images go to stdout; progress and the summary go to stderr.

\b
Exit codes: 0 done; 1 failed at run time (one line; --verbose adds the traceback);
2 bad arguments; 130 interrupted.
"""


# ---------------------------------------------------------------------------------------------- arguments
class _Command(click.Command):
    """A click command whose usage errors are one line ("Error: ...") without the usage block."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as e:
            e.ctx = None
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            e.ctx = None
            raise


def _multiple_of_16(ctx, param, value):
    if value is not None and (value <= 0 or value % 16):
        near = max(16, round(value / 16) * 16)
        raise click.BadParameter(f"must be a positive multiple of 16, got {value} (try {near})")
    return value


def _parse_quantize(ctx, param, value: str):
    """auto | none | 4 | 8 | transformer=4,text_encoder=8 → what from_pretrained takes."""
    v = value.strip().lower()
    if v in ("none", "no", "0", "16", "32"):
        return None
    if v == "auto":
        return "auto"
    if v in ("4", "8"):
        return int(v)
    out = {}
    for part in v.split(","):
        name, _, bits = (s.strip() for s in part.partition("="))
        name = {"dit": "transformer", "te": "text_encoder"}.get(name, name)
        if name not in ("transformer", "text_encoder") or bits not in ("4", "8", "none"):
            raise click.BadParameter(f"cannot read {part!r}: use auto, none, 4, 8 or transformer=4,text_encoder=8")
        out[name] = int(bits) if bits in ("4", "8") else None
    return out


def _check_template(ctx, param, value: str) -> str:
    if value.endswith(("/", os.sep)) or Path(value).is_dir():
        value = str(Path(value) / DEFAULT_OUTPUT)
    try:
        filled = value.format(seed=0, index=0)
    except (KeyError, IndexError, ValueError) as e:
        raise click.BadParameter(f"{value!r}: only {{seed}} and {{index}} can be filled in ({e})") from None
    suffix = Path(filled).suffix.lower()
    if suffix not in ("", ".png"):
        raise click.BadParameter(f"{value!r}: images are written as PNG (their parameters live in PNG text chunks)")
    return value if suffix else value + ".png"


def _seeds(given: tuple[int, ...], num_images: int) -> list[int]:
    """One image per --seed; a single seed with -n N counts up from it; no seed picks a random one."""
    if len(given) > 1:
        if num_images not in (1, len(given)):
            raise click.UsageError(f"{len(given)} seeds but --num-images {num_images}: give one seed or {num_images}")
        return list(given)
    base = given[0] if given else secrets.randbelow(2**32)
    return [base + k for k in range(num_images)]


# ---------------------------------------------------------------------------------------------- PNG files
def png_params(prompt, negative_prompt, seed, steps, guidance, size, model, quantization, dtype,
               image=None, strength=None) -> dict[str, str]:
    """The text chunks of one image: one per parameter, plus an A1111-style "parameters" summary that
    image viewers and sites that show generation settings already understand."""
    params = {"prompt": prompt, "negative_prompt": negative_prompt or None, "seed": seed, "steps": steps,
              "guidance": guidance, "size": size, "model": model, "quantization": quantization, "dtype": dtype,
              "image": image, "strength": strength, "version": f"zimage-mlx {__version__}"}
    params = {k: str(v) for k, v in params.items() if v is not None}
    a1111 = prompt + (f"\nNegative prompt: {negative_prompt}" if negative_prompt else "")
    a1111 += (f"\nSteps: {steps}, Sampler: Euler (flow matching), CFG scale: {guidance}, Seed: {seed}, "
              f"Size: {size}, Model: {model}, Quantization: {quantization}, Version: zimage-mlx {__version__}")
    if image is not None:
        a1111 += f", Denoising strength: {strength}"
    return {**params, "parameters": a1111}


def save_png(image, path: Path, params: dict[str, str], overwrite: bool = False) -> Path:
    """Write `image` with `params` as PNG text chunks; return the path used.

    The PNG goes to a hidden temporary file next to the target first, so a failed or interrupted write
    never leaves a partial image. Without `overwrite` an existing file is kept and the next free name
    (NAME-1.png, NAME-2.png, ...) is used; a hard link claims the name atomically, so two runs cannot
    write over each other either.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in params.items():
        info.add_text(k, v)  # tEXt when Latin-1, else UTF-8 iTXt
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        if overwrite:
            os.replace(tmp, path)
            return path
        candidate, k = path, 0
        while True:
            try:
                os.link(tmp, candidate)
                return candidate
            except FileExistsError:
                k += 1
                candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
            except OSError:  # no hard links on this file system: check, then rename
                while candidate.exists():
                    k += 1
                    candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
                os.replace(tmp, candidate)
                return candidate
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_png_params(path: str | Path) -> dict[str, str]:
    """The zimage-mlx parameters stored in a PNG (empty if there are none)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # text chunks after the image data are read only by load()
        text = dict(getattr(im, "text", {}) or {})
    if "version" not in text or not str(text["version"]).startswith("zimage-mlx"):
        return {}
    return {k: text[k] for k in PNG_KEYS if k in text}


# ---------------------------------------------------------------------------------------------- progress
class _Progress:
    """The per-step callback: a one-line bar with seconds per step and ETA on a terminal's stderr,
    a single line per image otherwise."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.live = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.done = 0

    def __call__(self, step, sigma, latents):
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        per = elapsed / self.done
        if self.live:
            fill = 24 * self.done // self.total
            click.echo(f"\r{self.label} [{'#' * fill}{'.' * (24 - fill)}] {self.done}/{self.total}  "
                       f"{per:.2f} s/step  ETA {per * (self.total - self.done):.0f} s ",
                       nl=self.done == self.total, err=True)
        elif self.enabled and self.done == self.total:
            click.echo(f"{self.label}: {self.total} steps in {elapsed:.1f} s ({per:.2f} s/step)", err=True)
        return True


def _note(msg: str) -> None:
    click.echo(msg, err=True)


# ---------------------------------------------------------------------------------------------- generate
def _generate(o: dict) -> None:
    import mlx.core as mx

    from .pipeline import VARIANT_DEFAULTS, ZImagePipeline
    from .sampler import img2img_start

    stages: dict[str, float] = {}

    def clock(stage: str, t0: float) -> None:
        stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - t0

    t_all = time.perf_counter()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    pipe = ZImagePipeline.from_pretrained(o["model"], dtype=o["dtype"], quantize=o["quantize"], verbose=True)
    pipe.text_encoder  # load now, so loading and encoding are timed apart
    clock("load", t0)

    defaults = VARIANT_DEFAULTS[pipe.variant]
    steps = o["steps"] or defaults["num_inference_steps"]
    guidance = defaults["guidance_scale"] if o["guidance"] is None else o["guidance"]
    negative = o["negative_prompt"] if guidance > 0 else None
    if o["negative_prompt"] and guidance <= 0:
        _note("note: the negative prompt is ignored without guidance (--guidance > 0)")
    strength = o["strength"] if o["image"] else None
    run_steps = steps - img2img_start(steps, strength) if o["image"] else steps
    if run_steps <= 0:
        raise ValueError(f"--strength {strength} with {steps} steps leaves no step to run")

    t0 = time.perf_counter()
    feats = pipe.encode_prompt([o["prompt"]] + ([negative or ""] if guidance > 0 else []))
    pipe.free_text_encoder()
    clock("encode", t0)
    t0 = time.perf_counter()
    pipe.transformer, pipe.vae  # noqa: B018 - load both before the first step
    clock("load", t0)

    quant = pipe.quantization
    if not o["seed"]:
        _note(f"seed: {', '.join(map(str, o['seeds']))}")
    for i, seed in enumerate(o["seeds"]):
        label = f"image {i + 1}/{len(o['seeds'])}" if len(o["seeds"]) > 1 else "denoising"
        out = pipe(prompt_embeds=feats[:1], negative_prompt_embeds=feats[1:] or None,
                   height=o["height"], width=o["width"], num_inference_steps=steps, guidance_scale=guidance,
                   cfg_truncation=o["cfg_truncation"], cfg_normalization=o["cfg_normalization"], seed=seed,
                   image=o["image"], strength=strength if o["image"] else 0.6,
                   callback=_Progress(run_steps, label, enabled=not o["quiet"]))
        for k in ("vae_encode", "denoise", "decode"):
            if k in out.timings:
                stages[k] = stages.get(k, 0.0) + out.timings[k]
        img = out.images[0]
        t0 = time.perf_counter()
        params = png_params(o["prompt"], negative, seed, steps, guidance, f"{img.width}x{img.height}",
                            o["model"], quant, pipe.dtype_name, image=o["image"], strength=strength)
        path = Path(o["output"].format(seed=seed, index=i))
        saved = save_png(img, path, params, overwrite=o["overwrite"])
        clock("save", t0)
        if saved != path:
            _note(f"note: {path} exists; saving as {saved.name}")
        click.echo(str(saved))

    n = len(o["seeds"])
    per_step = stages.get("denoise", 0.0) / (n * run_steps)
    parts = [f"{k} {v:.1f} s" + (f" ({per_step:.2f} s/step)" if k == "denoise" else "") for k, v in stages.items()]
    _note(f"done: {n} image{'s' * (n > 1)} in {time.perf_counter() - t_all:.1f} s - {', '.join(parts)}; "
          f"peak memory {mx.get_peak_memory() / 1e9:.2f} GB")


def run_guarded(fn, verbose: bool) -> None:
    """Run fn; a runtime failure prints one line and exits 1 (the traceback first with --verbose)."""
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
        msg = " ".join(str(e).split()) or type(e).__name__
        hint = "" if verbose else " (--verbose for the traceback)"
        click.echo(f"error: {msg}{hint}", err=True)
        sys.exit(1)


@click.command("generate", cls=_Command, epilog=EPILOG)
@click.argument("prompt", required=False)
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False),
              help="Read the prompt from a UTF-8 text file (instead of PROMPT).")
@click.option("--negative-prompt", default="", help="What to steer away from (used only when --guidance > 0).")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="Denoising steps  [default: 8 for Turbo, 50 for Base]")
@click.option("--guidance", type=click.FloatRange(0.0), default=None,
              help="Classifier-free guidance scale, 0 = off  [default: 0 for Turbo, 4 for Base]")
@click.option("--width", "-W", type=int, default=None, callback=_multiple_of_16,
              help="Width in pixels, a multiple of 16  [default: 1024, or the input image's]")
@click.option("--height", "-H", type=int, default=None, callback=_multiple_of_16,
              help="Height in pixels, a multiple of 16  [default: 1024, or the input image's]")
@click.option("--seed", "-s", type=click.IntRange(0), multiple=True,
              help="Seed; repeat it for one image per seed. Random (and printed) when absent.")
@click.option("--num-images", "-n", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Images to make; with a single --seed S they use seeds S, S+1, ...")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="Hub id, Hugging Face-layout directory, or a directory made by `zimage-mlx convert`.")
@click.option("--quantize", "-q", default="auto", show_default=True, callback=_parse_quantize,
              help="auto (fit the machine's memory) | none | 4 | 8 | per model: transformer=4,text_encoder=8")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True,
              callback=lambda ctx, p, v: None if v == "auto" else v,
              help="Compute dtype; auto = bfloat16 on a GPU, float32 on the CPU.")
@click.option("--image", "-i", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Input image: image-to-image instead of text-to-image.")
@click.option("--strength", type=click.FloatRange(0.0, 1.0), default=None,
              help="How much of --image to repaint, 0-1 (1 ignores the image)  [default: 0.6]")
@click.option("--cfg-truncation", type=float, default=1.0, show_default=True,
              help="Turn guidance off once the normalized time passes this (1 = never).")
@click.option("--cfg-normalization", type=click.FloatRange(0.0), default=0.0, show_default=True,
              help="Cap the guided prediction's norm at this multiple of the positive one (0 = off).")
@click.option("--output", "-o", default=DEFAULT_OUTPUT, show_default=True, callback=_check_template,
              help="Output file, or a template with {seed} and {index}, or a directory. See below.")
@click.option("--overwrite", is_flag=True, help="Replace existing files instead of choosing a free name.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--verbose", "-v", is_flag=True, help="Show the traceback when something fails.")
@click.version_option(__version__, prog_name="zimage-mlx")
def generate(**o):
    """Generate images from PROMPT with Z-Image (Turbo by default) on MLX."""
    if o["prompt_file"]:
        if o["prompt"] is not None:
            raise click.UsageError("give PROMPT or --prompt-file, not both")
        o["prompt"] = Path(o["prompt_file"]).read_text(encoding="utf-8").strip()
    if not o["prompt"]:
        raise click.UsageError("give a PROMPT (or --prompt-file FILE); see --help")
    if o["strength"] is not None and o["image"] is None:
        raise click.UsageError("--strength needs --image")
    if o["image"] and o["strength"] is None:
        o["strength"] = 0.6
    if o["image"] is None:
        o["width"], o["height"] = o["width"] or 1024, o["height"] or 1024
    o["seeds"] = _seeds(o["seed"], o["num_images"])
    run_guarded(lambda: _generate(o), o["verbose"])


@click.command("info", cls=_Command)
@click.argument("png", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the parameters as a JSON object.")
def info(png, as_json):
    """Print the generation parameters stored in a PNG made by zimage-mlx."""
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


@click.group()
@click.version_option(__version__, prog_name="zimage-mlx")
def cli():
    """Z-Image text-to-image on Apple Silicon with MLX."""


cli.add_command(generate)
cli.add_command(info)
cli.add_command(convert_command)

if __name__ == "__main__":
    generate(prog_name="python -m zimage_mlx.generate")
