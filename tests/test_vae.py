"""FLUX VAE: parity with diffusers' AutoencoderKL (both checkpoint layouts), tiled decode, loading errors."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.torch import load_file, save_file

from conftest import rel_err, to_numpy
from make_vae import make_tiny_vae, save_tiny_vae, save_tiny_vae_ldm
from zimage_mlx.loading.components import load_component
from zimage_mlx.loading.single_files import vae_config_from_shapes
from zimage_mlx.models import vae_blocks, vae_tiling
from zimage_mlx.models.vae import AutoencoderKL, VAEConfig, largest_decoder_activation
from zimage_mlx.loading.weights import safetensors_keys
from zimage_mlx.loading.weights import WeightError

SCALE, SHIFT = 0.3611, 0.1159


@pytest.fixture(scope="module")
def oracle():
    return make_tiny_vae(seed=3)


@pytest.fixture(scope="module")
def paths(oracle, tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    save_tiny_vae(d / "diffusers", oracle)
    save_tiny_vae_ldm(d / "ae.safetensors", oracle)
    save_tiny_vae_ldm(d / "aio.safetensors", oracle, prefix="first_stage_model.")
    return d


@pytest.fixture(scope="module", params=["diffusers", "ldm", "ldm_prefixed"])
def vae(request, oracle, paths):
    if request.param == "diffusers":
        return load_component("vae", paths / "diffusers")
    name = "ae.safetensors" if request.param == "ldm" else "aio.safetensors"
    return load_component("vae", paths / name, config=dict(oracle.config))


def _latents(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_decode_parity(vae, oracle):
    lat = _latents((2, 16, 6, 5))
    with torch.no_grad():
        ref = oracle.decode(lat / SCALE + SHIFT).sample.permute(0, 2, 3, 1).numpy()
    out = vae.decode(lat.numpy(), tile=None)
    assert out.dtype == mx.float32 and out.shape == ref.shape
    assert rel_err(to_numpy(out), ref) <= 1e-4
    assert rel_err(to_numpy(vae.decode(mx.array(lat.numpy()), tile=None)), ref) <= 1e-4  # mx input too


def test_encode_parity(vae, oracle):
    img = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = oracle.encode(img).latent_dist
        mean = ((dist.mean - SHIFT) * SCALE).numpy()
        sample = ((dist.sample(torch.Generator().manual_seed(7)) - SHIFT) * SCALE).numpy()
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(7)).numpy()
    x = img.permute(0, 2, 3, 1).numpy()
    assert rel_err(to_numpy(vae.encode(x)), mean) <= 1e-4
    assert rel_err(to_numpy(vae.encode(x, noise=eps)), sample) <= 1e-4


def test_encode_seeded_sample(vae):
    x = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    mean = np.array(vae.encode(x))
    a, b = np.array(vae.encode(x, seed=5)), np.array(vae.encode(x, seed=5))
    c = np.array(vae.encode(x, key=mx.random.key(6)))
    assert a.shape == mean.shape == (1, 16, 4, 4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - mean).max() > 1e-3 and np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize("checkpoint_bytes", [None, 0, 20_000])
def test_tiled_decode_matches_untiled(oracle, paths, checkpoint_bytes):
    vae = load_component("vae", paths / "diffusers")
    lat = _latents((2, 16, 14, 9), seed=2).numpy()  # images 112 x 72: 8-row strips -> 14 strips at full size
    full = np.array(vae.decode(lat, tile=None))
    tiled = np.array(vae.decode(lat, tile=8, checkpoint_bytes=checkpoint_bytes))
    assert tiled.shape == full.shape == (2, 112, 72, 3)
    assert np.abs(tiled - full).max() <= 1e-4  # bound: 2/255; float32 rounding only
    with torch.no_grad():
        ref = oracle.decode(torch.from_numpy(lat) / SCALE + SHIFT).sample.permute(0, 2, 3, 1).numpy()
    assert rel_err(tiled, ref) <= 1e-4


@pytest.mark.parametrize("tile", [1, 3])
def test_whole_activation_tiled_decode_matches_untiled(oracle, paths, monkeypatch, tile):
    """The default tiled decode (whole activations, strip convolutions); tile=1: several strips at every stage. The
    latents ramp from +2 (top) to -2 (bottom) so that statistics of a strip instead of the whole image, or a wrong
    halo row, would be far off."""
    vae = load_component("vae", paths / "diffusers")
    lat = _latents((2, 16, 14, 9), seed=6) + torch.linspace(2, -2, 14)[:, None]
    strips = []
    real = vae_tiling._WholeDecoder._strips
    monkeypatch.setattr(vae_tiling._WholeDecoder, "_strips",
                        lambda self, *a: strips.append(real(self, *a)) or strips[-1])
    tiled = np.array(vae.decode(lat.numpy(), tile=tile))
    assert len(strips) > 10 and len(strips[-1]) > 1  # every convolution; the last at full size
    assert tile != 1 or all(len(s) > 1 for s in strips)
    full = np.array(vae.decode(lat.numpy(), tile=None))
    assert tiled.shape == full.shape == (2, 112, 72, 3)
    assert np.abs(tiled - full).max() <= 1e-4
    with torch.no_grad():
        ref = oracle.decode(lat / SCALE + SHIFT).sample.permute(0, 2, 3, 1).numpy()
    assert rel_err(tiled, ref) <= 1e-4


@pytest.mark.parametrize("up", [False, True])
def test_strip_convolution_matches_conv2d(up):
    """A 3x3 conv (after a nearest 2x upsample when `up`) computed in row strips with one halo row each side,
    concatenated, is the whole-image convolution."""
    x = mx.random.normal((2, 7, 5, 6), key=mx.random.key(1))
    conv = vae_blocks.Upsample2D(4).conv if up else nn.Conv2d(6, 4, 3, padding=1)
    conv.update({"weight": mx.random.normal((4, 3, 3, 6), key=mx.random.key(2)),
                 "bias": mx.random.normal((4,), key=mx.random.key(3))})
    ref = conv(vae_blocks.upsample_nearest(x) if up else x)
    taps = vae_tiling._up_taps(conv) if up else vae_tiling._conv_taps(conv)
    strip = vae_tiling._upconv_strip if up else vae_tiling._conv3x3_strip
    parts = [strip(x[:, max(a - 1, 0) : min(b + 1, 7)], taps, conv.bias, a == 0, b == 7)
             for a, b in ((0, 1), (1, 4), (4, 7))]
    out = mx.concatenate(parts, axis=1)
    assert out.shape == ref.shape
    assert np.abs(np.array(out) - np.array(ref)).max() <= 1e-5


def test_checkpoint_bytes_below_the_largest_activation_recomputes_strips(paths, monkeypatch):
    """`checkpoint_bytes` is the largest activation the tiled decode may keep whole: below it, the recomputing
    strip decoder runs (its agreement with the untiled decode: test_tiled_decode_matches_untiled)."""
    vae = load_component("vae", paths / "diffusers")
    lat = _latents((1, 16, 6, 5), seed=8).numpy()
    largest = largest_decoder_activation(vae.config.block_out_channels, 1, 6, 5, 4)
    assert largest == 32 * 48 * 40 * 4  # the last up block's input: the 32 channels before it, at full size
    used = []
    for cls in (vae_tiling._WholeDecoder, vae_tiling._StripDecoder):
        real = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, x, real=real, cls=cls: used.append(cls) or real(self, x))
    vae.decode(lat, tile=8, checkpoint_bytes=largest)
    vae.decode(lat, tile=8, checkpoint_bytes=largest - 1)
    assert used == [vae_tiling._WholeDecoder, vae_tiling._StripDecoder]


def test_auto_tiling_is_used_for_large_images(paths, monkeypatch):
    """"auto" tiles above 64² on MLX's CPU backend (faster there from 128² up, a tenth of the activations at 256²)
    and above 256² on a GPU; the memory plan's decode estimate follows the same rule."""
    from zimage_mlx import memory

    assert vae_tiling.auto_tile(64, 64, cpu=True) is None and vae_tiling.auto_tile(128, 128, cpu=True) == 256
    assert vae_tiling.auto_tile(256, 256, cpu=False) is None and vae_tiling.auto_tile(320, 288, cpu=False) == 113
    cfg = {"block_out_channels": [128, 256, 512, 512]}
    cpu, gpu = (memory.vae_decode_activation_bytes(cfg, 256, 256, mx.float32, cpu=c) for c in (True, False))
    assert 0.2 * 2**30 < cpu < 0.25 * 2**30 < 2.3 * 2**30 < gpu < 2.5 * 2**30    # measured 0.21 / 2.39 GiB
    vae = load_component("vae", paths / "diffusers")
    used = []
    for cls in (vae_tiling._WholeDecoder, vae_tiling._StripDecoder):
        real = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, x, real=real, cls=cls: used.append(cls) or real(self, x))
    for shape, tiled in (((1, 16, 40, 36), True),     # 320 x 288 image: tiled on either backend
                         ((1, 16, 16, 16), True),     # 128², tiled on the CPU (these tests' backend)
                         ((1, 16, 8, 8), False)):     # 64², untiled
        lat = _latents(shape, seed=4).numpy()
        used.clear()
        auto = np.array(vae.decode(lat))
        assert used == ([vae_tiling._WholeDecoder] if tiled else []), shape
        assert np.abs(auto - np.array(vae.decode(lat, tile=None))).max() <= 1e-4


