"""S3-DiT parity against diffusers' ZImageTransformer2DModel on tiny random checkpoints (CPU, fast)."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from conftest import rel_err
from make_transformer import TINY_CONFIG, make_tiny_transformer, save_tiny_transformer
from zimage_mlx.loading.components import load_component
from zimage_mlx.models.transformer import ZImageTransformer, ZImageTransformerConfig
from zimage_mlx.loading.weights import fill_model
from zimage_mlx.loading.weights import WeightError

FP32_TOL = 1e-4
BF16_TOL = 3e-2

# The real Z-Image-Turbo transformer/config.json (docs/architecture.md#model-configurations), with the keys diffusers adds.
REAL_CONFIG = {
    "_class_name": "ZImageTransformer2DModel",
    "_diffusers_version": "0.36.0.dev0",
    "all_f_patch_size": [1],
    "all_patch_size": [2],
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560,
    "dim": 3840,
    "in_channels": 16,
    "n_heads": 30,
    "n_kv_heads": 30,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "siglip_feat_dim": None,
}

# dim 128 / 4 heads -> head_dim 32 (also not a multiple of 64), two refiner layers.
CONFIG_128 = dict(dim=128, n_heads=4, n_kv_heads=4, axes_dims=[8, 12, 12], n_refiner_layers=2)


def mlx_from_torch(tm, dtype=mx.float32):
    weights = {k: mx.array(v.detach().float().numpy()) for k, v in tm.state_dict().items()}
    model = ZImageTransformer(ZImageTransformerConfig.from_dict(dict(tm.config)))
    return fill_model(model, model.sanitize(weights), dtype, "torch state dict")


def make_inputs(seed, batch, h, w, cap_lens, cap_dim):
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((batch, 16, h, w)).astype(np.float32)
    t = rng.uniform(0.05, 0.95, batch).astype(np.float32)  # 1 - sigma
    caps = [rng.standard_normal((n, cap_dim)).astype(np.float32) for n in cap_lens]
    return lat, t, caps


def torch_ref(tm, lat, t, caps, dtype=torch.float32):
    with torch.no_grad():
        out = tm(
            [torch.from_numpy(x)[:, None].to(dtype) for x in lat],
            torch.from_numpy(t),
            [torch.from_numpy(c).to(dtype) for c in caps],
            return_dict=False,
        )[0]
    return np.stack([o[:, 0].float().numpy() for o in out])


def mlx_out(model, lat, t, caps):
    y = model(mx.array(lat), mx.array(t), [mx.array(c) for c in caps])
    assert y.dtype == mx.float32
    return np.array(y)


# (seed, config overrides, batch, latent h, latent w, caption lengths)
CASES = {
    "cap13_img15_nonsquare": (0, {}, 1, 10, 6, [13]),  # 13 caption tokens, 5x3 = 15 image tokens
    "batch2_caps_differ_buckets": (1, {}, 2, 8, 12, [13, 45]),  # padded caption lengths 32 and 64
    "batch2_caps_same_bucket": (0, {}, 2, 12, 8, [7, 20]),  # same padded length, different pad counts
    "no_pad_tokens": (1, {}, 1, 16, 16, [32]),  # 64 image tokens, 32 caption tokens: nothing padded
    "dim128_seed2": (2, CONFIG_128, 2, 6, 14, [50, 3]),
}


@pytest.fixture(scope="module")
def torch_models():
    cache = {}

    def get(seed, overrides):
        key = (seed, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            cache[key] = make_tiny_transformer(seed, **overrides)
        return cache[key]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_diffusers_float32(case, torch_models):
    seed, overrides, batch, h, w, cap_lens = CASES[case]
    tm = torch_models(seed, overrides)
    lat, t, caps = make_inputs(seed + 10, batch, h, w, cap_lens, tm.config.cap_feat_dim)
    ref = torch_ref(tm, lat, t, caps)
    out = mlx_out(mlx_from_torch(tm, mx.float32), lat, t, caps)
    err = rel_err(out, ref)
    print(f"{case}: float32 rel err {err:.2e}")
    assert err <= FP32_TOL


@pytest.mark.parametrize("case", ["batch2_caps_differ_buckets", "batch2_caps_same_bucket"])
def test_prepared_captions_and_compiled_kernels(case, torch_models):
    """The caption path prepared once (and a CFG-style subset of it) and the mx.compile'd elementwise kernels give
    the same velocity as the plain per-call path."""
    seed, overrides, batch, h, w, cap_lens = CASES[case]
    tm = torch_models(seed, overrides)
    lat, t, caps = make_inputs(seed + 10, batch, h, w, cap_lens, tm.config.cap_feat_dim)
    model = mlx_from_torch(tm, mx.float32)
    plain = mlx_out(model, lat, t, caps)
    prepared = model.prepare([mx.array(c) for c in caps], h, w)
    np.testing.assert_array_equal(np.array(model(mx.array(lat), mx.array(t), prepared)), plain)
    second = prepared.select([1])     # a batch of one runs other matmul shapes: equal up to float32 rounding
    assert rel_err(np.array(model(mx.array(lat[1:]), mx.array(t[1:]), second)), plain[1:]) <= 1e-6
    with pytest.raises(ValueError, match="prepared for 2 latents"):
        model(mx.array(lat[:1]), mx.array(t[:1]), prepared)
    model.set_compile(True)
    try:
        compiled = np.array(model(mx.array(lat), mx.array(t), prepared))
    finally:
        model.set_compile(False)
    assert rel_err(compiled, plain) <= 1e-6
    assert rel_err(compiled, torch_ref(tm, lat, t, caps)) <= FP32_TOL


def test_two_cpu_streams_are_bit_identical(torch_models):
    """On the CPU backend attention (halves of the heads) and SwiGLU (halves of the tokens) run on two streams:
    exactly the single-stream result."""
    from zimage_mlx.models import kernels as tr

    seed, overrides, batch, h, w, cap_lens = CASES["batch2_caps_differ_buckets"]
    tm = torch_models(seed, overrides)
    lat, t, caps = make_inputs(seed + 10, batch, h, w, cap_lens, tm.config.cap_feat_dim)
    model = mlx_from_torch(tm, mx.float32)
    assert mx.default_device() == mx.cpu
    split = mlx_out(model, lat, t, caps)
    one_stream = tr.Kernels(swiglu=tr.swiglu, attention=tr.scaled_dot_product_attention)
    for _, m in model.named_modules():
        if hasattr(m, "kernels"):
            m.kernels = one_stream
    np.testing.assert_array_equal(mlx_out(model, lat, t, caps), split)


@pytest.mark.parametrize("bits, dequantize", [(None, False), (4, False), (8, False), (4, True)])
def test_fused_projections(bits, dequantize, torch_models):
    """q/k/v as one `to_qkv` and w1/w3 as one `w13` (float and quantized) give the unfused model's velocity, and a
    quantized fused weight is exactly the quantization of the stacked float weights (group quantization is
    row-wise). The CPU's dequantizing layers (quantize.DequantizingLinear) fuse into one too."""
    from zimage_mlx.loading.quantize import DequantizingLinear, dequantize_matmuls

    seed, overrides, batch, h, w, cap_lens = CASES["dim128_seed2"]
    tm = torch_models(seed, overrides)
    lat, t, caps = make_inputs(seed + 10, batch, h, w, cap_lens, tm.config.cap_feat_dim)
    model = mlx_from_torch(tm, mx.float32)
    att = model.layers[0].attention
    stacked = mx.concatenate([att.to_q.weight, att.to_k.weight, att.to_v.weight])
    if bits:
        nn.quantize(model, group_size=32, bits=bits,
                    class_predicate=lambda p, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 32 == 0)
    if dequantize:
        dequantize_matmuls(model)
    before = mlx_out(model, lat, t, caps)
    cfg = model.config
    assert model.fuse_projections() == 2 * (cfg.n_layers + 2 * cfg.n_refiner_layers)
    assert "to_q" not in att and "w1" not in model.layers[0].feed_forward
    assert "to_qkv" in att and "w13" in model.layers[0].feed_forward
    after = mlx_out(model, lat, t, caps)
    err = rel_err(after, before)
    print(f"bits={bits}: fused vs separate projections, rel diff {err:.1e}")
    assert err <= 1e-6
    if bits:
        assert type(att.to_qkv) is (DequantizingLinear if dequantize else nn.QuantizedLinear)
        for got, want in zip((att.to_qkv.weight, att.to_qkv.scales, att.to_qkv.biases),
                             mx.quantize(stacked, 32, bits)):
            np.testing.assert_array_equal(np.array(got), np.array(want))
    assert model.fuse_projections() == 0       # already fused


