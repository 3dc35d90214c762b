"""`zimage-mlx generate` (also `python -m zimage_mlx.generate`): the options translated into pipeline calls.

Every check that needs only the arguments and the input files runs before the pipeline is built; the checks that
need the model's configs (size multiple, memory plan, steps) run before a weight is read; the plan line prints
after both. Images are checked writable first, written atomically, never over an existing file unless
`--overwrite` is given, and saved to a fallback path (and said so) if their destination fails at the end.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import click

from .. import __version__
from ..distributed import PARALLEL_MODES, init_group, shared_random_seed
from ..models.controlnet import SEMANTICS
from ..pipeline.control_maps import CONTROL_TYPES
from ..pipeline.images import preprocess_mask
from ..pipeline.pipeline import ZImagePipeline
from ..pipeline.request import (DEFAULT_INPAINT_STRENGTH, DEFAULT_SIZE, DEFAULT_STRENGTH, MAX_SEED, GenerationRequest,
                                RequestError, expand_seeds)
from ..pipeline.preview import Previewer, load_tiny_decoder
from .command import Command, note, run_guarded
from .options import finite, lora_option, model_options
from .outputs import (DEFAULT_OUTPUT, PreviewFile, Progress, check_template, check_writable, output_paths,
                      save_with_fallback)
from .pngfile import describe_loras, png_params

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


# ---------------------------------------------------------------------------------------------- argument checks
def _utf8(text: str, what: str) -> str:
    """Refuse text that is not valid UTF-8 (click hands undecodable bytes over as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        offset = len(text[:e.start].encode("utf-8", "surrogateescape"))
        raise click.UsageError(f"{what} is not valid UTF-8 (byte offset {offset})") from None
    return text


def _read_prompt_file(path: str) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise click.UsageError(f"--prompt-file {path}: not valid UTF-8 (byte offset {e.start}); save it as UTF-8") \
            from None


def _image_size(path: str, option: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise click.UsageError(f"{option} {path}: not an image ({' '.join(str(e).split())})") from None


def _check_prompts(o: dict) -> None:
    if o["prompt_file"]:
        if o["prompt"] is not None:
            raise click.UsageError("give PROMPT or --prompt-file, not both")
        o["prompt"] = _read_prompt_file(o["prompt_file"])
    if not o["prompt"]:
        raise click.UsageError("give a PROMPT (or --prompt-file FILE); see --help")
    o["prompt"] = _utf8(o["prompt"], "PROMPT")
    o["negative_prompt"] = _utf8(o["negative_prompt"], "--negative-prompt")


def _check_request(o: dict) -> None:
    """The pipeline's rules between parameters (which needs or excludes which: GenerationRequest.check_combinations),
    checked before the pipeline is built; then the two about options the request does not hold."""
    try:
        GenerationRequest.from_dict(_request_dict(o), source="cli").check_combinations(controlnet=bool(o["controlnet"]))
    except RequestError as e:
        raise _usage(e) from None
    if o["controlnet"] and not o["control_image"]:     # the Python API runs the base model alone (a warning)
        raise click.UsageError("--controlnet needs --control-image FILE (the condition: a canny/depth/pose map, or "
                               "a photo with --control-type)")
    if o["control_scale"] and not o["control_image"]:  # the request's scale always has a value (0.75)
        raise click.UsageError("--control-scale needs --control-image")


def _check_input_images(o: dict) -> None:
    """Every input file opens as an image, and the mask fits the image (the pipeline's rule, preprocess_mask)."""
    o["image_size"] = _image_size(o["image"], "--image") if o["image"] else None
    o["control_sizes"] = [_image_size(p, "--control-image") for p in o["control_image"]]
    if o["mask"]:
        mask_size = _image_size(o["mask"], "--mask")
        try:
            preprocess_mask(o["mask"], mask_size[1], mask_size[0], image_size=o["image_size"])
        except ValueError as e:
            raise click.UsageError(f"--mask {o['mask']}: {e}") from None


def _fill_defaults(o: dict) -> None:
    o["png_extra"] = {"mask": o["mask"], "control_image": ", ".join(o["control_image"]) or None,
                      "control_type": o["control_type"] if o["control_image"] else None,
                      "control_scale": _scale(o["control_scale"]) if o["control_image"] else None,
                      "controlnet": o["controlnet"]}


# the pipeline's parameter (a RequestError's field) -> the option that set it
OPTIONS = {"prompt": "PROMPT", "negative_prompt": "--negative-prompt", "height": "-H/--height",
           "width": "-W/--width", "num_inference_steps": "--steps", "guidance_scale": "--guidance",
           "cfg_truncation": "--cfg-truncation", "cfg_normalization": "--cfg-normalization", "image": "--image",
           "strength": "--strength", "mask_image": "--mask", "mask_blur": "--mask-blur", "paste_back": "--paste-back",
           "control_image": "--control-image", "controlnet_conditioning_scale": "--control-scale",
           "control_type": "--control-type", "controlnet": "--controlnet PATH", "seed": "--seed",
           "num_images_per_prompt": "--num-images", "cache": "--cache", "cache_threshold": "--cache-threshold"}


def _usage(e: RequestError) -> click.UsageError:
    """A RequestError in the CLI's words (one line, exit 2): "X needs Y" with option names, else the message with
    its parameter names as options, led by the option when it does not name it."""
    def option(name):
        return OPTIONS.get(name, name)

    if e.needs:
        return click.UsageError(f"{option(e.field)}{f' with {option(e.given)}' if e.given else ''} needs "
                                f"{option(e.needs)}")
    text = re.sub(r"\b[a-z]+(?:_[a-z]+)+\b", lambda m: option(m.group()), str(e))
    return click.UsageError(text if option(e.field) in text else f"{option(e.field)}: {text}")


def _scale(values: tuple) -> float | list[float]:
    """--control-scale: one value for every control image, or one each (default 0.75)."""
    return list(values) if len(values) > 1 else values[0] if values else 0.75


def _request_dict(o: dict) -> dict:
    """The options under the pipeline's parameter names (GenerationRequest.from_dict(..., source="cli"))."""
    return {"prompt": o["prompt"], "negative_prompt": o["negative_prompt"] or None, "height": o["height"],
            "width": o["width"], "num_inference_steps": o["steps"], "guidance_scale": o["guidance"],
            "cfg_truncation": o["cfg_truncation"], "cfg_normalization": o["cfg_normalization"], "image": o["image"],
            "strength": o["strength"], "mask_image": o["mask"], "mask_blur": o["mask_blur"],
            "paste_back": o["paste_back"], "control_image": list(o["control_image"]) or None,
            "control_type": o["control_type"], "cache": o["cache"], "cache_threshold": o["cache_threshold"],
            "controlnet_conditioning_scale": _scale(o["control_scale"])}


def _request(pipe, o: dict) -> GenerationRequest:
    """The options as the pipeline's request, validated against the model's configs (no weight is read): defaults
    filled (steps, guidance, strength, the size from an input image), every rule the pipeline's; a bad value is
    one line naming the option (exit 2)."""
    m = pipe.size_multiple
    for path, (cw, ch) in zip(o["control_image"], o["control_sizes"]):
        if min(cw, ch) < m:
            raise click.UsageError(f"--control-image {path} is {cw}x{ch} pixels; it must be at least {m}x{m}")
    try:
        req = GenerationRequest.from_dict(_request_dict(o), source="cli").validate(pipe.limits)
        pipe.check_size(req.height, req.width)
    except RequestError as e:
        raise _usage(e) from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return req


# ---------------------------------------------------------------------------------------------- generation
def _load(o: dict, note_main) -> tuple[ZImagePipeline, GenerationRequest]:
    """The pipeline (lazy: configs and headers only) and the checked sizes and steps; LoRAs read and checked."""
    size = o["image_size"] or (o["control_sizes"][0] if o["control_sizes"] else None)
    pipe = ZImagePipeline.from_pretrained(o["model"], dtype=o["dtype"], quantize=o["quantize"],
                                          height=o["height"] or (size[1] if size else DEFAULT_SIZE),
                                          width=o["width"] or (size[0] if size else DEFAULT_SIZE),
                                          compile=o["compile"], fused_projections=o["fused_projections"],
                                          verbose=o["rank"] == 0, parallel=o["parallel"], controlnet=o["controlnet"],
                                          controlnet_semantics=o["controlnet_semantics"])
    req = _request(pipe, o)
    if o["lora"]:   # read and checked against the transformer's config (its weights are not loaded yet)
        names = [pipe.load_lora_weights(path) for path, _ in o["lora"]]
        pipe.set_adapters(names, [w for _, w in o["lora"]])
    if o["negative_prompt"] and not req.do_cfg:
        note_main("note: the negative prompt is ignored without guidance (--guidance > 0)")
    procs = f"; {pipe.parallel}-parallel over {pipe.world_size} processes" if pipe.world_size > 1 else ""
    note_main(f"Z-Image {pipe.variant.capitalize()} ({req.num_inference_steps} steps, guidance "
              f"{req.guidance_scale:g}), {pipe.dtype_name}, {req.width}x{req.height}{procs}; {pipe.plan.summary()}")
    if o["lora"]:
        note_main(f"LoRA: {describe_loras(pipe.loras)}")
    if not o["seed"]:
        note_main(f"seed: {', '.join(map(str, o['seeds']))}")
    return pipe, req


def _callback(o: dict, req: GenerationRequest, label: str, decoder):
    callback = Progress(req.steps_to_run, label, enabled=o["rank"] == 0 and not o["quiet"])
    if not (o["preview"] and o["rank"] == 0):     # process 0's image (the first of each data-parallel call)
        return callback
    return PreviewFile(Path(o["preview"]), callback, Previewer(decoder))


def _save(pipe, o: dict, req: GenerationRequest, seeds: list[int], paths: list[Path], images, stages: dict) -> None:
    negative = req.negative_prompt[0] if req.do_cfg and req.negative_prompt else None
    for seed, path, img in zip(seeds, paths, images):
        t0 = time.perf_counter()
        params = png_params(o["prompt"], negative, seed, req.num_inference_steps, req.guidance_scale,
                            f"{img.width}x{img.height}", o["model"], pipe.quantization, pipe.dtype_name,
                            image=o["image"], strength=req.strength, loras=pipe.loras, extra=o["png_extra"])
        saved = save_with_fallback(img, path, params, o["overwrite"])
        stages["save"] = stages.get("save", 0.0) + time.perf_counter() - t0
        if saved != path and saved.parent == path.parent:
            note(f"note: {path} exists; saving as {saved.name}")
        click.echo(str(saved))


def _generate(o: dict) -> None:
    import mlx.core as mx

    main = o["rank"] == 0           # under mlx.launch only rank 0 prints and writes
    stages: dict[str, float] = {}
    t_all = time.perf_counter()
    mx.reset_peak_memory()
    pipe, req = _load(o, note if main else (lambda msg: None))
    stages["load"] = time.perf_counter() - t_all
    if o["enhance"]:   # docs/enhance.md: the text encoder's own Qwen3 rewrites the prompt (seeded by the first seed)
        o["png_extra"]["original_prompt"] = o["prompt"]
        o["prompt"] = pipe.enhance_prompt(o["prompt"], seed=o["seeds"][0])
        req = req.replace(prompt=[o["prompt"]])
        if main:
            note(f"enhanced prompt: {o['prompt']}")
    decoder = load_tiny_decoder(o["taef1"]) if o["taef1"] else None
    # Data-parallel: each call makes one image per process (image k on process k mod N); else one image per call.
    per_call = pipe.world_size if pipe.parallel == "data" else 1
    n, calls = len(o["seeds"]), 0
    cached = [0, 0]       # step cache: steps computed, steps
    for start in range(0, n, per_call):
        seeds = o["seeds"][start: start + per_call]
        count = f"{start + 1}-{start + len(seeds)}" if len(seeds) > 1 else f"{start + 1}"
        label = f"image {count}/{n}" if n > 1 else "denoising"
        out = pipe.generate(req.replace(seed=seeds, num_images_per_prompt=len(seeds),
                                        on_step=_callback(o, req, label, decoder)))
        calls += 1
        if out.cache_stats:
            cached = [a + b for a, b in zip(cached, (out.cache_stats["computed"], out.cache_stats["steps"]))]
        for k, v in out.timings.items():
            if k != "total":
                key = "load" if k.startswith("load_") else k
                stages[key] = stages.get(key, 0.0) + v
        if main:
            _save(pipe, o, req, seeds, o["paths"][start: start + per_call], out.images, stages)
    if not main:
        return
    per_step = stages.get("denoise", 0.0) / (calls * req.steps_to_run)
    parts = [f"{k} {v:.1f} s" + (f" ({per_step:.2f} s/step)" if k == "denoise" else "") for k, v in stages.items()]
    if o["cache"]:
        parts.append(f"step cache {o['cache']}: {cached[0]} of {cached[1]} steps computed")
    note(f"done: {n} image{'s' * (n > 1)} in {time.perf_counter() - t_all:.1f} s - {', '.join(parts)}; "
         f"peak memory {mx.get_peak_memory() / 1e9:.2f} GB{' (process 0)' if pipe.world_size > 1 else ''}")


def _seeds_and_paths(o: dict, group, who: str) -> None:
    """Inside run_guarded: under mlx.launch the seed exchange is already a collective (a lost peer: one line)."""
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


@click.command("generate", cls=Command, epilog=EPILOG)
@click.argument("prompt", required=False)
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False),
              help="Read the prompt from a UTF-8 text file (instead of PROMPT).")
