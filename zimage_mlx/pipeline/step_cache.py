"""Step caching: skip main layers 1..N-1 of a denoising step by reusing the residual of the last computed step.

Two rules, both driven by the signal r = (main layer 0's output) − (its input), compared in float32 over the
positive-branch samples (every token of their unified sequence; docs/step-cache.md):

* "first_block" -- diffusers 0.42.1 `hooks/first_block_cache.py` (FirstBlockCacheConfig): d = mean|r − r_ref| /
  mean|r_ref| with r_ref from the last computed step; compute when d > threshold, else output = layer-0 output +
  the tail (last layer's output − layer-0 output) of the last computed step.
* "teacache" -- mlx-teacache 0.14.1's rule for Z-Image Base (`variants/z_image_base`, `_kernel/gate.py`): x =
  mean|r − r_prev| / mean|r_prev| against the previous step; above the calibrated range always compute, below it
  clamp; accumulate max(0, p(x)); skip while the sum stays under the threshold and fewer than 8 steps in a row were
  skipped; the first and last steps compute; a skip's output = layer-0 input + the full residual (last layer's
  output − layer-0 input) of the last computed step.

`StepCache.forward(transformer, latents, timestep, captions, control)` replaces one transformer call. Under CFG
the batch holds both branches: one decision from the positive rows, a residual cached for every row. A ControlNet's
layer hints are computed only on computed steps (they are part of the cached residual). With a `group`
(parallel="tensor" | "cfg") every process takes rank 0's signal, so all make the same decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx

RULES = ("teacache", "first_block")
DEFAULT_THRESHOLDS = {"teacache": 0.12, "first_block": 0.05}
# mlx-teacache 0.14.1 variants/z_image_base/config.py (the "Signal B" fit, c4 .. c0) and its calibrated range.
TEACACHE_COEFFICIENTS = (-898.9907628349583, 367.7086118008557, -45.41511572598643, 3.95114319842774, 0.0)
TEACACHE_RANGE = (0.027887196237753466, 0.25914120883567665)
MAX_CONSECUTIVE_SKIPS = 8       # mlx-teacache _kernel/gate.py: a runaway-skip guard


def check_cache(cache, threshold) -> tuple[str | None, float | None]:
    """(rule, threshold) from the user's `cache` / `cache_threshold`, or a ValueError naming the bad one."""
    return cache_rule(cache, threshold), cache_threshold(cache_rule(cache, threshold), threshold)


def cache_rule(cache, threshold=None) -> str | None:
    """The rule's name ("first-block", the CLI's spelling, is "first_block"), or None for no cache; a ValueError
    for an unknown name or a threshold without a cache."""
    if cache is None:
        if threshold is not None:
            raise ValueError(f"cache_threshold={threshold!r} needs cache='teacache' or 'first_block'")
        return None
    rule = cache.replace("-", "_") if isinstance(cache, str) else cache
    if rule not in RULES:
        raise ValueError(f"cache must be one of {RULES} (or None), got {cache!r}")
    return rule


def cache_threshold(rule: str | None, threshold) -> float | None:
    """The threshold checked (a finite number >= 0), or the rule's default for None."""
    if rule is None:
        return None
    if threshold is None:
        return DEFAULT_THRESHOLDS[rule]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or threshold < 0:
        raise ValueError(f"cache_threshold must be a finite number >= 0, got {threshold!r}")
    return float(threshold)


def teacache_price(x: float) -> float:
    """max(0, p(x)) with x clamped up to the calibrated range's low end (callers compute above its high end)."""
    x = max(x, TEACACHE_RANGE[0])
    c4, c3, c2, c1, c0 = TEACACHE_COEFFICIENTS
    return max(0.0, (((c4 * x + c3) * x + c2) * x + c1) * x + c0)


@dataclass
class CacheStats:
    """What a cached run did: one entry per step in `signal` (None where there was nothing to compare against) and
    `computed_steps` (True: main layers 1..N-1 ran)."""

    rule: str
    threshold: float
    signal: list = field(default_factory=list)
    computed_steps: list = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.computed_steps)

    @property
    def computed(self) -> int:
        return sum(self.computed_steps)

    @property
    def skipped(self) -> int:
        return self.steps - self.computed

    def as_dict(self) -> dict:
        return {"rule": self.rule, "threshold": self.threshold, "steps": self.steps, "computed": self.computed,
                "skipped": self.skipped, "signal": list(self.signal), "computed_steps": list(self.computed_steps)}