def test_rope_is_the_complex_multiply_bit_for_bit():
    """apply_rope's 3-pass form gives exactly diffusers' interleaved complex multiply in float32."""
    from zimage_mlx.models.kernels import apply_rope

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 16)).astype(np.float32)
    ang = rng.uniform(-7, 7, (7, 8)).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    ref = np.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(x.shape)
    out = apply_rope(mx.array(x), mx.array(np.repeat(cos, 2, -1)), mx.array(np.stack([-sin, sin], -1).reshape(7, 16)))
    np.testing.assert_array_equal(np.array(out), ref)


@pytest.mark.parametrize("case", ["cap13_img15_nonsquare", "batch2_caps_differ_buckets", "dim128_seed2"])
def test_forward_bfloat16_close_to_float32_reference(case, torch_models):
    seed, overrides, batch, h, w, cap_lens = CASES[case]
    tm = torch_models(seed, overrides)
    lat, t, caps = make_inputs(seed + 10, batch, h, w, cap_lens, tm.config.cap_feat_dim)
    ref = torch_ref(tm, lat, t, caps)
    model = mlx_from_torch(tm, mx.bfloat16)
    assert model.dtype == mx.bfloat16
    err = rel_err(mlx_out(model, lat, t, caps), ref)
    print(f"{case}: bfloat16 rel err {err:.2e}")
    assert err <= BF16_TOL


