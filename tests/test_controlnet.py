"""ControlNet Union: model parity with diffusers' ZImageControlNetModel (every variant), the "reference" semantics
against a torch reference built from diffusers' blocks following VideoX-Fun's ZImageControlTransformer2DModel.forward,
variant detection, loading, and bad inputs. Pipeline-level parity lives in test_inpaint_control.py."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import rel_err
from make_controlnet import make_tiny_controlnet, save_tiny_controlnet
from make_transformer import make_tiny_transformer, save_tiny_transformer

from zimage_mlx.models.controlnet import ControlConditioning, ControlInput, config_from_weights, load_controlnet
from zimage_mlx.pipeline.control_maps import canny, control_map
from zimage_mlx.loading.components import load_component
from zimage_mlx.loading.weights import WeightError

LAT_H, LAT_W = 8, 6      # 12 image tokens (padded to 32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny transformer and a 2.1 / 2.0 / v1 ControlNet for it, in torch and MLX."""
    root = tmp_path_factory.mktemp("cn")
    tr = make_tiny_transformer(1)
    save_tiny_transformer(root / "transformer", tr)
    out = {"tr": tr, "mlx_tr": load_component("transformer", root / "transformer", mx.float32), "root": root}
    for variant in ("2.1", "2.0", "v1"):
        cn = make_tiny_controlnet(2, variant)
        save_tiny_controlnet(root / variant, cn)
        save_tiny_controlnet(root / f"{variant}.safetensors", cn, single_file=True)
        out[variant] = cn
    return out


def _inputs(control_in_dim, seed=0, caps=(7, 40)):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(len(caps), 16, 1, LAT_H, LAT_W, generator=g)
    ctx = torch.randn(len(caps), control_in_dim, 1, LAT_H, LAT_W, generator=g)
    feats = [torch.randn(n, 64, generator=g) for n in caps]
    return lat, ctx, feats, torch.full((len(caps),), 0.3)


def _mlx_forward(mlx_tr, net, lat, ctx, feats, t, scale, semantics):
    control = ControlConditioning(net, [ControlInput(mx.array(ctx.squeeze(2).numpy()), scale)], semantics)
    out = mlx_tr(mx.array(lat.squeeze(2).numpy()), mx.array(t.numpy()), [mx.array(f.numpy()) for f in feats],
                 control=control)
    return np.array(out)


@pytest.mark.parametrize("variant", ["2.1", "2.0", "v1"])
def test_diffusers_semantics_matches_diffusers(models, variant):
    from diffusers import ZImageControlNetModel

    tr, cn = models["tr"], ZImageControlNetModel.from_transformer(models[variant], models["tr"])
    net = load_controlnet(models["root"] / variant, mx.float32)
    assert net.config.add_control_noise_refiner == cn.config.add_control_noise_refiner
    lat, ctx, feats, t = _inputs(cn.config.control_in_dim)   # two captions of different padded lengths
    with torch.no_grad():
        samples = cn(list(lat.unbind(0)), t, feats, list(ctx.unbind(0)), conditioning_scale=0.75)
        ref = torch.stack(tr(list(lat.unbind(0)), t, feats, controlnet_block_samples=samples)[0]).squeeze(2)
        base = torch.stack(tr(list(lat.unbind(0)), t, feats)[0]).squeeze(2)
    ours = _mlx_forward(models["mlx_tr"], net, lat, ctx, feats, t, 0.75, "diffusers")
    err, moved = rel_err(ours, ref.numpy()), rel_err(ref.numpy(), base.numpy())
    print(f"{variant}: rel err {err:.2e}, hints move the output by {moved:.0%}")
    assert moved >= 0.05 and err <= 1e-4


