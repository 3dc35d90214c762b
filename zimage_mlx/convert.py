"""`python -m zimage_mlx.convert` / `zimage-mlx convert`: PyTorch checkpoints → the MLX layout (mlx_format.py).

Sources: a hub id or a Hugging Face-layout directory (diffusers tree), or ComfyUI single files
(`--transformer z_image_turbo_bf16.safetensors --text-encoder qwen_3_4b.safetensors --vae ae.safetensors`).
Each file's kind is detected from its keys. Everything is written into a hidden temporary directory beside the
destination and renamed into place at the end: an interrupted conversion leaves nothing that loads as a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import click
import mlx.core as mx

from . import __version__
from .mlx_format import FORMAT_VERSION, MANIFEST_NAME, save_component
from .weights import (DEFAULT_REPO, KIND_NAMES, WeightError, component_files, detect_file_kind, read_component,
                      read_config, read_safetensors, resolve_source)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
TURBO_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                   "use_dynamic_shifting": False, "shift": 3.0}


def file_sha256(path: Path) -> str:
    """sha256 of a file; for a Hugging Face cache symlink the blob name already is it (no re-read)."""
    target = Path(os.path.realpath(path))
    if re.fullmatch(r"[0-9a-f]{64}", target.name) and target.parent.name == "blobs":
        return target.name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _prepare_output(output: Path, overwrite: bool) -> Path:
    """Refuse a non-empty destination unless overwrite; remove stale temporaries; return a fresh temp dir."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise WeightError(f"{output} exists and is not empty; pass --overwrite to replace it")
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


def _install(tmp: Path, output: Path) -> None:
    """Atomically put the finished temp dir at `output` (replacing an old one only at the very end)."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _source_files(root: Path) -> list[Path]:
    files = []
    for part in ("transformer", "text_encoder", "vae"):
        files += component_files(root / part)
    return files


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
    bits: dict[str, int | None] | int | None = None,
    group_size: int = 64,
    overwrite: bool = False,
    revision: str | None = None,
    variant: str | None = None,
    hash_sources: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> Path:
    """Convert a Z-Image checkpoint to the MLX layout at `output`; returns `output`.

    bits: None, 4, 8 or per component {"transformer": 4, "text_encoder": 8} (the VAE always stays float).
    """
    from .pipeline import detect_variant, dtype_name, parse_dtype
    from .sampler import SchedulerConfig
    from .text_encoder import config_from_weights as te_config, text_encoder_from_weights
    from .transformer import config_from_weights as tr_config, transformer_from_weights
    from .vae import VAEConfig, vae_from_weights

    output = Path(output).expanduser()
    mx_dtype = parse_dtype(dtype)
    if not isinstance(bits, dict):
        bits = {"transformer": bits, "text_encoder": bits}
    bits = {k: bits.get(k) for k in ("transformer", "text_encoder")}
    for k, b in bits.items():
        if b not in (None, 4, 8):
            raise ValueError(f"{k}: bits must be 4, 8 or none, got {b}")

    singles = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}
    if source is not None and any(singles.values()):
        raise ValueError("give either a source directory/hub id or single files, not both")
    if source is None and not all(singles.values()):
        missing = [f"--{k.replace('_', '-')}" for k, v in singles.items() if not v]
        raise ValueError(f"single-file conversion needs {', '.join(missing)} too")

    # ---- inputs
    if source is not None:
        root = resolve_source(source, revision=revision)
        if not (root / "transformer").is_dir():
            raise WeightError(f"{root}: not a Hugging Face-layout Z-Image directory (no transformer/ folder)")
        inputs = {p: root / p for p in ("transformer", "text_encoder", "vae")}
        tok_dir = Path(tokenizer) if tokenizer else root / "tokenizer"
        sched_file = root / "scheduler" / "scheduler_config.json"
        scheduler = json.loads(sched_file.read_text()) if sched_file.is_file() else TURBO_SCHEDULER
        files = {str(f.relative_to(root)): f for f in _source_files(root)}
        kind = "diffusers"
        if variant is None:
            variant = detect_variant(Path(str(source)), read_config(root / "transformer"),
                                     SchedulerConfig.from_dict(scheduler))
    else:
        inputs = {k: Path(v).expanduser() for k, v in singles.items()}
        for expected, path in inputs.items():
            found = detect_file_kind(path)
            if found != expected:
                raise WeightError(f"{path}: given as the {expected.replace('_', ' ')}, but it holds "
                                  f"{KIND_NAMES[found]}")
        tok_dir = Path(tokenizer) if tokenizer else _hub_tokenizer(log)
        scheduler = TURBO_SCHEDULER
        files = {p.name: p for p in inputs.values()}
        kind = "comfyui"
        variant = variant or "turbo"   # ComfyUI files carry no scheduler; --variant base for Z-Image (Base)
    if not (tok_dir / "tokenizer.json").is_file():
        raise WeightError(f"{tok_dir}: no tokenizer.json (pass --tokenizer DIR with the Qwen3 tokenizer files)")

    from_weights = {"transformer": transformer_from_weights, "text_encoder": text_encoder_from_weights,
                    "vae": vae_from_weights}
    single_file_config = {   # a single file carries no config.json: a given one, or what its shapes say
        "transformer": lambda w: _read_json(transformer_config) if transformer_config else tr_config(w),
        "text_encoder": te_config,
        "vae": lambda w: _read_json(vae_config) if vae_config else asdict(VAEConfig()),
    }
    tmp = _prepare_output(output, overwrite)
    try:
        t_all = time.perf_counter()
        components = {}
        for name in ("text_encoder", "transformer", "vae"):
            t0 = time.perf_counter()
            b = bits.get(name)
            log(f"converting {name} ({dtype}{f', {b}-bit' if b else ''}) …")
            path = inputs[name]
            if path.is_dir():
                config, weights = read_config(path), read_component(path)
            else:
                weights = read_safetensors(path)
                config = single_file_config[name](weights)
            model = from_weights[name](config, weights, mx_dtype, str(path), b, group_size)
            del weights
            shards = save_component(tmp / name, model, config)
            nbytes = sum((tmp / name / s).stat().st_size for s in shards)
            del model
            mx.clear_cache()
            dt = time.perf_counter() - t0
            log(f"  {name}: {nbytes / 1e9:.2f} GB in {dt:.1f} s")
            components[name] = {"dtype": dtype_name(mx_dtype), "bits": b if name != "vae" else None,
                                "group_size": group_size if b and name != "vae" else None, "files": shards,
                                "bytes": nbytes, "seconds": round(dt, 2)}
        (tmp / "tokenizer").mkdir()
        for f in TOKENIZER_FILES:
            if (tok_dir / f).is_file():
                shutil.copy2(tok_dir / f, tmp / "tokenizer" / f)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
        hashes = {}
        if hash_sources:
            log("hashing sources …")
            hashes = {rel: "sha256:" + file_sha256(p) for rel, p in files.items()}
        manifest = {
            "format": "zimage_mlx", "format_version": FORMAT_VERSION, "zimage_mlx_version": __version__,
            "variant": variant, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"kind": kind, "source": str(source) if source is not None else None, "revision": revision,
                       "files": hashes},
            "components": components,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))   # written last: marks completion
        _install(tmp, output)
        log(f"wrote {output} in {time.perf_counter() - t_all:.1f} s")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise WeightError(f"{path}: unreadable config ({e})") from None


def _hub_tokenizer(log) -> Path:
    """The Qwen3 tokenizer files from the Z-Image hub repo (a small download; cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    log(f"fetching the tokenizer from {DEFAULT_REPO} …")
    try:
        return Path(snapshot_download(DEFAULT_REPO, allow_patterns=["tokenizer/*"])) / "tokenizer"
    except (LocalEntryNotFoundError, OSError):
        raise WeightError("the ComfyUI files carry no tokenizer and it could not be downloaded; pass --tokenizer DIR "
                          f"(the tokenizer/ folder of {DEFAULT_REPO})") from None


def _parse_bits(quantize: str | None, te_bits: str | None, dit_bits: str | None) -> dict:
    def one(v):
        if v is None or str(v).lower() in ("none", "no", "0", "16", "32"):
            return None
        if str(v) in ("4", "8"):
            return int(v)
        raise click.BadParameter(f"bits must be 4, 8 or none, got {v}")

    base = one(quantize)
    return {"transformer": one(dit_bits) if dit_bits is not None else base,
            "text_encoder": one(te_bits) if te_bits is not None else base}


@click.command("convert")
@click.argument("source", required=False)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Destination directory.")
@click.option("--transformer", type=click.Path(exists=True, dir_okay=False), help="ComfyUI/single-file transformer.")
@click.option("--text-encoder", type=click.Path(exists=True, dir_okay=False), help="Single-file Qwen3 text encoder.")
@click.option("--vae", type=click.Path(exists=True, dir_okay=False), help="Single-file FLUX VAE (ae.safetensors).")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False), help="Directory with tokenizer.json.")
@click.option("--transformer-config", type=click.Path(exists=True, dir_okay=False),
              help="config.json for a single-file transformer (default: inferred from its shapes).")
