"""Step caching (pipeline/step_cache.py, docs/step-cache.md): passes computed, wall time and the final latents'
difference to the uncached run, per rule and threshold.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/cache_bench.py [--size 256] [--time-embed-scale 0.01] [--markdown]

Model: the reduced configuration of benchmarks/bench.py (dim 256, 4 heads, caption features 256) with the real 30
main layers and 2 + 2 refiner blocks, MLX's default random initialization, float32. Random weights change layer 0's
residual almost completely from step to step (nothing would ever be skipped), so the timestep embedder's output is
scaled by --time-embed-scale: ×0.03 gives a signal (layer 0's residual change) of 4-10 % per step over 50 steps
here, inside TeaCache's calibrated range (2.8-26 %); ×0.1 gives 20-33 %. The table prints the signal's range. Random weights say nothing about image quality: the latent differences only show
how far a threshold moves the result, not whether an image still looks right.

Two settings, each an uncached run and then every rule/threshold, the loop the pipeline runs (guidance.py batched
CFG, Euler steps):
  base        50 steps, CFG 4 (100 transformer passes), a 40-token prompt and a 10-token negative prompt;
  controlnet  20 steps, no CFG, a 2.1-shaped ControlNet (15 control layers every 2nd main layer, 2 refiner blocks).
Per run: transformer passes whose main layers 1..29 ran (of all), the speedup over the uncached run -- ideal (all
passes ÷ computed passes: a skipped pass costing nothing) and from the step times (a computed and a skipped
transformer call through the cache timed round-robin, the fastest of --repeats; the uncached call is printed
beside them; a skipped pass still runs the noise refiner, layer 0 and the final
layer, the ControlNet's refiner, and the decision) -- the loop's wall time (only steady on an idle machine), and
max|Δ| / max|uncached| of the final latents. Also the signal's own cost (the float32 reduction and the host sync
deciding a step) next to one step. Prints a table; never part of the tests.
"""

from __future__ import annotations

import argparse
import platform
import time

import mlx.core as mx
import numpy as np

from zimage_mlx import sampler
from zimage_mlx.models.controlnet import ControlConditioning, ControlInput, ZImageControlNet, ZImageControlNetConfig
from zimage_mlx.models.transformer import ZImageTransformer, ZImageTransformerConfig
from zimage_mlx.pipeline.step_cache import StepCache

REDUCED = dict(dim=256, n_heads=4, n_kv_heads=4, cap_feat_dim=256, axes_dims=[16, 24, 24])   # bench.py's
SETTINGS = {
    "base": dict(steps=50, guidance=4.0, control=False),
    "controlnet": dict(steps=20, guidance=0.0, control=True),
}
RUNS = [("teacache", 0.12), ("teacache", 0.3), ("teacache", 0.6), ("teacache", 1.0),
        ("first_block", 0.05), ("first_block", 0.1), ("first_block", 0.2)]


def build(scale: float, control: bool, seed: int = 0):
    mx.random.seed(seed)
    model = ZImageTransformer(ZImageTransformerConfig(**REDUCED))
    last = model.t_embedder.mlp[2]
    last.weight, last.bias = last.weight * scale, last.bias * scale
    net = None
    if control:
        net = ZImageControlNet(ZImageControlNetConfig(dim=REDUCED["dim"], n_heads=4, n_kv_heads=4))
    mx.eval(model.parameters(), net.parameters() if net is not None else [])
    return model, net


