"""Convert Z-Image PyTorch checkpoints into the MLX layout (components.py): the library side of `zimage-mlx convert`.

Sources: a hub id or a Hugging Face-layout directory (diffusers tree), or ComfyUI single files
(`transformer=z_image_turbo_bf16.safetensors, text_encoder=qwen_3_4b.safetensors, vae=ae.safetensors`). Each file's
kind is detected from its keys and its config inferred from its tensor shapes. Everything is written into a hidden
temporary directory beside the destination and renamed into place at the end: an interrupted conversion leaves
nothing that loads as a model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
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
from ..models.transformer import ZImageTransformerConfig
from ..models.vae import VAEConfig
from .weights import WeightError, component_files, dtype_name, parse_dtype, read_config, safetensors_keys

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
TURBO_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                   "use_dynamic_shifting": False, "shift": 3.0}


# --------------------------------------------------------------------------- single-file kinds
KIND_NAMES = {
    "transformer": "a Z-Image transformer (S3-DiT)",
    "text_encoder": "a Qwen3 text encoder",
    "vae": "a FLUX 16-channel VAE",
    "controlnet": "a Z-Image ControlNet Union",
}


def _file_kind_from_keys(keys: dict[str, tuple]) -> str:
    """'transformer' | 'text_encoder' | 'vae' | 'controlnet', or a WeightError saying what the file looks like."""
    names = list(keys)

    def has(*fragments):
        return any(all(f in k for f in fragments) for k in names)

    if has("lora_") or has(".lora.") or has("lokr_") or has("hada_w"):
        raise WeightError("it looks like a LoRA (lora_A/lora_down keys); LoRAs are applied on top of a model, "
                          "they are not a model")
    if has("layers.0.adaLN_modulation.0.weight") and (has("cap_embedder") or has("x_pad_token")):
        return "transformer"
    if has("control_all_x_embedder.") and has("control_layers.0."):
        return "controlnet"
    if has("double_blocks.") or has("single_blocks."):
        raise WeightError("it looks like a FLUX transformer (double_blocks/single_blocks), not Z-Image")
    if has("input_blocks.") or has("conditioner.embedders") or has("down_blocks.0.attentions"):
        raise WeightError("it looks like a Stable Diffusion / SDXL UNet checkpoint, not Z-Image")
    if has("self_attn.q_norm.weight") and has("embed_tokens.weight"):
        return "text_encoder"
    if has("self_attn.q_proj") and has("embed_tokens.weight"):
        raise WeightError("it looks like a language model without q/k norms (Qwen2/Llama?), not the Qwen3 encoder")
    conv_in = next((v for k, v in keys.items() if k.endswith("decoder.conv_in.weight")), None)
    if conv_in is not None:
        if len(conv_in[0]) == 4 and conv_in[0][1] != 16:
            raise WeightError(f"it looks like a {conv_in[0][1]}-channel VAE (SD/SDXL); Z-Image needs the 16-channel "
                              "FLUX VAE (ae.safetensors)")
        return "vae"
    raise WeightError("it is not a Z-Image transformer, Qwen3 text encoder or FLUX VAE checkpoint "
                      f"(first keys: {', '.join(names[:3])})")


def detect_file_kind(path: str | Path) -> str:
    """Which Z-Image component a single checkpoint file holds, from its keys (never unpickles anything)."""
    path = Path(path)
    if not path.is_file():
        raise WeightError(f"{path}: file not found")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF" or path.suffix.lower() == ".gguf":
        raise WeightError(f"{path}: a GGUF file; zimage_mlx reads .safetensors checkpoints (convert it or use the "
                          "bf16 safetensors release)")
    safetensors = head[8:9] == b"{"   # an 8-byte header length (any first byte, 0x80 too), then the JSON header
    pickle = head[:2] == b"PK" or head[:1] == b"\x80"
    if (pickle and not safetensors) or path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise WeightError(f"{path}: a pickle checkpoint (.ckpt/.pt/.bin); these can run code when loaded and are "
                          "never opened: use the .safetensors release")
    try:
        return _file_kind_from_keys(safetensors_keys(path))
    except WeightError as e:
        if str(e).startswith(str(path)):
            raise
        raise WeightError(f"{path}: {e}") from None


# --------------------------------------------------------------------------- configs from tensor shapes
def transformer_config_from_shapes(keys: dict[str, tuple[int, ...]]) -> dict:
    """A transformer config for a single-file checkpoint (ComfyUI layout or diffusers names), from tensor shapes.

    Everything not visible in the shapes takes the real Z-Image value (rope, axes, eps).
    """
    keys = {k.removeprefix("model.diffusion_model."): v for k, v in keys.items()}
    x_emb = keys.get("x_embedder.weight") or keys.get("all_x_embedder.2-1.weight")
    norm_q = keys.get("layers.0.attention.q_norm.weight") or keys.get("layers.0.attention.norm_q.weight")
    cap = keys.get("cap_embedder.1.weight")
    if x_emb is None or cap is None:
        raise WeightError("not a Z-Image transformer checkpoint (no x_embedder / cap_embedder tensors)")

    def count(prefix):
        return len({k.split(".")[1] for k in keys if k.startswith(prefix + ".")})

    dim = x_emb[0]
    head_dim = norm_q[0] if norm_q else 128
    if head_dim != 128:
        raise WeightError(f"head_dim {head_dim} is not Z-Image's 128: the RoPE axes cannot be inferred from the "
                          "file; pass the model's config.json (--transformer-config)")
    cfg = ZImageTransformerConfig(
        dim=dim, in_channels=x_emb[1] // 4, n_layers=count("layers"), n_refiner_layers=count("noise_refiner"),
        n_heads=dim // head_dim, n_kv_heads=dim // head_dim, cap_feat_dim=cap[1], qk_norm=norm_q is not None,
    )
    return {k: getattr(cfg, k) for k in ZImageTransformerConfig.__dataclass_fields__}


def text_encoder_config_from_shapes(keys: dict[str, tuple[int, ...]]) -> dict:
    """A Qwen3 config for a single-file text encoder (e.g. ComfyUI's qwen_3_4b.safetensors), from tensor shapes."""
    keys = {k.removeprefix("model."): v for k, v in keys.items()}
    try:
        vocab, hidden = keys["embed_tokens.weight"]
        head_dim = keys["layers.0.self_attn.q_norm.weight"][0]
        n_heads = keys["layers.0.self_attn.q_proj.weight"][0] // head_dim
        n_kv = keys["layers.0.self_attn.k_proj.weight"][0] // head_dim
        inter = keys["layers.0.mlp.gate_proj.weight"][0]
    except KeyError as e:
        raise WeightError(f"not a Qwen3 text encoder checkpoint (no {e.args[0]})") from None
    layers = len({k.split(".")[1] for k in keys if k.startswith("layers.")})
    return {"architectures": ["Qwen3ForCausalLM"], "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": head_dim,
            "intermediate_size": inter, "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
            "max_position_embeddings": 40960, "hidden_act": "silu", "attention_bias": False}


_VAE_BLOCK = re.compile(r"^encoder\.(?:down|down_blocks)\.(\d+)\.(?:block|resnets)\.(\d+)\.conv1\.weight$")


def vae_config_from_shapes(keys: dict[str, tuple[int, ...]]) -> dict:
    """A VAE config for a single-file VAE (FLUX/LDM or diffusers names), from tensor shapes.

    block_out_channels, layers_per_block, latent/in/out channels and the mid-block attention come from the shapes;
    the GroupNorm group count (32), scaling and shift factors cannot, and take the FLUX VAE's (the only 16-channel
    VAE Z-Image uses); a file they cannot fit is refused with a pointer to --vae-config.
    """
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in keys):
            keys = {k[len(prefix):]: v for k, v in keys.items() if k.startswith(prefix)}
            break
    blocks: dict[int, dict[int, tuple]] = {}
    for k, shape in keys.items():
        if m := _VAE_BLOCK.match(k):
            blocks.setdefault(int(m[1]), {})[int(m[2])] = shape
    conv_in = keys.get("decoder.conv_in.weight")
    enc_in = keys.get("encoder.conv_in.weight")
    conv_out = keys.get("decoder.conv_out.weight")
    if not blocks or conv_in is None or enc_in is None or conv_out is None \
            or sorted(blocks) != list(range(len(blocks))):
        raise WeightError("cannot infer the VAE's configuration from its tensors (encoder blocks or conv_in/"
                          "conv_out missing); pass its config.json with --vae-config")
    layers = {len(b) for b in blocks.values()}
    if len(layers) != 1:
        raise WeightError(f"the VAE's encoder blocks have different depths {sorted(layers)}; pass its config.json "
                          "with --vae-config")
    attention = any(".attn_1." in k or ".attentions.0." in k for k in keys if k.startswith("encoder.mid"))
    channels = [blocks[i][0][0] for i in range(len(blocks))]
    groups = VAEConfig().norm_num_groups
    if any(c % groups for c in channels):
        raise WeightError(f"the VAE's channels {channels} do not divide into {groups} GroupNorm groups, so its group "
                          "count cannot be inferred; pass its config.json with --vae-config")
    return {**{k: v for k, v in vars(VAEConfig()).items() if not k.endswith("_types")},
            "in_channels": enc_in[1], "out_channels": conv_out[0], "latent_channels": conv_in[1],
            "block_out_channels": channels, "layers_per_block": layers.pop(),
            "mid_block_add_attention": attention}


