"""Step caching (pipeline/step_cache.py) against the uncached transformer and a torch reference of the written rule.

The oracle for the rules is diffusers' ZImageTransformer2DModel with its main layers replaced by `RuleMain`, a
plain torch statement of docs/step-cache.md. Random weights need one change to say anything about caching: with
random adaLN weights layer 0's residual changes ~100 % from step to step and nothing would ever be skipped, so
every model here has its timestep embedder's output scaled by 0.1 (6-9 % change per step, inside TeaCache's
calibrated range).
"""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from conftest import rel_err
from make_controlnet import make_tiny_controlnet, save_tiny_controlnet
from make_transformer import make_tiny_transformer
from zimage_mlx import sampler
from zimage_mlx.loading.weights import fill_model
from zimage_mlx.models.controlnet import ControlConditioning, ControlInput, load_controlnet
from zimage_mlx.models.transformer import ZImageTransformer, ZImageTransformerConfig
from zimage_mlx.pipeline.step_cache import (MAX_CONSECUTIVE_SKIPS, TEACACHE_RANGE, StepCache, check_cache,
                                            teacache_price)

LAT = 8                    # 8x8 latents: 16 image tokens (padded to 32)
CAPS = (20, 40)            # positive / negative caption lengths: two caption groups (32 and 64 tokens)
STEPS = 12
TIME_EMBED_SCALE = 0.01


def scaled_tiny_transformer(seed=3):
    """diffusers' tiny transformer with 4 main layers and its timestep embedding scaled by 0.1 (module doc)."""
    tm = make_tiny_transformer(seed, n_layers=4)
    with torch.no_grad():
        last = tm.t_embedder.mlp[2]
        last.weight.mul_(TIME_EMBED_SCALE)
        last.bias.mul_(TIME_EMBED_SCALE)
    weights = {k: mx.array(v.detach().numpy()) for k, v in tm.state_dict().items()}
    model = ZImageTransformer(ZImageTransformerConfig.from_dict(dict(tm.config)))
    return tm, fill_model(model, model.sanitize(weights), mx.float32, "torch state dict")


@pytest.fixture(scope="module")
def models():
    return scaled_tiny_transformer()


def _inputs(seed=0, batch=1):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, 16, LAT, LAT)).astype(np.float32)
    caps = [rng.standard_normal((n, 64)).astype(np.float32) for n in CAPS]
    return noise, [caps[0]] * batch + [caps[1]] * batch


def denoise(predict, noise, steps=STEPS, guidance=4.0):
    """The pipeline's loop (sampler functions), with predict(x (2B,...) numpy, t float) -> (2B,...) velocities."""
    cfg = sampler.SchedulerConfig()
    sigmas = sampler.sigmas_for(steps, cfg)
    timesteps = sampler.timesteps_for(sigmas, cfg)
    latents = mx.array(noise)
    B = noise.shape[0]
    for i in range(steps):
        t = float(sampler.model_time(timesteps[i], cfg))
        v = mx.array(predict(np.array(latents), t))
        v = sampler.guidance(v[:B], v[B:], guidance) if guidance else v
        latents = sampler.euler_step(latents, v, sigmas[i], sigmas[i + 1])
        mx.eval(latents)
    return np.array(latents)


def mlx_predict(model, caps, cache=None, control=None):
    captions = model.prepare([mx.array(c) for c in caps], LAT, LAT)

    def predict(x, t):
        x2 = mx.array(np.concatenate([x, x]))
        tt = mx.full((x2.shape[0],), t, dtype=mx.float32)
        if cache is None:
            return np.array(model(x2, tt, captions, control=control))
        return np.array(cache.forward(model, x2, tt, captions, control))
    return predict


