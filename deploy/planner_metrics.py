"""The planner's decisions as Prometheus metrics, served on the router's /metrics.

The planner pushes a plain-data report after every tick (`PlannerReport`); the router actor registers a
`PlannerCollector` on its app's registry, which renders the latest report at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REPLICA_STATES = ("starting", "ready", "draining")


@dataclass(frozen=True)
class PoolReport:
    """One pool after a planner tick."""

    desired: int  # replicas the planner wants
    replicas: dict[str, int]  # replicas by state: starting | ready | draining
    autoscaled: bool  # whether a policy sizes the pool (else it is fixed)
    metric: str = ""  # the policy's metric, "" when fixed
    value: float | None = None  # its window mean at the last decision
    target: float = 0.0  # its target
    recommended: int = 0  # what the window asked for at the last decision
    decisions: dict[str, int] = field(default_factory=dict)  # scale decisions so far by action: up | down
    replaced: int = 0  # replicas that died and were replaced so far


class PlannerCollector(Collector):
    """Renders the latest `{pool: PoolReport}` pushed by the planner."""

    def __init__(self) -> None:
        self.pools: dict[str, PoolReport] = {}

    def update(self, pools: dict[str, Any]) -> None:
        self.pools = {name: p if isinstance(p, PoolReport) else PoolReport(**p) for name, p in pools.items()}

    def collect(self) -> Iterator[Metric]:
        replicas = GaugeMetricFamily("disagg_planner_replicas", "Replicas of the pool by state", labels=["pool", "state"])
        desired = GaugeMetricFamily("disagg_planner_desired_replicas", "Replicas the planner wants", labels=["pool"])
        recommended = GaugeMetricFamily("disagg_planner_recommended_replicas",
                                        "Replicas the metric window asked for at the last decision", labels=["pool"])
        value = GaugeMetricFamily("disagg_planner_metric_value", "Window mean of the pool's scaling metric",
                                  labels=["pool", "metric"])
        target = GaugeMetricFamily("disagg_planner_metric_target", "Target of the pool's scaling metric",
                                   labels=["pool", "metric"])
        decisions = CounterMetricFamily("disagg_planner_decisions", "Scale decisions by action",
                                        labels=["pool", "action"])
        replaced = CounterMetricFamily("disagg_planner_replacements", "Replicas that died and were replaced",
                                       labels=["pool"])
        for pool, r in sorted(self.pools.items()):
            for state in REPLICA_STATES:
                replicas.add_metric([pool, state], float(r.replicas.get(state, 0)))
            desired.add_metric([pool], float(r.desired))
            replaced.add_metric([pool], float(r.replaced))
            for action in ("up", "down"):
                decisions.add_metric([pool, action], float(r.decisions.get(action, 0)))
            if r.autoscaled:
                recommended.add_metric([pool], float(r.recommended))
                target.add_metric([pool, r.metric], r.target)
                if r.value is not None:
                    value.add_metric([pool, r.metric], r.value)
        yield from (replicas, desired, recommended, value, target, decisions, replaced)
