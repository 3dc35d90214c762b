"""Metal runtime settings around one generation, sized from its memory plan (memory.MemoryPlan): the wired limit
(`mx.set_wired_limit`) and MLX's buffer-cache limit (`mx.set_cache_limit`), restored after the call. No-ops off
Metal (MLX's CPU and CUDA backends)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class RuntimeLimits:
    """What to set around one generation: bytes for `mx.set_wired_limit` / `mx.set_cache_limit` (None: leave)."""

    wired: int | None = None
    cache: int | None = None


def runtime_limits(plan, metal: bool | None = None, info: dict | None = None) -> RuntimeLimits:
    """The Metal settings for a call planned by `plan` (a memory.MemoryPlan; none without a plan or off Metal): wire
    the plan's predicted peak when the system's wired limit (`max_recommended_working_set_size`) allows it -- the memory stays resident,
    so no page-outs between steps (a peer measured the run-to-run jitter fall from 2.7x to < 1 %) -- and cap MLX's
    buffer cache at the memory the plan leaves free (available − peak), so cached buffers never push past the plan."""
    metal = mx.metal.is_available() if metal is None else metal
    if plan is None or not metal:
        return RuntimeLimits()
    if info is None:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    system = int(info.get("max_recommended_working_set_size", 0))
    wired = plan.predicted_peak if 0 < plan.predicted_peak < system else None
    return RuntimeLimits(wired, max(plan.available - plan.predicted_peak, 0))


@contextmanager
def applied_limits(limits: RuntimeLimits):
    """Set `limits` for the duration of the block; the previous limits are restored after it (also on errors)."""
    previous = {}
    try:
        if limits.wired is not None:
            previous["wired"] = mx.set_wired_limit(limits.wired)
        if limits.cache is not None:
            previous["cache"] = mx.set_cache_limit(limits.cache)
        yield limits
    finally:
        if "cache" in previous:
            mx.set_cache_limit(previous["cache"])
        if "wired" in previous:
            mx.set_wired_limit(previous["wired"])
