"""Time encoding one 512-token prompt with the full-size Qwen3-4B encoder (35 of 36 layers), random weights.

    python benchmarks/text_encoder_bench.py                 # float32 (CPU default; ~15.7 GB of weights)
    python benchmarks/text_encoder_bench.py --dtype bfloat16 # Apple GPU setting
    python benchmarks/text_encoder_bench.py --bits 8         # nn.quantize the linear layers (and the embedding)

On Linux CPU, preload a threaded BLAS:
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python benchmarks/text_encoder_bench.py
Weights are created directly in MLX, layer by layer (never in torch), so peak memory is about one copy.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from zimage_mlx.models.text_encoder import Qwen3Encoder, Qwen3EncoderConfig


def build(dtype: mx.Dtype, bits: int | None) -> Qwen3Encoder:
    model = Qwen3Encoder(Qwen3EncoderConfig())  # the real Qwen3-4B config (docs/architecture.md#model-configurations); params are lazy randoms
    # Materialize module by module in the target dtype so the float32 init never exists for the whole model.
    for module in [model.embed_tokens, *model.layers]:
        module.update(tree_map(lambda p: p.astype(dtype), module.parameters()))
        mx.eval(module.parameters())
        if bits and not isinstance(module, nn.Embedding):
            nn.quantize(module, group_size=64, bits=bits)
            mx.eval(module.parameters())
    if bits:
        model.embed_tokens = nn.QuantizedEmbedding.from_embedding(model.embed_tokens, group_size=64, bits=bits)
        mx.eval(model.parameters())
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--bits", type=int, default=None, choices=[4, 8])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    dtype = getattr(mx, args.dtype)

    t0 = time.perf_counter()
    model = build(dtype, args.bits)
    t_build = time.perf_counter() - t0
    cfg = model.config
    print(f"Qwen3 encoder: {len(model.layers)} of {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{args.dtype}{f', {args.bits}-bit' if args.bits else ''}, device {mx.default_device()}; "
          f"built in {t_build:.1f} s, weights {mx.get_active_memory() / 2**30:.2f} GiB")

    ids = mx.random.randint(0, 151643, (1, args.tokens), key=mx.random.key(0)).astype(mx.int32)
    times = []
    for i in range(args.runs):
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        out = model(ids)
        mx.eval(out)
        times.append(time.perf_counter() - t0)
        print(f"run {i}: {times[-1]:.2f} s for {args.tokens} tokens "
              f"({args.tokens / times[-1]:.1f} tok/s), peak {mx.get_peak_memory() / 2**30:.2f} GiB, "
              f"out {tuple(out.shape)} {out.dtype}, finite={bool(mx.isfinite(out.astype(mx.float32)).all())}")
    print(f"encode {args.tokens} tokens: best {min(times):.2f} s")


if __name__ == "__main__":
    main()
