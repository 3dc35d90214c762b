"""One Z-Image DiT step through mflux's transformer, for step_bench.py's side-by-side row. Prints one JSON line.

Run it with the python of a venv that has mflux (never a dependency of zimage_mlx; see step_bench.py's docstring):

    /tmp/mflux-venv/bin/python benchmarks/mflux_step.py --dim 1536 --n-heads 12 --n-layers 6 --size 512

It imports only mflux and MLX. It builds `mflux.models.z_image...ZImageTransformer` at the given config, sets
every parameter to mx.random.normal * 0.02 in the run's dtype (float32 on the CPU backend, bfloat16 on a GPU — the
rule step_bench.py uses), and times one forward (batch 1: a 16 × 1 × size/8 × size/8 latent and a caption of
--caption-tokens × 2560 features, as mflux's pipeline passes them) followed by mx.eval of the output: one call with
a fresh peak counter, then --repeats timed calls. mflux recomputes the caption path (embedding, context refiner,
RoPE tables) inside every call. --compile wraps the forward in mx.compile, as mflux's own denoising loop does
(`mx.compile(predict)` everywhere except Apple M1/M2).

Output: {"step_s": median, "min_s", "first_call_s", "peak_gb", "mflux", "mlx", "device", "dtype", "compile"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib.metadata import version


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--n-heads", type=int, default=12)
    ap.add_argument("--n-layers", type=int, default=6)
    ap.add_argument("--n-refiner-layers", type=int, default=2)
    ap.add_argument("--axes-dims", default="32,48,48", help="RoPE dims per axis, comma-separated")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--caption-tokens", type=int, default=77)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "gpu"], default=None)
    ap.add_argument("--compile", action="store_true", help="mx.compile the forward, as mflux's denoising loop does")
    args = ap.parse_args()

    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    if args.device:
        mx.set_default_device(mx.cpu if args.device == "cpu" else mx.gpu)
    from mflux.models.common.config.model_config import ModelConfig
    from mflux.models.z_image.model.z_image_transformer.transformer import ZImageTransformer

    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    ModelConfig.precision = dtype  # mflux casts the timestep embedding (the adaLN input) to this
    mx.random.seed(0)
    model = ZImageTransformer(dim=args.dim, n_layers=args.n_layers, n_refiner_layers=args.n_refiner_layers,
                              n_heads=args.n_heads, axes_dims=[int(a) for a in args.axes_dims.split(",")])
    # mflux's --float32 switch (float32 timestep embedding and RoPE output); off for bfloat16, as mflux runs it
    model.set_float32(dtype == mx.float32)
    params = [(k, (mx.random.normal(v.shape) * 0.02).astype(dtype)) for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())

    h = w = args.size // 8
    lat = mx.random.normal((16, 1, h, w), key=mx.random.key(0)).astype(dtype)
    cap = mx.random.normal((args.caption_tokens, 2560), key=mx.random.key(1)).astype(dtype)
    t = mx.array([0.5])
    sigmas = mx.array([1.0, 0.0])  # unused when the timestep is an array

    def forward(x, timestep, cap_feats):
        return model(x=x, timestep=timestep, sigmas=sigmas, cap_feats=cap_feats)

    step = mx.compile(forward) if args.compile else forward
    mx.eval(lat, cap, t, sigmas)
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    mx.eval(step(lat, t, cap))
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        mx.eval(step(lat, t, cap))
        times.append(time.perf_counter() - t0)
    print(json.dumps({"step_s": statistics.median(times), "min_s": min(times), "first_call_s": first,
                      "peak_gb": mx.get_peak_memory() / 1e9, "mflux": version("mflux"), "mlx": mx.__version__,
                      "device": str(mx.default_device()), "dtype": str(dtype), "compile": args.compile}))


if __name__ == "__main__":
    main()
