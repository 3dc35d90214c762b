"""Metal runtime settings around a generation (metal_limits.runtime_limits / applied_limits), tested as decisions: the
calls made to mx.set_wired_limit / mx.set_cache_limit and their restoration (this machine has no Metal)."""

import mlx.core as mx
import pytest

from zimage_mlx.memory import MemoryPlan
from zimage_mlx.metal_limits import RuntimeLimits, applied_limits, runtime_limits

GB = 10**9


def plan(peak=6 * GB, available=10 * GB):
    return MemoryPlan(bits={"transformer": 4}, group_size=64, free_text_encoder_first=True, predicted_peak=peak,
                      available=available, source="test")


def test_wires_the_planned_peak_and_caps_the_cache_at_what_the_plan_leaves():
    limits = runtime_limits(plan(), metal=True, info={"max_recommended_working_set_size": 11 * GB})
    assert limits == RuntimeLimits(wired=6 * GB, cache=4 * GB)


def test_no_settings_off_metal_without_a_plan_or_beyond_the_system_wired_limit():
    assert runtime_limits(plan(), metal=False) == RuntimeLimits()
    assert runtime_limits(None, metal=True, info={"max_recommended_working_set_size": 11 * GB}) == RuntimeLimits()
    too_big = runtime_limits(plan(12 * GB, 16 * GB), metal=True, info={"max_recommended_working_set_size": 11 * GB})
    assert too_big == RuntimeLimits(wired=None, cache=4 * GB)
    assert runtime_limits(plan(), metal=False) == runtime_limits(plan())     # this machine: no Metal


def test_limits_are_set_for_the_call_and_restored_after_it_even_on_errors(monkeypatch):
    calls = []
    state = {"wired": 0, "cache": 123}

    def setter(name):
        def set_limit(value):
            calls.append((name, value))
            old, state[name] = state[name], value
            return old
        return set_limit

    monkeypatch.setattr(mx, "set_wired_limit", setter("wired"))
    monkeypatch.setattr(mx, "set_cache_limit", setter("cache"))
    with pytest.raises(RuntimeError, match="boom"):
        with applied_limits(RuntimeLimits(wired=6 * GB, cache=4 * GB)):
            assert state == {"wired": 6 * GB, "cache": 4 * GB}
            raise RuntimeError("boom")
    assert calls == [("wired", 6 * GB), ("cache", 4 * GB), ("cache", 123), ("wired", 0)]
    assert state == {"wired": 0, "cache": 123}
    calls.clear()
    with applied_limits(RuntimeLimits()):
        pass
    assert calls == []


def test_a_generation_runs_inside_the_limits(monkeypatch):
    """pipe(...) with a plan on "Metal": the plan's limits hold while the steps run and are restored after."""
    import numpy as np

    from zimage_mlx import ZImagePipeline
    from zimage_mlx.models.transformer import ZImageTransformer, ZImageTransformerConfig
    from zimage_mlx.pipeline import pipeline
    from zimage_mlx.sampler import SchedulerConfig

    seen, state = [], {"wired": 0, "cache": 7}

    def setter(name):
        def set_limit(value):
            old, state[name] = state[name], value
            return old
        return set_limit

    monkeypatch.setattr(mx, "set_wired_limit", setter("wired"))
    monkeypatch.setattr(mx, "set_cache_limit", setter("cache"))
    monkeypatch.setattr(pipeline, "runtime_limits",
                        lambda p: runtime_limits(p, metal=True, info={"max_recommended_working_set_size": 11 * GB}))
    cfg = dict(dim=32, n_heads=2, n_layers=1, n_refiner_layers=1, cap_feat_dim=16, axes_dims=[8, 4, 4])
    pipe = ZImagePipeline(tokenizer=None, scheduler_config=SchedulerConfig(),
                          transformer=ZImageTransformer(ZImageTransformerConfig(**cfg)),
                          configs={"transformer": cfg, "vae": {"block_out_channels": [8, 8, 8, 8]}}, plan=plan())
    monkeypatch.setattr(pipe, "check_size", lambda h, w, b=1: (h, w))
    pipe(prompt_embeds=[mx.ones((3, 16))], height=32, width=32, num_inference_steps=2, guidance_scale=0.0,
         output_type="latent", latents=np.zeros((1, 16, 4, 4), np.float32), on_step=lambda r: seen.append(dict(state)))
    assert seen == [{"wired": 6 * GB, "cache": 4 * GB}] * 2 and state == {"wired": 0, "cache": 7}