def test_pad_tokens_matter(torch_models):
    """The learned pad tokens are attended: changing them must change the output (guards the padding path)."""
    tm = torch_models(0, {})
    lat, t, caps = make_inputs(3, 1, 10, 6, [13], tm.config.cap_feat_dim)
    model = mlx_from_torch(tm)
    base = mlx_out(model, lat, t, caps)
    model.cap_pad_token = model.cap_pad_token + 1.0
    assert rel_err(mlx_out(model, lat, t, caps), base) > 1e-3
    model = mlx_from_torch(tm)
    model.x_pad_token = model.x_pad_token + 1.0
    assert rel_err(mlx_out(model, lat, t, caps), base) > 1e-3


@pytest.mark.parametrize("shape", [(1, 16, 7, 6), (1, 16, 8, 5), (2, 16, 9, 9)])
def test_odd_latent_size_raises(shape, torch_models):
    model = mlx_from_torch(torch_models(0, {}))
    caps = [mx.zeros((5, 64))] * shape[0]
    with pytest.raises(ValueError, match="multiples of 2"):
        model(mx.zeros(shape), mx.array([0.5] * shape[0]), caps)


def test_bad_inputs_raise(torch_models):
    model = mlx_from_torch(torch_models(0, {}))
    with pytest.raises(ValueError, match="latents must be"):
        model(mx.zeros((1, 4, 8, 8)), mx.array([0.5]), [mx.zeros((5, 64))])
    with pytest.raises(ValueError, match="caption feature arrays"):
        model(mx.zeros((2, 16, 8, 8)), mx.array([0.5, 0.5]), [mx.zeros((5, 64))])
    with pytest.raises(ValueError, match="caption features must be"):
        model(mx.zeros((1, 16, 8, 8)), mx.array([0.5]), [mx.zeros((5, 32))])