class StepCache:
    """The cached state of one generation of `num_steps` transformer calls (one per denoising step).

    positive_rows: the batch rows whose signal decides (CFG: the positive half; default every row).
    group: an mx.distributed group whose processes must agree (parallel "tensor" / "cfg"); rank 0's signal rules.
    """

    def __init__(self, rule: str, threshold: float | None, num_steps: int, positive_rows=None, group=None):
        self.rule, self.threshold = check_cache(rule, threshold)
        self.num_steps = num_steps
        self.positive_rows = None if positive_rows is None else set(positive_rows)
        self.group = group
        self.stats = CacheStats(self.rule, self.threshold)
        self._signal_ref: dict = {}     # layout key -> positive rows' r: r_prev (teacache) / r_ref (first_block)
        self._residual: dict = {}       # (layout key, group k) -> cached residual of the whole caption group
        self._acc = 0.0
        self._run = 0

    # ------------------------------------------------------------------ the forward
    def model_call(self, transformer, control=None):
        """The transformer (with the ControlNet hook `control`) as guidance.py's model call (x, t, captions,
        doubled), run through this cache; doubled: x is CFG's [positive ; negative] batch."""
        def call(x, t, captions, doubled=False):
            hook = control.doubled() if doubled and control is not None else control
            return self.forward(transformer, x, t, captions, hook)
        return call

    def forward(self, model, latents: mx.array, timestep, captions, control=None) -> mx.array:
        """model(latents, timestep, captions, control) with main layers 1..N-1 run or reused per this rule.
        captions: `model.prepare`'s Captions for this batch (the pipeline prepares them once per call)."""
        B = latents.shape[0]
        timestep = mx.broadcast_to(mx.array(timestep).reshape(-1), (B,))
        whole = len(captions.groups) == 1
        parts = []
        for g in captions.groups:
            rows = mx.array(g.index)
            lat, t = (latents, timestep) if whole else (latents[rows], timestep[rows])
            ctl = control if whole or control is None else control.select(g.index)
            u, temb = model.stream_in(lat, t, g, ctl)
            first = model.layers[0](u, g.cos, g.sin, temb)
            parts.append((g, lat, u, first, temb, ctl))
        layout = id(captions)
        compute = self._decide(layout, [(g.index, first, u) for g, _, u, first, _, _ in parts],
                               all((layout, k) in self._residual for k in range(len(parts))))
        out = [None] * B
        for k, (g, lat, u, first, temb, ctl) in enumerate(parts):
            if compute:
                hints = ctl.layer_hints(u, g.cos, g.sin, temb) if ctl is not None else {}
                h = model.main_layers(first + hints[0] if 0 in hints else first, g, temb, hints, start=1)
                residual = h - (u if self.rule == "teacache" else first)
                mx.eval(residual)         # (keeps one array, not the step's graph, until the next skip)
                self._residual[(layout, k)] = residual
            else:
                h = (u if self.rule == "teacache" else first) + self._residual[(layout, k)]
            y = model.stream_out(h, temb, lat.shape)
            if whole:
                return y
            for j, i in enumerate(g.index):
                out[i] = y[j]
        return mx.stack(out)

    # ------------------------------------------------------------------ the rules
    def _decide(self, layout, signals: list, have_residual: bool) -> bool:
        """True: compute main layers 1..N-1 this step. signals: (batch rows, layer-0 output, its input) per caption
        group."""
        step = len(self.stats.computed_steps)
        r = [self._positive(rows, first, u) for rows, first, u in signals]
        mx.eval([a for a in r if a is not None])
        ref = self._signal_ref.get(layout)
        value = self._relative_change(r, ref) if ref is not None else None
        if self.rule == "teacache":
            self._signal_ref[layout] = r       # r_prev: the previous step's signal, every step
            compute = self._teacache(step, value)
        else:
            compute = value is None or value > self.threshold
        # a NaN/inf signal (as mlx-teacache's "numerical miss") or a missing residual: compute
        compute = compute or not have_residual or (value is not None and not math.isfinite(value))
        if compute:
            self._acc, self._run = 0.0, 0
            if self.rule == "first_block":
                self._signal_ref[layout] = r   # r_ref: only on computed steps
        else:
            self._run += 1
        self.stats.signal.append(value)
        self.stats.computed_steps.append(compute)
        return compute

    def _teacache(self, step: int, x: float | None) -> bool:
        if step == 0 or step >= self.num_steps - 1 or x is None or not math.isfinite(x) or x > TEACACHE_RANGE[1]:
            return True
        self._acc += teacache_price(x)
        return not (self._acc < self.threshold and self._run < MAX_CONSECUTIVE_SKIPS)

    def _positive(self, rows, first: mx.array, u: mx.array) -> mx.array | None:
        """The positive rows' signal r = first − u in float32 (None when the group has no positive row)."""
        keep = [j for j, i in enumerate(rows) if self.positive_rows is None or i in self.positive_rows]
        if not keep:
            return None
        if len(keep) < len(rows):
            first, u = first[mx.array(keep)], u[mx.array(keep)]
        return first.astype(mx.float32) - u.astype(mx.float32)

    def _relative_change(self, r: list, ref: list) -> float:
        """sum|r − ref| / sum|ref| over the positive rows (= the ratio of the two means), rank 0's under a group."""
        num = den = mx.array(0.0, dtype=mx.float32)
        for a, b in zip(r, ref):
            if a is not None and b is not None:
                num = num + mx.abs(a - b).sum()
                den = den + mx.abs(b).sum()
        pair = mx.stack([num, den])
        if self.group is not None:
            pair = mx.distributed.all_gather(pair[None], group=self.group)[0]
        num, den = pair.tolist()
        return num / max(den, 1e-12)
