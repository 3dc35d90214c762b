"""The command line: `zimage-mlx generate|convert|info|serve|upload` (also `python -m zimage_mlx`,
`python -m zimage_mlx.generate`).

All click code lives here; the commands call the pipeline and the converter and do not redo their work. Bad
arguments print one line and exit 2 (checked before any model loads); runtime failures print one line and exit 1
(`--verbose` adds the traceback); Ctrl-C exits 130. Images are checked writable before the model loads, written
atomically, never over an existing file unless `--overwrite` is given, and saved to a fallback path (and said so)
if their destination fails at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

from .. import __version__
from ..pipeline.control_maps import CONTROL_TYPES
from ..models.controlnet import SEMANTICS
from ..loading.convert import check_output, convert, convert_controlnet
from ..distributed import PARALLEL_MODES, init_group, shared_random_seed, watch_for_lost_peers
from ..loading.hub import DEFAULT_REPO
from ..loading.publish import upload
from ..pipeline.pipeline import DEFAULT_INPAINT_STRENGTH, DEFAULT_SIZE, DEFAULT_STRENGTH, MAX_SEED, ZImagePipeline, expand_seeds
from .pngfile import describe_loras, png_params, read_png_params, save_png
from ..pipeline.preview import Previewer, load_tiny_decoder
from ..loading.quantize import GROUP_SIZES, VOCABULARY, parse_quantize

DEFAULT_OUTPUT = "zimage-{seed}.png"

EPILOG = """\b
Examples:
  zimage-mlx generate "a red fox in the snow, golden hour"
  zimage-mlx generate --prompt-file prompt.txt -W 1280 -H 720 --seed 1 --seed 2 -o "fox-{seed}.png"
  zimage-mlx generate "the same scene at night" --image fox-1.png --strength 0.5
  zimage-mlx generate "a red door" --image house.png --mask door-mask.png
  zimage-mlx generate "a dancer" --controlnet Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors \\
      --control-image photo.png --control-type canny --control-scale 0.75
  zimage-mlx info fox-1.png

\b
Output files: {seed} and {index} (0-based, formats such as {index:03d} work) are filled in; a
directory means DIR/zimage-{seed}.png; several images with a plain file name get -{seed} added.
An existing file is never replaced: the next free name (NAME-1.png, NAME-2.png, ...) is used and
printed, unless --overwrite is given. Paths of the saved images go to stdout; progress and the
summary go to stderr.

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


def _quantize_option(ctx, param, value):
    """The CLI spelling of quantize.parse_quantize's vocabulary (one parser for generate, convert and the API)."""
    if value is None:
        return None
    try:
        return parse_quantize(value)
    except ValueError as e:
        raise click.BadParameter(f"{e}") from None


def _finite(ctx, param, value):
    if value is not None and value != value:   # NaN passes click's range checks
        raise click.BadParameter("must be a number, got nan")
    return value


def _lora_option(ctx, param, values) -> list[tuple[str, float]]:
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


def _utf8(text: str, what: str) -> str:
    """Refuse text that is not valid UTF-8 (click hands undecodable bytes over as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise click.UsageError(f"{what} is not valid UTF-8 (byte offset {len(text[:e.start].encode('utf-8', 'surrogateescape'))})") from None
    return text


def _read_prompt_file(path: str) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise click.UsageError(f"--prompt-file {path}: not valid UTF-8 (byte offset {e.start}); save it as UTF-8") \
            from None


def output_paths(template: str, seeds: list[int]) -> list[Path]:
    """One path per image; several images with a template that names none of them get -{seed} added."""
    if len(seeds) > 1 and not re.search(r"\{(seed|index)[^}]*\}", template):
        stem, suffix = os.path.splitext(template)
        template = f"{stem}-{{seed}}{suffix}"
    return [Path(template.format(seed=s, index=i)) for i, s in enumerate(seeds)]


def check_writable(paths: list[Path]) -> None:
    """Fail before any model loads when an image could not be written (read-only place, parent is a file, ...)."""
    for parent in dict.fromkeys(p.parent for p in paths):
        probe_dir = parent
        while not probe_dir.exists() and probe_dir != probe_dir.parent:
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise click.UsageError(f"cannot write images into {parent}: {probe_dir} is not a folder")
        try:
            with tempfile.TemporaryFile(dir=probe_dir):
                pass
        except OSError as e:
            raise click.UsageError(f"cannot write images into {parent} ({e.strerror or e})") from None


def _save_with_fallback(image, path: Path, params: dict, overwrite: bool) -> Path:
    """Save; if the destination fails now (disk full, removed folder), save into the current or temp folder."""
    try:
        return save_png(image, path, params, overwrite=overwrite)
    except OSError as e:
        for folder in (Path.cwd(), Path(tempfile.gettempdir())):
            try:
                saved = save_png(image, folder / path.name, params)
            except OSError:
                continue
            _note(f"warning: could not write {path} ({e.strerror or e}); saved the image as {saved} instead")
            return saved
        raise


# ---------------------------------------------------------------------------------------------- progress
class _Progress:
    """The per-step callback: a one-line bar with seconds per step and ETA on a terminal's stderr,
    a single line per image otherwise."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.live = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.done = 0

    def __call__(self, record):
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


