"""One pool's replicas on Ray: start them, register them with the router, notice deaths, drain and stop them.

A replica goes starting -> ready -> draining -> gone, or straight to gone when it dies or fails to start.
  starting  the actor exists (or waits for a node with its resources) and its worker is loading
  ready     the worker printed READY and the router routes to it
  draining  the routers send it nothing new, and its worker got SIGTERM: it finishes its requests and keeps its KV
            leases until pulled (worker/server.py), then exits; past `ray.drain_timeout_s` (or `disagg shutdown
            --timeout`) a second signal ends the drain and its remaining decode requests move to other workers
Only `ReplicaPool` changes these states, and only from the planner actor's event loop. A planner that restarted
adopts the replicas it finds (`adopt`): ready, or draining if their actor was told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from deploy.config import ClusterConfig
from deploy.ray.rank_bundles import actor_options, remove_group
from deploy.ray.routers import RouterSet
from deploy.ray.worker_actor import KILL_AFTER_S, WorkerActor

log = logging.getLogger("disagg.planner")

CALL_TIMEOUT_S = 10.0  # deadline of the planner's calls to a worker actor


@dataclass
class Replica:
    """One worker actor as the planner tracks it."""

    name: str  # the actor's name in the deployment's namespace (also the worker id)
    handle: ActorHandle  # the WorkerActor
    created: float  # time.monotonic() when the actor was requested
    ready: asyncio.Future[str]  # its wait_ready(): the gRPC address, or the error that kept it from starting
    state: str = "starting"  # starting | ready | draining
    address: str = ""  # gRPC host:port once ready
    drain_started: float = 0.0  # time.monotonic() when draining began
    stopping: asyncio.Task[int | None] | None = None  # the actor's graceful stop(), once draining began here


async def call(ref: ray.ObjectRef, timeout_s: float = CALL_TIMEOUT_S) -> Any:
    """Await an actor call with a deadline (GetTimeoutError when it passes)."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)
    except TimeoutError:
        raise GetTimeoutError(f"no answer within {timeout_s:g}s") from None


