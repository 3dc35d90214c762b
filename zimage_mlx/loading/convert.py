"""Convert Z-Image PyTorch checkpoints into the MLX layout (components.py): the library side of `zimage-mlx convert`.

Sources: a hub id or a Hugging Face-layout directory (diffusers tree), or ComfyUI single files
(`transformer=z_image_turbo_bf16.safetensors, text_encoder=qwen_3_4b.safetensors, vae=ae.safetensors`). Each file's
kind is detected from its keys and its config inferred from its tensor shapes. Everything is written into a hidden
temporary directory beside the destination and renamed into place at the end: an interrupted conversion leaves
nothing that loads as a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .. import __version__
from ..models.controlnet import MLX_KEY, controlnet_save_config, load_controlnet
from .components import (FORMAT_VERSION, MANIFEST_NAME, MODEL_COMPONENTS, QUANTIZABLE, is_mlx_dir, load_component,
                         save_component)
from .download import file_sha256, inventory
from .hub import download_tokenizer, resolve_file, resolve_source
from .quantize import GROUP_SIZES, parse_quantize
from ..sampler import SchedulerConfig, detect_variant
from .single_files import CONFIG_FROM_SHAPES, KIND_NAMES, detect_file_kind
from .weights import WeightError, component_files, dtype_name, parse_dtype, read_config, safetensors_keys

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
TURBO_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                   "use_dynamic_shifting": False, "shift": 3.0}


# --------------------------------------------------------------------------- the destination
def check_output(output: str | Path, overwrite: bool) -> Path:
    """The destination, refused before any work when it cannot be written: the current directory (or one of
    its parents) itself, a file, a non-empty folder without `overwrite`, or — with `overwrite` — a non-empty
    folder that is not an earlier conversion (its contents are never deleted)."""
    output = Path(output).expanduser()
    resolved = output.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise WeightError(f"{output}: cannot convert into the current directory (or a parent of it); "
                          "give a new folder such as ./z-image-mlx")
    if output.exists() and not output.is_dir():
        raise WeightError(f"{output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise WeightError(f"{output} exists and is not empty; pass --overwrite to replace it")
        if not is_mlx_dir(output):
            raise WeightError(f"{output} is not empty and is not a zimage_mlx conversion (no {MANIFEST_NAME}); "
                              "--overwrite only replaces an earlier conversion: choose another folder")
    return output


def _prepare_output(output: Path) -> Path:
    """Remove stale temporaries of dead conversions; return a fresh temp dir beside `output`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged_output(output: Path):
    """A fresh temporary folder beside `output` for the block to fill: put at `output` atomically when the block
    ends, removed when it fails or is interrupted (an earlier `output` stays as it was)."""
    tmp = _prepare_output(output)
    try:
        yield tmp
        _install(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install(tmp: Path, output: Path) -> None:
    """Atomically put the finished temp dir at `output` (replacing an old one only at the very end)."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise WeightError(f"{path}: unreadable config ({e})") from None


# --------------------------------------------------------------------------- convert
def convert(
    output: str | Path,
    source: str | Path | None = None,
    *,
    transformer: str | Path | None = None,
    text_encoder: str | Path | None = None,
    vae: str | Path | None = None,
    tokenizer: str | Path | None = None,
    transformer_config: str | Path | None = None,
    vae_config: str | Path | None = None,
    dtype: str = "bfloat16",
    quantize=None,
    group_size: int = 64,
    overwrite: bool = False,
    revision: str | None = None,
    variant: str | None = None,
    hash_sources: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> Path:
    """Convert a Z-Image checkpoint to the MLX layout at `output`; returns `output`.

    quantize: what `quantize.parse_quantize` reads except "auto" — None, 4, 8 or per component
    {"transformer": 4, "text_encoder": 8} (the VAE always stays float).
    """
    mx_dtype = parse_dtype(dtype)
    bits = _check_convert_args(quantize, group_size, source, transformer, text_encoder, vae)
    output = check_output(output, overwrite)
    if source is not None:   # every file's header is checked here, before any compute
        src = _tree_inputs(source, revision, output, mx_dtype, bits, tokenizer, variant)
    else:
        src = _single_file_inputs({"transformer": transformer, "text_encoder": text_encoder, "vae": vae},
                                  {"transformer": transformer_config, "vae": vae_config}, tokenizer, variant)
    if not (src.tokenizer / "tokenizer.json").is_file():
        raise WeightError(f"{src.tokenizer}: no tokenizer.json (pass --tokenizer DIR with the Qwen3 tokenizer files)")

    t_all = time.perf_counter()
    with staged_output(output) as tmp:
        components = {name: _convert_component(tmp, name, src, mx_dtype, bits, group_size, log)
                      for name in ("text_encoder", "transformer", "vae")}
        _copy_tokenizer_and_scheduler(tmp, src)
        hashes = {}
        if hash_sources:
            log("hashing sources …")
            hashes = {rel: "sha256:" + file_sha256(p) for rel, p in src.files.items()}
        manifest = {
            "format": "zimage_mlx", "format_version": FORMAT_VERSION, "zimage_mlx_version": __version__,
            "variant": src.variant, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"kind": src.kind, "source": str(source) if source is not None else None,
                       "revision": revision, "files": hashes},
            "components": components, "files": inventory(tmp, hashes=False),   # sha256s: added by publish
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))   # written last: marks completion
    log(f"wrote {output} in {time.perf_counter() - t_all:.1f} s")
    return output


@dataclass
class _Sources:
    """What a conversion reads: the component files (or folders), configs inferred for single files, the
    tokenizer folder, the scheduler config, the source files to hash, the layout kind and the variant."""

    inputs: dict
    configs: dict
    tokenizer: Path
    scheduler: dict
    files: dict
    kind: str
    variant: str


def _check_convert_args(quantize, group_size, source, transformer, text_encoder, vae) -> dict:
    bits = parse_quantize(quantize)
    if bits == "auto":
        raise ValueError("quantize='auto' plans for this machine at load time; conversion needs explicit bits "
                         "(4, 8, none or transformer=4,text_encoder=8)")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    singles = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}
    if source is not None and any(singles.values()):
        raise ValueError("give either a source directory/hub id or single files, not both")
    if source is None and not all(singles.values()):
        missing = [f"--{k.replace('_', '-')}" for k, v in singles.items() if not v]
        raise ValueError(f"single-file conversion needs {', '.join(missing)} too")
    return bits


def _tree_inputs(source, revision, output, mx_dtype, bits, tokenizer, variant) -> _Sources:
    """A Hugging Face-layout tree (a folder or a hub id)."""
    root = resolve_source(source, revision=revision, convert_into=output, dtype=mx_dtype, quantize=bits)
    for part in MODEL_COMPONENTS:
        if not (root / part).is_dir():
            raise WeightError(f"{root}: not a Hugging Face-layout Z-Image directory (no {part}/ folder)")
    sched_file = root / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(sched_file) if sched_file.is_file() else TURBO_SCHEDULER
    files = {str(f.relative_to(root)): f for p in MODEL_COMPONENTS for f in component_files(root / p)}
    for f in files.values():
        safetensors_keys(f)
    return _Sources({p: root / p for p in MODEL_COMPONENTS}, {}, Path(tokenizer) if tokenizer else root / "tokenizer",
                    scheduler, files, "diffusers",
                    variant or detect_variant(source, SchedulerConfig.from_dict(scheduler)))


def _single_file_inputs(singles: dict, given_configs: dict, tokenizer, variant) -> _Sources:
    """ComfyUI-style single files (local paths or hub files owner/repo/file), each checked to hold its part."""
    inputs = {k: resolve_file(v) for k, v in singles.items()}
    for expected, path in inputs.items():
        found = detect_file_kind(path)
        if found != expected:
            raise WeightError(f"{path}: given as the {expected.replace('_', ' ')}, but it holds {KIND_NAMES[found]}")
    configs = {}
    for name, path in inputs.items():
        try:
            configs[name] = _read_json(given_configs[name]) if given_configs.get(name) else \
                CONFIG_FROM_SHAPES[name]({k: shape for k, (shape, _) in safetensors_keys(path).items()})
        except WeightError as e:
            raise WeightError(f"{path}: {e}") from None
    # ComfyUI files carry no scheduler: Turbo unless variant="base" (Z-Image Base)
    return _Sources(inputs, configs, Path(tokenizer) if tokenizer else download_tokenizer(), TURBO_SCHEDULER,
                    {p.name: p for p in inputs.values()}, "comfyui", variant or "turbo")


def _convert_component(tmp: Path, name: str, src: _Sources, mx_dtype, bits: dict, group_size: int, log) -> dict:
    """Load one component (cast/quantized tensor by tensor), save it into tmp/name; its manifest entry."""
    t0 = time.perf_counter()
    b = bits.get(name) if name in QUANTIZABLE else None
    log(f"converting {name} ({dtype_name(mx_dtype)}{f', {b}-bit' if b else ''}) …")
    path = src.inputs[name]
    model = load_component(name, path, mx_dtype, b, group_size, config=src.configs.get(name))
    config = src.configs.get(name) or read_config(path)
    shards = save_component(tmp / name, model, config)
    nbytes = sum((tmp / name / s).stat().st_size for s in shards)
    del model
    mx.clear_cache()
    dt = time.perf_counter() - t0
    log(f"  {name}: {nbytes / 1e9:.2f} GB in {dt:.1f} s")
    return {"dtype": dtype_name(mx_dtype), "bits": b, "group_size": group_size if b else None,
            "files": shards, "bytes": nbytes, "seconds": round(dt, 2)}


def _copy_tokenizer_and_scheduler(tmp: Path, src: _Sources) -> None:
    (tmp / "tokenizer").mkdir()
    for f in TOKENIZER_FILES:
        if (src.tokenizer / f).is_file():
            shutil.copy2(src.tokenizer / f, tmp / "tokenizer" / f)
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(src.scheduler, indent=2))


def convert_controlnet(
    output: str | Path,
    source: str | Path,
    *,
    dtype: str = "bfloat16",
    bits: int | None = None,
    group_size: int = 64,
    config: dict | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> Path:
    """Convert a ControlNet Union (published single file or diffusers directory) into an MLX directory
    (config.json with the variant's config and storage, model.safetensors; quantized with the transformer's
    policy when `bits` is given), written atomically. Load it with `ZImagePipeline.load_controlnet(output)`."""
    mx_dtype = parse_dtype(dtype)
    if bits not in (None, 4, 8):
        raise ValueError(f"bits must be 4, 8 or None, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    source = resolve_file(source)
    if source.is_file() and detect_file_kind(source) != "controlnet":
        raise WeightError(f"{source}: given as a ControlNet, but it holds {KIND_NAMES[detect_file_kind(source)]}")
    output = Path(output).expanduser()
    config_file = output / "config.json"
    if not (overwrite and config_file.is_file() and MLX_KEY in _read_json(config_file)):   # an earlier conversion
        output = check_output(output, overwrite)
    t0 = time.perf_counter()
    with staged_output(output) as tmp:
        model = load_controlnet(source, mx_dtype, config=config, bits=bits, group_size=group_size)
        log(f"converting ControlNet {model.config.variant} ({dtype_name(mx_dtype)}{f', {bits}-bit' if bits else ''}) …")
        shards = save_component(tmp, model, controlnet_save_config(model, bits, group_size if bits else None))
        nbytes = sum((tmp / f).stat().st_size for f in shards)
    log(f"wrote {output}: {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    return output


if __name__ == "__main__":
    # `python -m zimage_mlx.convert`: runs as the module __main__, so loading the command line here is not an
    # import of cli by this library module (cli imports convert, never the reverse).
    import importlib

    importlib.import_module("zimage_mlx.cli").convert_main()
