"""The planner, simulated: deploy/ray/planner_actor.py's tick around the real policy.

Every `autoscaling.interval_s` it stops drained replicas, reads one router snapshot, turns it into one metric
sample per autoscaled pool with deploy/pool_metrics.py's `pool_sample`, keeps the look-back window, asks
deploy/planner.py's `decide` for the pool's replica count and reconciles the pool to it - the actor's `_plan`
and `tick`, with simulated time for its monotonic clock. Nothing of the policy is copied.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from deploy.autoscale import AutoscalingConfig
from deploy.planner import Decision, PolicyState, Sample, decide
from deploy.pool_metrics import pool_sample
from simulator.pool import Pool


class Autoscaler:
    """Desired replica counts per pool, moved by the planner's policy on the pools' metrics."""

    def __init__(self, cfg: AutoscalingConfig, pools: dict[str, Pool], desired: dict[str, int]) -> None:
        self.cfg, self.pools = cfg, pools
        self.desired = dict(desired)
        self.windows: dict[str, deque[Sample]] = {r: deque() for r in pools}
        self.states = {r: PolicyState() for r in pools}
        self.last: dict[str, Decision] = {}
        self.decisions: list[dict[str, Any]] = []  # every change, with the numbers behind it
        self._prev: dict[str, Any] | None = None

    def tick(self, now: float, snapshot: dict[str, Any]) -> None:
        """One planner tick at `now` on a router snapshot (RouterActor.snapshot's shape)."""
        for pool in self.pools.values():
            pool.poll_draining()
        for role, pool in self.pools.items():
            self.plan(role, snapshot, now)
            pool.reconcile(self.desired[role])
        self._prev = snapshot

    def plan(self, role: str, snapshot: dict[str, Any], now: float) -> Decision | None:
        """PlannerActor._plan: update `desired[role]` from the policy; a fixed pool keeps its size."""
        policy = self.cfg.pool(role)
        if policy is None:
            return None
        sample = pool_sample(policy.metric, role, snapshot, self._prev, now)
        window = self.windows[role]
        window.append(sample)
        while window and window[0].t <= now - policy.window_s:
            window.popleft()
        decision, self.states[role] = decide(policy, list(window), self.desired[role], sample.ready, now,
                                             self.states[role])
        self.last[role] = decision
        if decision.action != "hold":
            self.desired[role] = decision.replicas
            self.decisions.append({"t": round(now, 3), "pool": role, "action": decision.action,
                                   "from": decision.current, "to": decision.replicas, "value": decision.value,
                                   "ready": decision.ready, "reason": decision.reason})
        return decision
