"""LoRA: every Z-Image format against diffusers' `ZImagePipeline.load_lora_weights` (where it loads the format) or
against a torch transformer merged by hand (where it does not); quantized layers against an exact side branch.

8-step latents on a tiny random checkpoint, float32; every LoRA has alpha != rank and moves the latents by >= 5%.
"""

import json
import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from conftest import rel_err, to_numpy
from make_lora import (TARGETS, as_ai_toolkit, as_dot, as_kohya, as_peft, fused_qkv_lora, kohya_name, linear,
                       merged, native_name, peft_metadata, random_lora, save, split_qkv)
from make_pipeline import diffusers_pipelines, save_tiny_pipeline

from zimage_mlx import ZImagePipeline
from zimage_mlx.loading.hub import resolve_file
from zimage_mlx.lora.adapters import LoRAError, LoRAState, load_adapter
from zimage_mlx.lora.layers import LoRALinear
from zimage_mlx.models.fused_projections import FUSED_PROJECTIONS
from zimage_mlx.loading.weights import WeightError

H, W, STEPS = 64, 48, 8
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("lora")
    root, models = save_tiny_pipeline(tmp / "Z-Image-Turbo-tiny", qwen_tokenizer_dir)
    t2i, _ = diffusers_pipelines(models, qwen_tokenizer_dir)
    # fused q/k/v and w1/w3 (the GPU default): every format's targets as row slices of the fused layers
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32", keep_text_encoder=True, fused_projections=True)
    lat = torch.randn((1, 16, 2 * (H // 16), 2 * (W // 16)), generator=torch.Generator().manual_seed(0))
    embeds = pipe.encode_prompt([PROMPT])
    ref_embeds, _ = t2i.encode_prompt([PROMPT], do_classifier_free_guidance=False)

    class Tiny:
        pass

    t = Tiny()
    t.tmp, t.root, t.models, t.tr, t.t2i, t.pipe, t.lat = tmp, root, models, models["transformer"], t2i, pipe, lat
    t.embeds, t.ref_embeds = embeds, ref_embeds
    t.base_ref = diffusers_latents(t, t2i)
    t.base = ours(t)
    return t


def diffusers_latents(t, p):
    return p(prompt_embeds=[e.clone() for e in t.ref_embeds], latents=t.lat.clone(), height=H, width=W,
             num_inference_steps=STEPS, guidance_scale=0.0, output_type="latent").images.numpy()


def ours(t, pipe=None):
    pipe = pipe or t.pipe
    return to_numpy(pipe(prompt_embeds=t.embeds, latents=t.lat.numpy(), height=H, width=W,
                         num_inference_steps=STEPS, guidance_scale=0.0, output_type="latent").images)


def merged_latents(t, **kw):
    """Latents of diffusers' pipeline with the LoRA merged into a copy of the torch transformer by hand."""
    model = merged(t.tr, *kw.pop("loras", ()), **kw)
    p = type(t.t2i)(**{**t.t2i.components, "transformer": model})
    p.set_progress_bar_config(disable=True)
    return diffusers_latents(t, p)


def effect(a, base) -> float:
    return float(np.linalg.norm(a - base) / np.linalg.norm(base))


def _no_lora_left(pipe):
    return not any(isinstance(m, LoRALinear) for _, m in pipe.transformer.named_modules())


# ------------------------------------------------------------------------------------ formats diffusers loads
def _dot_with_redundant_keys(t, lora):
    """The dot format writes a fused `qkv` and a bare `out` next to the split keys: random here, so applying
    them would show."""
    tensors = as_dot(lora)
    rng = np.random.default_rng(7)
    for k in ("qkv", "out"):
        tensors[f"diffusion_model.layers.0.attention.{k}.lora.down.weight"] = rng.standard_normal((4, 96), np.float32)
        tensors[f"diffusion_model.layers.0.attention.{k}.lora.up.weight"] = rng.standard_normal(
            (288 if k == "qkv" else 96, 4), np.float32)
    return tensors


def _kohya_fused(t, lora, fused):
    """ComfyUI fused attention in kohya names: `lora_unet_layers_0_attention_qkv` (+ the other targets)."""
    tensors = as_kohya({k: v for k, v in lora.items() if not any(p in k for p in ("to_q", "to_k", "to_v"))})
    for blk, (a, b, alpha) in fused.items():
        n = kohya_name(f"{blk}.attention.qkv")
        tensors.update({f"{n}.lora_down.weight": a, f"{n}.lora_up.weight": b,
                        f"{n}.alpha": np.array(alpha, np.float32)})
    return tensors


def _lokr(t, factored: bool):
    """LyCORIS LoKr (ai-toolkit keys): full w1 with full w2, or w2 = w2_a w2_b with alpha/rank scaling."""
    rng = np.random.default_rng(9 + factored)
    tensors, kron = {}, {}
    for tg in ("layers.0.attention.to_q", "layers.1.feed_forward.w1", "noise_refiner.0.attention.to_out.0",
               "layers.0.adaLN_modulation.0"):
        o, i = linear(t.tr, tg).weight.shape
        o1, i1 = (4 if o % 4 == 0 else 2), (4 if i % 4 == 0 else 2)
        w1 = rng.standard_normal((o1, i1)).astype(np.float32)
        k = f"diffusion_model.{tg}"
        if factored:
            w2a = rng.standard_normal((o // o1, 3)).astype(np.float32)
            w2b = (rng.standard_normal((3, i // i1)) * 0.03).astype(np.float32)
            tensors.update({f"{k}.lokr_w1": w1, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b,
                            f"{k}.alpha": np.array(5.0, np.float32)})
            kron[tg] = (w1, w2a @ w2b, 5.0 / 3, 1.0)
        else:
            w2 = (rng.standard_normal((o // o1, i // i1)) * 0.03).astype(np.float32)
            tensors.update({f"{k}.lokr_w1": w1, f"{k}.lokr_w2": w2, f"{k}.alpha": np.array(7.0, np.float32)})
            kron[tg] = (w1, w2, 1.0, 1.0)   # both factors full: no alpha scaling
    return tensors, kron


def diffusers_cases(t):
    lora = random_lora(t.tr, strength=0.2, seed=1)
    lora_r = random_lora(t.tr, strength=0.2, seed=2, alpha=4.0)   # alpha = rank (the dot format has no alpha)
    fused = fused_qkv_lora(t.tr, strength=0.2, seed=3)
    pattern = {"layers.0.feed_forward.w2": 2.0}
    patterned = {k: (a, b, pattern.get(k, alpha)) for k, (a, b, alpha) in lora.items()}
    return {
        "diffusers-peft-metadata": (as_peft(lora), peft_metadata(lora, pattern), dict(loras=[patterned])),
        "ai-toolkit": (as_ai_toolkit(lora), None, dict(loras=[lora])),
        "peft-default-adapter": (as_ai_toolkit(lora, prefix="", adapter=".default"), None, dict(loras=[lora])),
        "kohya": (as_kohya(lora), None, dict(loras=[lora])),
        "dot-with-redundant-fused": (_dot_with_redundant_keys(t, lora_r), None, dict(loras=[lora_r])),
        "kohya-fused-qkv": (_kohya_fused(t, lora, fused), None, dict(loras=[split_qkv(fused), {
            k: v for k, v in lora.items() if not any(p in k for p in ("to_q", "to_k", "to_v"))}])),
        "lokr-full": (_lokr(t, False)[0], None, dict(kron=_lokr(t, False)[1])),
        "lokr-factored": (_lokr(t, True)[0], None, dict(kron=_lokr(t, True)[1])),
    }


@pytest.mark.parametrize("fmt", ["diffusers-peft-metadata", "ai-toolkit", "peft-default-adapter", "kohya",
                                 "dot-with-redundant-fused", "kohya-fused-qkv", "lokr-full", "lokr-factored"])
def test_format_matches_diffusers(tiny, fmt):
    t = tiny
    tensors, metadata, reference = diffusers_cases(t)[fmt]
    path = save(t.tmp / f"{fmt}.safetensors", tensors, metadata)
    t.t2i.load_lora_weights(str(path), adapter_name="x")
    t.t2i.set_adapters(["x"], [1.0])
    try:
        ref = diffusers_latents(t, t.t2i)
    finally:
        t.t2i.unload_lora_weights()
    hand = merged_latents(t, **reference)
    assert rel_err(ref, hand) <= 1e-5, "diffusers and the hand-merged reference disagree (test setup)"
    name = t.pipe.load_lora_weights(str(path))
    try:
        got = ours(t)
    finally:
        t.pipe.unload_lora_weights()
    err, moved = rel_err(got, ref), effect(ref, t.base_ref)
    print(f"{fmt}: rel err vs diffusers {err:.2e}, LoRA moves the latents by {moved:.1%}")
    assert name == "default_0"
    assert moved >= 0.05 and err <= 1e-4
    np.testing.assert_array_equal(ours(t), t.base)   # unload: exactly the base model


# ------------------------------------------------------------------------------------ formats diffusers cannot load
def _native(t, spelling, seed=4):
    """ComfyUI-native module names (attention.qkv with one shared A, attention.out, x_embedder, final_layer) in
    A/B or kohya spelling; returns (tensors, the same update per diffusers target)."""
    blocks = ("layers.0", "noise_refiner.0")
    lora = {k: v for k, v in random_lora(t.tr, strength=0.2, seed=seed).items()
            if not any(k.startswith(f"{blk}.attention.to_{p}") for blk in blocks for p in "qkv")}
    fused = fused_qkv_lora(t.tr, blocks=blocks, strength=0.2, seed=seed + 1)
    named = {native_name(k): v for k, v in lora.items()}
    named.update({f"{blk}.attention.qkv": v for blk, v in fused.items()})
    tensors = as_kohya(named, name=kohya_name) if spelling == "kohya" else as_ai_toolkit(named)
    return tensors, {**lora, **split_qkv(fused)}


def _deltas(t):
    """ComfyUI full deltas: .diff on norms and on a whole matrix, .diff_b on biases, a fused-qkv matrix .diff."""
    rng = np.random.default_rng(21)
    params = dict(t.tr.named_parameters())
    tensors, diffs = {}, {}
    for name in ("layers.0.attention_norm1.weight", "layers.1.ffn_norm2.weight", "layers.0.attention.norm_q.weight",
                 "all_x_embedder.2-1.bias", "all_final_layer.2-1.linear.bias", "layers.1.feed_forward.w2.weight"):
        p = params[name].detach().numpy()
        d = (rng.standard_normal(p.shape) * 0.3 * np.abs(p).mean()).astype(np.float32)
        stem, attr = name.rsplit(".", 1)
        key = native_name(stem).replace("attention.norm_q", "attention.q_norm")
        tensors[f"diffusion_model.{key}.{'diff' if attr == 'weight' else 'diff_b'}"] = d
        diffs[name] = (d, 1.0)
    qkv = [params[f"layers.1.attention.to_{p}.weight"].detach().numpy() for p in "qkv"]
    d = [(rng.standard_normal(w.shape) * 0.3 * np.abs(w).mean()).astype(np.float32) for w in qkv]
    tensors["diffusion_model.layers.1.attention.qkv.diff"] = np.concatenate(d)
    diffs.update({f"layers.1.attention.to_{p}.weight": (x, 1.0) for p, x in zip("qkv", d)})
    return tensors, diffs


def _tucker(t):
    """LoKr with a factored w1 and a Tucker w2 (lokr_t2: w2 = w2_aᵀ t2 w2_b), alpha / rank scaling."""
    rng = np.random.default_rng(31)
    tensors, kron = {}, {}
    for tg in ("layers.0.attention.to_v", "layers.1.feed_forward.w3"):
        o, i = linear(t.tr, tg).weight.shape
        w1a, w1b = rng.standard_normal((4, 2)).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32)
        t2 = rng.standard_normal((2, 2)).astype(np.float32)
        w2a = rng.standard_normal((2, o // 4)).astype(np.float32)
        w2b = (rng.standard_normal((2, i // 4)) * 0.05).astype(np.float32)
        k = f"lycoris_{tg.replace('.', '_')}"
        tensors.update({f"{k}.lokr_w1_a": w1a, f"{k}.lokr_w1_b": w1b, f"{k}.lokr_t2": t2, f"{k}.lokr_w2_a": w2a,
                        f"{k}.lokr_w2_b": w2b, f"{k}.alpha": np.array(3.0, np.float32)})
        kron[tg] = (w1a @ w1b, w2a.T @ t2 @ w2b, 3.0 / 2, 1.0)
    # a LoKr on ComfyUI's fused qkv: exact, the kron's rows split over to_q/to_k/to_v (ΔW computed once)
    d = linear(t.tr, "layers.1.attention.to_q").weight.shape[0]
    w1 = rng.standard_normal((3, 2)).astype(np.float32)
    w2 = (rng.standard_normal((d, d // 2)) * 0.05).astype(np.float32)
    tensors.update({"lycoris_layers_1_attention_qkv.lokr_w1": w1, "lycoris_layers_1_attention_qkv.lokr_w2": w2})
    rows = np.split(np.kron(w1, w2), 3)
    return tensors, kron, {f"layers.1.attention.to_{p}.weight": (r, 1.0) for p, r in zip("qkv", rows)}


def hand_cases(t):
    lora = random_lora(t.tr, strength=0.2, seed=4)
    deltas, diffs = _deltas(t)
    tucker, kron, qkv_rows = _tucker(t)
    rs = random_lora(t.tr, strength=0.2, seed=5)
    rs_scaled = {k: (a, b, alpha * np.sqrt(a.shape[0])) for k, (a, b, alpha) in rs.items()}  # alpha/√r
    rs_meta = json.loads(peft_metadata(rs)["lora_adapter_metadata"])
    rs_meta["transformer.use_rslora"] = True
    native_ab, ref_ab = _native(t, "ab")
    native_kohya, ref_kohya = _native(t, "kohya")
    return {
        "native-A/B-fused-qkv": (native_ab, None, dict(loras=[ref_ab])),
        "native-kohya": (native_kohya, None, dict(loras=[ref_kohya])),
        "transformer-prefix-with-alpha": (as_ai_toolkit(lora, prefix="transformer."), None, dict(loras=[lora])),
        "transformer-prefix-default": (as_ai_toolkit(lora, prefix="transformer.", adapter=".default"), None,
                                       dict(loras=[lora])),
        "full-deltas": (deltas, None, dict(diffs=diffs)),
        "lokr-tucker-lycoris-names": (tucker, None, dict(kron=kron, diffs=qkv_rows)),
        "rslora-metadata": (as_peft(rs), {"lora_adapter_metadata": json.dumps(rs_meta)}, dict(loras=[rs_scaled])),
    }


@pytest.mark.parametrize("fmt", ["native-A/B-fused-qkv", "native-kohya", "transformer-prefix-with-alpha",
                                 "transformer-prefix-default", "full-deltas", "lokr-tucker-lycoris-names",
                                 "rslora-metadata"])
def test_format_matches_hand_merged(tiny, fmt):
    t = tiny
    tensors, metadata, reference = hand_cases(t)[fmt]
    path = save(t.tmp / f"{fmt.replace('/', '')}.safetensors", tensors, metadata)
    ref = merged_latents(t, **reference)
    t.pipe.load_lora_weights(str(path), adapter_name="hand")
    try:
        got = ours(t)
    finally:
        t.pipe.unload_lora_weights()
    err, moved = rel_err(got, ref), effect(ref, t.base_ref)
    print(f"{fmt}: rel err vs hand-merged {err:.2e}, LoRA moves the latents by {moved:.1%}")
    assert moved >= 0.05 and err <= 1e-4
    np.testing.assert_array_equal(ours(t), t.base)
    assert _no_lora_left(t.pipe)


# ------------------------------------------------------------------------------------ several adapters, switching
def test_two_adapters_weights_and_switching(tiny, monkeypatch):
    t = tiny
    la, lb = random_lora(t.tr, strength=0.2, seed=11), random_lora(t.tr, strength=0.2, seed=12, alpha=3.0)
    fa, fb = save(t.tmp / "a.safetensors", as_kohya(la)), save(t.tmp / "b.safetensors", as_ai_toolkit(lb))
    t.t2i.load_lora_weights(str(fa), adapter_name="a")
    t.t2i.load_lora_weights(str(fb), adapter_name="b")
    assert t.t2i.get_active_adapters() == ["b"]
    t.t2i.set_adapters(["a", "b"], [0.7, -0.4])
    try:
        ref = diffusers_latents(t, t.t2i)
    finally:
        t.t2i.unload_lora_weights()
    loads = []
    monkeypatch.setitem(t.pipe._loaders, "transformer", lambda: loads.append(1))
    try:
        assert t.pipe.load_lora_weights(str(fa), adapter_name="a") == "a"
        assert t.pipe.load_lora_weights(str(fb), adapter_name="b") == "b"
        assert t.pipe.get_active_adapters() == ["b"]                 # the newest, as in diffusers
        t.pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
        got = ours(t)
        t.pipe.set_adapters("a", 0.0)                                # 0 disables: exactly the base model
        np.testing.assert_array_equal(ours(t), t.base)
        assert t.pipe.get_active_adapters() == []
        t.pipe.set_adapters(["a", "b"], [0.7, -0.4])
        again = ours(t)
    finally:
        t.pipe.unload_lora_weights()
    err = rel_err(got, ref)
    print(f"two adapters (0.7, -0.4): rel err vs diffusers {err:.2e}, moved {effect(ref, t.base_ref):.1%}")
    assert err <= 1e-4 and effect(ref, t.base_ref) >= 0.05
    np.testing.assert_array_equal(again, got)
    assert loads == []                                               # switching never reloads the base
    np.testing.assert_array_equal(ours(t), t.base)


def test_lora_before_the_transformer_loads(tiny):
    t = tiny
    lora = random_lora(t.tr, strength=0.2, seed=13)
    path = save(t.tmp / "early.safetensors", as_kohya(lora))
    fresh = ZImagePipeline.from_pretrained(t.root, dtype="float32")
    assert fresh._models["transformer"] is None
    fresh.load_lora_weights(str(path))
    assert fresh._models["transformer"] is None                       # checked against the config, not loaded
    got = ours(t, fresh)
    t.pipe.load_lora_weights(str(path))
    try:
        np.testing.assert_allclose(got, ours(t), rtol=0, atol=1e-6)
    finally:
        t.pipe.unload_lora_weights()
    assert effect(got, t.base) >= 0.05
    assert fresh.loras[0]["file"] == "early.safetensors" and len(fresh.loras[0]["sha256"]) == 64


def test_fuse_and_unfuse(tiny):
    t = tiny
    pipe = ZImagePipeline.from_pretrained(t.root, dtype="float32")   # fuse/unfuse round weights: not the shared one
    path = save(t.tmp / "fuse.safetensors", as_kohya(random_lora(t.tr, strength=0.2, seed=14)))
    pipe.load_lora_weights(str(path), adapter_name="f")
    try:
        pipe.set_adapters("f", 0.8)
        branch = ours(t, pipe)
        pipe.fuse_lora()
        assert not any(isinstance(m, LoRALinear) and any(not b.fused for b in m.branches)
                       for _, m in pipe.transformer.named_modules())
        fused = ours(t, pipe)
        with pytest.raises(ValueError, match="unfuse_lora"):
            pipe.set_adapters("f", 1.0)
        pipe.unfuse_lora()
        unfused = ours(t, pipe)
    finally:
        pipe.unload_lora_weights()
    assert rel_err(fused, branch) <= 1e-5 and effect(branch, t.base) >= 0.05
    # branches back on; unfuse subtracts what fuse added (as diffusers does), so weights agree up to one rounding
    assert rel_err(unfused, branch) <= 1e-5
    assert rel_err(ours(t, pipe), t.base) <= 1e-5
    pipe.load_lora_weights(str(path), adapter_name="f")
    pipe.fuse_lora()
    pipe.unload_lora_weights()                     # unloading a fused LoRA unfuses it first
    assert rel_err(ours(t, pipe), t.base) <= 1e-5 and _no_lora_left(pipe)


# ------------------------------------------------------------------------------------ quantized layers
class ExactBranch(nn.Module):
    """The reference: a quantized layer's own output plus the exact float ΔW·x (built here, not by lora.py)."""

    def __init__(self, base, delta):
        super().__init__()
        self.base = base
        self.delta = delta

    @property
    def weight(self):   # the timestep embedder reads its first layer's dtype
        return self.base.weight

    def __call__(self, x):
        return self.base(x) + x @ self.delta.T


def _layer_deltas(layers: dict, lora: dict) -> dict:
    """{layer path: ΔW} of a LoRA given per diffusers target; a target inside a fused layer of the pipeline's
    transformer (to_q in to_qkv, w1 in w13) fills its rows of that layer's ΔW (zeros elsewhere)."""
    out = {}
    for tg, (a, b, alpha) in lora.items():
        delta = alpha / a.shape[0] * (b @ a)
        stem, _, proj = tg.rpartition(".")
        fused = [(f, parts) for f, parts in FUSED_PROJECTIONS.items() if proj in parts and f"{stem}.{f}" in layers]
        if not fused:
            out[tg] = delta
            continue
        name, parts = fused[0]
        n = delta.shape[0]
        full = out.setdefault(f"{stem}.{name}", np.zeros((n * len(parts), delta.shape[1]), np.float32))
        i = parts.index(proj)
        full[i * n:(i + 1) * n] += delta
    return out


def _quantized_pipe(t, bits):
    from zimage_mlx.loading.quantize import should_quantize

    pipe = ZImagePipeline.from_pretrained(t.root, dtype="float32", fused_projections=True)
    nn.quantize(pipe.transformer, group_size=32, bits=bits, class_predicate=lambda p, m: should_quantize(p, m, 32))
    return pipe


def _swap(model, target, new):
    *parent, last = target.split(".")
    obj = model
    for p in parent:
        obj = obj[int(p)] if isinstance(obj, list) else obj[p]
    if isinstance(obj, list):
        obj[int(last)] = new
    else:
        obj[last] = new


def _cos_ratio(e, ref):
    e, ref = e.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    return float(e @ ref / np.linalg.norm(e) / np.linalg.norm(ref)), float(np.linalg.norm(e) / np.linalg.norm(ref))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_keeps_the_full_effect(tiny, bits):
    t = tiny
    lora = random_lora(t.tr, strength=0.2, seed=15)
    path = save(t.tmp / "q.safetensors", as_kohya(lora))
    pipe = _quantized_pipe(t, bits)
    model = pipe.transformer
    assert sum(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()) >= 15
    base = ours(t, pipe)
    pipe.load_lora_weights(str(path))
    with_lora = ours(t, pipe)
    assert isinstance(pipe.transformer.layers[0].attention.to_qkv.base, nn.QuantizedLinear)
    with pytest.raises(ValueError, match="quantized"):
        pipe.fuse_lora()
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(ours(t, pipe), base)

    layers = dict(model.named_modules())
    deltas = _layer_deltas(layers, lora)
    for path, delta in deltas.items():                            # the exact run-time branch, by hand
        _swap(model, path, ExactBranch(layers[path], mx.array(delta)))
    exact = ours(t, pipe)
    cos, ratio = _cos_ratio(with_lora - base, exact - base)
    print(f"{bits}-bit: LoRA effect vs exact branch: cosine {cos:.5f}, norm ratio {ratio:.4f}; "
          f"effect {effect(exact, base):.1%}")
    assert effect(exact, base) >= 0.05
    assert cos >= 0.999 and 0.99 <= ratio <= 1.01

    if bits == 4:   # baking the LoRA into the weights and re-quantizing at 4 bits loses it
        for path, delta in deltas.items():
            q = layers[path]
            _swap(model, path, q)
            if isinstance(q, nn.QuantizedLinear):
                w = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)
                q.weight, q.scales, q.biases = mx.quantize(w + mx.array(delta), q.group_size, q.bits)
            else:
                q.weight = q.weight + mx.array(delta)
        baked = ours(t, pipe)
        cos_b, ratio_b = _cos_ratio(baked - base, exact - base)
        print(f"4-bit bake + requantize: cosine {cos_b:.4f}, norm ratio {ratio_b:.3f}")
        assert cos_b < 0.999 or not 0.99 <= ratio_b <= 1.01


def test_full_delta_on_a_quantized_fused_layer(tiny):
    """A `.diff` on ComfyUI's fused qkv over the pipeline's quantized to_qkv: a dense side branch on its rows,
    equal to the exact ΔW·x added by hand."""
    t = tiny
    tensors, diffs = _deltas(t)
    path = save(t.tmp / "qkv-diff.safetensors", {k: v for k, v in tensors.items() if ".qkv." in k})
    pipe = _quantized_pipe(t, 8)
    model = pipe.transformer
    assert isinstance(model.layers[1].attention.to_qkv, nn.QuantizedLinear)
    base = ours(t, pipe)
    pipe.load_lora_weights(str(path))
    got = ours(t, pipe)
    pipe.unload_lora_weights()
    delta = np.concatenate([diffs[f"layers.1.attention.to_{p}.weight"][0] for p in "qkv"])
    _swap(model, "layers.1.attention.to_qkv", ExactBranch(model.layers[1].attention.to_qkv, mx.array(delta)))
    exact = ours(t, pipe)
    err = rel_err(got, exact)
    print(f"qkv .diff on a quantized to_qkv: rel err vs exact {err:.2e}, effect {effect(exact, base):.1%}")
    assert effect(exact, base) >= 0.01 and err <= 1e-5


def test_branch_keeps_the_activation_dtype():
    layer = nn.Linear(64, 32)
    layer.set_dtype(mx.bfloat16)
    model = _Toy(layer)
    a = mx.random.normal((4, 64))
    b = mx.random.normal((32, 4))
    st = LoRAState()
    st.attach(model)
    st.add(load_adapter({"lin.lora_A.weight": a, "lin.lora_B.weight": b}, model, mx.float32, "x"))
    y = model.lin(mx.random.normal((2, 64)).astype(mx.bfloat16))
    assert y.dtype == mx.bfloat16 and model.lin.branches[0].patch.down.dtype == mx.bfloat16


class _Toy(nn.Module):
    """A model with one linear, or with q/k/v fused into one `attention.to_qkv` (as the pipeline's transformer)."""

    def __init__(self, lin=None, fused_dim=None):
        super().__init__()
        if lin is not None:
            self.lin = lin
        if fused_dim:
            self.attention = nn.Module()
            self.attention.to_qkv = nn.Linear(fused_dim, 3 * fused_dim, bias=False)

    @property
    def dtype(self):
        return mx.bfloat16 if "lin" in self and self.lin.weight.dtype == mx.bfloat16 else mx.float32

    def sanitize(self, weights):
        return weights


def test_per_projection_lora_on_a_fused_qkv_layer():
    """A layer computing q, k, v in one matmul still takes a LoRA per projection, on its output rows."""
    d = 16
    model = _Toy(fused_dim=d)
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    state = {f"attention.to_{p}.lora_{ab}.weight": rng.standard_normal(s).astype(np.float32)
             for p in "qv" for ab, s in (("A", (2, d)), ("B", (d, 2)))}
    st = LoRAState()
    st.attach(model)
    w = np.array(model.attention.to_qkv.weight)
    st.add(load_adapter(state, model, mx.float32, "x"))
    x = rng.standard_normal((3, d)).astype(np.float32)
    got = np.array(model.attention.to_qkv(mx.array(x)))
    ref = x @ w.T
    for i, p in enumerate("qkv"):
        if p in "qv":
            ref[:, i * d:(i + 1) * d] += x @ (state[f"attention.to_{p}.lora_B.weight"]
                                              @ state[f"attention.to_{p}.lora_A.weight"]).T
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ bad inputs
def _flux(t):
    return {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": np.zeros((4, 96), np.float32)}


def _bad_cases(t):
    a, b = np.ones((4, 96), np.float32), np.ones((96, 4), np.float32)
    unmatched = {f"diffusion_model.layers.0.attention.to_z{i}.lora_A.weight": a for i in range(7)}
    unmatched.update({f"diffusion_model.layers.0.attention.to_z{i}.lora_B.weight": b for i in range(7)})
    return {
        "flux": (_flux(t), "for FLUX"),
        "sdxl": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": a}, "Stable Diffusion"),
        "qwen-image": ({"transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight": a}, "Qwen-Image"),
        "text-encoder": ({"text_encoder.layers.0.self_attn.q_proj.lora_A.weight": a}, "text encoder"),
        "unmatched": (unmatched, r"14 key\(s\) match no layer.*to_z0.lora_A.weight.*\(and 9 more\)"),
        "rank-mismatch": ({"layers.0.attention.to_q.lora_A.weight": a,
                           "layers.0.attention.to_q.lora_B.weight": np.ones((96, 3), np.float32)}, "rank mismatch"),
        "wrong-shape": ({"layers.0.feed_forward.w2.lora_A.weight": a, "layers.0.feed_forward.w2.lora_B.weight": b},
                        r"shape \(96, 96\).*\(96, 256\)"),
        "A-without-B": ({"layers.0.attention.to_q.lora_A.weight": a}, "no matching lora_B"),
        "dora": ({"layers.0.attention.to_q.lora_A.weight": a, "layers.0.attention.to_q.lora_B.weight": b,
                  "layers.0.attention.to_q.dora_scale": np.ones((96, 1), np.float32)}, "DoRA"),
        "lokr-on-wrong-shape": ({"layers.0.attention.to_q.lokr_w1": np.ones((4, 4), np.float32),
                                 "layers.0.attention.to_q.lokr_w2": np.ones((24, 20), np.float32)}, "does not fit"),
        "integer-tensor": ({"layers.0.attention.to_q.lora_A.weight": a.astype(np.int32),
                            "layers.0.attention.to_q.lora_B.weight": b}, "floating-point"),
    }


@pytest.mark.parametrize("case", ["flux", "sdxl", "qwen-image", "text-encoder", "unmatched", "rank-mismatch",
                                  "wrong-shape", "A-without-B", "dora", "lokr-on-wrong-shape", "integer-tensor",
                                  "pickle", "pickle-renamed", "truncated", "not-found", "hub-offline"])
def test_bad_lora_is_one_clear_error_and_changes_nothing(tiny, case, monkeypatch):
    t = tiny
    pipe = t.pipe
    good = save(t.tmp / "good.safetensors", as_kohya(random_lora(t.tr, strength=0.2, seed=16)))
    pipe.load_lora_weights(str(good), adapter_name="good")
    before = {k: np.array(v) for k, v in tree_flatten(pipe.transformer.parameters())}
    wrapped = sorted(p for p, m in pipe.transformer.named_modules() if isinstance(m, LoRALinear))
    if case in ("pickle", "pickle-renamed"):
        path = t.tmp / ("lora.ckpt" if case == "pickle" else "lora.safetensors")
        torch.save({"layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 96)}, path)
        src, match = str(path), "pickle"
        monkeypatch.setattr("pickle.load", lambda *a, **k: pytest.fail("unpickled"))
    elif case == "truncated":
        path = save(t.tmp / "trunc.safetensors", as_kohya(random_lora(t.tr, seed=17)))
        path.write_bytes(path.read_bytes()[:-100])
        src, match = str(path), "truncated or corrupt"
    elif case == "not-found":
        src, match = str(t.tmp / "missing.safetensors"), "not found"
    elif case == "hub-offline":
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(t.tmp / "empty-hub-cache"))
        src, match = "someone/some-lora/lora.safetensors", "not in the local Hugging Face cache"
    else:
        tensors, match = _bad_cases(t)[case]
        src = str(save(t.tmp / f"bad-{case}.safetensors", tensors))
    try:
        with pytest.raises(WeightError if case == "hub-offline" else LoRAError, match=match) as e:
            pipe.load_lora_weights(src, adapter_name="bad")
        print(f"{case}: {e.value}")
        assert "\n" not in str(e.value)
        assert list(pipe._lora.adapters) == ["good"]
        assert sorted(p for p, m in pipe.transformer.named_modules() if isinstance(m, LoRALinear)) == wrapped
        after = dict(tree_flatten(pipe.transformer.parameters()))
        assert all(np.array_equal(before[k], np.array(after[k])) for k in before)
    finally:
        pipe.unload_lora_weights()


def test_api_errors(tiny):
    t = tiny
    path = save(t.tmp / "api.safetensors", as_kohya(random_lora(t.tr, targets=TARGETS[:2], seed=18)))
    t.pipe.load_lora_weights(str(path), adapter_name="one")
    try:
        with pytest.raises(ValueError, match="already in use"):
            t.pipe.load_lora_weights(str(path), adapter_name="one")
        with pytest.raises(ValueError, match="no adapter named 'two'"):
            t.pipe.set_adapters(["one", "two"], [1.0, 1.0])
        with pytest.raises(ValueError, match="2 adapter weights for 1 adapters"):
            t.pipe.set_adapters(["one"], [1.0, 0.5])
    finally:
        t.pipe.unload_lora_weights()


def test_hub_file_from_the_cache_offline(tmp_path, monkeypatch):
    """`owner/repo/file.safetensors` resolves through huggingface_hub (here: its cache, offline)."""
    snap = tmp_path / "models--someone--z-lora" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    save(snap / "style.safetensors", {"x": np.zeros(2, np.float32)})
    (tmp_path / "models--someone--z-lora" / "refs").mkdir()
    (tmp_path / "models--someone--z-lora" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert resolve_file("someone/z-lora/style.safetensors").resolve() == (snap / "style.safetensors").resolve()
    local = tmp_path / "x.safetensors"
    assert resolve_file(str(local)) == local


def test_safetensors_header_starting_like_a_pickle_is_read(tmp_path):
    """A header length whose first byte is 0x80 must not be taken for a pickle."""
    from zimage_mlx.lora.formats import read_lora

    for pad in range(0, 300):
        path = save(tmp_path / "h.safetensors", {"a" * (pad + 1): np.zeros(1, np.float32)})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    tensors, _, sha = read_lora(path)
    assert list(tensors) == ["a" * (pad + 1)] and len(sha) == 64
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80


# ------------------------------------------------------------------------------------ CLI
def test_cli_lora_option_png_metadata_and_info(tiny, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from zimage_mlx.apps.cli import cli, generate
    from zimage_mlx.apps.pngfile import read_png_params

    t = tiny
    fa = save(tmp_path / "style.safetensors", as_kohya(random_lora(t.tr, strength=0.2, seed=19)))
    fb = save(tmp_path / "detail.safetensors", as_ai_toolkit(random_lora(t.tr, strength=0.2, seed=20)))
    common = ["a fox", "--seed", "3", "-m", str(t.root), "--quantize", "none", "--dtype", "float32", "--steps", "2",
              "-W", "64", "-H", "48", "--quiet"]
    r = CliRunner().invoke(generate, [*common, "--lora", f"{fa}:0.7", "--lora", f"{fb}:-0.4",
                                      "-o", str(tmp_path / "lora.png")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    plain = CliRunner().invoke(generate, [*common, "-o", str(tmp_path / "plain.png")])
    assert plain.exit_code == 0, plain.output
    import hashlib
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in (fa, fb)}
    expected = f"style.safetensors:0.7 (sha256 {sha[fa]}), detail.safetensors:-0.4 (sha256 {sha[fb]})"
    assert read_png_params(tmp_path / "lora.png")["loras"] == expected
    assert "loras" not in read_png_params(tmp_path / "plain.png")
    with Image.open(tmp_path / "lora.png") as a, Image.open(tmp_path / "plain.png") as b:
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() > 1   # the LoRAs changed it
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "lora.png")])
    assert info.exit_code == 0 and f"loras: {expected}" in info.stdout

    bad = CliRunner().invoke(generate, [*common, "--lora", str(tmp_path / "nope.safetensors"),
                                        "-o", str(tmp_path / "bad.png")])
    assert bad.exit_code == 2 and "no such file" in bad.output and len(bad.output.strip().splitlines()) == 1
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    bad = CliRunner().invoke(generate, [*common, "--lora", f"{empty}:0.5", "-o", str(tmp_path / "bad.png")])
    assert bad.exit_code == 1 and "empty.safetensors" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "bad.png").exists()
    nan = CliRunner().invoke(generate, [*common, "--lora", f"{fa}:nan", "-o", str(tmp_path / "nan.png")])
    assert nan.exit_code == 2 and "finite" in nan.output