# --------------------------------------------------------------------------- the torch statement of the rule
class RuleMain(torch.nn.Module):
    """diffusers' main layers run under the written rule (docs/step-cache.md); replaces `tm.layers` as its only entry.
    Means are over the first `n_pos` samples' unmasked positions, in float32."""

    def __init__(self, layers, rule, threshold, num_steps, n_pos):
        super().__init__()
        self.inner = layers
        self.rule, self.threshold, self.num_steps, self.n_pos = rule, threshold, num_steps, n_pos
        self.ref = self.residual = None
        self.acc, self.run, self.computed, self.signal = 0.0, 0, [], []

    def forward(self, x, mask, *args):
        first = self.inner[0](x, mask, *args)
        r = (first - x).float()[: self.n_pos]
        keep = torch.ones(r.shape[:2]) if mask is None else mask[: self.n_pos].float()
        value = None
        if self.ref is not None:
            value = float(((r - self.ref).abs().sum(-1) * keep).sum() / ((self.ref.abs().sum(-1) * keep).sum()))
        step = len(self.computed)
        if self.rule == "teacache":
            self.ref = r
            if step in (0, self.num_steps - 1) or value > TEACACHE_RANGE[1]:
                compute = True
            else:
                x_c = max(value, TEACACHE_RANGE[0])
                c4, c3, c2, c1, c0 = (-898.9907628349583, 367.7086118008557, -45.41511572598643,
                                      3.95114319842774, 0.0)
                self.acc += max(0.0, c4 * x_c**4 + c3 * x_c**3 + c2 * x_c**2 + c1 * x_c + c0)
                compute = not (self.acc < self.threshold and self.run < 8)
        else:
            compute = value is None or value > self.threshold
        self.computed.append(compute)
        self.signal.append(value)
        if not compute:
            self.run += 1
            return (x if self.rule == "teacache" else first) + self.residual
        self.acc, self.run = 0.0, 0
        if self.rule == "first_block":
            self.ref = r
        h = first
        for layer in self.inner[1:]:
            h = layer(h, mask, *args)
        self.residual = h - (x if self.rule == "teacache" else first)
        return h


def torch_predict(tm, caps):
    def predict(x, t):
        x2 = np.concatenate([x, x])
        with torch.no_grad():
            out = tm([torch.from_numpy(a)[:, None] for a in x2], torch.full((len(x2),), t),
                     [torch.from_numpy(c) for c in caps], return_dict=False)[0]
        return np.stack([o[:, 0].numpy() for o in out])
    return predict


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("rule", ["teacache", "first_block"])
def test_threshold_zero_is_the_uncached_run_bit_for_bit(models, rule):
    _, model = models
    noise, caps = _inputs()
    plain = denoise(mlx_predict(model, caps), noise)
    cache = StepCache(rule, 0.0, STEPS, positive_rows=range(1))
    cached = denoise(mlx_predict(model, caps, cache), noise)
    assert np.array_equal(plain, cached)
    assert cache.stats.computed == STEPS and cache.stats.skipped == 0
    assert cache.stats.signal[0] is None and all(0.0 < s < 1.0 for s in cache.stats.signal[1:])


def torch_reference_run(tm, rule, threshold, caps, noise):
    """diffusers' transformer with its main layers behind the written rule (RuleMain): (the rule, the final latents)."""
    reference = RuleMain(tm.layers, rule, threshold, STEPS, n_pos=1)
    original = tm.layers
    tm.layers = torch.nn.ModuleList([reference])
    try:
        return reference, denoise(torch_predict(tm, caps), noise)
    finally:
        tm.layers = original


@pytest.mark.parametrize("rule, threshold", [("teacache", 0.3), ("teacache", 1.5), ("first_block", 0.15)])
def test_rule_matches_the_torch_reference(models, rule, threshold):
    """CFG with captions of different padded lengths (two groups here, a masked batch in diffusers): one decision
    per step from the positive branch, both branches' residuals reused on skips."""
    tm, model = models
    noise, caps = _inputs(1)
    cache = StepCache(rule, threshold, STEPS, positive_rows=range(1))
    ours = denoise(mlx_predict(model, caps, cache), noise)
    reference, theirs = torch_reference_run(tm, rule, threshold, caps, noise)
    assert cache.stats.computed_steps == reference.computed
    np.testing.assert_allclose(cache.stats.signal[1:], reference.signal[1:], rtol=1e-4)
    assert 0 < cache.stats.skipped < STEPS - 2, cache.stats.as_dict()
    assert rel_err(ours, theirs) <= 1e-4
    plain = denoise(mlx_predict(model, caps), noise)
    assert not np.array_equal(ours, plain)        # the skips changed something, a little
    assert rel_err(ours, plain) < 0.2


