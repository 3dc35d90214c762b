"""Trainable LoRA layers (lora/layers.py) against peft's LoraLayer on a torch copy of the same layers: forward and
gradients on a float layer, a 4-bit layer (plain and the CPU's dequantizing one) and row slices of a fused to_qkv;
inference adapters stay frozen. Float32 throughout.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from peft import LoraConfig, inject_adapter_in_model

from conftest import rel_err
from zimage_mlx.loading.quantize import DequantizingLinear, dequantize_matmuls
from zimage_mlx.lora.adapters import LoRAState, load_adapter
from zimage_mlx.lora.layers import LoRABranch, LoRALinear, add_trainable_lora, trainable_lora_state

D, HIDDEN, RANK, ALPHA = 64, 96, 4, 12.0
TARGETS = ["to_k", "feed_forward.w1"]
NAMES = ["layers.0.attention.to_k", "layers.0.feed_forward.w1"]


class Block(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.attention = nn.Module()
        if fused:
            self.attention.to_qkv = nn.Linear(D, 3 * D, bias=False)
        else:
            for p in "qkv":
                self.attention[f"to_{p}"] = nn.Linear(D, D, bias=False)
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(D, HIDDEN)


class Toy(nn.Module):
    """q|k|v and w1 outputs side by side, whether q/k/v are one fused layer or three."""

    def __init__(self, fused: bool = False):
        super().__init__()
        self.layers = [Block(fused)]

    @property
    def dtype(self):
        return mx.float32

    def sanitize(self, weights):
        """ComfyUI's fused `attention.qkv` split in its three row blocks (as the transformer's sanitize does)."""
        out = {}
        for k, v in weights.items():
            parts = [(k.replace(".qkv.", f".to_{p}."), i) for i, p in enumerate("qkv")] if ".qkv." in k else [(k, 0)]
            n = v.shape[0] // len(parts)
            out.update({name: v if len(parts) == 1 else v[i * n:(i + 1) * n] for name, i in parts})
        return out

    def __call__(self, x):
        att = self.layers[0].attention
        qkv = att.to_qkv(x) if "to_qkv" in att else mx.concatenate([att[f"to_{p}"](x) for p in "qkv"], -1)
        return mx.concatenate([qkv, self.layers[0].feed_forward.w1(x)], -1)


class TorchToy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = torch.nn.ModuleDict({f"to_{p}": torch.nn.Linear(D, D, bias=False) for p in "qkv"})
        self.feed_forward = torch.nn.ModuleDict({"w1": torch.nn.Linear(D, HIDDEN)})

    def forward(self, x):
        return torch.cat([*(self.attention[f"to_{p}"](x) for p in "qkv"), self.feed_forward["w1"](x)], -1)


def _float_weight(layer) -> np.ndarray:
    if isinstance(layer, nn.QuantizedLinear):
        return np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits))
    return np.array(layer.weight)


def _torch_twin(model: Toy) -> TorchToy:
    """The same base weights in torch (a fused to_qkv split in its three row blocks; quantized ones dequantized)."""
    att, ff = model.layers[0].attention, model.layers[0].feed_forward
    if "to_qkv" in att:
        qkv = np.split(_float_weight(att.to_qkv), 3)
    else:
        qkv = [_float_weight(att[f"to_{p}"]) for p in "qkv"]
    t = TorchToy()
    with torch.no_grad():
        for p, w in zip("qkv", qkv):
            t.attention[f"to_{p}"].weight.copy_(torch.from_numpy(w))
        t.feed_forward["w1"].weight.copy_(torch.from_numpy(_float_weight(ff.w1)))
        t.feed_forward["w1"].bias.copy_(torch.from_numpy(np.array(ff.w1.bias)))
    return t


def _toy(kind: str) -> Toy:
    model = Toy(fused=kind.startswith("fused"))
    if "4-bit" in kind:
        nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear)
                    and not p.endswith("w1"))     # w1 stays float: one float and one quantized target
    if "dequantizing" in kind:
        assert dequantize_matmuls(model) > 0
    mx.eval(model.parameters())
    return model


def _init(seed=0):
    rng = np.random.default_rng(seed)
    return {"layers.0.attention.to_k": (rng.standard_normal((RANK, D)).astype(np.float32) * 0.2,
                                        rng.standard_normal((D, RANK)).astype(np.float32) * 0.2),
            "layers.0.feed_forward.w1": (rng.standard_normal((RANK, D)).astype(np.float32) * 0.2,
                                         rng.standard_normal((HIDDEN, RANK)).astype(np.float32) * 0.2)}


@pytest.mark.parametrize("kind", ["float", "4-bit", "4-bit-dequantizing", "fused", "fused-4-bit"])
def test_trainable_lora_matches_peft(kind):
    model = _toy(kind)
    twin = _torch_twin(model)
    init = _init()
    layers = add_trainable_lora(model, TARGETS, RANK, alpha=ALPHA, init=init)
    assert list(layers) == NAMES and all(isinstance(m, LoRALinear) for m in layers.values())
    quantized = isinstance(layers[NAMES[0]].base, nn.QuantizedLinear)
    assert quantized == ("4-bit" in kind)
    assert isinstance(layers[NAMES[0]].base, DequantizingLinear) == ("dequantizing" in kind)

    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS), twin)
    with torch.no_grad():
        for name, (a, b) in init.items():
            peft_layer = twin.get_submodule(name.removeprefix("layers.0."))
            peft_layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
            peft_layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
    assert {n for n, p in twin.named_parameters() if p.requires_grad} == {
        f"{n.removeprefix('layers.0.')}.lora_{ab}.default.weight" for n in NAMES for ab in "AB"}

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, D)).astype(np.float32)
    target = rng.standard_normal((2, 5, 3 * D + HIDDEN)).astype(np.float32)

    def loss_fn(m, x):
        return mx.mean((m(x) - mx.array(target)) ** 2)

    loss, grads = nn.value_and_grad(model, loss_fn)(model, mx.array(x))
    tx = torch.from_numpy(x)
    t_out = twin(tx)
    t_loss = torch.mean((t_out - torch.from_numpy(target)) ** 2)
    t_loss.backward()

    got = np.array(model(mx.array(x)))
    assert rel_err(got, t_out.detach().numpy()) <= 1e-5
    assert abs(float(loss) - t_loss.item()) <= 1e-5 * abs(t_loss.item())
    q_rows = x @ twin.attention["to_q"].weight.detach().numpy().T       # untargeted rows: the base layer's
    np.testing.assert_allclose(got[..., :D], q_rows, rtol=1e-5, atol=1e-5)

    flat = dict(tree_flatten(grads))
    wrapper = {NAMES[0]: NAMES[0].replace("to_k", "to_qkv" if kind.startswith("fused") else "to_k"),
               NAMES[1]: NAMES[1]}
    assert set(flat) == set(dict(tree_flatten(model.trainable_parameters()))) == {
        f"{wrapper[n]}.branches.0.lora_{ab}" for n in NAMES for ab in "AB"}
    state = trainable_lora_state(model)
    assert list(state) == NAMES
    for name, (a, b) in state.items():
        peft_layer = twin.get_submodule(name.removeprefix("layers.0."))
        assert _same(a, mx.array(init[name][0])) and _same(b, mx.array(init[name][1]))
        for ab in "AB":
            ref = getattr(peft_layer, f"lora_{ab}")["default"].weight.grad.numpy()
            err = rel_err(np.array(flat[f"{wrapper[name]}.branches.0.lora_{ab}"]), ref)
            print(f"{kind} {name} lora_{ab}: grad rel err vs peft {err:.1e}")
            assert err <= 1e-5


def _same(p, q) -> bool:
    return p.shape == q.shape and bool(mx.array_equal(p, q))


def test_forward_is_base_plus_scaled_update_on_fused_rows():
    """On a fused to_qkv, a LoRA on to_k adds scale·B(A·x) to rows D:2D and nothing elsewhere."""
    model = _toy("fused")
    w = np.array(model.layers[0].attention.to_qkv.weight)
    init = _init(3)
    add_trainable_lora(model, ["to_k"], RANK, alpha=ALPHA, init={NAMES[0]: init[NAMES[0]]})
    x = np.random.default_rng(2).standard_normal((3, D)).astype(np.float32)
    a, b = init[NAMES[0]]
    ref = x @ w.T
    ref[:, D:2 * D] += ALPHA / RANK * (x @ a.T) @ b.T
    np.testing.assert_allclose(np.array(model.layers[0].attention.to_qkv(mx.array(x))), ref, rtol=1e-5, atol=1e-5)


def test_default_init_is_peft_kaiming_and_b_zero():
    """A ~ U(±1/√in) (torch kaiming_uniform_(a=√5), PEFT's default), B = 0: the model output is unchanged; alpha
    None is alpha = rank; the key makes it reproducible."""
    model = _toy("float")
    x = mx.random.normal((4, D), key=mx.random.key(5))
    before = np.array(model(x))
    add_trainable_lora(model, "w1", 16, key=mx.random.key(0))
    a, b = trainable_lora_state(model)["layers.0.feed_forward.w1"]
    bound = 1 / math.sqrt(D)
    ref = torch.empty(16, D)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
    assert float(ref.abs().max()) <= bound and float(mx.abs(a).max()) <= bound
    assert float(mx.abs(a).max()) > 0.95 * bound and abs(float(a.mean())) < 0.1 * bound
    assert a.dtype == mx.float32 and not np.any(np.array(b)) and b.shape == (HIDDEN, 16)
    np.testing.assert_array_equal(np.array(model(x)), before)
    branch = model.layers[0].feed_forward.w1.branches[0]
    assert isinstance(branch, LoRABranch) and branch.scale == 1.0
    again = _toy("float")
    add_trainable_lora(again, "w1", 16, key=mx.random.key(0))
    assert _same(trainable_lora_state(again)["layers.0.feed_forward.w1"][0], a)


def _adapter_state():
    rng = np.random.default_rng(4)
    return {"layers.0.attention.to_k.lora_A.weight": rng.standard_normal((2, D)).astype(np.float32),
            "layers.0.attention.to_k.lora_B.weight": rng.standard_normal((D, 2)).astype(np.float32)}


@pytest.mark.parametrize("fused", [False, True])
def test_inference_adapters_are_frozen_and_train_beside_one(fused):
    model = _toy("fused" if fused else "float")
    base_trainable = {k: v for k, v in tree_flatten(model.trainable_parameters())}
    st = LoRAState()
    st.attach(model)
    st.add(load_adapter(_adapter_state(), model, mx.float32, "style"))
    after = dict(tree_flatten(model.trainable_parameters()))
    assert {k.replace(".base.", "."): v for k, v in after.items()}.keys() == base_trainable.keys()
    assert all(after[k] is v or _same(after[k], v) for k, v in
               zip(sorted(after), (base_trainable[k] for k in sorted(base_trainable))))
    x = mx.random.normal((3, D), key=mx.random.key(1))
    with_style = np.array(model(x))

    add_trainable_lora(model, TARGETS, RANK, alpha=ALPHA, init=_init())   # beside the loaded adapter
    grads = dict(tree_flatten(nn.value_and_grad(model, lambda m, x: m(x).sum())(model, x)[1]))
    assert len(grads) == 4 and all(k.endswith(("lora_A", "lora_B")) for k in grads)
    assert list(trainable_lora_state(model)) == NAMES
    st.clear()                                   # unloading the adapter keeps the trainable branches
    assert list(trainable_lora_state(model)) == NAMES
    assert not np.allclose(np.array(model(x)), with_style)


def test_fused_qkv_lora_shares_its_down_projection():
    """A ComfyUI fused-qkv LoRA (one down for q, k, v) on a fused to_qkv is one branch: A·x once per call."""
    model = _toy("fused")
    rng = np.random.default_rng(6)
    st = LoRAState()
    st.attach(model)
    down, up = rng.standard_normal((3, D)).astype(np.float32), rng.standard_normal((3 * D, 3)).astype(np.float32)
    st.add(load_adapter({"layers.0.attention.qkv.lora_down.weight": down, "layers.0.attention.qkv.lora_up.weight": up},
                        model, mx.float32, "qkv"))
    (branch,) = model.layers[0].attention.to_qkv.branches
    assert branch.span is None and branch.lora_B.shape == (3 * D, 3) and branch.lora_A.shape == (3, D)
    x = rng.standard_normal((2, D)).astype(np.float32)
    w = np.array(model.layers[0].attention.to_qkv.base.weight)
    np.testing.assert_allclose(np.array(model.layers[0].attention.to_qkv(mx.array(x))),
                               x @ (w + up @ down).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, match", [
    (dict(targets=["to_z"]), r"'to_z' match no linear layer"),
    (dict(targets=[]), "targets must be module names"),
    (dict(targets=["to_q", 3]), "targets must be module names"),
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=2.0), "rank must be a positive integer"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(init={"layers.0.attention.to_v": (np.zeros((4, D)), np.zeros((D, 4)))}), "not among the targeted"),
    (dict(init={NAMES[0]: (np.zeros((4, D + 1)), np.zeros((D, 4)))}), r"expected A \(4, 64\)"),
])
def test_add_trainable_lora_refuses_bad_arguments(args, match):
    model = _toy("fused")
    before = dict(tree_flatten(model.parameters()))
    kw = dict(targets=TARGETS, rank=RANK) | args
    with pytest.raises(ValueError, match=match):
        add_trainable_lora(model, **kw)
    assert dict(tree_flatten(model.parameters())).keys() == before.keys()
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())


def test_a_second_trainable_lora_on_a_layer_is_refused():
    model = _toy("float")
    add_trainable_lora(model, "to_k", RANK)
    with pytest.raises(ValueError, match="already carry a trainable LoRA"):
        add_trainable_lora(model, ["to_k", "to_q"], RANK)
    assert list(trainable_lora_state(model)) == ["layers.0.attention.to_k"]


@pytest.mark.parametrize("fused", [False, True])
def test_transformer_lora_gradients_match_peft(fused):
    """The tiny Z-Image transformer with a trainable LoRA on every attention and feed-forward projection against
    peft on diffusers' model: velocity and the gradient of a flow-matching-style loss for every factor."""
    from make_transformer import make_tiny_transformer
    from zimage_mlx.loading.weights import fill_model
    from zimage_mlx.models.transformer import ZImageTransformer, ZImageTransformerConfig

    tm = make_tiny_transformer(3)
    weights = {k: mx.array(v.detach().numpy()) for k, v in tm.state_dict().items()}
    model = ZImageTransformer(ZImageTransformerConfig.from_dict(dict(tm.config)))
    model = fill_model(model, model.sanitize(weights), mx.float32, "torch state dict")
    if fused:
        model.fuse_projections()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
    rng = np.random.default_rng(8)
    layers = add_trainable_lora(model, targets, 4, alpha=6.0, key=mx.random.key(2))
    init = {n: (np.array(a), rng.standard_normal(b.shape).astype(np.float32) * 0.05)
            for n, (a, b) in trainable_lora_state(model).items()}
    for name, (_, b) in init.items():
        (branch,) = [x for x in layers[name].branches if x.target == name]
        branch.lora_B = mx.array(b)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=6.0, target_modules=targets), tm)
    assert sorted(n.removesuffix(".lora_A.default.weight") for n, _ in tm.named_parameters()
                  if n.endswith("lora_A.default.weight")) == sorted(init)
    with torch.no_grad():
        for name, (a, b) in init.items():
            tm.get_submodule(name).lora_A["default"].weight.copy_(torch.from_numpy(a))
            tm.get_submodule(name).lora_B["default"].weight.copy_(torch.from_numpy(b))
    lat = rng.standard_normal((1, 16, 8, 6)).astype(np.float32)
    t = np.array([0.3], np.float32)
    cap = rng.standard_normal((13, tm.config.cap_feat_dim)).astype(np.float32)
    target = rng.standard_normal(lat.shape).astype(np.float32)

    def loss_fn(m):
        return mx.mean((m(mx.array(lat), mx.array(t), [mx.array(cap)]) - mx.array(target)) ** 2)

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    out = tm([torch.from_numpy(lat[0])[:, None]], torch.from_numpy(t), [torch.from_numpy(cap)], return_dict=False)[0]
    t_loss = torch.mean((out[0][:, 0][None] - torch.from_numpy(target)) ** 2)
    t_loss.backward()
    assert abs(loss.item() - t_loss.item()) <= 1e-5 * t_loss.item()
    flat = dict(tree_flatten(grads))
    assert len(flat) == 2 * len(init) == 2 * 7 * 4   # 7 projections × (2 layers + 2 refiners), A and B
    worst = 0.0
    for name in init:
        peft_layer = tm.get_submodule(name)
        (i,) = [k for k, x in enumerate(layers[name].branches) if x.target == name]
        path = next(p for p, m in model.named_modules() if m is layers[name])
        for ab in "AB":
            ref = getattr(peft_layer, f"lora_{ab}")["default"].weight.grad.numpy()
            worst = max(worst, rel_err(np.array(flat[f"{path}.branches.{i}.lora_{ab}"]), ref))
    v_err = rel_err(np.array(model(mx.array(lat), mx.array(t), [mx.array(cap)])), out[0][:, 0][None].detach().numpy())
    print(f"fused={fused}: velocity rel err {v_err:.1e}; worst LoRA grad rel err vs peft {worst:.1e}")
    # measured: velocity 4.5e-6 (the transformer's own float32 parity), gradients 1.9e-5 (float32 rounding carried
    # back through 4 blocks); a wrong scale, slice or frozen factor is off by O(1)
    assert v_err <= 1e-5 and worst <= 1e-4