class _PreviewFile:
    """Wraps the progress callback: after every step, the predicted final image (preview.Previewer) replaces
    `path` atomically (written beside it, then renamed), so an image viewer never shows a half-written file."""

    def __init__(self, path: Path, inner, decoder=None):
        self.path, self.inner = path, inner
        self.previewer = Previewer(decoder)

    def __call__(self, record):
        image = self.previewer.image(record)     # the step's own x̂0 (a denoise.StepRecord)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".png.part", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                image.save(f, format="PNG", compress_level=1)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return self.inner(record)


def _note(msg: str) -> None:
    click.echo(msg, err=True)


PEER_LOST = "[ring] connection to a peer was lost"
PEER_LOST_HINT = " (another process of the launch failed or was stopped)"


def run_guarded(fn, verbose: bool, who: str = "") -> None:
    """Run fn; a runtime failure prints one line and exits 1 (the traceback first with --verbose).
    who: "process R of N: " under mlx.launch, so each process's line says which one failed."""
    hint = "" if verbose else " (--verbose for the traceback)"
    if who:
        # a collective that waits forever on a dead peer (distributed.watch_for_lost_peers) ends the same way
        watch_for_lost_peers(lambda: _exit_launched(f"error: {who}{PEER_LOST}{PEER_LOST_HINT}"))
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
        if who and "connection to a peer was lost" in msg:
            msg += PEER_LOST_HINT
        if who:
            _exit_launched(f"error: {who}{msg}{hint}")
        click.echo(f"error: {msg}{hint}", err=True)
        sys.exit(1)


