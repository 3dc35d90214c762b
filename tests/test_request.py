"""The request layer (zimage_mlx/pipeline/request.py): defaults, the validation table, from_dict / from_kwargs,
the one place of the strength default, data-parallel sharding, and the mask rule (pipeline/images.py). No
weights: requests are checked against ModelLimits alone."""

import inspect
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zimage_mlx.pipeline.images import mask_image_to_l, preprocess_mask
from zimage_mlx.pipeline.pipeline import ZImagePipeline
from zimage_mlx.pipeline.request import (DEFAULT_INPAINT_STRENGTH, DEFAULT_SIZE, DEFAULT_STRENGTH, GenerationRequest,
                                         ModelLimits, RequestError)

PKG = Path(__file__).resolve().parents[1] / "zimage_mlx"
TURBO = ModelLimits()
BASE = ModelLimits(variant="base")
CONTROL = ModelLimits(control_in_dim=33)
IMG = Image.new("RGB", (64, 48))
MASK = Image.new("L", (64, 48), 255)


def _ok(limits=TURBO, **kw) -> GenerationRequest:
    return GenerationRequest.from_kwargs(**kw).validate(limits)


# ---------------------------------------------------------------------------------------------- defaults
def test_defaults_follow_the_variant():
    r = _ok(prompt="a cat")
    assert (r.num_inference_steps, r.guidance_scale, r.height, r.width) == (8, 0.0, DEFAULT_SIZE, DEFAULT_SIZE)
    assert (r.prompt, r.strength, r.control_image, r.first_step, r.batch) == (["a cat"], None, None, 0, 1)
    r = _ok(BASE, prompt="a cat")
    assert (r.num_inference_steps, r.guidance_scale) == (50, 4.0)


def test_strength_default_in_one_place():
    assert _ok(prompt="x", image=IMG).strength == DEFAULT_STRENGTH == 0.6
    assert _ok(prompt="x", image=IMG, mask_image=MASK).strength == DEFAULT_INPAINT_STRENGTH == 1.0
    assert _ok(prompt="x", image=IMG).first_step == int(8 - 8 * 0.6) == 3   # diffusers get_timesteps
    # no other module of the package spells the defaults (the CLI and the server import them)
    for path in PKG.rglob("*.py"):
        if path.name != "request.py":
            src = path.read_text()
            assert not re.search(r"^DEFAULT_(INPAINT_)?STRENGTH\s*=", src, re.M), path


def test_size_from_the_image_floored_to_the_multiple():
    r = _ok(prompt="x", image=Image.new("RGB", (70, 50)))
    assert (r.width, r.height) == (64, 48)
    r = _ok(CONTROL, prompt="x", control_image=Image.new("RGB", (40, 33)))
    assert (r.width, r.height) == (32, 32) and r.controlnet_conditioning_scale == [0.75]


def test_validate_is_idempotent():
    r = _ok(CONTROL, prompt=["a", "b"], image=IMG, mask_image=MASK, control_image=[IMG, IMG],
            controlnet_conditioning_scale=[0.5, 1.0], seed=3, num_images_per_prompt=2)
    assert r.validate(CONTROL) == r and r.batch == 4 and not r.inpaint


def test_call_signature_matches_the_request():
    """__call__'s parameters are the request's fields with the same defaults (one list, checked here)."""
    params = inspect.signature(ZImagePipeline.__call__).parameters
    fields = {f: getattr(GenerationRequest(), f) for f in GenerationRequest.field_names() if f != "image_seed"}
    assert [p for p in params if p != "self"] == list(fields)
    for name, default in fields.items():
        d = params[name].default
        assert d == default or (isinstance(d, tuple) and list(d) == list(default)), name