def test_real_config_structure():
    cfg = VAEConfig.from_dict({"block_out_channels": [128, 256, 512, 512], "_class_name": "AutoencoderKL", "x": 1})
    params = dict(tree_flatten(AutoencoderKL(cfg).parameters()))
    assert len(params) == 244
    assert sum(v.size for v in params.values()) == 83_819_683
    assert params["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"].shape == (256, 1, 1, 512)
    assert params["decoder.mid_block.attentions.0.to_out.0.weight"].shape == (512, 512)
    assert params["encoder.conv_out.weight"].shape == (32, 3, 3, 512)


def test_missing_tensor_error(paths, tmp_path):
    sd = load_file(str(paths / "ae.safetensors"))
    del sd["decoder.up.0.block.1.norm2.weight"]
    save_file(sd, str(tmp_path / "ae.safetensors"))
    cfg = dict(load_component("vae", paths / "diffusers").config.__dict__)
    # reversed index: LDM up.0 is the last diffusers up block
    n = len(cfg["block_out_channels"])
    with pytest.raises(WeightError, match=rf"decoder\.up_blocks\.{n - 1}\.resnets\.1\.norm2\.weight"):
        load_component("vae", tmp_path / "ae.safetensors", config=cfg)


def test_wrong_shape_error(paths, tmp_path):
    d = tmp_path / "vae"
    d.mkdir()
    (d / "config.json").write_text((paths / "diffusers" / "config.json").read_text())
    sd = load_file(str(paths / "diffusers" / "diffusion_pytorch_model.safetensors"))
    sd["encoder.conv_in.bias"] = torch.zeros(7)
    save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightError, match=r"encoder\.conv_in\.bias.*\(7,\)"):
        load_component("vae", d)


