"""Building a ZImagePipeline from a source: a hub id (converted once to the MLX layout and cached, loading/hub.py),
a Hugging Face-layout directory or an MLX directory. Reads configs, the manifest and every weight file's header,
plans memory (memory.plan_memory) and sets up lazy loaders; no weights are read here."""

from __future__ import annotations

import sys
from pathlib import Path

from ..distributed import barrier, check_mode, check_tensor_parallel, init_group, tensor_parallel_sizes
from ..loading.components import MODEL_COMPONENTS, QUANTIZABLE, is_mlx_dir, load_component, read_manifest, \
    stored_config
from ..loading.convert import convert
from ..loading.hub import (DEFAULT_REPO, cache_dir, cache_root, find_cached, looks_like_repo_id, resolve_file,
                           resolve_source)
from ..loading.quantize import describe_bits, parse_quantize
from ..loading.weights import WeightError, component_files, default_dtype, dtype_name, parse_dtype, read_config, \
    safetensors_keys
from ..memory import plan_memory
from ..models.controlnet import controlnet_config
from ..models.tokenizer import ZImageTokenizer
from ..sampler import SchedulerConfig, check_variant, detect_variant
from .lazy_models import check_semantics
from .request import DEFAULT_SIZE


def load_pipeline(cls, src=DEFAULT_REPO, dtype=None, quantize=None, *, revision=None, keep_text_encoder=False,
                  variant=None, height=DEFAULT_SIZE, width=DEFAULT_SIZE, compile=None, fused_projections=None,
                  verbose=False, parallel=None, controlnet=None, controlnet_semantics="reference"):
    """`ZImagePipeline.from_pretrained` (its docstring describes the arguments)."""
    parallel = check_mode(parallel)
    group = init_group() if parallel else None
    world = group.size() if group is not None else 1
    if parallel == "cfg" and world > 2:
        raise ValueError(f"parallel='cfg' runs the two guidance branches on 2 processes; this launch has {world} "
                         "(use parallel='data' or 'tensor')")
    mx_dtype = parse_dtype(dtype) if dtype is not None else None
    requested = parse_quantize(quantize)
    if variant is not None:
        check_variant(variant)
    hub_id = str(src) if looks_like_repo_id(str(src)) else None
    try:
        root = resolve_source(src, revision=revision, convert_into=cache_root(), dtype=mx_dtype or default_dtype(),
                              quantize=requested)   # prints the download plan; refuses a full disk
    except WeightError:
        # Offline with the hub snapshot gone: a converted copy in our cache still serves.
        root = find_cached(hub_id, revision, mx_dtype) if hub_id else None
        if root is None:
            raise
    manifest = read_layout(root)
    tensor = parallel == "tensor" and world > 1
    if mx_dtype is None:
        mx_dtype = parse_dtype(manifest["components"]["transformer"]["dtype"]) if manifest else default_dtype()
    configs = {n: stored_config(n, read_config(root / n), component_keys(root / n)) for n in MODEL_COMPONENTS}
    check_semantics(controlnet_semantics)
    if controlnet is not None:
        controlnet = resolve_file(controlnet)
        configs["controlnet"] = controlnet_config(controlnet).to_dict()

    saved_bits = {n: manifest["components"][n].get("bits") for n in QUANTIZABLE} if manifest else {}
    if any(saved_bits.values()):
        requested = saved_bits          # already quantized on disk: load (and plan) as saved
    if tensor:
        check_tensor_parallel(configs["transformer"], world)
    # The text encoder is split too when its heads allow it; otherwise every process holds all of it.
    shards = {n: world for n in QUANTIZABLE
              if tensor and world in tensor_parallel_sizes(n, configs[n], up_to=world)}
    plan = plan_memory(configs, mx_dtype, requested=requested, height=height, width=width, shards=shards,
                       keep_text_encoder=keep_text_encoder)
    if keep_text_encoder is None:
        keep_text_encoder = not plan.free_text_encoder_first     # keep it between calls when that fits
    bits, group_size = plan.bits, plan.group_size
    if tensor:
        check_tensor_parallel(configs["transformer"], world, bits["transformer"], group_size)
        shards = {n: k for n, k in shards.items()
                  if world in tensor_parallel_sizes(n, configs[n], bits.get(n), group_size, up_to=world)}

    if hub_id is not None and manifest is None:
        cached = cache_dir(hub_id, root, mx_dtype, bits)
        verbose = verbose and (group is None or group.rank() == 0)
        # Processes take turns, so the first on each machine converts and the others sharing its disk reuse it.
        for turn in range(world):
            if (group is None or group.rank() == turn) and not usable_conversion(cached):
                if verbose:
                    print(f"converting {hub_id} to MLX (once) into {cached} …", file=sys.stderr)
                convert(cached, root, dtype=dtype_name(mx_dtype), quantize=bits, group_size=group_size,
                        overwrite=True, log=(lambda m: print(m, file=sys.stderr)) if verbose else (lambda m: None))
            if group is not None:
                barrier(group)
        root, manifest = cached, read_manifest(cached)

    sched_file = root / "scheduler" / "scheduler_config.json"
    scheduler = SchedulerConfig.from_file(sched_file) if sched_file.is_file() else SchedulerConfig()
    saved = manifest["components"] if manifest else {}
    loaders = {n: (lambda n=n: load_component(n, root / n, mx_dtype, bits.get(n), group_size, saved=saved.get(n),
                                              group=group if n in shards else None))
               for n in MODEL_COMPONENTS}
    variant = variant or (manifest or {}).get("variant") or detect_variant(src, scheduler)
    pipe = cls(tokenizer=ZImageTokenizer.from_dir(root / "tokenizer"), scheduler_config=scheduler,
               loaders=loaders, configs=configs, variant=variant, keep_text_encoder=keep_text_encoder,
               source=str(src), dtype=mx_dtype, quantization=describe_bits(bits), plan=plan, compile=compile,
               fused_projections=fused_projections, parallel=parallel, group=group, controlnet_semantics=controlnet_semantics)
    if controlnet is not None:
        pipe.load_controlnet(controlnet)
    return pipe



def read_layout(root: Path) -> dict | None:
    """The manifest of an MLX-layout directory, or None for a Hugging Face-layout one; every weight file's header
    is checked here, so a truncated or corrupt shard is reported before anything loads or computes."""
    manifest = read_manifest(root) if is_mlx_dir(root) else None
    for part in (*MODEL_COMPONENTS, "tokenizer"):
        if not (root / part).is_dir():
            raise WeightError(
                f"{root}: not a Z-Image model directory (no {part}/ folder); expected the Hugging Face layout of "
                f"{DEFAULT_REPO} or a directory made by `zimage-mlx convert`"
            )
    for part in MODEL_COMPONENTS:
        for f in component_files(root / part):
            safetensors_keys(f)
    return manifest


def component_keys(directory: Path) -> set[str]:
    """The tensor names of a component directory (from the file headers)."""
    return {k for f in component_files(directory) for k in safetensors_keys(f)}


def usable_conversion(path: Path) -> bool:
    """A cached conversion that reads as one (manifest and every header intact); a corrupt one is rebuilt."""
    if not is_mlx_dir(path):
        return False
    try:
        read_layout(path)
    except WeightError:
        return False
    return True


