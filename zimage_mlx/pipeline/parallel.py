"""Data-parallel generation under `mlx.launch` (distributed.py): image k of a batch on process k mod N, with the
seed it has in a one-process run, gathered at the end so every process returns the whole result."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from ..distributed import failed_ranks, gather_batches
from .images import to_pil
from .request import GenerationRequest, PipelineOutput, expand_seeds


def generate_data_parallel(req: GenerationRequest, group, generate: Callable[[GenerationRequest], PipelineOutput],
                           timings: dict) -> PipelineOutput:
    """Run this process's share of the validated request `req` (GenerationRequest.shard) with `generate`; a
    failure on any process is raised on all of them."""
    n, rank = group.size(), group.rank()
    sub, mine = req.shard(rank, n)
    error, out = None, None
    try:
        if mine:
            out = generate(sub)
    except Exception as e:  # noqa: BLE001 - shared with the other processes below, then re-raised
        error = e
    failed = failed_ranks(error is not None, group)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"process {', '.join(map(str, failed))} of {n} failed (see its message)")
    local = mx.zeros((0, 1, 1, 1)) if out is None else mx.array(out.images)
    images = gather_batches(local, group)
    if req.output_type != "latent":
        images = np.array(images)
        if req.output_type == "pil":
            images = to_pil(images)
    batch = req.batch
    seeds = [None] * batch if req.seed is None else expand_seeds(req.seed, batch)
    return PipelineOutput(images=images, seeds=seeds, timings=dict(out.timings if out else timings),
                          peak_memory_gb=mx.get_peak_memory() / 1e9,
                          cache_stats=out.cache_stats if out else None)      # this process's images' run