# ---------------------------------------------------------------------------------------------- validation table
NAN, INF = float("nan"), float("inf")
CASES = [
    # (limits, kwargs, field, message fragment)
    (TURBO, dict(prompt="x", height=0, width=64), "height", "height must be at least 1"),
    (TURBO, dict(prompt="x", height=48, width=50), "width", "width must be a positive multiple of 16"),
    (TURBO, dict(prompt="x", height=100000, width=32), "height", "position range"),
    (TURBO, dict(prompt=123), "prompt", "prompt must be a string or a list of strings, got int"),
    (TURBO, dict(prompt=[]), "prompt", "prompt is an empty list"),
    (TURBO, dict(), "prompt", "give a prompt or prompt_embeds"),
    (TURBO, dict(prompt="\ud800 fox"), "prompt", "prompt is not valid Unicode: a lone surrogate"),
    (TURBO, dict(prompt=["ok", "a \udfff"]), "prompt", "lone surrogate"),
    (BASE, dict(prompt="x", negative_prompt="\ud800"), "negative_prompt", "not valid Unicode"),
    (BASE, dict(prompt=["a", "b", "c"], negative_prompt=["n", "m"]), "negative_prompt", "2 negative prompts for 3"),
    (BASE, dict(prompt_embeds=[np.zeros((2, 4))]), "negative_prompt_embeds", "pass negative_prompt_embeds too"),
    (TURBO, dict(prompt="x", seed=-1), "seed", "seed must be between 0"),
    (TURBO, dict(prompt="x", seed="12"), "seed", "seed must be an integer"),
    (TURBO, dict(prompt="x", seed=[1, 2]), "seed", "2 seeds for 1 images"),
    (TURBO, dict(prompt="x", guidance_scale=NAN), "guidance_scale", "guidance_scale must be a finite number"),
    (TURBO, dict(prompt="x", num_inference_steps=0), "num_inference_steps", "between 1 and 1000"),
    (TURBO, dict(prompt="x", num_images_per_prompt=0), "num_images_per_prompt", "at least 1"),
    (TURBO, dict(prompt="x", cfg_truncation=INF), "cfg_truncation", "finite number"),
    (TURBO, dict(prompt="x", max_sequence_length=0), "max_sequence_length", "at least 1"),
    (TURBO, dict(prompt="x", output_type="jpg"), "output_type", "output_type must be"),
    (TURBO, dict(prompt="x", strength=0.5), "strength", "strength needs an image"),
    (TURBO, dict(prompt="x", image=IMG, strength=1.5), "strength", "strength must be between 0.0 and 1.0"),
    (TURBO, dict(prompt="x", image=IMG, strength=0.0), "strength", "leaves no step"),
    (TURBO, dict(prompt="x", image=Image.new("RGB", (1, 1))), "image", "1x1 pixels"),
    (TURBO, dict(prompt="x", image=3.5), "image", "image must be a PIL image"),
    (TURBO, dict(prompt="x", mask_image=MASK), "mask_image", "mask_image needs image"),
    (TURBO, dict(prompt="x", image=IMG, mask_image=MASK, mask_blur=-1), "mask_blur", "between 0.0"),
    (TURBO, dict(prompt="x", control_image=IMG), "control_image", "no ControlNet: load one"),
    (CONTROL, dict(prompt="x", control_image=Image.new("RGB", (1, 1))), "control_image", "1x1 pixels"),
    (CONTROL, dict(prompt="x", control_image=IMG, controlnet_conditioning_scale=NAN),
     "controlnet_conditioning_scale", "finite number"),
    (CONTROL, dict(prompt="x", control_image=IMG, controlnet_conditioning_scale=[1.0, INF]),
     "controlnet_conditioning_scale", "2 controlnet_conditioning_scale values for 1 control images"),
    (CONTROL, dict(prompt="x", control_image=IMG, controlnet_conditioning_scale=1e3),
     "controlnet_conditioning_scale", "between -100.0 and 100.0"),
    (CONTROL, dict(prompt="x", control_image=IMG, controlnet_conditioning_scale=-INF),
     "controlnet_conditioning_scale", "finite number"),
    (CONTROL, dict(prompt="x", control_image=IMG, image=IMG), "image", "needs mask_image"),
    (CONTROL, dict(prompt="x", control_image=IMG, image=IMG, mask_image=MASK, strength=0.5), "strength",
     "takes no strength"),
    (ModelLimits(control_in_dim=16), dict(prompt="x", control_image=IMG, image=IMG, mask_image=MASK), "mask_image",
     "needs a 2.x ControlNet"),
    (ModelLimits(cfg_split=True), dict(prompt="x"), "guidance_scale", "parallel='cfg' splits"),
    (TURBO, dict(prompt="x", loras=[1, 2]), "loras", "'loras' must map adapter names to weights"),
    (TURBO, dict(prompt="x", loras={("a", "b"): 1.0}), "loras", "'loras' must map adapter names to weights"),
    (TURBO, dict(prompt="x", loras="style"), "loras", "'loras' must map adapter names to weights"),
    (TURBO, dict(prompt="x", loras={"a": NAN}), "loras", "'loras' weight of 'a' must be a finite number"),
    (TURBO, dict(prompt="x", loras={"a": INF}), "loras", "finite number between -100 and 100, got inf"),
    (TURBO, dict(prompt="x", loras={"a": 1e300}), "loras", "got 1e+300"),
    (TURBO, dict(prompt="x", loras={"a": [1]}), "loras", "got [1]"),
    (TURBO, dict(prompt="x", loras={"a": True}), "loras", "got True"),
    (ModelLimits(adapters=("style",)), dict(prompt="x", loras={"nope": 1.0}), "loras",
     "no LoRA named 'nope'; loaded: 'style'"),
    (ModelLimits(adapters=()), dict(prompt="x", loras={"a": 1.0}), "loras", "loaded: none"),
    (TURBO, dict(prompt="x", callback=3), "callback", "callback must be callable"),
    (TURBO, dict(prompt="x", on_step=[print, 3]), "on_step", "on_step must be a callable"),
    (TURBO, dict(prompt="x", callback_on_step_end_tensor_inputs=["prompt_embeds"]),
     "callback_on_step_end_tensor_inputs", "not in ['latents']"),
]