def _reference_forward(tr, cn, lat, ctx, cap, t, scale):
    """VideoX-Fun's ZImageControlTransformer2DModel.forward (2.1, batch 1) built from the diffusers modules: the
    control noise refiner's hints are added to the main noise refiner; the control layers read the main stream."""
    temb = tr.t_embedder(t * tr.t_scale)
    xs, caps, sizes, x_pos, cap_pos, x_pad, cap_pad = tr.patchify_and_embed([lat], [cap], 2, 1)
    x = tr.all_x_embedder["2-1"](xs[0])
    x[x_pad[0]] = tr.x_pad_token
    c = cn.control_all_x_embedder["2-1"](cn.patchify([ctx], 2, 1)[0])
    c[x_pad[0]] = tr.x_pad_token
    x, c, adaln = x[None], c[None], temb.type_as(x)
    x_freqs = tr.rope_embedder(x_pos[0])[None]
    for layer in cn.control_noise_refiner:
        c = layer(c, x, None, x_freqs, adaln)
    *refiner_hints, c = torch.unbind(c)
    for i, layer in enumerate(tr.noise_refiner):
        x = layer(x, None, x_freqs, adaln)
        if i in cn.control_refiner_layers_places:
            x = x + refiner_hints[cn.control_refiner_layers_places.index(i)] * scale
    cap = tr.cap_embedder(caps[0])
    cap[cap_pad[0]] = tr.cap_pad_token
    # diffusers' position list has the pad ids twice; its forward keeps the first len(cap) rows (1..Lc).
    cap, cap_freqs = cap[None], tr.rope_embedder(cap_pos[0][: len(cap)])[None]
    for layer in tr.context_refiner:
        cap = layer(cap, None, cap_freqs)
    u, freqs = torch.cat([x, cap], 1), torch.cat([x_freqs, cap_freqs], 1)
    cu = torch.cat([c, cap], 1)
    for layer in cn.control_layers:
        cu = layer(cu, u, None, freqs, adaln)
    hints = torch.unbind(cu)[:-1]
    for i, layer in enumerate(tr.layers):
        u = layer(u, None, freqs, adaln)
        if i in cn.control_layers_places:
            u = u + hints[cn.control_layers_places.index(i)] * scale
    u = tr.all_final_layer["2-1"](u, c=adaln)
    return tr.unpatchify(list(u.unbind(0)), sizes, 2, 1)[0]


def test_reference_semantics_matches_videox_fun_forward(models):
    from diffusers import ZImageControlNetModel

    tr, cn = models["tr"], ZImageControlNetModel.from_transformer(models["2.1"], models["tr"])
    net = load_controlnet(models["root"] / "2.1", mx.float32)
    lat, ctx, feats, t = _inputs(33, seed=1, caps=(9,))
    with torch.no_grad():
        ref = _reference_forward(tr, cn, lat[0], ctx[0], feats[0], t, 0.8)[None].squeeze(2).numpy()
        samples = cn(list(lat.unbind(0)), t, feats, list(ctx.unbind(0)), conditioning_scale=0.8)
        diffusers_out = torch.stack(tr(list(lat.unbind(0)), t, feats, controlnet_block_samples=samples)[0])
    ours = _mlx_forward(models["mlx_tr"], net, lat, ctx, feats, t, 0.8, "reference")
    err = rel_err(ours, ref)
    apart = rel_err(diffusers_out.squeeze(2).numpy(), ref)
    print(f"reference semantics: rel err {err:.2e}; diffusers' semantics differ from it by {apart:.1%}")
    assert err <= 1e-4 and apart >= 0.01


def test_several_controls_sum_and_scale_zero_is_the_base_model(models):
    net = load_controlnet(models["root"] / "2.1", mx.float32)
    tr = models["mlx_tr"]
    lat, ctx, feats, t = _inputs(33, seed=2, caps=(5,))
    x, tt, f = mx.array(lat.squeeze(2).numpy()), mx.array(t.numpy()), [mx.array(feats[0].numpy())]
    c1, c2 = mx.array(ctx.squeeze(2).numpy()), mx.array(ctx.squeeze(2).numpy()[:, ::-1].copy())
    base = np.array(tr(x, tt, f))
    zero = np.array(tr(x, tt, f, control=ControlConditioning(net, [ControlInput(c1, 0.0)], "diffusers")))
    np.testing.assert_array_equal(zero, base)
    one = np.array(tr(x, tt, f, control=ControlConditioning(net, [ControlInput(c1, 0.5)], "diffusers")))
    both = np.array(tr(x, tt, f, control=ControlConditioning(net, [ControlInput(c1, 0.5), ControlInput(c2, 0.3)],
                                                                   "diffusers")))
    assert rel_err(both, one) > 0.01   # the second control contributes


