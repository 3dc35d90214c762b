"""Metal runtime settings around a generation (memory.runtime_limits / applied_limits), tested as decisions: the
calls made to mx.set_wired_limit / mx.set_cache_limit and their restoration (this machine has no Metal)."""

import mlx.core as mx
import pytest

from zimage_mlx.memory import MemoryPlan, RuntimeLimits, applied_limits, runtime_limits

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
