"""The planner as a Ray actor: the mechanism around the policy in deploy/planner.py.

Every `autoscaling.interval_s` it
  1. registers replicas that became ready, drops dead ones, stops drained ones (deploy/ray/replica_pool.py);
  2. reads one router snapshot and turns it into one metric sample per autoscaled pool (deploy/pool_metrics.py);
  3. asks the policy for each pool's replica count (a fixed pool keeps `pools.<pool>.replicas`);
  4. starts or drains replicas to match - a dead replica is replaced here too, since it no longer counts;
  5. logs every scale decision with the numbers behind it and pushes a report to the router's /metrics;
  6. makes every router replica know exactly its workers (deploy/ray/routers.py): a router that restarted, or
     missed a change while it was down, catches up here.
New actors that find no node with their resources pend; Ray's autoscaler (if the cluster has one) adds the node.

Restarts: the launcher creates the planner with `max_restarts=-1`. A restarted planner (Ray reran `__init__`)
queues `recover()` on itself: it adopts every worker actor it finds (worker_actor.discover), names new replicas
after the highest index in use, keeps each pool's size within its bounds, and resumes the loop. Scale decisions
and their history start again (the policy's window refills within `window_s`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import time
from typing import Any

import ray

from deploy.config import ClusterConfig
from deploy.planner import Decision, PolicyState, Sample, decide
from deploy.planner_metrics import PoolReport
from deploy.pool_metrics import pool_sample
from deploy.ray.replica_pool import ReplicaPool
from deploy.ray.routers import ROUTER_NAME, RouterSet
from deploy.ray.worker_actor import call_self_after_init, discover, reconstructed

log = logging.getLogger("disagg.planner")

__all__ = ["PLANNER_NAME", "ROUTER_NAME", "PlannerActor"]

PLANNER_NAME = "planner"
FIXED_INTERVAL_S = 5.0  # tick period when no pool autoscales (replacing dead replicas still needs a loop)


@ray.remote(num_cpus=0, max_restarts=-1)
class PlannerActor:
    """Owns the deployment's worker actors; `start` brings the pools up, `shutdown` drains and stops them."""

    def __init__(self, cluster: dict[str, Any], namespace: str) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg = ClusterConfig.from_dict(cluster)
        self.namespace = namespace
        self.routers = RouterSet(namespace, self.cfg.router_config().processes)
        self.counters: dict[str, itertools.count[int]] = collections.defaultdict(itertools.count)
        roles = [r for r in ("prefill", "decode") if self.cfg.pool(r).replicas > 0]
        self.pools = {r: ReplicaPool(r, cluster, self.routers, namespace,
                                     lambda role: f"{role}-{next(self.counters[role])}") for r in roles}
        self.desired = {r: self.cfg.pool(r).replicas for r in roles}
        self.windows: dict[str, collections.deque[Sample]] = {r: collections.deque() for r in roles}
        self.policy_states = {r: PolicyState() for r in roles}
        self.last: dict[str, Decision] = {}
        self.decisions: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        self.counts = {r: {"up": 0, "down": 0} for r in roles}
        self.interval_s = self.cfg.autoscaling.interval_s if self._autoscaled() else FIXED_INTERVAL_S
        self._prev_snapshot: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()  # set by shutdown: the loop ends after its current tick
        # A restarted planner answers `status` only once `recover` has adopted the pools: before, its pools are
        # empty and a caller would read a deployment without replicas.
        self._recovered = asyncio.Event()
        self._recovering = False  # recover() has begun (it may be called twice: call_self_after_init retries)
        if not reconstructed():
            self._recovered.set()
        else:
            log.warning("planner actor restarted; adopting the running replicas")
            call_self_after_init("recover")  # runs once __init__ has returned

    def _autoscaled(self) -> bool:
        return any(self.cfg.autoscaling.pool(r) is not None for r in self.pools)

    # ---- lifecycle --------------------------------------------------------------------------------------------
    async def start(self, timeout_s: float) -> dict[str, Any]:
        """Start every pool's replicas and the planning loop; return once all are ready (raise on a failure)."""
        for role, pool in self.pools.items():
            for _ in range(self.desired[role]):
                pool.start()
        self._task = asyncio.create_task(self._run(), name="planner")
        deadline = time.monotonic() + timeout_s
        while not all(p.counts()["ready"] >= self.desired[r] for r, p in self.pools.items()):
            failures = [f for p in self.pools.values() for f in p.failures]
            if failures:
                raise RuntimeError("a worker failed to start: " + failures[0])
            if time.monotonic() > deadline:
                raise TimeoutError(f"pools not ready after {timeout_s:.0f}s: {self._counts()}")
            await asyncio.sleep(0.25)
        return await self.status()

    async def recover(self) -> None:
        """After a restart: adopt the worker actors found, then plan as before (module docstring). Once: a second
        call waits for the first."""
        if self._recovering:
            await self._recovered.wait()
            return
        self._recovering = True
        try:
            for attempt in itertools.count(1):
                try:  # without the list it would start a second set of replicas: retry until it comes
                    found = await asyncio.to_thread(discover, self.namespace)
                    break
                except Exception:
                    log.exception("could not list the worker actors (attempt %d); retrying", attempt)
                    await asyncio.sleep(min(30.0, 2.0 * attempt))
            for info in sorted(found, key=lambda i: int(i["name"].split("-")[1])):
                role, index = info["name"].split("-")
                self.counters[role] = itertools.count(max(int(index) + 1, next(self.counters[role])))
                if role in self.pools and (info["alive"] or not info["address"]):
                    self.pools[role].adopt(info)
                else:  # its worker exited while no planner watched: remove the actor, the pool replaces it
                    ray.kill(info["handle"], no_restart=True)
            for role, pool in self.pools.items():
                policy = self.cfg.autoscaling.pool(role)
                if policy is not None:
                    self.desired[role] = max(policy.min_replicas, min(policy.max_replicas, len(pool.active())))
            log.info("planner recovered: %s, desired %s", self._counts(), self.desired)
            self._task = asyncio.create_task(self._run(), name="planner")
        finally:  # a failed recovery still answers status (with what it adopted) rather than hang it
            self._recovered.set()

    async def pid(self) -> int:
        """The actor's process id (tests kill it to check the restart)."""
        return os.getpid()

    async def shutdown(self, timeout_s: float) -> dict[str, Any]:
        """Stop planning, drain every replica (up to `timeout_s`), stop them all, and stop the router."""
        self._closing.set()
        if self._task is not None:
            # Let the current tick finish: cancelled halfway, it could drop a replica it had not yet stopped.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), self.interval_s + 60)
            self._task.cancel()
        await asyncio.gather(*(p.stop_all(timeout_s) for p in self.pools.values()))
        await self.routers.stop()
        return {"stopped": True}

    async def _run(self) -> None:
        while not self._closing.is_set():
            began = time.monotonic()
            try:
                await self.tick()
            except Exception:  # one bad tick (a router hiccup) must not end planning for good
                log.exception("planner tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), max(0.0, self.interval_s - (time.monotonic() - began)))

    # ---- one tick ---------------------------------------------------------------------------------------------
    async def tick(self) -> None:
        for pool in self.pools.values():
            await pool.poll_starting()
            await pool.check_alive()
            await pool.poll_draining()
        snapshot = await self.routers.snapshot()
        now = time.monotonic()
        for role, pool in self.pools.items():
            self._plan(role, snapshot, now)
            await pool.reconcile(self.desired[role], snapshot)
        self._prev_snapshot = snapshot
        replicas = [r for p in self.pools.values() for r in p.replicas.values() if r.address]
        await self.routers.reconcile([r.address for r in replicas if r.state == "ready"],
                                     [r.address for r in replicas if r.state == "draining"])
        await self.routers.set_planner_report(self.report())

    def _plan(self, role: str, snapshot: dict[str, Any], now: float) -> None:
        """Update `desired[role]` from the policy; fixed pools keep their configured size."""
        policy = self.cfg.autoscaling.pool(role)
        if policy is None:
            return
        sample = pool_sample(policy.metric, role, snapshot, self._prev_snapshot, now)
        window = self.windows[role]
        window.append(sample)
        while window and window[0].t <= now - policy.window_s:
            window.popleft()
        decision, self.policy_states[role] = decide(policy, list(window), self.desired[role], sample.ready, now,
                                                    self.policy_states[role])
        self.last[role] = decision
        if decision.action == "hold":  # pending ones (the window asks for a change) at INFO: they precede a change
            level = logging.INFO if decision.recommended != decision.current else logging.DEBUG
            log.log(level, "%s: hold at %d: %s (%s %s, target %g, ready %d)", role, decision.current, decision.reason,
                    decision.metric, decision.value, decision.target, decision.ready)
            return
        self.desired[role] = decision.replicas
        self.counts[role][decision.action] += 1
        self._record(role, decision, window, now)

    def _record(self, role: str, decision: Decision, window: collections.deque[Sample], now: float) -> None:
        """Log a scale decision with the metric window behind it, and keep it for `status`."""
        record = {"time": time.time(), "pool": role, "action": decision.action, "from": decision.current,
                  "to": decision.replicas, **dataclasses.asdict(decision),
                  "window": [(round(s.t - now, 2), s.value, s.ready) for s in window]}
        self.decisions.append(record)
        log.info("%s: scale %s %d -> %d: %s (ready %d, recommended %d, window [(age s, value, ready)] %s)", role,
                 decision.action, decision.current, decision.replicas, decision.reason, decision.ready,
                 decision.recommended, record["window"])

    # ---- reporting --------------------------------------------------------------------------------------------
    def _counts(self) -> dict[str, dict[str, int]]:
        return {r: p.counts() for r, p in self.pools.items()}

    def report(self) -> dict[str, PoolReport]:
        """Per-pool figures for the router's /metrics (deploy/planner_metrics.py)."""
        out = {}
        for role, pool in self.pools.items():
            d, policy = self.last.get(role), self.cfg.autoscaling.pool(role)
            out[role] = PoolReport(
                desired=self.desired[role], replicas=pool.counts(), autoscaled=policy is not None,
                metric=policy.metric if policy else "", value=d.value if d else None,
                target=policy.target if policy else 0.0, recommended=d.recommended if d else self.desired[role],
                decisions=dict(self.counts[role]), replaced=pool.replaced)
        return out

    async def status(self) -> dict[str, Any]:
        """Pools, replicas (with the router's view of their health and load), and recent decisions."""
        await self._recovered.wait()
        snapshot = await self.routers.snapshot()
        urls = await self.routers.urls()
        seen = {w["address"]: w for w in snapshot["workers"]}
        pools = {}
        for role, pool in self.pools.items():
            policy, d = self.cfg.autoscaling.pool(role), self.last.get(role)
            replicas = [{"name": r.name, "state": r.state, "address": r.address, **_router_view(seen.get(r.address))}
                        for r in sorted(pool.replicas.values(), key=lambda r: r.created)]
            pools[role] = {"desired": self.desired[role], "replicas": replicas, "replaced": pool.replaced,
                           "autoscaling": dataclasses.asdict(policy) if policy else None,
                           "value": d.value if d else None, "reason": d.reason if d else "",
                           "failures": list(pool.failures)}
        return {"router": urls[0] if urls else "", "routers": urls, "namespace": self.namespace,
                "interval_s": self.interval_s, "pools": pools,
                "decisions": list(self.decisions)[-20:]}


def _router_view(w: dict[str, Any] | None) -> dict[str, Any]:
    if w is None:
        return {"healthy": False, "in_flight": 0, "load": None}
    return {"healthy": w["healthy"], "in_flight": w["in_flight"], "load": w["load"], "error": w["error"]}