def _exit_launched(line: str) -> None:
    """Under mlx.launch a dead peer can leave MLX's communication threads blocked, and the interpreter's normal
    shutdown would wait for them: print the error line and leave at once (nothing is half-written: images are
    atomic)."""
    click.echo(line, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


# ---------------------------------------------------------------------------------------------- generate
def _image_size(path: str, option: str = "--image") -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise click.UsageError(f"{option} {path}: not an image ({e})") from None


def _generate(o: dict) -> None:
    import mlx.core as mx

    main = o["rank"] == 0           # under mlx.launch only rank 0 prints and writes
    note = _note if main else (lambda msg: None)
    stages: dict[str, float] = {}
    t_all = time.perf_counter()
    mx.reset_peak_memory()
    image_size = _image_size(o["image"]) if o["image"] else \
        _image_size(o["control_image"][0], "--control-image") if o["control_image"] else None
    width = o["width"] or (image_size[0] if image_size else DEFAULT_SIZE)
    height = o["height"] or (image_size[1] if image_size else DEFAULT_SIZE)
    t0 = time.perf_counter()
    pipe = ZImagePipeline.from_pretrained(o["model"], dtype=o["dtype"], quantize=o["quantize"], height=height,
                                          width=width, compile=o["compile"],
                                          fused_projections=o["fused_projections"], verbose=main, parallel=o["parallel"],
                                          controlnet=o["controlnet"], controlnet_semantics=o["controlnet_semantics"])
    # Everything the pipeline would refuse is checked now, before a weight is read.
    try:
        steps, guidance = pipe.defaults(o["steps"], o["guidance"])
        if image_size:   # an input image's own size is floored to the size multiple, as diffusers does
            m = pipe.size_multiple
            if min(image_size) < m and not (o["width"] and o["height"]):
                which = f"--image {o['image']}" if o["image"] else f"--control-image {o['control_image'][0]}"
                raise ValueError(f"{which} is {image_size[0]}x{image_size[1]} pixels; it must be at "
                                 f"least {m}x{m} (or give -W and -H to resize it)")
            width, height = o["width"] or width - width % m, o["height"] or height - height % m
        pipe.check_size(height, width)
        run_steps = pipe.steps_to_run(steps, o["strength"])
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if o["lora"]:   # read and checked against the transformer's config (its weights are not loaded yet)
        names = [pipe.load_lora_weights(path) for path, _ in o["lora"]]
        pipe.set_adapters(names, [w for _, w in o["lora"]])
    stages["load"] = time.perf_counter() - t0
    negative = o["negative_prompt"] if guidance > 0 else None
    if o["negative_prompt"] and guidance <= 0:
        note("note: the negative prompt is ignored without guidance (--guidance > 0)")
    if pipe.parallel == "cfg" and pipe.world_size > 1 and guidance <= 0:
        raise click.UsageError("--parallel cfg splits classifier-free guidance, which is off (--guidance 0, as "
                               "Turbo uses); use --parallel data or tensor")
    procs = f"; {pipe.parallel}-parallel over {pipe.world_size} processes" if pipe.world_size > 1 else ""
    note(f"Z-Image {pipe.variant.capitalize()} ({steps} steps, guidance {guidance:g}), {pipe.dtype_name}, "
         f"{width}x{height}{procs}; {pipe.plan.summary()}")
    if o["lora"]:
        note(f"LoRA: {describe_loras(pipe.loras)}")
    if not o["seed"]:
        note(f"seed: {', '.join(map(str, o['seeds']))}")
    if o["enhance"]:   # docs/enhance.md: the text encoder's own Qwen3 rewrites the prompt (seeded by the first seed)
        o["png_extra"]["original_prompt"] = o["prompt"]
        o["prompt"] = pipe.enhance_prompt(o["prompt"], seed=o["seeds"][0])
        note(f"enhanced prompt: {o['prompt']}")
    decoder = load_tiny_decoder(o["taef1"]) if o["taef1"] else None

    # Data-parallel: each call makes one image per process (image k on process k mod N); else one image per call.
    per_call = pipe.world_size if pipe.parallel == "data" else 1
    calls, cached = 0, [0, 0]       # step cache: steps computed, steps
    for start in range(0, len(o["seeds"]), per_call):
        seeds = o["seeds"][start: start + per_call]
        count = f"{start + 1}-{start + len(seeds)}" if len(seeds) > 1 else f"{start + 1}"
        label = f"image {count}/{len(o['seeds'])}" if len(o["seeds"]) > 1 else "denoising"
        callback = _Progress(run_steps, label, enabled=main and not o["quiet"])
        if o["preview"] and main:     # process 0's image (the first of each data-parallel call)
            callback = _PreviewFile(Path(o["preview"]), callback, decoder)
        out = pipe(prompt=o["prompt"], negative_prompt=negative, height=height, width=width,
                   num_inference_steps=steps, guidance_scale=guidance, cfg_truncation=o["cfg_truncation"],
                   cfg_normalization=o["cfg_normalization"], seed=seeds, num_images_per_prompt=len(seeds),
                   image=o["image"], strength=o["strength"], mask_image=o["mask"], mask_blur=o["mask_blur"],
                   paste_back=o["paste_back"], control_image=list(o["control_image"]) or None,
                   control_type=o["control_type"], controlnet_conditioning_scale=o["control_scale"],
                   on_step=callback, cache=o["cache"], cache_threshold=o["cache_threshold"])
        calls += 1
        if out.cache_stats:
            cached = [a + b for a, b in zip(cached, (out.cache_stats["computed"], out.cache_stats["steps"]))]
        for k, v in out.timings.items():
            if k != "total":
                key = "load" if k.startswith("load_") else k
                stages[key] = stages.get(key, 0.0) + v
        if not main:
            continue
        for seed, path, img in zip(seeds, o["paths"][start: start + per_call], out.images):
            t0 = time.perf_counter()
            params = png_params(o["prompt"], negative, seed, steps, guidance, f"{img.width}x{img.height}",
                                o["model"], pipe.quantization, pipe.dtype_name, image=o["image"],
                                strength=o["strength"], loras=pipe.loras, extra=o["png_extra"])
            saved = _save_with_fallback(img, path, params, o["overwrite"])
            stages["save"] = stages.get("save", 0.0) + time.perf_counter() - t0
            if saved != path and saved.parent == path.parent:
                note(f"note: {path} exists; saving as {saved.name}")
            click.echo(str(saved))

    n = len(o["seeds"])
    per_step = stages.get("denoise", 0.0) / (calls * run_steps)
    parts = [f"{k} {v:.1f} s" + (f" ({per_step:.2f} s/step)" if k == "denoise" else "") for k, v in stages.items()]
    if o["cache"]:
        parts.append(f"step cache {o['cache']}: {cached[0]} of {cached[1]} steps computed")
    note(f"done: {n} image{'s' * (n > 1)} in {time.perf_counter() - t_all:.1f} s - {', '.join(parts)}; "
         f"peak memory {mx.get_peak_memory() / 1e9:.2f} GB{' (process 0)' if pipe.world_size > 1 else ''}")


@click.command("generate", cls=_Command, epilog=EPILOG)
@click.argument("prompt", required=False)
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False),
              help="Read the prompt from a UTF-8 text file (instead of PROMPT).")
