"""ControlNet Union cost: DiT step time with the ControlNet ÷ without, and the ControlNet's weight memory.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/controlnet_bench.py --size 128 --repeats 2 [--layers 30] [--semantics reference]

Step time: the real block structure at full width (dim 3840, 30 heads, FFN 10240): 30 main layers, 2 noise-refiner
and 2 context-refiner blocks; the 2.1 ControlNet adds 15 control layers + 2 control-refiner blocks, 2.1-lite 3 + 2.
To fit the CPU's memory the blocks of one kind share one set of random weights (the arithmetic and the weight
traffic per block are those of distinct blocks). `--layers L` scales the depth (control layers scale with it).
One "step" is one transformer call (one velocity, batch 1, --caption-tokens caption), median of --repeats after a
warm-up, the configurations measured round-robin. Memory: the ControlNet's parameter bytes computed from the real
configs' shapes (nothing is allocated), bf16 and with the package's 8/4-bit quantization policy (group 64), as the
memory plan counts them. Prints tables; never part of the tests.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from zimage_mlx.models.controlnet import ControlConditioning, ControlInput, ZImageControlNet, ZImageControlNetConfig
from zimage_mlx.memory import component_weight_bytes
from zimage_mlx.models.transformer import ZImageTransformer, ZImageTransformerConfig

VARIANTS = {   # published configs (diffusers' ZImageControlNetModel / VideoX-Fun yaml files)
    "2.1": dict(control_layers_places=list(range(0, 30, 2)), add_control_noise_refiner="control_noise_refiner"),
    "2.1-lite": dict(control_layers_places=[0, 10, 20], add_control_noise_refiner="control_noise_refiner"),
    "2.0": dict(control_layers_places=list(range(0, 30, 2)), add_control_noise_refiner="control_layers"),
    "v1": dict(control_layers_places=list(range(0, 30, 5)), add_control_noise_refiner=None, control_in_dim=16),
}


def scaled_places(places: list[int], layers: int) -> list[int]:
    return sorted({p * layers // 30 for p in places})


def build_transformer(layers: int, dtype) -> ZImageTransformer:
    """The real block structure with `layers` main layers; all modulated blocks share one set of weights, the two
    context-refiner blocks another."""
    model = ZImageTransformer(ZImageTransformerConfig(n_layers=1, n_refiner_layers=1))
    block = model.layers[0]
    model.layers = [block] * layers
    model.noise_refiner = [block] * 2
    model.context_refiner = model.context_refiner * 2
    model.set_dtype(dtype)
    return model


def build_controlnet(variant: str, layers: int, dtype, plain_block) -> ZImageControlNet:
    """A published variant's structure: the first control block (with before_proj) and one shared other block
    (v1's plain refiner blocks share `plain_block`, a modulated block of the transformer's shape)."""
    v = dict(VARIANTS[variant])
    places = scaled_places(v.pop("control_layers_places"), layers)
    net = ZImageControlNet(ZImageControlNetConfig(control_layers_places=[0, 1], **v))
    first, rest = net.control_layers
    net.control_layers = [first] + [rest] * (len(places) - 1)
    net.config.control_layers_places = places
    if v["add_control_noise_refiner"] == "control_noise_refiner":
        net.control_noise_refiner = [first, rest]
    elif v["add_control_noise_refiner"] is None:
        net.control_noise_refiner = [plain_block] * 2
    net.set_dtype(dtype)
    return net


def time_steps(model, nets: dict, size: int, caption_tokens: int, repeats: int, semantics: str) -> dict:
    """Median seconds per transformer call for each configuration, measured round-robin (base, variant, ...)
    so that other load on the machine affects all of them alike."""
    h = w = size // 8
    x = mx.random.normal((1, 16, h, w), key=mx.random.key(0))
    caps = [mx.random.normal((caption_tokens, 2560), key=mx.random.key(1))]
    t = mx.array([0.5])
    ctx = {name: mx.random.normal((1, net.config.control_in_dim, h, w), key=mx.random.key(2))
           for name, net in nets.items()}
    times = {name: [] for name in ["none", *nets]}
    for r in range(repeats + 1):   # round 0 warms up (and materializes the random weights)
        for name in times:
            kw = {} if name == "none" else \
                {"control": ControlConditioning(nets[name], [ControlInput(ctx[name], 0.75)], semantics)}
            t0 = time.perf_counter()
            mx.eval(model(x, t, caps, **kw))
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def block_times(size: int, caption_tokens: int, repeats: int, dtype) -> dict:
    """Median seconds of one block of each kind at this token count, interleaved: a main layer and a control layer
    over the unified sequence, a noise-refiner / control-refiner block over the image tokens, a context-refiner block
    over the caption. Composing them predicts the full model's ratio with less noise than whole steps."""
    from zimage_mlx.models.controlnet import ControlBlock
    from zimage_mlx.models.transformer import TransformerBlock

    cfg = ZImageTransformerConfig()
    img = (size // 16) ** 2
    img += -img % 32
    cap = caption_tokens + -caption_tokens % 32
    # (only the first control block also has before_proj: one dim x dim matmul more, left out here)
    main, ctx_ref, ctrl = TransformerBlock(cfg, True), TransformerBlock(cfg, False), ControlBlock(cfg, False)
    for m in (main, ctx_ref, ctrl):
        m.set_dtype(dtype)
    temb = mx.random.normal((1, 256)).astype(dtype)

    def inputs(n):
        x = mx.random.normal((1, n, cfg.dim)).astype(dtype)
        ang = mx.random.uniform(shape=(n, cfg.head_dim // 2))
        cos, sin = rope_tables_for(ang)
        return x, cos, sin

    runs = {
        "main layer": (lambda a: main(a[0], a[1], a[2], temb), inputs(img + cap)),
        "noise refiner": (lambda a: main(a[0], a[1], a[2], temb), inputs(img)),
        "context refiner": (lambda a: ctx_ref(a[0], a[1], a[2]), inputs(cap)),
        "control layer": (lambda a: ctrl(a[0], a[0], a[1], a[2], temb), inputs(img + cap)),
        "control refiner": (lambda a: ctrl(a[0], a[0], a[1], a[2], temb), inputs(img)),
    }
    times = {k: [] for k in runs}
    for r in range(repeats + 1):
        for name, (fn, args) in runs.items():
            t0 = time.perf_counter()
            mx.eval(fn(args))
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def rope_tables_for(ang):
    """cos/sin in the layout the transformer's attention takes (as ZImageTransformer._rope_cos_sin builds them)."""
    import numpy as np

    a = np.array(ang)
    cos = np.repeat(np.cos(a), 2, axis=-1)
    sin = np.stack([-np.sin(a), np.sin(a)], axis=-1).reshape(len(a), -1)
    return mx.array(cos), mx.array(sin)


def flop_ratio(variant: str, size: int = 1024, caption_tokens: int = 128) -> float:
    """Analytic matmul + attention FLOP ratio (with ÷ without) at a size: what the step ratio tends to once the
    step is compute-bound (large images, GPU)."""
    dim, hidden = 3840, 10240
    img = (size // 16) ** 2
    img += -img % 32
    cap = caption_tokens + -caption_tokens % 32
    u = img + cap

    def block(s, extra_proj=0):
        return s * (4 * dim * dim + 3 * dim * hidden + extra_proj * dim * dim) + 2 * s * s * dim

    base = 30 * block(u) + 2 * block(img) + 2 * block(cap)
    v = VARIANTS[variant]
    n = len(v["control_layers_places"])
    extra = n * block(u, 1) + u * dim * dim
    if v["add_control_noise_refiner"] == "control_noise_refiner":
        extra += 2 * block(img, 1) + img * dim * dim
    elif v["add_control_noise_refiner"] == "control_layers":
        extra += n * block(img, 1) + img * dim * dim
    else:
        extra += 2 * block(img)
    return (base + extra) / base


def composed_table(bt: dict, variants: list[str]):
    base = 30 * bt["main layer"] + 2 * bt["noise refiner"] + 2 * bt["context refiner"]
    print("\nPer-block times (median), composed into the full 30-layer model:")
    print("| block | s |\n|---|---|")
    for k, v in bt.items():
        print(f"| {k} | {v:.3f} |")
    print("| ControlNet | predicted step ÷ without (reference / diffusers semantics) | FLOP ratio at 1024² |\n"
          "|---|---|---|")
    for name in variants:
        v = VARIANTS[name]
        n = len(v["control_layers_places"])
        extra = n * bt["control layer"]
        if v["add_control_noise_refiner"] == "control_noise_refiner":
            extra += 2 * bt["control refiner"]
        elif v["add_control_noise_refiner"] == "control_layers":
            extra += n * bt["control refiner"]
        else:
            extra += 2 * bt["noise refiner"]
        private = 2 * bt["noise refiner"] if v["add_control_noise_refiner"] else 0.0
        print(f"| {name} | {(base + extra) / base:.2f} / {(base + extra + private) / base:.2f} | "
              f"{flop_ratio(name):.2f} |")


def memory_table():
    print("\nControlNet weight memory (real configs, from shapes):")
    print("| variant | params | bf16 | 8-bit | 4-bit |\n|---|---|---|---|---|")
    for name, v in VARIANTS.items():
        cfg = ZImageControlNetConfig(**v)
        n = sum(p.size for _, p in tree_flatten(ZImageControlNet(cfg).parameters()))
        sizes = [component_weight_bytes("controlnet", cfg.to_dict(), mx.bfloat16, b, 64) / 1e9 for b in (None, 8, 4)]
        print(f"| {name} | {n / 1e9:.2f} B | {sizes[0]:.2f} GB | {sizes[1]:.2f} GB | {sizes[2]:.2f} GB |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (tokens = (size/16)^2)")
    ap.add_argument("--caption-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=30, help="main layers (control layers scale with them)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--semantics", choices=["reference", "diffusers"], default="reference")
    ap.add_argument("--variants", default="2.1,2.1-lite")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--per-block", action="store_true", help="time one block of each kind and compose (less noise)")
    args = ap.parse_args()
    mx.set_default_device(mx.cpu if args.device == "cpu" else mx.gpu)
    dtype = getattr(mx, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    print(f"machine: {platform.machine()} {platform.system()}, MLX {mx.__version__} {args.device}, "
          f"{str(dtype).split('.')[-1]}; {args.size}x{args.size} ({(args.size // 16) ** 2} image tokens), "
          f"{args.caption_tokens} caption tokens, {args.layers} main layers, {args.semantics} semantics")
    if args.per_block:
        composed_table(block_times(args.size, args.caption_tokens, args.repeats, dtype), args.variants.split(","))
    elif not args.memory_only:
        model = build_transformer(args.layers, dtype)
        nets = {v: build_controlnet(v, args.layers, dtype, model.layers[0]) for v in args.variants.split(",")}
        res = time_steps(model, nets, args.size, args.caption_tokens, args.repeats, args.semantics)
        print("| ControlNet | control layers | step (s) | ÷ without |\n|---|---|---|---|")
        print(f"| none | 0 | {res['none']:.2f} | 1.00 |")
        for name, net in nets.items():
            print(f"| {name} | {len(net.config.control_layers_places)} | {res[name]:.2f} | "
                  f"{res[name] / res['none']:.2f} |")
    memory_table()


if __name__ == "__main__":
    main()