@pytest.mark.parametrize("limits, kwargs, field, message", CASES, ids=[c[2] + str(i) for i, c in enumerate(CASES)])
def test_bad_request(limits, kwargs, field, message):
    with pytest.raises(RequestError, match=re.escape(message)) as e:
        _ok(limits, **kwargs)
    assert e.value.field == field and isinstance(e.value, ValueError)


# (kwargs, field, the parameter it needs, the one whose presence asks for it): each rule between parameters once,
# in check_combinations, which validate runs first and the CLI runs before its pipeline exists
COMBINATIONS = [
    (dict(strength=0.5), "strength", "image", None),
    (dict(mask_image=MASK), "mask_image", "image", None),
    (dict(image=IMG, mask_blur=4.0), "mask_blur", "mask_image", None),
    (dict(image=IMG, paste_back=True), "paste_back", "mask_image", None),
    (dict(control_type="canny"), "control_type", "control_image", None),
    (dict(cache_threshold=0.1), "cache_threshold", "cache", None),
    (dict(control_image=IMG), "control_image", "controlnet", None),
    (dict(control_image=IMG, image=IMG), "image", "mask_image", "control_image"),
]


@pytest.mark.parametrize("kwargs, field, needs, given", COMBINATIONS, ids=[c[1] for c in COMBINATIONS])
def test_combination_rules_name_what_they_need(kwargs, field, needs, given):
    limits = TURBO if needs == "controlnet" else CONTROL
    for check in (lambda r: r.check_combinations(controlnet=limits.control_in_dim is not None),
                  lambda r: r.validate(limits)):
        with pytest.raises(RequestError) as e:
            check(GenerationRequest.from_kwargs(prompt="x", **kwargs))
        assert (e.value.field, e.value.needs, e.value.given) == (field, needs, given)
        assert str(e.value).startswith(field) and needs in str(e.value)


def test_combinations_without_a_model():
    """Checked with no limits (the ControlNet unknown): what a caller can refuse before building a pipeline."""
    GenerationRequest(prompt="x", control_image=IMG).check_combinations()          # ControlNet not known: no rule
    GenerationRequest(prompt="x", image=IMG, mask_image=MASK, mask_blur=2.0, paste_back=True, control_type="none",
                      cache="teacache", cache_threshold=0.2).check_combinations(controlnet=False)
    with pytest.raises(RequestError, match="2 controlnet_conditioning_scale values for 1 control images"):
        GenerationRequest(prompt="x", control_image=[IMG], controlnet_conditioning_scale=[1, 2]).check_combinations()
    with pytest.raises(RequestError, match="takes no strength") as e:
        GenerationRequest(prompt="x", image=IMG, mask_image=MASK, control_image=IMG,
                          strength=0.5).check_combinations(controlnet=True)
    assert e.value.field == "strength" and e.value.needs is None
    r = GenerationRequest(prompt="x", image=IMG, mask_image=MASK, control_image=IMG, strength=1.0)
    r.check_combinations(controlnet=True)                                          # 1 is ControlNet inpainting's


def test_controlnet_without_control_image_warns_and_runs_the_base_model():
    with pytest.warns(UserWarning, match="ControlNet is loaded but no control_image"):
        r = _ok(CONTROL, prompt="x")
    assert r.control_image is None and r.controls == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ok(TURBO, prompt="x")


# ---------------------------------------------------------------------------------------------- from_dict
def test_loras_weights_become_floats():
    r = _ok(ModelLimits(adapters=("a", "b")), prompt="x", loras={"a": 1, "b": np.float32(-0.5)})
    assert r.loras == {"a": 1.0, "b": -0.5} and all(type(w) is float for w in r.loras.values())