class ReplicaPool:
    """The replicas of one role (prefill | decode)."""

    def __init__(self, role: str, cluster: dict[str, Any], routers: RouterSet, namespace: str,
                 new_name: Callable[[str], str]) -> None:
        cfg = ClusterConfig.from_dict(cluster)
        self.role = role
        self.cluster = cluster
        self.routers = routers
        self.namespace = namespace
        self.resources = cfg.pool(role).resources
        self.tensor_parallel_size = cfg.tensor_parallel_size(role)  # ranks per replica
        self.startup_timeout_s = cfg.ray.startup_timeout_s
        self.drain_timeout_s = cfg.ray.drain_timeout_s
        self.new_name = new_name
        self.replicas: dict[str, Replica] = {}
        self.replaced = 0  # replicas that died (or failed to start) and were dropped, to be replaced
        self.failures: list[str] = []  # why replicas failed to start, newest last
        self._stopping: set[asyncio.Task[None]] = set()  # background stops of replicas already taken out

    def counts(self) -> dict[str, int]:
        out = {"starting": 0, "ready": 0, "draining": 0}
        for r in self.replicas.values():
            out[r.state] += 1
        return out

    def active(self) -> list[Replica]:
        """Replicas that count toward the pool's size: starting or ready."""
        return [r for r in self.replicas.values() if r.state != "draining"]

    # ---- starting ---------------------------------------------------------------------------------------------
    def start(self) -> Replica:
        """Ask Ray for one more worker actor; it may pend until a node with its resources joins."""
        name = self.new_name(self.role)
        # N ranks: a placement group of N bundles on one node (deploy/ray/rank_bundles.py); the actor pends until
        # Ray has reserved all of it.
        options = actor_options(name, self.resources, self.tensor_parallel_size)
        handle = WorkerActor.options(name=name, namespace=self.namespace, lifetime="detached", max_restarts=0,
                                     **options).remote(name, self.role, self.cluster)
        r = Replica(name, handle, time.monotonic(), asyncio.wrap_future(
            handle.wait_ready.remote(self.startup_timeout_s).future()))
        self.replicas[name] = r
        log.info("%s: starting replica %s (resources %s per rank, %d rank(s))", self.role, name,
                 self.resources.ray_options(), self.tensor_parallel_size)
        return r

    async def poll_starting(self) -> None:
        """Register replicas whose worker is ready; drop those that failed or have waited past the timeout."""
        for r in [r for r in self.replicas.values() if r.state == "starting"]:
            if not r.ready.done():
                if time.monotonic() - r.created > self.startup_timeout_s + CALL_TIMEOUT_S:
                    await self._fail(r, f"not ready after {self.startup_timeout_s:.0f}s (no node with "
                                        f"{self.resources.ray_options()}?)")
                continue
            try:
                r.address = r.ready.result()
                await self.routers.add_worker(r.address)
            except RayError as e:
                await self._fail(r, str(e))
                continue
            r.state = "ready"
            log.info("%s: replica %s ready at %s after %.1fs", self.role, r.name, r.address,
                     time.monotonic() - r.created)

    async def _fail(self, r: Replica, why: str) -> None:
        log.error("%s: replica %s failed to start: %s", self.role, r.name, why)
        self.failures.append(f"{r.name}: {why}")
        del self.failures[:-10]
        await self._forget(r)

    # ---- liveness ---------------------------------------------------------------------------------------------
    async def check_alive(self) -> list[str]:
        """Drop ready or draining replicas whose actor or worker process died; returns their names."""
        watched = [r for r in self.replicas.values() if r.state != "starting" and r.stopping is None]
        answers = await asyncio.gather(*(call(r.handle.info.remote()) for r in watched), return_exceptions=True)
        dead = []
        for r, a in zip(watched, answers, strict=True):
            if isinstance(a, RayActorError) or (isinstance(a, dict) and not a["alive"]):
                why = "actor died" if isinstance(a, RayActorError) else f"worker exited with code {a['returncode']}"
                log.log(logging.INFO if r.state == "draining" else logging.WARNING, "%s: replica %s (%s) is gone: %s",
                        self.role, r.name, r.address, why)
                if r.state == "ready":
                    self.replaced += 1
                dead.append(r.name)
                await self._forget(r)
        return dead

    # ---- scaling ----------------------------------------------------------------------------------------------
    async def reconcile(self, desired: int, snapshot: dict[str, Any]) -> None:
        """Start or drain replicas until `desired` are starting or ready."""
        active = self.active()
        for _ in range(desired - len(active)):
            self.start()
        if len(active) > desired:
            await self.drain(len(active) - desired, snapshot)

    async def drain(self, n: int, snapshot: dict[str, Any], timeout_s: float | None = None) -> None:
        """Take `n` replicas out: starting ones first (nothing runs on them), then the ready ones with least work.
        A ready one is drained by its worker (module docstring), for `timeout_s` (default ray.drain_timeout_s)."""
        in_flight = {w["address"]: w["in_flight"] for w in snapshot.get("workers", [])}
        starting = sorted((r for r in self.active() if r.state == "starting"), key=lambda r: -r.created)
        ready = sorted((r for r in self.active() if r.state == "ready"),
                       key=lambda r: (in_flight.get(r.address, 0), -r.created))
        for r in (starting + ready)[:n]:
            if r.state == "starting":
                log.info("%s: cancelling replica %s, still starting", self.role, r.name)
                await self._forget(r)
                continue
            # Routers first: once the worker refuses new requests, none may still be on the way to it.
            await self.routers.drain_worker(r.address)
            r.state, r.drain_started = "draining", time.monotonic()
            limit = self.drain_timeout_s if timeout_s is None else timeout_s
            r.stopping = asyncio.create_task(self._stop_gracefully(r, limit), name=f"drain-{r.name}")
            log.info("%s: draining replica %s (%s), at most %.0fs", self.role, r.name, r.address, limit)

    async def _stop_gracefully(self, r: Replica, timeout_s: float) -> int | None:
        """The actor's stop(): SIGTERM, a second signal after `timeout_s`, SIGKILL after KILL_AFTER_S more."""
        try:
            return await call(r.handle.stop.remote(timeout_s), timeout_s=timeout_s + KILL_AFTER_S + 30)
        except RayError as e:  # the actor died or does not answer: the kill in _forget ends it
            log.warning("%s: stopping replica %s: %s", self.role, r.name, e)
            return None

    async def poll_draining(self) -> None:
        """Take out the draining replicas whose worker has exited."""
        for r in [r for r in self.replicas.values() if r.state == "draining" and r.stopping is not None]:
            if r.stopping.done():
                log.info("%s: replica %s drained and stopped in %.1fs (exit code %s)", self.role, r.name,
                         time.monotonic() - r.drain_started, r.stopping.result())
                await self._forget(r)

    async def stop_all(self, timeout_s: float) -> None:
        """Drain every replica at once, giving their requests `timeout_s` to finish, then stop whatever is left."""
        await self.drain(len(self.active()), {}, timeout_s=timeout_s)
        draining = [r.stopping for r in self.replicas.values() if r.stopping is not None]
        await asyncio.gather(*draining)
        for r in list(self.replicas.values()):
            await self._forget(r)
        await asyncio.gather(*self._stopping)

    def adopt(self, info: dict[str, Any]) -> Replica:
        """A replica found alive after the planner restarted (worker_actor.discover): ready once it has an address
        (its routers are caught up by the next reconcile), draining if its actor was told to stop."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if info["address"]:
            done.set_result(info["address"])
        else:
            done = asyncio.wrap_future(info["handle"].wait_ready.remote(self.startup_timeout_s).future())
        r = Replica(info["name"], info["handle"], time.monotonic(), done, address=info["address"])
        r.state = "draining" if info["stopping"] else ("ready" if info["address"] else "starting")
        r.drain_started = r.created
        self.replicas[r.name] = r
        log.info("%s: adopted replica %s (%s, %s)", self.role, r.name, r.state, r.address or "not ready yet")
        return r

    async def _forget(self, r: Replica) -> None:
        """Take the replica out of the pool and the routers now; stop and kill its actor in the background (the
        planner's tick must not wait for it). Never raises."""
        self.replicas.pop(r.name, None)
        if not r.ready.done():
            r.ready.cancel()
        if r.address:
            await self.routers.remove_worker(r.address)
        task = asyncio.create_task(self._stop_actor(r), name=f"stop-{r.name}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop_actor(self, r: Replica) -> None:
        if r.state != "starting":  # a starting actor may not even be placed; killing it kills its worker too
            with contextlib.suppress(RayError):  # already dead: the kill below is enough
                await call(r.handle.stop.remote(0.0), timeout_s=KILL_AFTER_S + 15)
        ray.kill(r.handle, no_restart=True)
        remove_group(r.name)  # its ranks' bundles (none with one rank)