def test_variant_detection_from_single_files(models):
    from safetensors.numpy import load_file

    expected = {"2.1": "control_noise_refiner", "2.0": "control_layers", "v1": None}
    for variant, mode in expected.items():
        weights = {k: mx.array(v) for k, v in load_file(str(models["root"] / f"{variant}.safetensors")).items()}
        cfg = config_from_weights(weights, {"control_layers_places": [0, 1]})
        assert cfg.add_control_noise_refiner == mode and cfg.dim == 96 and cfg.n_heads == 2
        assert cfg.control_in_dim == (16 if variant == "v1" else 33)
    # 15 control layers -> every second layer (published 2.1); 3 -> lite [0, 10, 20]
    fake = {"control_all_x_embedder.2-1.weight": mx.zeros((256, 132))}     # (keys and shapes are all it reads)
    fake.update({f"control_layers.{i}.after_proj.weight": mx.zeros((1,)) for i in range(15)})
    assert config_from_weights(fake).control_layers_places == list(range(0, 30, 2))
    lite = {k: v for k, v in fake.items() if not k.startswith("control_layers.") or int(k.split(".")[1]) < 3}
    lite["control_noise_refiner.0.before_proj.weight"] = mx.ones((4, 4))
    lite["control_noise_refiner.1.after_proj.weight"] = mx.ones((4, 4))
    cfg = config_from_weights(lite)
    assert cfg.control_layers_places == [0, 10, 20] and cfg.variant == "2.1-lite"
    # an all-zero before_proj (never trained) is a 2.0 file
    lite["control_noise_refiner.0.before_proj.weight"] = mx.zeros((4, 4))
    assert config_from_weights(lite).add_control_noise_refiner == "control_layers"
    with pytest.raises(WeightError, match="5 control layers match no published"):
        config_from_weights({k: v for k, v in fake.items() if not k.startswith("control_layers.")
                             or int(k.split(".")[1]) < 5})


def test_single_file_loads_like_the_directory(models):
    a = load_controlnet(models["root"] / "2.1", mx.float32)
    b = load_controlnet(models["root"] / "2.1.safetensors", mx.float32,
                        config={"control_layers_places": [0, 1], "control_refiner_layers_places": [0],
                                "n_refiner_layers": 1})
    assert a.config == b.config
    w = b.control_layers[1].after_proj.weight
    np.testing.assert_array_equal(np.array(a.control_layers[1].after_proj.weight), np.array(w))


def test_bad_controlnet_files(models, tmp_path):
    from safetensors.numpy import save_file

    flux = tmp_path / "flux_controlnet.safetensors"
    save_file({"controlnet_x_embedder.weight": np.zeros((4, 4), np.float32),
               "controlnet_blocks.0.weight": np.zeros((4, 4), np.float32)}, str(flux))
    with pytest.raises(WeightError, match="flux_controlnet.safetensors.*FLUX ControlNet"):
        load_controlnet(flux)
    sdxl = tmp_path / "sdxl_controlnet.safetensors"
    save_file({"controlnet_cond_embedding.conv_in.weight": np.zeros((4, 4), np.float32)}, str(sdxl))
    with pytest.raises(WeightError, match="SDXL ControlNet"):
        load_controlnet(sdxl)
    net = load_controlnet(models["root"] / "2.1", mx.float32)
    from zimage_mlx.models.transformer import ZImageTransformerConfig

    with pytest.raises(ValueError, match="dim 96 != the transformer's 3840; n_heads 2 != the transformer's 30"):
        net.config.check_matches(ZImageTransformerConfig())
    cfg = json.loads((models["root"] / "2.1" / "config.json").read_text())
    with pytest.raises(WeightError, match="has shape"):
        load_controlnet(models["root"] / "2.1", mx.float32, config={**cfg, "dim": 128, "n_heads": 2})


def test_canny_finds_the_edges_of_a_square():
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = 255
    edges = np.asarray(canny(Image.fromarray(img)))[..., 0] > 0
    assert edges[16:48, 14:19].any(axis=1).all() and edges[16:48, 45:50].any(axis=1).all()   # both vertical sides
    assert not edges[24:40, 24:40].any() and not edges[:8].any()                            # nothing inside/outside
    g = np.asarray(control_map(Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8)),
                               "gray"))
    assert g.shape == (8, 8, 3) and (g[..., 0] == g[..., 2]).all()
    with pytest.raises(ValueError, match="unknown control type 'depth'"):
        control_map(Image.fromarray(img), "depth")