@click.option("--negative-prompt", default="", help="What to steer away from (used only when --guidance > 0).")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="Denoising steps  [default: 8 for Turbo, 50 for Base]")
@click.option("--guidance", type=click.FloatRange(0.0), default=None, callback=_finite,
              help="Classifier-free guidance scale, 0 = off  [default: 0 for Turbo, 4 for Base]")
@click.option("--width", "-W", type=click.IntRange(1), default=None,
              help="Width in pixels, a multiple of 16  [default: 1024, or the input image's]")
@click.option("--height", "-H", type=click.IntRange(1), default=None,
              help="Height in pixels, a multiple of 16  [default: 1024, or the input image's]")
@click.option("--seed", "-s", type=click.IntRange(0, MAX_SEED), multiple=True,
              help="Seed; repeat it for one image per seed. Random (and printed) when absent.")
@click.option("--num-images", "-n", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Images to make; with a single --seed S they use seeds S, S+1, ...")
@click.option("--model", "-m", default=DEFAULT_REPO, show_default=True,
              help="Hub id, Hugging Face-layout directory, or a directory made by `zimage-mlx convert`.")
@click.option("--quantize", "-q", default="auto", show_default=True, callback=_quantize_option,
              help=f"auto (fit the machine's memory) | {VOCABULARY.replace('auto, ', '')}")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True,
              callback=lambda ctx, p, v: None if v == "auto" else v,
              help="Compute dtype; auto = bfloat16 on a GPU, float32 on the CPU.")
@click.option("--compile/--no-compile", default=None,
              help="mx.compile the transformer's elementwise chains  [default: on a GPU yes, on the CPU no]")
@click.option("--fused-projections/--separate-projections", default=None,
              help="Run q/k/v and w1/w3 as one matmul each (exact)  [default: on a GPU yes, on the CPU no]")
