"""The chaos soak's faults: on a schedule, kill -9, SIGSTOP/SIGCONT or SIGTERM a random worker, and on Ray kill a
router replica.

Targets: `LocalTarget` (deploy/local.py's supervised processes) and `RayTarget` (a deploy/ray deployment: worker
processes found through their actors' `info`, router replicas as the actors `router`, `router-1`, ...).

Rules that keep the run meaningful (the goal is zero errors while a worker of each role can serve):
  * a decode worker is hit only while another decode worker serves (up, healthy, not stopped, not draining);
    a prefill worker may always be hit (decode workers prefill locally when no prefill worker serves);
  * a worker is hit again only after it is back up (the launcher's supervision restarts killed and drained ones
    under the same name; on Ray the planner replaces them under a new name);
  * a SIGSTOP lasts `stop_s` (a random span), then SIGCONT: shorter than the router's health deadline it is only a
    pause, longer it is a hang, and the worker's requests move elsewhere until it answers again;
  * a router replica is killed (`router_kill`, Ray only: ray.kill, and Ray restarts it) only while every replica
    serves, so another one takes the port's new connections meanwhile. The connections the killed process held
    die with it: those clients see a connection error, the one loss the soak expects. `RouterKill` records when
    the replica went and when it served again, the window in which such errors are counted apart.
Every fault is recorded (time, action, worker or router replica, pid) for the report.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from deploy.local import LocalCluster

ACTIONS = ("kill9", "stop", "term")  # worker faults, on either target
ROUTER_KILL = "router_kill"  # a router replica killed (Ray only)
RAY_ACTIONS = (*ACTIONS, ROUTER_KILL)


@dataclass(frozen=True)
class FaultPlan:
    """How often and how the soak breaks workers (and router replicas)."""

    interval_s: float = 8.0  # mean seconds between two faults (uniform in [0.5, 1.5] x this)
    actions: tuple[str, ...] = ACTIONS  # what faults may be injected, in turn
    stop_s: tuple[float, float] = (1.0, 6.0)  # range of a SIGSTOP's length, seconds
    roles: tuple[str, ...] = ("prefill", "decode")  # which pools may be hit

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or not self.actions or set(self.actions) - set(RAY_ACTIONS):
            raise ValueError(f"fault plan needs interval_s > 0 and actions among {RAY_ACTIONS}")


@dataclass
class Fault:
    t: float  # seconds since the soak began
    action: str
    worker: str  # the worker, or the router replica of a router_kill
    pid: int
    length_s: float = 0.0  # a SIGSTOP's length


@dataclass
class RouterKill:
    """A router replica killed; `back` is set once it serves again (its connections' errors are counted apart)."""

    name: str
    pid: int
    at: float  # time.monotonic() just before the kill
    back: float | None = None  # time.monotonic() when it was seen serving again


class Target(Protocol):
    """What the faults act on."""

    routers: list[str]  # router replicas that a router_kill may hit (none where one router process serves)

    def serving(self) -> dict[str, int]:
        """Worker name -> pid of its process, for every worker that serves now."""
        ...

    def send(self, name: str, pid: int, sig: int) -> None:
        """Signal the worker's process `pid` (nothing if the name has another process by now)."""
        ...

    def router_serves(self, name: str) -> bool:
        """Router replica `name` serves the port (again, after a kill)."""
        ...

    def kill_router(self, name: str) -> int:
        """Kill router replica `name` (it restarts); returns the pid it had."""
        ...


@dataclass
class LocalTarget:
    """deploy/local.py's processes: the launcher restarts a worker that exits, under the same name."""

    cluster: LocalCluster
    # One router process: killing it would cut every client, which is not what the soak measures.
    routers: list[str] = field(default_factory=list)

    def serving(self) -> dict[str, int]:
        return {n: p.popen.pid for n, p in self.cluster.procs.items()
                if n != "router" and p.state == "up" and p.popen.poll() is None}

    def send(self, name: str, pid: int, sig: int) -> None:
        if self.cluster.procs[name].popen.pid == pid:
            self.cluster.send(name, sig)

    def router_serves(self, name: str) -> bool:
        return name == "router" and self.cluster.procs["router"].state == "up"

    def kill_router(self, name: str) -> int:
        raise NotImplementedError("the local launcher runs one router process")


class RayTarget:
    """A deploy/ray deployment seen from a driver in its namespace (ray.init done by the caller)."""

    def __init__(self, url: str, namespace: str, routers: list[str]) -> None:
        self.url, self.namespace, self.routers = url, namespace, routers
        self.pids_seen: set[int] = set()  # every worker and router process seen (the leak check after shutdown)

    def serving(self) -> dict[str, int]:
        """Workers whose process lives and printed READY, not told to stop, and healthy and not draining in the
        view of the router replica that answers /ready (a replacement counts once the planner registered it)."""
        from deploy.ray.worker_actor import discover

        healthy = self._healthy()
        try:
            infos = discover(self.namespace, timeout_s=10)
        except ValueError:  # an actor died between the listing and the lookup: nothing hit this time
            return {}
        self.pids_seen.update(i["pid"] for i in infos)
        return {i["name"]: i["pid"] for i in infos
                if i["alive"] and not i["stopping"] and i["address"] in healthy}

    def _healthy(self) -> set[str]:
        try:
            ready = httpx.get(f"{self.url}/ready", timeout=5).json()  # 503 when no decode worker, still JSON
        except (httpx.HTTPError, ValueError):
            return set()
        return {w["address"] for w in ready["workers"] if w["healthy"] and not w["draining"]}

    def send(self, name: str, pid: int, sig: int) -> None:
        # The pid comes from the actor's info in the same tick (or is a process we stopped, which cannot exit
        # before its SIGCONT), so it is not a recycled one.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def router_serves(self, name: str, timeout_s: float = 1.0) -> bool:
        """The replica's actor answers and has bound the port (a restarted one only after `recover`)."""
        import ray
        from ray.exceptions import RayError

        try:
            return bool(ray.get(ray.get_actor(name, namespace=self.namespace).get_url.remote(), timeout=timeout_s))
        except (RayError, ValueError):
            return False

    def router_pid(self, name: str) -> int:
        import ray

        pid = ray.get(ray.get_actor(name, namespace=self.namespace).pid.remote(), timeout=10)
        self.pids_seen.add(pid)
        return pid

    def kill_router(self, name: str) -> int:
        import ray

        pid = self.router_pid(name)
        ray.kill(ray.get_actor(name, namespace=self.namespace), no_restart=False)  # max_restarts=-1: it comes back
        return pid


@dataclass
class Chaos:
    """Runs the plan in a thread between `start()` and `stop()`."""

    target: Target
    plan: FaultPlan
    seed: int = 0
    faults: list[Fault] = field(default_factory=list)
    router_kills: list[RouterKill] = field(default_factory=list)
    router_kills_skipped: int = 0  # turns of router_kill passed because a replica did not serve

    def __post_init__(self) -> None:
        if ROUTER_KILL in self.plan.actions and not self.target.routers:
            raise ValueError(f"{ROUTER_KILL} needs a deployment with router replicas (Ray)")
        self._rng = random.Random(self.seed)
        self._stop = threading.Event()
        self._paused: dict[str, tuple[float, int]] = {}  # worker -> (when its SIGCONT is due, the stopped pid)
        self._pids: dict[str, int] = {}  # worker -> the pid a fault last hit (busy until the name has another)
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos")
        self._began = self._next_router_check = 0.0
        self._turn = 0  # position in the rotation of actions (and of roles)

    def start(self) -> None:
        self._began = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """No more faults; every stopped worker is continued."""
        self._stop.set()
        self._thread.join()
        for name, (_, pid) in list(self._paused.items()):
            self.target.send(name, pid, signal.SIGCONT)
        self._paused.clear()

    def windows(self, grace_s: float = 2.0) -> list[tuple[float, float]]:
        """(from, to) in time.monotonic() of each router kill: from the kill until `grace_s` after the replica
        served again (never seen back: no end). A connection lost in one counts as cut by the kill."""
        return [(k.at, (k.back if k.back is not None else math.inf) + grace_s) for k in self.router_kills]

    def _run(self) -> None:
        next_at = time.monotonic() + self._gap()
        while not self._stop.wait(0.1):
            now = time.monotonic()
            for name, (due, pid) in list(self._paused.items()):
                if now >= due:
                    self.target.send(name, pid, signal.SIGCONT)
                    del self._paused[name]
            self._check_routers(now)
            if now >= next_at:
                self._inject(now)
                next_at = now + self._gap()

    def _check_routers(self, now: float) -> None:
        """Once a second, note when a killed router replica serves again."""
        pending = [k for k in self.router_kills if k.back is None]
        if not pending or now < self._next_router_check:
            return
        self._next_router_check = now + 1.0
        for k in pending:
            if self.target.router_serves(k.name):
                k.back = time.monotonic()

    def _gap(self) -> float:
        return self.plan.interval_s * self._rng.uniform(0.5, 1.5)

    def _inject(self, now: float) -> None:
        # Actions in turn, and each worker action on each role in turn (every pair is exercised even in a short run:
        # six worker faults cover them), the worker within the role at random. A worker fault that finds nothing it
        # may hit is tried again at the next tick. A router kill that finds a replica not serving is passed over
        # (and counted): a replica that never comes back must not stall every worker fault behind it.
        n, k = self._turn, len(self.plan.actions)
        action, role = self.plan.actions[n % k], self.plan.roles[(n // k) % len(self.plan.roles)]
        fault = self._kill_router(now) if action == ROUTER_KILL else self._hit_worker(now, action, role)
        if fault is not None:
            self.faults.append(fault)
            self._turn += 1
        elif action == ROUTER_KILL:
            self.router_kills_skipped += 1
            self._turn += 1

    def _hit_worker(self, now: float, action: str, role: str) -> Fault | None:
        serving = {n: pid for n, pid in self.target.serving().items() if n.split("-")[0] in self.plan.roles
                   and n not in self._paused and self._pids.get(n) != pid}
        decode = sum(1 for n in serving if n.startswith("decode"))
        allowed = sorted(n for n in serving if n.startswith("prefill") or decode >= 2)
        if not allowed:
            return None
        name = self._rng.choice([m for m in allowed if m.startswith(role)] or allowed)
        fault = Fault(round(now - self._began, 2), action, name, serving[name])
        if action == "stop":
            fault.length_s = round(self._rng.uniform(*self.plan.stop_s), 2)
            self._paused[name] = (now + fault.length_s, fault.pid)
            self.target.send(name, fault.pid, signal.SIGSTOP)
        else:
            self._pids[name] = fault.pid  # busy until another process serves under the name
            self.target.send(name, fault.pid, signal.SIGKILL if action == "kill9" else signal.SIGTERM)
        return fault

    def _kill_router(self, now: float) -> Fault | None:
        # Every replica serves (so at least one besides the victim takes the port's new connections meanwhile).
        names = [n for n in self.target.routers if self.target.router_serves(n)]
        if len(names) < max(2, len(self.target.routers)):
            return None
        name = self._rng.choice(sorted(names))
        at = time.monotonic()  # before the kill: a connection it cuts errs after this
        pid = self.target.kill_router(name)
        self.router_kills.append(RouterKill(name, pid, at))
        return Fault(round(now - self._began, 2), ROUTER_KILL, name, pid)
