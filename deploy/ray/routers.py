"""The deployment's router replicas as the planner sees them: one `RouterSet` that fans each call out to all.

`router.processes: N` runs N router actors (named router, router-1, ...). On one node they share the served port
(SO_REUSEPORT: the kernel spreads new connections over the live ones), so when one dies the others go on serving
and Ray restarts it (router_actor.py). Each replica is a whole router with its own worker registry: every worker
change (add, drain, remove) goes to all of them, and every tick the planner makes each replica's worker list
match its own (`reconcile`), which is how a restarted replica, or one that missed a change while it was down,
catches up. A replica that does not answer is skipped, never waited for beyond CALL_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayError

log = logging.getLogger("disagg.planner")

ROUTER_NAME = "router"
CALL_TIMEOUT_S = 10.0  # deadline of one call to one router replica


def router_name(index: int) -> str:
    """The actor name of router replica `index` (the first keeps the plain name `disagg status` has always used)."""
    return ROUTER_NAME if index == 0 else f"{ROUTER_NAME}-{index}"


async def _call(ref: ray.ObjectRef, timeout_s: float = CALL_TIMEOUT_S) -> Any:
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)


class RouterSet:
    """Handles to every router replica; each method calls all of them at once and tolerates dead ones."""

    def __init__(self, namespace: str, count: int) -> None:
        self.names = [router_name(i) for i in range(count)]
        self.handles: dict[str, ActorHandle] = {n: ray.get_actor(n, namespace=namespace) for n in self.names}
        self.snapshots: dict[str, dict[str, Any]] = {}  # the latest snapshot of each replica that answered

    async def _all(self, method: str, *args: Any) -> dict[str, Any]:
        """`method(*args)` on every replica; the answers of those that gave one, by name."""
        names = list(self.handles)
        answers = await asyncio.gather(*(_call(getattr(self.handles[n], method).remote(*args)) for n in names),
                                       return_exceptions=True)
        out = {}
        for name, a in zip(names, answers, strict=True):
            if isinstance(a, RayError | TimeoutError):
                log.warning("router %s: %s failed (%s); it catches up once it answers again", name, method,
                            type(a).__name__)
            elif isinstance(a, BaseException):
                raise a
            else:
                out[name] = a
        return out

    async def add_worker(self, address: str) -> None:
        await self._all("add_worker", address)

    async def drain_worker(self, address: str) -> None:
        await self._all("drain_worker", address)

    async def remove_worker(self, address: str) -> None:
        await self._all("remove_worker", address)

    async def set_planner_report(self, report: Any) -> None:
        await self._all("set_planner_report", report)

    async def stop(self) -> None:
        await self._all("stop")

    async def urls(self) -> list[str]:
        got = await self._all("get_url")
        return [got[n] for n in self.names if got.get(n)]

    async def snapshot(self) -> dict[str, Any]:
        """Every replica's snapshot, merged (`merge`); raises RayError if no replica answers."""
        self.snapshots = await self._all("snapshot")
        if not self.snapshots:
            raise RayError("no router replica answered")
        return merge(list(self.snapshots.values()))

    async def reconcile(self, serving: list[str], draining: list[str]) -> None:
        """Make each replica (as of its latest snapshot) know exactly the planner's workers: add what it lacks,
        mark draining what is draining, remove what the planner no longer has."""
        wanted = set(serving) | set(draining)
        for name, snap in self.snapshots.items():
            known = {w["address"]: w for w in snap["workers"]}
            calls = [self.handles[name].add_worker.remote(a) for a in wanted - set(known)]
            calls += [self.handles[name].drain_worker.remote(a) for a in draining
                      if not known.get(a, {}).get("draining")]
            calls += [self.handles[name].remove_worker.remote(a) for a in set(known) - wanted]
            if calls:
                log.info("router %s: catching up with the planner (%d change(s))", name, len(calls))
            results = await asyncio.gather(*(_call(c) for c in calls), return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, RayError | TimeoutError):
                    raise r


def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """One snapshot from several replicas': a worker's health, draining and load from the first replica that knows
    it (they poll the same workers), its requests in flight summed; latency histograms summed bucket by bucket."""
    workers: dict[str, dict[str, Any]] = {}
    for snap in snapshots:
        for w in snap["workers"]:
            if w["address"] not in workers:
                workers[w["address"]] = dict(w)
            else:
                seen = workers[w["address"]]
                seen["in_flight"] += w["in_flight"]
                seen["in_flight_tokens"] += w["in_flight_tokens"]
    histograms: dict[str, list[tuple[float, float]]] = {}
    for snap in snapshots:
        for name, buckets in snap["histograms"].items():
            total = histograms.get(name)
            histograms[name] = list(buckets) if total is None else [
                (le, c + d) for (le, c), (_, d) in zip(total, buckets, strict=True)]
    return {"workers": list(workers.values()), "histograms": histograms}