@click.option("--image", "-i", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Input image: image-to-image instead of text-to-image.")
@click.option("--strength", type=click.FloatRange(0.0, 1.0, min_open=True), default=None, callback=_finite,
              help=f"How much of --image to repaint, 0-1 (1 ignores the image)  [default: {DEFAULT_STRENGTH}; "
                   f"{DEFAULT_INPAINT_STRENGTH} with --mask]")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Inpainting mask for --image: white = repaint, black = keep.")
@click.option("--mask-blur", type=click.FloatRange(0.0), default=0.0, callback=_finite,
              help="Feather the mask by this many pixels (Gaussian; 0 = the binarized mask diffusers uses).")
@click.option("--paste-back", is_flag=True, help="Keep the unmasked pixels of --image exactly.")
@click.option("--control-image", type=click.Path(exists=True, dir_okay=False), multiple=True,
              help="ControlNet condition (a canny/depth/pose/... map, or a photo with --control-type); repeatable.")
@click.option("--control-type", type=click.Choice(CONTROL_TYPES), default="none", show_default=True,
              help="Built-in preprocessor applied to each --control-image (none = it is already a map).")
@click.option("--control-scale", type=click.FloatRange(0.0), multiple=True, callback=_finite,
              help="ControlNet conditioning scale, one for all or one per --control-image  [default: 0.75]")
@click.option("--controlnet", default=None,
              help="ControlNet Union: .safetensors file, diffusers or converted directory, or owner/repo/file.")
@click.option("--controlnet-semantics", type=click.Choice(SEMANTICS), default="reference", show_default=True,
              help="reference = the training code (VideoX-Fun); diffusers = diffusers 0.42.1 exactly.")
@click.option("--cfg-truncation", type=float, default=1.0, show_default=True, callback=_finite,
              help="Turn guidance off once the normalized time passes this (1 = never).")
@click.option("--cfg-normalization", type=click.FloatRange(0.0), default=0.0, show_default=True, callback=_finite,
              help="Cap the guided prediction's norm at this multiple of the positive one (0 = off).")
@click.option("--cache", type=click.Choice(["teacache", "first-block"]), default=None,
              help="Step caching: skip the main layers of the steps close to the last computed one (Base, ControlNet "
                   "runs; docs/step-cache.md).")
@click.option("--cache-threshold", type=click.FloatRange(0.0), default=None, callback=_finite,
              help="The step cache's threshold (larger skips more)  [default: teacache 0.12, first-block 0.05]")
@click.option("--lora", multiple=True, callback=_lora_option, metavar="PATH[:WEIGHT]",
              help="Apply a LoRA (.safetensors file or hub file owner/repo/file.safetensors) with this weight "
                   "(default 1); repeat for several.")
@click.option("--enhance", is_flag=True, help="Rewrite the prompt first with the text encoder's own Qwen3 into a "
              "detailed one (printed; both are stored in the PNG).")
@click.option("--output", "-o", default=DEFAULT_OUTPUT, show_default=True, callback=_check_template,
              help="Output file, or a template with {seed} and {index}, or a directory. See below.")
@click.option("--overwrite", is_flag=True, help="Replace existing files instead of choosing a free name.")
@click.option("--preview", type=click.Path(dir_okay=False), default=None,
              help="Refresh this PNG with a cheap preview of the image forming after every step.")
@click.option("--taef1", default=None,
              help="TAEF1 weights (taef1_decoder.safetensors; a path or hub file owner/repo/file) for full-size "
                   "previews instead of the 1/8-size map.")
@click.option("--parallel", type=click.Choice(PARALLEL_MODES), default=None,
              help="Under mlx.launch, share the work between the processes (Macs): data = one image per process, "
                   "cfg = the two guidance branches on 2 processes, tensor = the models split (1/N of the weights "
                   "each). Ignored with one process.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--verbose", "-v", is_flag=True, help="Show the traceback when something fails.")
@click.version_option(__version__, prog_name="zimage-mlx")
def generate(**o):
    """Generate images from PROMPT with Z-Image (Turbo by default) on MLX."""
    if o["prompt_file"]:
        if o["prompt"] is not None:
            raise click.UsageError("give PROMPT or --prompt-file, not both")
        o["prompt"] = _read_prompt_file(o["prompt_file"])
    if not o["prompt"]:
        raise click.UsageError("give a PROMPT (or --prompt-file FILE); see --help")
    o["prompt"] = _utf8(o["prompt"], "PROMPT")
    o["negative_prompt"] = _utf8(o["negative_prompt"], "--negative-prompt")
    if o["strength"] is not None and o["image"] is None:
        raise click.UsageError("--strength needs --image")
    if (o["mask"] or o["mask_blur"] or o["paste_back"]) and not (o["image"] and o["mask"]):
        raise click.UsageError("--mask needs --image, and --mask-blur/--paste-back need --image and --mask")
    if o["control_image"] and not o["controlnet"]:
        raise click.UsageError("--control-image needs --controlnet PATH (a ControlNet Union file or directory)")
    if (o["control_scale"] or o["control_type"] != "none") and not o["control_image"]:
        raise click.UsageError("--control-scale/--control-type need --control-image")
    if len(o["control_scale"]) > 1 and len(o["control_scale"]) != len(o["control_image"]):
        raise click.UsageError(f"{len(o['control_scale'])} --control-scale values for {len(o['control_image'])} "
                               "--control-image files: give one, or one each")
    if o["control_image"] and o["image"] and not o["mask"]:
        raise click.UsageError("--control-image with --image needs --mask (ControlNet inpainting)")
    if o["control_image"] and o["mask"] and o["strength"] is not None:
        raise click.UsageError("ControlNet inpainting (--control-image with --mask) starts from noise: no --strength")
    if o["image"] and o["strength"] is None and not (o["control_image"] and o["mask"]):
        o["strength"] = DEFAULT_INPAINT_STRENGTH if o["mask"] else DEFAULT_STRENGTH
    scales = list(o["control_scale"]) or [0.75]
    o["control_scale"] = scales if len(scales) > 1 else scales[0]
    o["png_extra"] = {"mask": o["mask"], "control_image": ", ".join(o["control_image"]) or None,
                      "control_type": o["control_type"] if o["control_image"] else None,
                      "control_scale": o["control_scale"] if o["control_image"] else None,
                      "controlnet": o["controlnet"]}
    if o["cache_threshold"] is not None and o["cache"] is None:
        raise click.UsageError("--cache-threshold needs --cache teacache|first-block")
    if len(o["seed"]) > 1 and o["num_images"] not in (1, len(o["seed"])):
        raise click.UsageError(f"{len(o['seed'])} seeds but --num-images {o['num_images']}: give one seed or "
                               f"{o['num_images']}")
    if o["parallel"] and os.environ.get("MLX_HOSTFILE") and os.environ.get("MLX_RANK", "0") == "0":
        # MLX waits without a word (and holding the interpreter) until every process of the launch has connected
        _note(f"connecting the processes of the launch ({os.environ['MLX_HOSTFILE']}); this waits for all of them")
    group = init_group() if o["parallel"] else None
    o["rank"] = group.rank() if group is not None else 0
    who = f"process {group.rank()} of {group.size()}: " if group is not None and group.size() > 1 else ""

    def seeds_then_generate():
        # inside run_guarded: under mlx.launch the seed exchange is already a collective (a lost peer: one line)
        try:
            seeds = list(o["seed"]) if len(o["seed"]) > 1 else o["seed"][0] if o["seed"] else None
            if seeds is None and who:
                seeds = shared_random_seed(group)        # every process must use the same seeds
            o["seeds"] = expand_seeds(seeds, max(o["num_images"], len(o["seed"])))
        except ValueError as e:
            raise click.UsageError(f"--seed: {e} (with --num-images {o['num_images']})") from None
        o["paths"] = output_paths(o["output"], o["seeds"])
        if o["overwrite"] and len(set(o["paths"])) < len(o["paths"]):
            raise click.UsageError(f"{o['output']!r} gives the same file name to several images")
        if o["rank"] == 0:
            check_writable(o["paths"] + ([Path(o["preview"])] if o["preview"] else []))
        _generate(o)

    run_guarded(seeds_then_generate, o["verbose"], who)


# ---------------------------------------------------------------------------------------------- info
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


# ---------------------------------------------------------------------------------------------- convert
@click.command("convert", cls=_Command)
@click.argument("source", required=False)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Destination directory.")
@click.option("--transformer", help="ComfyUI/single-file transformer (path or hub file owner/repo/file).")
@click.option("--text-encoder", help="Single-file Qwen3 text encoder (path or hub file owner/repo/file).")
@click.option("--vae", help="Single-file FLUX VAE, ae.safetensors (path or hub file owner/repo/file).")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False), help="Directory with tokenizer.json.")
@click.option("--transformer-config", type=click.Path(exists=True, dir_okay=False),
              help="config.json for a single-file transformer (default: inferred from its shapes).")
