"""The planner's policy: a pure function from a pool's recent metric samples to its desired replica count.

No Ray, no I/O, no clock: the mechanism (deploy/ray/planner_actor.py) samples the metric every
`autoscaling.interval_s`, calls `decide`, and starts or drains replicas to match. Tests replay recorded traces
through it (tests/test_planner_policy.py).

The rule, per pool and per tick:

1. Each sample says how many replicas the load of that moment needed: `value * ready / target` (per-replica metrics
   scale with the replicas serving; for latency percentiles this is the proportional rule of Kubernetes' HPA and
   Ray Serve). The look-back window's mean of that, rounded up and clamped to [min, max], is the recommendation.
   Within `tolerance` of the target the recommendation is the current count.
2. A recommendation above (below) the current count must hold continuously for `scale_up_delay_s`
   (`scale_down_delay_s`) before it is acted on; any tick that disagrees restarts that wait, and every change
   restarts both. So two changes are always at least the later one's delay apart: no flapping faster than that.
3. One decision moves the count by at most `max_step`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from deploy.autoscale import PoolAutoscaling


@dataclass(frozen=True)
class Sample:
    """One reading of a pool's scaling metric."""

    t: float  # when it was taken (seconds, any monotonic clock shared with `decide`'s `now`)
    value: float | None  # the metric; None: nothing to read (a latency metric with no request finished)
    ready: int  # replicas serving when it was taken


@dataclass(frozen=True)
class PolicyState:
    """What the policy carries from one tick to the next (it is a value: `decide` returns the next one)."""

    up_since: float | None = None  # when the recommendation went above the current count, if it still is
    down_since: float | None = None  # when it went below, if it still is


@dataclass(frozen=True)
class Decision:
    """One tick's outcome for one pool, with the numbers behind it (logged and exported as metrics)."""

    metric: str  # the metric the pool scales on
    value: float | None  # its mean over the window; None when the window held no sample
    target: float  # the configured target
    current: int  # replicas wanted before this decision
    ready: int  # replicas serving now
    recommended: int  # what the window asks for, clamped to [min, max]
    replicas: int  # replicas wanted after this decision
    reason: str  # why, in words
    waited_s: float = 0.0  # how long the recommendation had pointed this way when the change was made

    @property
    def action(self) -> str:
        return "up" if self.replicas > self.current else "down" if self.replicas < self.current else "hold"


def window_value(cfg: PoolAutoscaling, samples: Sequence[Sample], now: float) -> tuple[float | None, float | None]:
    """(mean metric, mean replicas needed) over the samples in the look-back window; (None, None) if none counts.

    For a latency metric, samples without a value are skipped and a window with none at all reads as an idle
    pool (0, 0): no request finished in the window, so there is no latency to hold down.
    """
    recent = [s for s in samples if now - cfg.window_s < s.t <= now]
    valued = [s for s in recent if s.value is not None and s.ready > 0]
    if not valued:
        return (0.0, 0.0) if cfg.latency and recent else (None, None)
    value = sum(s.value for s in valued) / len(valued)  # type: ignore[misc]
    needed = sum(s.value * s.ready / cfg.target for s in valued) / len(valued)  # type: ignore[operator]
    return value, needed


def recommend(cfg: PoolAutoscaling, value: float, needed: float, current: int) -> int:
    """Replicas the window asks for, clamped to [min, max]; the current count when within tolerance of target."""
    if abs(value / cfg.target - 1.0) <= cfg.tolerance:
        return max(cfg.min_replicas, min(cfg.max_replicas, current))
    # The epsilon keeps float noise (3.0000000001) from asking for a replica nobody needs.
    return max(cfg.min_replicas, min(cfg.max_replicas, math.ceil(needed - 1e-9)))


def decide(cfg: PoolAutoscaling, samples: Sequence[Sample], current: int, ready: int, now: float,
           state: PolicyState) -> tuple[Decision, PolicyState]:
    """The pool's replica count after this tick, and the state to pass to the next tick."""
    value, needed = window_value(cfg, samples, now)

    def hold(rec: int, reason: str, nxt: PolicyState) -> tuple[Decision, PolicyState]:
        return Decision(cfg.metric, value, cfg.target, current, ready, rec, current, reason), nxt

    if current < cfg.min_replicas or current > cfg.max_replicas:  # e.g. the config changed under a running pool
        new = max(cfg.min_replicas, min(cfg.max_replicas, current))
        return Decision(cfg.metric, value, cfg.target, current, ready, new, new, "outside [min, max]"), PolicyState()
    if value is None or needed is None:
        return hold(current, "no metric in the window yet", PolicyState())
    rec = recommend(cfg, value, needed, current)
    if rec == current:
        on_target = abs(value / cfg.target - 1.0) <= cfg.tolerance
        reason = "within tolerance of target" if on_target else f"needs {needed:.2f} replicas"
        return hold(rec, reason, PolicyState())
    up = rec > current
    since = (state.up_since if up else state.down_since)
    since = now if since is None else since
    delay = cfg.scale_up_delay_s if up else cfg.scale_down_delay_s
    waited = now - since
    if waited < delay:
        nxt = PolicyState(up_since=since) if up else PolicyState(down_since=since)
        return hold(rec, f"scale-{'up' if up else 'down'} pending ({waited:.1f}s of {delay:g}s)", nxt)
    new = min(rec, current + cfg.max_step) if up else max(rec, current - cfg.max_step)
    reason = f"{cfg.metric} {value:.4g} vs target {cfg.target:g} for {waited:.1f}s"
    return Decision(cfg.metric, value, cfg.target, current, ready, rec, new, reason, waited), PolicyState()