@pytest.mark.parametrize("ldm", [True, False])
def test_single_file_config_from_shapes(tmp_path, ldm):
    """A single-file VAE that is not FLUX's (2 blocks of 32/64 channels, 1 layer each) gets its config from its
    tensor shapes and decodes like the oracle."""
    oracle = make_tiny_vae(seed=7, block_out_channels=(32, 64), norm_num_groups=32)
    if ldm:
        save_tiny_vae_ldm(tmp_path / "ae.safetensors", oracle)
        path = tmp_path / "ae.safetensors"
    else:
        save_tiny_vae(tmp_path, oracle)
        path = next(tmp_path.glob("*.safetensors"))
    cfg = vae_config_from_shapes({k: s for k, (s, _) in safetensors_keys(path).items()})
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels",
                "norm_num_groups", "mid_block_add_attention"):
        assert np.array_equal(cfg[key], oracle.config[key]), key
    model = load_component("vae", path, mx.float32, config=cfg)
    z = _latents((1, 16, 8, 8))
    with torch.no_grad():
        ref = oracle.decode(z / SCALE + SHIFT).sample.permute(0, 2, 3, 1).numpy()
    assert rel_err(to_numpy(model.decode(z.numpy(), tile=None)), ref) < 1e-4


def test_single_file_config_that_cannot_be_inferred_names_the_option(paths):
    """The tiny VAE uses 8 groups: not inferable from shapes, so the error says to pass --vae-config."""
    with pytest.raises(WeightError, match="--vae-config"):
        vae_config_from_shapes({k: s for k, (s, _) in safetensors_keys(paths / "ae.safetensors").items()})


def test_single_file_without_config_is_refused(paths):
    with pytest.raises(WeightError, match="config"):
        load_component("vae", paths / "ae.safetensors")


def test_tiled_decode_memory(tmp_path, monkeypatch):
    """Doubling the side quadruples an untiled decode's activations. The default tiled decode keeps whole
    activations but no convolution temporaries of the whole image: under 2.5x the largest activation. With a
    `checkpoint_bytes` below that, the recomputing strip decoder's memory grows ~2x (the strip is full-width), so
    large images (2048², 4096²) stay bounded by the strip, not the area."""
    save_tiny_vae(tmp_path, make_tiny_vae(seed=5, block_out_channels=(8, 8, 8, 8), norm_num_groups=4))
    model = load_component("vae", tmp_path)
    attention = vae_blocks.Attention.__call__  # at most 1 MB of scores (not 67 MB): the convolutions' memory shows
    monkeypatch.setattr(vae_blocks.Attention, "__call__", lambda self, x: attention(self, x, max_score_elems=1 << 18))

    def peak(px, tile, checkpoint_bytes=1 << 20):
        z = mx.random.normal((1, 16, px // 8, px // 8), key=mx.random.key(0))
        mx.eval(z)
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(model.decode(z, tile=tile, checkpoint_bytes=checkpoint_bytes))
        return mx.get_peak_memory() - base

    tiled_256, tiled_512, untiled_512 = peak(256, 64), peak(512, 64), peak(512, None)
    whole_512 = peak(512, 16, None)
    largest = largest_decoder_activation(model.config.block_out_channels, 1, 64, 64, 4)
    print(f"decode activations: strip-recompute 256² {tiled_256 / 1e6:.1f} MB, 512² {tiled_512 / 1e6:.1f} MB; "
          f"whole-activation tiled 512² {whole_512 / 1e6:.1f} MB (largest activation {largest / 1e6:.1f} MB); "
          f"untiled 512² {untiled_512 / 1e6:.1f} MB")
    assert tiled_512 < 3 * tiled_256          # area grew 4x
    assert tiled_512 < untiled_512 / 3
    assert whole_512 < 2.5 * largest and whole_512 < untiled_512 / 3