CONFIG_FROM_SHAPES = {"transformer": transformer_config_from_shapes, "text_encoder": text_encoder_config_from_shapes,
                      "vae": vae_config_from_shapes}


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
    output = check_output(output, overwrite)

    # ---- inputs (every file's header is checked here, before any compute)
    configs = {}
    if source is not None:
        root = resolve_source(source, revision=revision, convert_into=output, dtype=mx_dtype, quantize=bits)
        for part in MODEL_COMPONENTS:
            if not (root / part).is_dir():
                raise WeightError(f"{root}: not a Hugging Face-layout Z-Image directory (no {part}/ folder)")
        inputs = {p: root / p for p in MODEL_COMPONENTS}
        tok_dir = Path(tokenizer) if tokenizer else root / "tokenizer"
        sched_file = root / "scheduler" / "scheduler_config.json"
        scheduler = _read_json(sched_file) if sched_file.is_file() else TURBO_SCHEDULER
        files = {str(f.relative_to(root)): f for p in MODEL_COMPONENTS for f in component_files(root / p)}
        for f in files.values():
            safetensors_keys(f)
        kind = "diffusers"
        variant = variant or detect_variant(source, SchedulerConfig.from_dict(scheduler))
    else:
        inputs = {k: resolve_file(v) for k, v in singles.items()}   # a path or a hub file owner/repo/file
        for expected, path in inputs.items():
            found = detect_file_kind(path)
            if found != expected:
                raise WeightError(f"{path}: given as the {expected.replace('_', ' ')}, but it holds "
                                  f"{KIND_NAMES[found]}")
        given = {"transformer": transformer_config, "vae": vae_config}
        for name, path in inputs.items():
            try:
                configs[name] = _read_json(given[name]) if given.get(name) else \
                    CONFIG_FROM_SHAPES[name]({k: shape for k, (shape, _) in safetensors_keys(path).items()})
            except WeightError as e:
                raise WeightError(f"{path}: {e}") from None
        tok_dir = Path(tokenizer) if tokenizer else download_tokenizer()
        scheduler = TURBO_SCHEDULER
        files = {p.name: p for p in inputs.values()}
        kind = "comfyui"
        variant = variant or "turbo"   # ComfyUI files carry no scheduler; variant="base" for Z-Image (Base)
    if not (tok_dir / "tokenizer.json").is_file():
        raise WeightError(f"{tok_dir}: no tokenizer.json (pass --tokenizer DIR with the Qwen3 tokenizer files)")

    tmp = _prepare_output(output)
    try:
        t_all = time.perf_counter()
        components = {}
        for name in ("text_encoder", "transformer", "vae"):
            t0 = time.perf_counter()
            b = bits.get(name) if name in QUANTIZABLE else None
            log(f"converting {name} ({dtype_name(mx_dtype)}{f', {b}-bit' if b else ''}) …")
            path = inputs[name]
            model = load_component(name, path, mx_dtype, b, group_size, config=configs.get(name))
            config = configs.get(name) or read_config(path)
            shards = save_component(tmp / name, model, config)
            nbytes = sum((tmp / name / s).stat().st_size for s in shards)
            del model
            mx.clear_cache()
            dt = time.perf_counter() - t0
            log(f"  {name}: {nbytes / 1e9:.2f} GB in {dt:.1f} s")
            components[name] = {"dtype": dtype_name(mx_dtype), "bits": b, "group_size": group_size if b else None,
                                "files": shards, "bytes": nbytes, "seconds": round(dt, 2)}
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
            "components": components, "files": inventory(tmp, hashes=False),   # sha256s: added by publish
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))   # written last: marks completion
        _install(tmp, output)
        log(f"wrote {output} in {time.perf_counter() - t_all:.1f} s")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


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
    tmp = _prepare_output(output)
    try:
        t0 = time.perf_counter()
        model = load_controlnet(source, mx_dtype, config=config, bits=bits, group_size=group_size)
        log(f"converting ControlNet {model.config.variant} ({dtype_name(mx_dtype)}{f', {bits}-bit' if bits else ''}) …")
        shards = save_component(tmp, model, controlnet_save_config(model, bits, group_size if bits else None))
        nbytes = sum((tmp / f).stat().st_size for f in shards)
        _install(tmp, output)
        log(f"wrote {output}: {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


if __name__ == "__main__":
    # `python -m zimage_mlx.convert`: runs as the module __main__, so loading the command line here is not an
    # import of cli by this library module (cli imports convert, never the reverse).
    import importlib

    importlib.import_module("zimage_mlx.cli").convert_main()
