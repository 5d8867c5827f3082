"""The `autoscaling:` section of the cluster YAML: one policy per pool, read by the planner (deploy/planner.py).

    autoscaling:
      interval_s: 5                  # one metric sample and one decision per pool this often
      prefill:                       # absent: the pool stays at pools.prefill.replicas
        min_replicas: 1
        max_replicas: 8
        metric: queued_tokens        # or ttft_p90
        target: 2048                 # queued prompt tokens per replica (ttft_p90: seconds)
        scale_up_delay_s: 30         # the pool must look too small this long before a replica is added
        scale_down_delay_s: 300      # ... too big this long before one is drained
        max_step: 1                  # replicas added or drained by one decision, at most
        window_s: 60                 # look-back: decisions use the metric averaged over this window
      decode: {min_replicas: 1, max_replicas: 8, metric: kv_usage, target: 0.7}

Only `disagg deploy` (Ray) acts on it; `disagg serve` starts `pools.*.replicas` workers and ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from engine.config import ConfigError, from_mapping

# pool -> metric -> (unit, True if it is a latency read from the router's histograms)
POOL_METRICS: dict[str, dict[str, tuple[str, bool]]] = {
    "prefill": {"queued_tokens": ("prompt tokens queued per replica", False), "ttft_p90": ("seconds", True)},
    "decode": {"kv_usage": ("fraction of KV blocks in use, mean over replicas", False), "itl_p90": ("seconds", True)},
}


def is_latency_metric(metric: str) -> bool:
    return any(metric in m and m[metric][1] for m in POOL_METRICS.values())


@dataclass(frozen=True)
class PoolAutoscaling:
    """How one pool scales: bounds, the metric it is held at, and how fast it may move."""

    metric: str  # queued_tokens | ttft_p90 (prefill); kv_usage | itl_p90 (decode)
    target: float  # the metric's value the pool is sized to hold (per replica for queued_tokens)
    min_replicas: int = 1  # never fewer (>= 1: scale to zero is not supported)
    max_replicas: int = 1  # never more
    scale_up_delay_s: float = 30.0  # the pool must look too small continuously this long before replicas are added
    scale_down_delay_s: float = 300.0  # ... too big this long before replicas are drained
    max_step: int = 1  # replicas added or drained by one decision, at most
    window_s: float = 60.0  # look-back: each decision uses the metric averaged over this many seconds
    tolerance: float = 0.1  # |metric / target - 1| up to this counts as on target: no change

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.min_replicas, int) and self.min_replicas >= 1,
             f"min_replicas must be an int >= 1 (scale to zero is not supported), got {self.min_replicas!r}"),
            (isinstance(self.max_replicas, int) and self.max_replicas >= self.min_replicas,
             f"max_replicas ({self.max_replicas!r}) must be an int >= min_replicas ({self.min_replicas})"),
            (_number(self.target) and self.target > 0, f"target must be a positive number, got {self.target!r}"),
            (_number(self.scale_up_delay_s) and self.scale_up_delay_s >= 0, "scale_up_delay_s must be >= 0"),
            (_number(self.scale_down_delay_s) and self.scale_down_delay_s >= 0, "scale_down_delay_s must be >= 0"),
            (isinstance(self.max_step, int) and self.max_step >= 1, f"max_step must be an int >= 1, got {self.max_step!r}"),
            (_number(self.window_s) and self.window_s > 0, "window_s must be positive"),
            (_number(self.tolerance) and 0 <= self.tolerance < 1, "tolerance must be in [0, 1)"),
            (self.metric != "kv_usage" or self.target <= 1, f"kv_usage target is a fraction in (0, 1], got {self.target}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def latency(self) -> bool:
        """Whether the metric is a latency percentile (no sample in the window means an idle pool)."""
        return is_latency_metric(self.metric)


@dataclass(frozen=True)
class AutoscalingConfig:
    """Per-pool autoscaling; a pool without a section keeps its fixed `replicas` (dead replicas are still replaced)."""

    interval_s: float = 5.0  # seconds between metric samples and decisions
    prefill: PoolAutoscaling | None = None  # the prefill pool's policy; None: fixed size
    decode: PoolAutoscaling | None = None  # the decode pool's policy; None: fixed size

    def __post_init__(self) -> None:
        if not (_number(self.interval_s) and self.interval_s > 0):
            raise ConfigError(f"autoscaling.interval_s must be positive, got {self.interval_s!r}")
        for pool in ("prefill", "decode"):
            p = self.pool(pool)
            if p is not None and p.window_s < self.interval_s:
                raise ConfigError(f"autoscaling.{pool}.window_s ({p.window_s:g}) must be >= interval_s "
                                  f"({self.interval_s:g}): the window must hold at least one sample")

    def pool(self, name: str) -> PoolAutoscaling | None:
        return getattr(self, name)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AutoscalingConfig:
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown key(s) in autoscaling: {', '.join(sorted(unknown))} "
                              "(expected interval_s, prefill, decode)")
        for pool in ("prefill", "decode"):
            if d.get(pool) is not None:
                d[pool] = _pool_from_dict(pool, d[pool])
        return from_mapping(cls, d, "autoscaling")


def _pool_from_dict(pool: str, d: Any) -> PoolAutoscaling:
    where = f"autoscaling.{pool}"
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(d).__name__}")
    allowed = POOL_METRICS[pool]
    for key in ("metric", "target"):
        if key not in d:
            raise ConfigError(f"{where}.{key} is required (metric: {' | '.join(allowed)})")
    if d["metric"] not in allowed:
        raise ConfigError(f"{where}.metric must be one of {', '.join(allowed)}, got {d['metric']!r}")
    try:
        return from_mapping(PoolAutoscaling, d, where)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)