@click.option("--negative-prompt", default="", help="What to steer away from (used only when --guidance > 0).")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="Denoising steps  [default: 8 for Turbo, 50 for Base]")
@click.option("--guidance", type=click.FloatRange(0.0), default=None, callback=finite,
              help="Classifier-free guidance scale, 0 = off  [default: 0 for Turbo, 4 for Base]")
@click.option("--width", "-W", type=click.IntRange(1), default=None,
              help="Width in pixels, a multiple of 16  [default: 1024, or the input image's]")
@click.option("--height", "-H", type=click.IntRange(1), default=None,
              help="Height in pixels, a multiple of 16  [default: 1024, or the input image's]")
@click.option("--seed", "-s", type=click.IntRange(0, MAX_SEED), multiple=True,
              help="Seed; repeat it for one image per seed. Random (and printed) when absent.")
@click.option("--num-images", "-n", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Images to make; with a single --seed S they use seeds S, S+1, ...")
@model_options
@click.option("--compile/--no-compile", default=None,
              help="mx.compile the transformer's elementwise chains  [default: on a GPU yes, on the CPU no]")
@click.option("--fused-projections/--separate-projections", default=None,
              help="Run q/k/v and w1/w3 as one matmul each (exact)  [default: on a GPU yes, on the CPU no]")
@click.option("--image", "-i", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Input image: image-to-image instead of text-to-image.")
@click.option("--strength", type=click.FloatRange(0.0, 1.0, min_open=True), default=None, callback=finite,
              help=f"How much of --image to repaint, 0-1 (1 ignores the image)  [default: {DEFAULT_STRENGTH}; "
                   f"{DEFAULT_INPAINT_STRENGTH} with --mask]")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Inpainting mask for --image: white = repaint, black = keep.")
@click.option("--mask-blur", type=click.FloatRange(0.0), default=0.0, callback=finite,
              help="Feather the mask by this many pixels (Gaussian; 0 = the binarized mask diffusers uses).")
@click.option("--paste-back", is_flag=True, help="Keep the unmasked pixels of --image exactly.")
@click.option("--control-image", type=click.Path(exists=True, dir_okay=False), multiple=True,
              help="ControlNet condition (a canny/depth/pose/... map, or a photo with --control-type); repeatable.")
@click.option("--control-type", type=click.Choice(CONTROL_TYPES), default="none", show_default=True,
              help="Built-in preprocessor applied to each --control-image (none = it is already a map).")
@click.option("--control-scale", type=click.FloatRange(0.0), multiple=True, callback=finite,
              help="ControlNet conditioning scale, one for all or one per --control-image  [default: 0.75]")
@click.option("--controlnet", default=None,
              help="ControlNet Union: .safetensors file, diffusers or converted directory, or owner/repo/file.")
@click.option("--controlnet-semantics", type=click.Choice(SEMANTICS), default="reference", show_default=True,
              help="reference = the training code (VideoX-Fun); diffusers = diffusers 0.42.1 exactly.")
@click.option("--cfg-truncation", type=float, default=1.0, show_default=True, callback=finite,
              help="Turn guidance off once the normalized time passes this (1 = never).")
@click.option("--cfg-normalization", type=click.FloatRange(0.0), default=0.0, show_default=True, callback=finite,
              help="Cap the guided prediction's norm at this multiple of the positive one (0 = off).")
@click.option("--enhance", is_flag=True, help="Rewrite the prompt first with the text encoder's own Qwen3 into a "
              "detailed one (printed; both are stored in the PNG).")
@click.option("--cache", type=click.Choice(["teacache", "first-block"]), default=None,
              help="Step caching: skip the main layers of the steps close to the last computed one (Base, ControlNet "
                   "runs; docs/step-cache.md).")
@click.option("--cache-threshold", type=click.FloatRange(0.0), default=None, callback=finite,
              help="The step cache's threshold (larger skips more)  [default: teacache 0.12, first-block 0.05]")
@click.option("--lora", multiple=True, callback=lora_option, metavar="PATH[:WEIGHT]",
              help="Apply a LoRA (.safetensors file or hub file owner/repo/file.safetensors) with this weight "
                   "(default 1); repeat for several.")
@click.option("--output", "-o", default=DEFAULT_OUTPUT, show_default=True, callback=check_template,
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
    _check_prompts(o)
    _check_request(o)
    _check_input_images(o)
    _fill_defaults(o)
    if o["parallel"] and os.environ.get("MLX_HOSTFILE") and os.environ.get("MLX_RANK", "0") == "0":
        # MLX waits without a word (and holding the interpreter) until every process of the launch has connected
        note(f"connecting the processes of the launch ({os.environ['MLX_HOSTFILE']}); this waits for all of them")
    group = init_group() if o["parallel"] else None
    o["rank"] = group.rank() if group is not None else 0
    who = f"process {group.rank()} of {group.size()}: " if group is not None and group.size() > 1 else ""

    def seeds_then_generate():
        _seeds_and_paths(o, group, who)
        _generate(o)

    run_guarded(seeds_then_generate, o["verbose"], who)