def test_teacache_first_and_last_steps_compute_and_runs_are_capped(models):
    _, model = models
    noise, caps = _inputs(2)
    cache = StepCache("teacache", 1e6, STEPS, positive_rows=range(1))
    denoise(mlx_predict(model, caps, cache), noise)
    steps = cache.stats.computed_steps
    assert steps[0] and steps[-1]
    assert steps[1: 1 + MAX_CONSECUTIVE_SKIPS] == [False] * MAX_CONSECUTIVE_SKIPS
    assert steps[1 + MAX_CONSECUTIVE_SKIPS]
    assert cache.stats.as_dict()["skipped"] == MAX_CONSECUTIVE_SKIPS + 1   # steps 1-8 and 10 (of 0-11)


def test_the_decision_comes_from_the_positive_rows(models):
    """The same positive inputs with another negative caption (and so another caption grouping): the same signals
    and decisions."""
    _, model = models
    noise, caps = _inputs(1)
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal(noise.shape).astype(np.float32) * 0.05 + noise * (1 - k / STEPS) for k in range(STEPS)]
    runs = []
    for neg in (caps[1], rng.standard_normal((5, 64)).astype(np.float32)):
        cache = StepCache("first_block", 0.15, STEPS, positive_rows=range(1))
        predict = mlx_predict(model, [caps[0], neg], cache)
        for k, x in enumerate(xs):
            predict(x, 0.1 + 0.8 * k / STEPS)
        runs.append(cache.stats)
    assert runs[0].computed_steps == runs[1].computed_steps and runs[0].skipped > 0
    np.testing.assert_allclose(runs[0].signal[1:], runs[1].signal[1:], rtol=1e-5)


def test_controlnet_hints_only_on_computed_steps(models, tmp_path):
    tm, model = models
    cn = make_tiny_controlnet(2, "2.1", transformer_config=dict(n_layers=4))
    net = load_controlnet(save_tiny_controlnet(tmp_path / "cn", cn), mx.float32)
    noise, caps = _inputs(3)
    ctx = mx.array(np.random.default_rng(4).standard_normal((2, 33, LAT, LAT)).astype(np.float32))
    calls = []
    layer_hints = net.layer_hints

    def counting_layer_hints(*args):
        calls.append(1)
        return layer_hints(*args)

    net.layer_hints = counting_layer_hints

    def run(cache):
        calls.clear()
        control = ControlConditioning(net, [ControlInput(ctx, 0.7)])
        return denoise(mlx_predict(model, caps, cache, control), noise)

    plain = run(None)
    assert len(calls) == 2 * STEPS                # two caption groups per step
    assert np.array_equal(run(StepCache("first_block", 0.0, STEPS, positive_rows=range(1))), plain)
    cache = StepCache("first_block", 0.15, STEPS, positive_rows=range(1))
    cached = run(cache)
    assert 0 < cache.stats.skipped and len(calls) == 2 * cache.stats.computed
    assert rel_err(cached, plain) < 0.2


def test_a_one_step_run_skips_nothing(models):
    _, model = models
    noise, caps = _inputs()
    for rule in ("teacache", "first_block"):
        cache = StepCache(rule, 1e6, 1, positive_rows=range(1))
        denoise(mlx_predict(model, caps, cache), noise, steps=1)
        assert cache.stats.as_dict() | {"signal": None} == {
            "rule": rule, "threshold": 1e6, "steps": 1, "computed": 1, "skipped": 0, "signal": None,
            "computed_steps": [True]}