def denoise(model, captions, noise, steps, guidance, cache=None, control=None):
    """The pipeline's loop (guidance.py batched CFG, sampler Euler steps); (final latents, wall seconds)."""
    cfg = sampler.SchedulerConfig()
    sigmas = sampler.sigmas_for(steps, cfg, image_seq_len=(noise.shape[2] // 2) * (noise.shape[3] // 2))
    timesteps = sampler.timesteps_for(sigmas, cfg)
    call = cache.model_call(model, control) if cache is not None else \
        (lambda x, t, c, doubled: model(x, t, c, control=control.doubled() if doubled and control else control))
    latents, B = noise, noise.shape[0]
    t0 = time.perf_counter()
    for i in range(steps):
        t = float(sampler.model_time(timesteps[i], cfg))
        if guidance:
            v = call(mx.concatenate([latents, latents]), mx.full((2 * B,), t), captions, True)
            v = sampler.guidance(v[:B], v[B:], guidance)
        else:
            v = call(latents, mx.full((B,), t), captions, False)
        latents = sampler.euler_step(latents, v, sigmas[i], sigmas[i + 1])
        mx.eval(latents)
    return latents, time.perf_counter() - t0


def step_costs(model, captions, noise, guidance, control, repeats: int) -> dict:
    """The fastest of `repeats` timings of one transformer call, measured round-robin (a shared machine's load
    only ever adds time): "plain" (uncached), "computed" (through a cache that computes: the signal included) and
    "skipped" (a cache that reuses its residual), and "signal" (one decision's float32 reduction and host sync on
    materialized arrays)."""
    B = noise.shape[0]
    x = mx.concatenate([noise, noise]) if guidance else noise
    t = mx.full((x.shape[0],), 0.5)
    hook = control.doubled() if guidance and control is not None else control
    always = StepCache("teacache", 0.0, 1, positive_rows=range(B))    # every call is its run's last step: computes
    never = StepCache("first_block", 1e9, 10 ** 6, positive_rows=range(B))
    mx.eval(never.forward(model, x, t, captions, hook))             # its one computed step
    calls = {"plain": lambda: model(x, t, captions, control=hook),
             "computed": lambda: always.forward(model, x, t, captions, hook),
             "skipped": lambda: never.forward(model, x, t, captions, hook)}
    times = {k: [] for k in calls}
    for _ in range(repeats + 1):                                    # the first round warms up
        for k, f in calls.items():
            t0 = time.perf_counter()
            mx.eval(f())
            times[k].append(time.perf_counter() - t0)
    out = {k: min(v[1:]) for k, v in times.items()}
    rows = [(g.index, mx.random.normal((len(g.index), g.cos.shape[0], REDUCED["dim"])),
             mx.random.normal((len(g.index), g.cos.shape[0], REDUCED["dim"]))) for g in captions.groups]
    mx.eval(rows)
    probe = StepCache("first_block", 0.1, 10, positive_rows=range(B))
    probe._decide("a", rows, True)
    t0 = time.perf_counter()
    for _ in range(10):
        probe._decide("a", rows, True)
    out["signal"] = (time.perf_counter() - t0) / 10       # (the mean: ten decisions, no model in between)
    return out


def bench(name: str, args) -> list[dict]:
    s = SETTINGS[name]
    model, net = build(args.time_embed_scale, s["control"])
    lat = args.size // 8
    noise = mx.random.normal((1, 16, lat, lat), key=mx.random.key(1))
    cap = mx.random.normal((40, REDUCED["cap_feat_dim"]), key=mx.random.key(2))
    neg = mx.random.normal((10, REDUCED["cap_feat_dim"]), key=mx.random.key(3))
    feats = [cap, neg] if s["guidance"] else [cap]
    captions = model.prepare(feats, lat, lat)
    control = None
    if net is not None:
        ctx = mx.random.normal((1, 33, lat, lat), key=mx.random.key(4))
        control = ControlConditioning(net, [ControlInput(ctx, 0.75)])
    denoise(model, captions, noise, 2, s["guidance"], control=control)          # warm-up
    plain, t_plain = denoise(model, captions, noise, s["steps"], s["guidance"], control=control)
    cost = step_costs(model, captions, noise, s["guidance"], control, args.repeats)
    passes = s["steps"] * (2 if s["guidance"] else 1)
    print(f"{name}: one transformer call {cost['plain'] * 1e3:.0f} ms uncached, {cost['computed'] * 1e3:.0f} ms "
          f"computed through the cache, {cost['skipped'] * 1e3:.0f} ms skipped; the signal's own cost "
          f"{cost['signal'] * 1e3:.2f} ms = 1/{cost['plain'] / cost['signal']:.0f} of a step", flush=True)
    rows = [dict(setting=name, rule="none", threshold=None, computed=passes, passes=passes, seconds=t_plain,
                 modeled=None, ideal=None, diff=0.0, signal=None)]
    for rule, threshold in RUNS:
        cache = StepCache(rule, threshold, s["steps"], positive_rows=range(1))
        out, t = denoise(model, captions, noise, s["steps"], s["guidance"], cache, control)
        st = cache.stats
        diff = float(mx.abs(out - plain).max() / mx.abs(plain).max())
        signal = [v for v in st.signal if v is not None]
        modeled = st.steps * cost["computed"] / (st.computed * cost["computed"] + st.skipped * cost["skipped"])
        print(f"  {name} {rule} {threshold:g}: {st.computed}/{st.steps} steps computed, {t:.1f} s", flush=True)
        rows.append(dict(setting=name, rule=rule, threshold=threshold, computed=st.computed * passes // st.steps,
                         passes=passes, seconds=t, modeled=modeled, ideal=st.steps / st.computed, diff=diff,
                         signal=(min(signal), float(np.median(signal)), max(signal))))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| setting | rule | threshold | passes computed | speedup: ideal / from step times (ratio) "
             "| loop wall time | final latents Δ | signal min / median / max |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = "" if r["modeled"] is None else \
            f"{r['ideal']:.2f}× / {r['modeled']:.2f}× ({r['modeled'] / r['ideal']:.2f})"
        sig = "" if r["signal"] is None else " / ".join(f"{v:.3f}" for v in r["signal"])
        thr = "" if r["threshold"] is None else f"{r['threshold']:g}"
        lines.append(f"| {r['setting']} | {r['rule']} | {thr} | {r['computed']}/{r['passes']} "
                     f"({100 * r['computed'] / r['passes']:.0f} %) | {speed} | {r['seconds']:.1f} s | {r['diff']:.4f} "
                     f"| {sig} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latents size/8)")
    ap.add_argument("--time-embed-scale", type=float, default=0.03)
    ap.add_argument("--settings", default="base,controlnet")
    ap.add_argument("--repeats", type=int, default=5, help="round-robin repeats of the step timings")
    args = ap.parse_args()
    print(f"{platform.machine()} {platform.system()}, MLX {mx.__version__} ({mx.default_device()}), float32, "
          f"{args.size}², reduced config with 30 main layers, timestep embedder ×{args.time_embed_scale:g}")
    rows = []
    for name in args.settings.split(","):
        rows += bench(name, args)
    print(table(rows))


if __name__ == "__main__":
    main()