def test_from_dict_equals_from_kwargs():
    body = {"prompt": "a fox", "height": 512.0, "width": 256, "num_inference_steps": 4, "guidance_scale": 1.5,
            "seed": 7.0, "negative_prompt": "blur", "strength": 0.5, "image": IMG, "output_type": "np",
            "loras": {"style": 0.8}}
    a = GenerationRequest.from_dict(body, source="json").validate(BASE)
    b = GenerationRequest.from_kwargs(**{**body, "height": 512, "seed": 7}).validate(BASE)
    assert a == b and isinstance(a.height, int) and a.seed == 7


@pytest.mark.parametrize("body, field, message", [
    ({"prompt": "x", "latents": [[0.0]]}, "latents", "'latents' is a Python-API-only parameter for a json request"),
    ({"prompt": "x", "callback": "f"}, "callback", "Python-API-only"),
    ({"prompt": "x", "steps": 4}, "steps", "'steps' is an unknown parameter"),
    ({"prompt": "x", "height": 512.5}, "height", "height must be an integer, got 512.5"),
    ({"prompt": "x", "guidance_scale": "3"}, "guidance_scale", "finite number"),
])
def test_from_dict_refuses(body, field, message):
    with pytest.raises(RequestError, match=re.escape(message)) as e:
        GenerationRequest.from_dict(body, source="json").validate(TURBO)
    assert e.value.field == field


def test_from_dict_needs_an_object():
    with pytest.raises(RequestError, match="must be an object of parameters, got list"):
        GenerationRequest.from_dict(["x"], source="cli")


def test_from_kwargs_unknown():
    with pytest.raises(RequestError, match="unknown parameter 'steps'") as e:
        GenerationRequest.from_kwargs(prompt="x", steps=3)
    assert e.value.field == "steps"


# ---------------------------------------------------------------------------------------------- data-parallel
def test_shard_splits_prompts_seeds_and_arrays_by_image():
    lat = np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1) * np.ones((6, 16, 2, 2), np.float32)
    r = _ok(BASE, prompt=["a", "b", "c"], negative_prompt=["na", "nb", "nc"], num_images_per_prompt=2, seed=10,
            latents=lat, height=32, width=32, output_type="pil")
    sub, mine = r.shard(1, 4)
    assert mine == [1, 5]
    assert sub.prompt == ["a", "c"] and sub.negative_prompt == ["na", "nc"] and sub.seed == [11, 15]
    assert sub.num_images_per_prompt == 1 and sub.output_type == "np" and sub.image_seed == 10
    assert np.array_equal(sub.latents[:, 0, 0, 0], [1, 5]) and sub.batch == 2
    one = _ok(BASE, prompt="a", negative_prompt="n", num_images_per_prompt=3, seed=0).shard(0, 2)[0]
    assert one.prompt == ["a", "a"] and one.negative_prompt == ["n"] and one.seed == [0, 2]


# ---------------------------------------------------------------------------------------------- the mask rule
def _rgba(alpha: np.ndarray, rgb: int = 0) -> Image.Image:
    a = np.zeros((*alpha.shape, 4), np.uint8)
    a[..., :3], a[..., 3] = rgb, alpha
    return Image.fromarray(a, "RGBA")


def test_rgba_mask_with_transparency_marks_the_area_to_edit():
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[8:24, 8:24] = 0                                   # transparent square = edit (OpenAI's rule)
    m = preprocess_mask(_rgba(alpha, rgb=0), 32, 32)        # black RGB: luminance alone would keep everything
    expect = np.zeros((32, 32), np.float32)
    expect[8:24, 8:24] = 1
    assert np.array_equal(m, expect)
    la = Image.fromarray(np.stack([np.zeros_like(alpha), alpha], -1), "LA")
    assert np.array_equal(preprocess_mask(la, 32, 32), expect)
    assert np.array_equal(preprocess_mask(np.asarray(_rgba(alpha)), 32, 32), expect)   # an HxWx4 array too


def test_opaque_rgba_mask_is_read_by_luminance():
    lum = np.zeros((32, 32), np.uint8)
    lum[:, 16:] = 255                                       # white = edit
    m = preprocess_mask(_rgba(np.full((32, 32), 255, np.uint8), rgb=lum[..., None]), 32, 32)
    assert np.array_equal(m, (lum >= 128).astype(np.float32))
    assert np.array_equal(preprocess_mask(Image.fromarray(lum), 32, 32), m)
    assert mask_image_to_l(Image.fromarray(lum)).mode == "L"


def test_the_server_uses_the_same_mask_rule():
    from zimage_mlx.apps.server import openai_mask

    alpha = np.full((16, 16), 255, np.uint8)
    alpha[:8] = 0
    for mask in (_rgba(alpha), _rgba(np.full((16, 16), 255, np.uint8), rgb=200)):
        assert np.array_equal(np.asarray(openai_mask(mask)), np.asarray(mask_image_to_l(mask)))