@pytest.mark.parametrize("rule", ["teacache", "first_block"])
def test_a_non_finite_signal_computes(rule):
    """A NaN in layer 0's residual must not freeze the rule into skipping (mlx-teacache's "numerical miss")."""
    cache = StepCache(rule, 1e6, 10)
    u, r = mx.zeros((1, 32, 8)), mx.ones((1, 32, 8))
    assert cache._decide("layout", [([0], r, u)], have_residual=False)          # step 0
    assert not cache._decide("layout", [([0], r * 1.01, u)], have_residual=True)
    assert cache._decide("layout", [([0], r * mx.nan, u)], have_residual=True)
    assert math.isnan(cache.stats.signal[-1])


def test_teacache_price_is_the_published_polynomial_clamped():
    assert teacache_price(0.0) == teacache_price(TEACACHE_RANGE[0]) > 0.08
    assert teacache_price(0.1) == pytest.approx(3.95114319842774 * 0.1 - 45.41511572598643 * 0.01
                                                + 367.7086118008557 * 1e-3 - 898.9907628349583 * 1e-4)
    assert teacache_price(1.0) == 0.0           # the fit goes negative far past its range: max(0, p)


@pytest.mark.parametrize("cache, threshold, message", [
    ("magcache", None, "cache must be one of"),
    ("teacache", -0.1, "cache_threshold must be a finite number >= 0"),
    ("first_block", math.nan, "cache_threshold must be a finite number >= 0"),
    ("teacache", "0.1", "cache_threshold must be a finite number >= 0"),
    (None, 0.1, "cache_threshold=0.1 needs cache="),
])
def test_bad_cache_arguments(cache, threshold, message):
    with pytest.raises(ValueError, match=message):
        check_cache(cache, threshold)


def test_cache_defaults_and_the_cli_spelling():
    assert check_cache(None, None) == (None, None)
    assert check_cache("teacache", None) == ("teacache", 0.12)
    assert check_cache("first-block", None) == ("first_block", 0.05)
    assert check_cache("first_block", 0) == ("first_block", 0.0)


# --------------------------------------------------------------------------- through the pipeline
def tiny_pipe(model, tm):
    from zimage_mlx import ZImagePipeline

    return ZImagePipeline(tokenizer=None, scheduler_config=sampler.SchedulerConfig(), transformer=model,
                          configs={"transformer": dict(tm.config), "vae": {"block_out_channels": [8, 8, 8, 8]}},
                          variant="base", dtype=mx.float32)


def pipe_run(pipe, caps, noise, steps=STEPS, **kw):
    return pipe(prompt_embeds=[mx.array(caps[0])], negative_prompt_embeds=[mx.array(caps[1])], latents=noise,
                num_inference_steps=steps, guidance_scale=4.0, height=LAT * 8, width=LAT * 8, output_type="latent",
                **kw)


def test_pipeline_cache_follows_the_written_rule(models):
    """pipe(..., cache=, cache_threshold=): threshold 0 is the uncached call bit for bit; with a threshold the
    latents are the torch reference's (diffusers' transformer under RuleMain) within 1e-4."""
    tm, model = models
    pipe = tiny_pipe(model, tm)
    noise, caps = _inputs(1)
    plain = pipe_run(pipe, caps, noise)
    assert plain.cache_stats is None
    zero = pipe_run(pipe, caps, noise, cache="first_block", cache_threshold=0)
    assert np.array_equal(np.array(zero.images), np.array(plain.images))
    assert zero.cache_stats["computed"] == STEPS
    out = pipe_run(pipe, caps, noise, cache="teacache", cache_threshold=0.3)
    reference, theirs = torch_reference_run(tm, "teacache", 0.3, caps, noise)
    stats = out.cache_stats
    assert stats["computed_steps"] == reference.computed and stats["skipped"] > 0
    assert stats["steps"] == STEPS and stats["computed"] + stats["skipped"] == STEPS
    assert len(stats["signal"]) == STEPS and stats["rule"] == "teacache" and stats["threshold"] == 0.3
    assert rel_err(np.array(out.images), theirs) <= 1e-4