@click.option("--vae-config", type=click.Path(exists=True, dir_okay=False),
              help="config.json for a single-file VAE (default: inferred from its shapes).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True)
@click.option("--quantize", "-q", default=None, callback=_quantize_option,
              help="4, 8, none, or per model: transformer=4,text_encoder=8 (the VAE stays float).")
@click.option("--transformer-bits", default=None, help="Bits for the transformer only (4, 8, none).")
@click.option("--text-encoder-bits", default=None, help="Bits for the text encoder only (4, 8, none).")
@click.option("--group-size", type=click.Choice([str(g) for g in GROUP_SIZES]), default="64", show_default=True)
@click.option("--revision", default=None, help="Hub revision (with a hub id).")
@click.option("--variant", type=click.Choice(["turbo", "base"]), default=None,
              help="Model family (sets default steps/guidance) [default: detected; turbo for single files].")
@click.option("--controlnet", default=None,
              help="Convert a ControlNet Union (file or diffusers directory) alone; bits from --quantize.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier conversion at the destination.")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks on errors.")
def convert_command(source, output, transformer, text_encoder, vae, tokenizer, transformer_config, vae_config, dtype,
                    quantize, transformer_bits, text_encoder_bits, group_size, revision, variant, controlnet,
                    overwrite, verbose):
    """Convert SOURCE (hub id or Hugging Face-layout directory), or --transformer/--text-encoder/--vae single
    files, into a zimage_mlx (MLX) directory that loads with no key mapping."""
    if quantize == "auto":
        raise click.UsageError("--quantize auto is decided at load time; give 4, 8, none or transformer=4,...")
    bits = dict(quantize or {"transformer": None, "text_encoder": None})
    for name, value in (("transformer", transformer_bits), ("text_encoder", text_encoder_bits)):
        if value is not None:
            bits[name] = _quantize_option(None, None, {name: value})[name]
    singles = [f for f in (transformer, text_encoder, vae) if f]
    if controlnet is not None:
        if source is not None or singles:
            raise click.UsageError("--controlnet converts a ControlNet alone: no SOURCE or model files with it")
        run_guarded(lambda: convert_controlnet(output, controlnet, dtype=dtype, bits=bits.get("transformer"),
                                               group_size=int(group_size), overwrite=overwrite), verbose)
        return
    if source is None and not singles:
        raise click.UsageError("give SOURCE or --transformer/--text-encoder/--vae files")
    if source is not None and singles:
        raise click.UsageError("give either SOURCE or single files (--transformer/--text-encoder/--vae), not both")
    if source is None and len(singles) < 3:
        missing = [f"--{k}" for k, v in (("transformer", transformer), ("text-encoder", text_encoder), ("vae", vae))
                   if not v]
        raise click.UsageError(f"single-file conversion needs {', '.join(missing)} too")
    if source is not None and (transformer_config or vae_config):
        raise click.UsageError("--transformer-config/--vae-config are for single files; SOURCE has its configs")
    try:
        check_output(output, overwrite)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    run_guarded(lambda: convert(output, source, transformer=transformer, text_encoder=text_encoder, vae=vae,
                                tokenizer=tokenizer, transformer_config=transformer_config, vae_config=vae_config,
                                dtype=dtype, quantize=bits, group_size=int(group_size), overwrite=overwrite,
                                revision=revision, variant=variant), verbose)


# ---------------------------------------------------------------------------------------------- upload
@click.command("upload", cls=_Command)
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", default=None, help="Branch to upload to (created when missing).")
@click.option("--dry-run", is_flag=True, help="Write the model card and list what would be uploaded; send nothing.")
@click.option("--overwrite", is_flag=True, help="Replace a repository that holds another model.")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks on errors.")
def upload_command(directory, repo_id, private, revision, dry_run, overwrite, verbose):
    """Publish DIRECTORY (made by `zimage-mlx convert`) as the hub model REPO_ID (owner/name), with a model card;
    it then loads with `--model REPO_ID`, downloading only its files."""
    run_guarded(lambda: upload(directory, repo_id, private=private, revision=revision, dry_run=dry_run,
                               overwrite=overwrite), verbose)


# ---------------------------------------------------------------------------------------------- serve
@click.command("serve", cls=_Command)
@click.option("--model", "-m", default=DEFAULT_REPO, show_default=True,
              help="Hub id, Hugging Face-layout directory, or a directory made by `zimage-mlx convert`.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="ZIMAGE_MLX_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on /v1/* (also read from $ZIMAGE_MLX_API_KEY).")
@click.option("--max-queue", type=click.IntRange(1), default=16, show_default=True,
              help="Requests accepted at once (running and waiting); more are answered 429.")
@click.option("--quantize", "-q", default="auto", show_default=True, callback=_quantize_option,
              help="auto (fit the machine's memory) | none | 4 | 8 | per model: transformer=4,text_encoder=8")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True,
              callback=lambda ctx, p, v: None if v == "auto" else v,
              help="Compute dtype; auto = bfloat16 on a GPU, float32 on the CPU.")
@click.option("--lora", multiple=True, callback=_lora_option,
              help="LoRA file to load at start, PATH or PATH:WEIGHT; repeat for several. Requests pick them by "
                   "name (the file's stem) with {\"loras\": {\"NAME\": WEIGHT}}.")
@click.option("--url-ttl", type=click.FloatRange(1), default=3600, show_default=True,
              help="Seconds a response_format=url image stays downloadable.")
@click.option("--taef1", default=None,
              help="TAEF1 weights (taef1_decoder.safetensors, a path or hub file) for full-size streamed previews.")
@click.option("--verbose", "-v", is_flag=True, help="Show the traceback when something fails.")
def serve(model, host, port, api_key, max_queue, quantize, dtype, lora, url_ttl, taef1, verbose):
    """Serve OpenAI's images API (/v1/images/generations, /v1/images/edits) and a web page at http://HOST:PORT/."""
    try:
        import uvicorn

        from . import server
    except ImportError as e:
        raise click.UsageError(f"the server needs the serve extra: pip install 'zimage-mlx[serve]' ({e})") from None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        _note(f"warning: listening on {host} without --api-key: anyone who can reach this port can use it")

    def start():
        # keep_text_encoder=None: the plan keeps it warm between requests when that fits
        pipe = ZImagePipeline.from_pretrained(model, dtype=dtype, quantize=quantize, verbose=True,
                                              keep_text_encoder=None)
        _note(f"Z-Image {pipe.variant.capitalize()}, {pipe.dtype_name}; {pipe.plan.summary()}")
        names = {}
        if lora:
            for path, weight in lora:
                name = Path(path).stem
                pipe.load_lora_weights(path, adapter_name=name)
                names[name] = weight
            pipe.set_adapters(list(names), list(names.values()))
        config = server.ServerConfig(model=Path(model).name if Path(model).exists() else model, api_key=api_key,
                                     max_queue=max_queue, url_ttl=url_ttl, loras=names,
                                     preview_decoder=load_tiny_decoder(taef1) if taef1 else None)
        app = server.create_app(pipe, config)
        _note("loading the models …")
        app.state.worker.call(lambda p: (p.transformer, p.vae, p.text_encoder if p.keep_text_encoder else None))
        _note(f"serving on http://{host}:{port}/ (OpenAI base_url http://{host}:{port}/v1)")
        uvicorn.run(app, host=host, port=port, log_level="warning" if not verbose else "info")

    run_guarded(start, verbose)


# ---------------------------------------------------------------------------------------------- the group
@click.group()
@click.version_option(__version__, prog_name="zimage-mlx")
def cli():
    """Z-Image text-to-image on Apple Silicon with MLX."""


cli.add_command(generate)
cli.add_command(info)
cli.add_command(convert_command)
cli.add_command(serve)
cli.add_command(upload_command)


@cli.command("train", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def train(argv):
    """Train a LoRA on a folder of captioned images (zimage-mlx train --help)."""
    from .train_cmd import main

    sys.exit(main(list(argv)))


def generate_main() -> None:
    """`python -m zimage_mlx.generate`."""
    generate(prog_name="python -m zimage_mlx.generate")


def convert_main() -> None:
    """`python -m zimage_mlx.convert`."""
    convert_command(prog_name="python -m zimage_mlx.convert")