def test_config_from_dict_and_real_key_set():
    cfg = ZImageTransformerConfig.from_dict(REAL_CONFIG)
    assert (cfg.dim, cfg.n_heads, cfg.head_dim, cfg.axes_lens) == (3840, 30, 128, [1536, 512, 512])
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        tm = ZImageTransformer2DModel(**{k: v for k, v in REAL_CONFIG.items() if not k.startswith("_")})
    expected = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    model = ZImageTransformer(cfg)  # parameters are lazy: nothing of the 6B model is materialized
    got = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert len(got) == 521
    assert got == expected


@pytest.mark.parametrize("overrides", [{}, CONFIG_128, dict(qk_norm=False)])
def test_tiny_key_set_matches_diffusers(overrides):
    from diffusers import ZImageTransformer2DModel

    cfg = {**TINY_CONFIG, **overrides}
    with torch.device("meta"):
        tm = ZImageTransformer2DModel(**cfg)
    expected = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tree_flatten(ZImageTransformer(ZImageTransformerConfig.from_dict(cfg)).parameters())}
    assert got == expected


def test_sanitize_identity_and_comfyui_layout(torch_models):
    tm = torch_models(0, {})
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    ident = ZImageTransformer(ZImageTransformerConfig.from_dict(dict(tm.config))).sanitize({k: mx.array(v) for k, v in sd.items()})
    assert set(ident) == set(sd)

    # Build the ComfyUI single-file layout from the diffusers one, then map it back.
    comfy = {"model.diffusion_model.norm_final.weight": mx.ones((96,))}
    for k, v in sd.items():
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q." in k:
            p = k[: -len("to_q.weight")]
            k, v = p + "qkv.weight", np.concatenate([sd[p + "to_q.weight"], sd[p + "to_k.weight"], sd[p + "to_v.weight"]])
        k = k.replace("attention.to_out.0.", "attention.out.").replace("norm_q", "q_norm").replace("norm_k", "k_norm")
        k = k.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        comfy["model.diffusion_model." + k] = mx.array(v)
    assert any(k.endswith("attention.qkv.weight") for k in comfy)
    mapped = ZImageTransformer(ZImageTransformerConfig.from_dict(dict(tm.config))).sanitize(comfy)
    assert set(mapped) == set(sd)
    for k, v in mapped.items():
        np.testing.assert_array_equal(np.array(v), sd[k], err_msg=k)


# ---- loading from HF-layout directories ----


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, torch_models):
    """The tiny model (dim 128 config) saved as fp32 shards and as bf16 shards."""
    tm = torch_models(2, CONFIG_128)
    root = tmp_path_factory.mktemp("dit")
    fp32 = save_tiny_transformer(root / "fp32", tm, torch.float32, shard=True)
    bf16 = save_tiny_transformer(root / "bf16", tm, torch.bfloat16, shard=True)
    single = save_tiny_transformer(root / "single", tm, torch.float32, shard=False)
    return tm, fp32, bf16, single


def _case_inputs(tm):
    return make_inputs(7, 2, 10, 6, [13, 40], tm.config.cap_feat_dim)


def test_load_fp32_shards(ckpt):
    tm, fp32, _, single = ckpt
    assert len(list(fp32.glob("*.safetensors"))) >= 2
    assert not (single / "diffusion_pytorch_model.safetensors.index.json").exists()
    lat, t, caps = _case_inputs(tm)
    ref = torch_ref(tm, lat, t, caps)
    for d in (fp32, single):
        model = load_component("transformer", d, mx.float32)
        assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
        err = rel_err(mlx_out(model, lat, t, caps), ref)
        print(f"{d.name} -> float32: rel err {err:.2e}")
        assert err <= FP32_TOL
    model = load_component("transformer", fp32, mx.bfloat16)
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(model.parameters()))
    err = rel_err(mlx_out(model, lat, t, caps), ref)
    print(f"fp32 shards -> bfloat16: rel err {err:.2e}")
    assert err <= BF16_TOL