def test_pipeline_cache_defaults_and_bad_arguments(models):
    tm, model = models
    pipe = tiny_pipe(model, tm)
    noise, caps = _inputs()
    one = pipe_run(pipe, caps, noise, steps=1, cache="first-block")
    assert one.cache_stats | {"signal": None} == {"rule": "first_block", "threshold": 0.05, "steps": 1,
                                                  "computed": 1, "skipped": 0, "signal": None,
                                                  "computed_steps": [True]}
    for kw, field, message in [
        (dict(cache="magcache"), "cache", "cache must be one of"),
        (dict(cache="teacache", cache_threshold=-1), "cache_threshold", "finite number >= 0"),
        (dict(cache="teacache", cache_threshold=float("nan")), "cache_threshold", "finite number >= 0"),
        (dict(cache_threshold=0.1), "cache_threshold", "needs cache="),
    ]:
        with pytest.raises(ValueError, match=message) as err:
            pipe_run(pipe, caps, noise, steps=2, **kw)
        assert err.value.field == field


# --------------------------------------------------------------------------- CLI and server
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, qwen_tokenizer_dir):
    from make_pipeline import save_tiny_pipeline

    root, _ = save_tiny_pipeline(tmp_path_factory.mktemp("cache") / "Z-Image-tiny", qwen_tokenizer_dir)
    return root


def test_cli_cache_flags(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from zimage_mlx.apps.cli import generate

    fast = ["-m", str(tiny_dir), "--quantize", "none", "--dtype", "float32", "--steps", "3", "-W", "64", "-H", "64",
            "--guidance", "2"]
    r = CliRunner().invoke(generate, ["a fox", *fast, "-o", str(tmp_path / "a.png"), "--cache", "first-block",
                                      "--cache-threshold", "0"])
    assert r.exit_code == 0, r.output
    assert "step cache first-block: 3 of 3 steps computed" in r.output
    for args, message in [(["--cache-threshold", "0.1"], "--cache-threshold needs --cache"),
                          (["--cache", "magcache"], "'magcache' is not one of"),
                          (["--cache", "teacache", "--cache-threshold", "-1"], "--cache-threshold"),
                          (["--cache", "teacache", "--cache-threshold", "nan"], "must be a finite number")]:
        r = CliRunner().invoke(generate, ["a fox", *fast, "-o", str(tmp_path / "b.png"), *args])
        assert r.exit_code == 2 and message in r.output, r.output


def test_server_cache_fields(tiny_dir):
    from starlette.testclient import TestClient

    from zimage_mlx import ZImagePipeline
    from zimage_mlx.apps.server import ServerConfig, create_app

    pipe = ZImagePipeline.from_pretrained(tiny_dir, dtype="float32", quantize=None, keep_text_encoder=True)
    body = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 3, "seed": 5, "guidance_scale": 2.0}
    with TestClient(create_app(pipe, ServerConfig(default_size=64, model="tiny")),
                    raise_server_exceptions=False) as client:
        r = client.post("/v1/images/generations", json={**body, "cache": "first_block", "cache_threshold": 1e6})
        assert r.status_code == 200, r.text
        expected = client.app.state.worker.call(lambda p: np.asarray(p(
            "a fox", height=64, width=64, num_inference_steps=3, seed=5, guidance_scale=2.0, cache="first_block",
            cache_threshold=1e6).images[0]), 60)
        plain = client.app.state.worker.call(lambda p: np.asarray(p(
            "a fox", height=64, width=64, num_inference_steps=3, seed=5, guidance_scale=2.0).images[0]), 60)
        import base64
        import io

        from PIL import Image

        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
        assert np.array_equal(got, expected) and not np.array_equal(got, plain)    # steps 2-3 reused step 1's
        for extra, message in [({"cache": "magcache"}, "cache must be one of"),
                               ({"cache_threshold": 0.1}, "cache_threshold=0.1 needs cache="),
                               ({"cache": "teacache", "cache_threshold": -1}, "'cache_threshold' must be at least"),
                               ({"cache": "teacache", "cache_threshold": "x"}, "'cache_threshold' must be a finite")]:
            r = client.post("/v1/images/generations", json={**body, **extra})
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