@click.option("--vae-config", type=click.Path(exists=True, dir_okay=False),
              help="config.json for a single-file VAE (default: the FLUX VAE's).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True)
@click.option("--quantize", "-q", default=None, help="4 or 8: quantize transformer and text encoder.")
@click.option("--transformer-bits", default=None, help="Bits for the transformer only (4, 8, none).")
@click.option("--text-encoder-bits", default=None, help="Bits for the text encoder only (4, 8, none).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--revision", default=None, help="Hub revision (with a hub id).")
@click.option("--variant", type=click.Choice(["turbo", "base"]), default=None,
              help="Model family (sets default steps/guidance) [default: detected; turbo for single files].")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty destination.")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks on errors.")
def convert_command(source, output, transformer, text_encoder, vae, tokenizer, transformer_config, vae_config, dtype, quantize, transformer_bits,
                    text_encoder_bits, group_size, revision, variant, overwrite, verbose):
    """Convert SOURCE (hub id or Hugging Face-layout directory), or --transformer/--text-encoder/--vae single
    files, into a zimage_mlx (MLX) directory that loads with no key mapping."""
    from .generate import run_guarded

    bits = _parse_bits(quantize, text_encoder_bits, transformer_bits)
    if source is None and not (transformer or text_encoder or vae):
        raise click.UsageError("give SOURCE or --transformer/--text-encoder/--vae files")
    run_guarded(lambda: convert(output, source, transformer=transformer, text_encoder=text_encoder, vae=vae,
                                tokenizer=tokenizer, transformer_config=transformer_config, vae_config=vae_config,
                                dtype=dtype, bits=bits, group_size=int(group_size),
                                overwrite=overwrite, revision=revision, variant=variant), verbose)


if __name__ == "__main__":
    convert_command(prog_name="python -m zimage_mlx.convert")
