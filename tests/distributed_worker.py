"""Run by tests/test_distributed.py as one process or under `mlx.launch -n 2`: generate each named case with
ZImagePipeline and save this process's latents, peak memory and transformer weight bytes to OUT-<rank>.npz.

    python tests/distributed_worker.py MODEL_DIR OUT case [case ...]
"""

from __future__ import annotations

import gc
import sys

import mlx.core as mx
import numpy as np

from zimage_mlx import ZImagePipeline
from zimage_mlx.distributed import init_group

CASES = {
    "cfg": dict(parallel="cfg", quantize=None, guidance_scale=4.0),
    "tensor": dict(parallel="tensor", quantize=None, guidance_scale=0.0),
    "tensor-cfg-4bit": dict(parallel="tensor", quantize=4, guidance_scale=3.0),
    # step caching (docs/step-cache.md): one decision per step on every process, from the positive branch
    "cfg-cache": dict(parallel="cfg", quantize=None, guidance_scale=4.0, cache="first_block", threshold=0.16),
    "tensor-cache": dict(parallel="tensor", quantize=None, guidance_scale=4.0, cache="teacache", threshold=0.3),
}
CACHE_STEPS = 8
TIME_EMBED_SCALE = 0.01    # random adaLN weights change layer 0's residual ~100 % per step: scaled, 6-12 % per step


def run(root: str, name: str) -> dict:
    case = CASES[name]
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32", quantize=case["quantize"], parallel=case["parallel"],
                                          height=64, width=64, fused_projections=True)
    before = mx.get_active_memory()
    pipe.transformer  # noqa: B018 - load it alone to weigh it
    transformer_bytes = mx.get_active_memory() - before
    cache = {}
    if "cache" in case:
        last = pipe.transformer.t_embedder.mlp[2]
        last.weight, last.bias = last.weight * TIME_EMBED_SCALE, last.bias * TIME_EMBED_SCALE
        cache = dict(cache=case["cache"], cache_threshold=case["threshold"], num_inference_steps=CACHE_STEPS)
    out = pipe(**{"prompt": "a red fox in the snow", "negative_prompt": "blurry", "height": 64, "width": 64,
                  "num_inference_steps": 2, "guidance_scale": case["guidance_scale"], "seed": 3,
                  "output_type": "latent", **cache})
    attention = pipe.transformer.layers[0].attention
    result = {name: np.array(out.images), f"{name}/peak": mx.get_peak_memory(),
              f"{name}/transformer_bytes": transformer_bytes,
              f"{name}/fused": "to_qkv" in attention and "to_q" not in attention}
    if out.cache_stats:
        result[f"{name}/computed"] = np.array(out.cache_stats["computed_steps"])
        result[f"{name}/signal"] = np.array([np.nan if v is None else v for v in out.cache_stats["signal"]])
    del pipe, out
    return result


def cfg_without_guidance(root: str) -> dict:
    """parallel='cfg' with guidance 0 (Turbo): refused under a launch, ignored with one process."""
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32", parallel="cfg", height=64, width=64)
    try:
        pipe(prompt="a red fox", height=64, width=64, num_inference_steps=1, guidance_scale=0.0, seed=3,
             output_type="latent")
    except ValueError as e:
        return {"cfg-without-guidance": "classifier-free guidance, which is off" in str(e)}
    return {"cfg-without-guidance": False}


def main(root: str, out: str, names: list[str]) -> None:
    mx.set_default_device(mx.cpu)
    results = {}
    for name in names:
        results.update(cfg_without_guidance(root) if name == "cfg-without-guidance" else run(root, name))
    np.savez(f"{out}-{init_group().rank()}.npz", **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
