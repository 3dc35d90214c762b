"""Every bad LoRA value is refused where it enters (load_lora_weights, --lora, set_adapters, fuse_lora): one clear
error naming the file / key / adapter, and nothing in the pipeline changed."""

import math

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from make_lora import as_ai_toolkit, as_kohya, random_lora, save
from make_pipeline import save_tiny_pipeline

from zimage_mlx import LoRAError, ZImagePipeline
from zimage_mlx.apps.cli import cli
from zimage_mlx.lora.formats import MAX_ABS
from zimage_mlx.lora.layers import LoRALinear

FAST = ["--quantize", "none", "--dtype", "float32", "--steps", "1", "-W", "32", "-H", "32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("lora-inputs")
    root, models = save_tiny_pipeline(tmp / "tiny", qwen_tokenizer_dir)
    pipe = ZImagePipeline.from_pretrained(root, dtype="float32")
    pipe.transformer  # noqa: B018 - loaded, so a refused LoRA could have changed it
    good = save(tmp / "good.safetensors", as_kohya(random_lora(models["transformer"], seed=1, strength=0.2)))
    return tmp, root, models["transformer"], pipe, good


@pytest.fixture()
def pipe(tiny):
    """The shared pipeline with one LoRA "good" at weight 0.5; afterwards: its state was not changed."""
    _, _, _, pipe, good = tiny
    pipe.load_lora_weights(str(good), adapter_name="good")
    pipe.set_adapters("good", 0.5)
    before = {k: np.array(v) for k, v in tree_flatten(pipe.transformer.parameters())}
    wrapped = sorted(p for p, m in pipe.transformer.named_modules() if isinstance(m, LoRALinear))
    try:
        yield pipe
        assert pipe.loras == [{**pipe.loras[0], "name": "good", "weight": 0.5}] and len(pipe.loras) == 1
        assert sorted(p for p, m in pipe.transformer.named_modules() if isinstance(m, LoRALinear)) == wrapped
        after = dict(tree_flatten(pipe.transformer.parameters()))
        assert after.keys() == before.keys() and all(np.array_equal(before[k], np.array(after[k])) for k in before)
    finally:
        pipe.unload_lora_weights()


def _spoiled(tr, key_part: str, value: float) -> tuple[dict, str]:
    """A LoRA (ai-toolkit keys, .alpha tensors) with one element of the tensor whose key ends in `key_part` set to
    `value`; returns (tensors, that key)."""
    tensors = as_ai_toolkit(random_lora(tr, seed=2, strength=0.2))
    key = sorted(k for k in tensors if k.endswith(key_part))[1]
    v = np.array(tensors[key], np.float32, copy=True)
    v.reshape(-1)[v.size // 2] = value
    tensors[key] = v
    return tensors, key


# (tensor key ending, bad value, fragment of the message)
BAD_VALUES = [
    ("lora_A.weight", math.nan, "not finite"),
    ("lora_B.weight", math.inf, "not finite"),
    ("lora_B.weight", -math.inf, "not finite"),
    ("alpha", math.nan, "not finite"),
    ("lora_A.weight", 2 * MAX_ABS, "larger than"),
    ("alpha", -3 * MAX_ABS, "larger than"),
]


@pytest.mark.parametrize("source", ["file", "dict"])
@pytest.mark.parametrize("ending, value, message", BAD_VALUES)
def test_nan_inf_or_absurd_lora_values_are_refused_at_load(tiny, pipe, source, ending, value, message):
    tmp, _, tr, _, _ = tiny
    tensors, key = _spoiled(tr, ending, value)
    if source == "file":
        src = save(tmp / "spoiled.safetensors", tensors)
        where = "spoiled.safetensors"
    else:
        src, where = tensors, "state dict"
    with pytest.raises(LoRAError, match=f"{where}: tensor {key} .*{message}") as e:
        pipe.load_lora_weights(src if source == "dict" else str(src), adapter_name="spoiled")
    assert "\n" not in str(e.value)


def test_a_large_but_sane_lora_loads(tiny):
    """Values up to MAX_ABS (and alpha = 4096) are accepted."""
    _, _, tr, pipe, _ = tiny
    tensors, _ = _spoiled(tr, "alpha", 4096.0)
    tensors[sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]][0, 0] = -MAX_ABS
    try:
        assert pipe.load_lora_weights(tensors, adapter_name="large") == "large"
    finally:
        pipe.unload_lora_weights()


@pytest.mark.parametrize("weights, exc, message", [
    (math.nan, ValueError, "adapter 'good'.*finite"),
    ([math.inf], ValueError, "adapter 'good'.*finite"),
    (-math.inf, ValueError, "adapter 'good'.*finite"),
    (np.float32("nan"), ValueError, "adapter 'good'.*finite"),
    ("0.5", TypeError, "adapter_weights must be one number or a list.*got str"),
    (True, TypeError, "adapter_weights must be one number or a list.*got bool"),
    ([None], TypeError, "adapter 'good': the weight must be a number, got NoneType"),
    ([0.5, 0.5], ValueError, "2 adapter weights for 1 adapters"),
    ({"good": 0.5}, TypeError, "one number or a list"),
])
def test_set_adapters_refuses_bad_weights(pipe, weights, exc, message):
    with pytest.raises(exc, match=message):
        pipe.set_adapters(["good"], weights)


@pytest.mark.parametrize("names, exc, message", [
    (5, TypeError, "adapter_names must be a name or a list of names, got int"),
    ([5], TypeError, "adapter_names must be a name or a list of names"),
    (["nope"], ValueError, "no adapter named 'nope'; loaded: 'good'"),
])
def test_set_adapters_refuses_bad_names(pipe, names, exc, message):
    with pytest.raises(exc, match=message):
        pipe.set_adapters(names, 0.5)


@pytest.mark.parametrize("weight", [np.float32(0.25), np.float64(0.25), np.array(0.25, np.float32), 0.25,
                                    [np.float32(0.25)], np.array([0.25]), mx.array(0.25), [mx.array(0.25)]])
def test_set_adapters_accepts_numpy_numbers(pipe, weight):
    pipe.set_adapters("good", weight)
    assert pipe.loras[0]["weight"] == 0.25 and type(pipe.loras[0]["weight"]) is float
    pipe.set_adapters("good", 0.5)


@pytest.mark.parametrize("call, exc, message", [
    (lambda p, t: p.fuse_lora(adapter_names=["nope"]), ValueError, "no adapter named 'nope'; loaded: 'good'"),
    (lambda p, t: p.fuse_lora(adapter_names="nope"), ValueError, "no adapter named 'nope'"),
    (lambda p, t: p.fuse_lora(lora_scale=math.nan), ValueError, "lora_scale must be a finite number"),
    (lambda p, t: p.fuse_lora(adapter_names=[3]), TypeError, "adapter_names must be"),
    (lambda p, t: p.load_lora_weights(str(t[4]), adapter_name=""), ValueError, "adapter_name must not be empty"),
    (lambda p, t: p.load_lora_weights(str(t[4]), adapter_name=5), TypeError, "adapter_name must be a string, got int"),
    (lambda p, t: p.load_lora_weights(None), TypeError,
     r"a \.safetensors path, a hub file \"owner/repo/file\.safetensors\" or a \{key: array\} dict, got None"),
    (lambda p, t: p.load_lora_weights(3.5), TypeError, "got float"),
    (lambda p, t: p.load_lora_weights(str(t[0])), LoRAError, "is a directory; pass a .safetensors file"),
    (lambda p, t: p.load_lora_weights({}), LoRAError, "holds no tensors"),
])
def test_lora_api_refuses_bad_arguments(tiny, pipe, call, exc, message):
    with pytest.raises(exc, match=message) as e:
        call(pipe, tiny)
    assert "\n" not in str(e.value)


def test_a_refused_fuse_fuses_nothing(pipe):
    with pytest.raises(ValueError, match="nope"):
        pipe.fuse_lora(adapter_names=["good", "nope"])
    assert not any(b.fused for _, m in pipe.transformer.named_modules() if isinstance(m, LoRALinear)
                   for b in m.branches)


@pytest.mark.parametrize("make, code, message", [
    (lambda tmp, tr: str(tmp), 1, "is a directory; pass a .safetensors file"),
    (lambda tmp, tr: str(save(tmp / "nan.safetensors", _spoiled(tr, "lora_B.weight", math.nan)[0])) + ":0.5", 1,
     "nan.safetensors: tensor "),
])
def test_cli_lora_refusals(tiny, tmp_path, make, code, message):
    _, root, tr, _, _ = tiny
    r = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(root), "--lora", make(tmp_path, tr),
                                 "-o", str(tmp_path / "x.png"), *FAST])
    lines = r.output.strip().splitlines()
    assert r.exit_code == code, r.output
    assert message in lines[-1] and len(lines) == 1, r.output
    assert not (tmp_path / "x.png").exists()