def test_load_bf16_shards(ckpt):
    tm, _, bf16, _ = ckpt
    lat, t, caps = _case_inputs(tm)
    # Reference: the torch model with bf16-rounded weights, computed in float32.
    rounded = make_tiny_transformer(2, **CONFIG_128)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in tm.state_dict().items()})
    ref_rounded = torch_ref(rounded, lat, t, caps)
    assert rel_err(ref_rounded, torch_ref(tm, lat, t, caps)) > 0  # the rounding is visible
    model = load_component("transformer", bf16, mx.float32)
    err = rel_err(mlx_out(model, lat, t, caps), ref_rounded)
    print(f"bf16 shards -> float32: rel err {err:.2e}")
    assert err <= FP32_TOL
    model = load_component("transformer", bf16, mx.bfloat16)
    err = rel_err(mlx_out(model, lat, t, caps), torch_ref(tm, lat, t, caps))
    print(f"bf16 shards -> bfloat16: rel err {err:.2e}")
    assert err <= BF16_TOL


def _rewrite_shard(src, dst, edit):
    """Copy a checkpoint directory, applying edit(dict) to the shard that holds layers.0 tensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    index = json.loads((dst / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"]["layers.0.attention.to_q.weight"]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_missing_tensor_raises_weight_error(ckpt, tmp_path):
    _, fp32, _, _ = ckpt
    key = "layers.0.attention.to_q.weight"
    _rewrite_shard(fp32, tmp_path / "missing", lambda d: d.pop(key))
    with pytest.raises(WeightError) as e:
        load_component("transformer", tmp_path / "missing", mx.float32)
    msg = str(e.value)
    assert key in msg and "(128, 128)" in msg and "missing" in msg


def test_wrong_shape_raises_weight_error(ckpt, tmp_path):
    _, fp32, _, _ = ckpt
    key = "layers.0.attention.to_q.weight"
    _rewrite_shard(fp32, tmp_path / "shape", lambda d: d.__setitem__(key, torch.zeros(128, 96)))
    with pytest.raises(WeightError) as e:
        load_component("transformer", tmp_path / "shape", mx.float32)
    msg = str(e.value)
    assert key in msg and "(128, 96)" in msg and "(128, 128)" in msg


def test_loading_is_lean(tmp_path):
    """fp32 checkpoint -> bf16 model: peak memory stays near one bf16 copy plus one fp32 tensor."""
    tm = make_tiny_transformer(
        5, dim=512, n_heads=4, n_kv_heads=4, axes_dims=[32, 48, 48], n_layers=4, n_refiner_layers=1, cap_feat_dim=256
    )
    save_tiny_transformer(tmp_path, tm, torch.float32, shard=True)
    bf16_bytes = sum(p.numel() for p in tm.parameters()) * 2
    largest_fp32 = max(p.numel() for p in tm.parameters()) * 4
    del tm
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    model = load_component("transformer", tmp_path, mx.bfloat16)
    peak = mx.get_peak_memory() - base
    print(f"load peak {peak / 1e6:.1f} MB; bf16 weights {bf16_bytes / 1e6:.1f} MB, largest fp32 {largest_fp32 / 1e6:.1f} MB")
    assert peak >= bf16_bytes  # the measurement sees the loaded weights
    assert peak <= 1.2 * (bf16_bytes + largest_fp32)  # a non-lazy load holds 3x bf16 (fp32 + bf16 copies)
    # fusing q/k/v and w1/w3 (as the pipeline does after loading) frees each module's parts as it goes: the model
    # keeps one copy, and the peak grows by at most one module's fused weights
    model.fuse_projections()
    active = mx.get_active_memory() - base
    print(f"after fusing: active {active / 1e6:.1f} MB, peak {(mx.get_peak_memory() - base) / 1e6:.1f} MB")
    assert active <= 1.05 * bf16_bytes
    assert mx.get_peak_memory() - base <= 1.2 * (bf16_bytes + largest_fp32)
    del model
