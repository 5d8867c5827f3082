"""A pool of replicas over time: started (serving after a start-up delay), drained, stopped; and what it cost.

The rules are deploy/ray/replica_pool.py's: `reconcile` starts replicas until `desired` are starting or ready, or
drains the surplus (starting ones first, newest first; then ready ones with the fewest requests in flight); a
draining replica takes no new requests and stops once it holds no work (or after the drain timeout). A replica
costs from the moment it is asked for (its node is paid while it starts) until it stops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from simulator.events import EventLoop
from simulator.replica import Replica
from simulator.router import SimRouter


@dataclass
class Slot:
    """One replica's life."""

    replica: Replica  # the simulated worker
    created: float  # when it was asked for (cost starts)
    state: str = "starting"  # starting | ready | draining | stopped
    drain_started: float = 0.0  # when draining began
    stopped: float = -1.0  # when it stopped (cost ends); -1 while it runs


class Pool:
    """The replicas of one role."""

    def __init__(self, role: str, make: Callable[[str], Replica], startup_s: float, gpus_per_replica: int,
                 loop: EventLoop, router: SimRouter, drain_timeout_s: float = 600.0) -> None:
        self.role, self.make, self.startup_s, self.gpus = role, make, startup_s, gpus_per_replica
        self.loop, self.router, self.drain_timeout_s = loop, router, drain_timeout_s
        self.slots: list[Slot] = []  # every replica ever started, in start order
        self.live: list[Slot] = []  # those not stopped
        self.replaced = 0
        self._n = 0

    def start(self, ready_now: bool = False) -> Slot:
        """Ask for a replica; it serves after the start-up delay (at once for the pool's first replicas)."""
        slot = Slot(self.make(f"{self.role}-{self._n:05d}"), self.loop.now)
        self._n += 1
        self.slots.append(slot)
        self.live.append(slot)
        if ready_now:
            self._ready(slot)
        else:
            self.loop.at(self.loop.now + self.startup_s, self._ready, slot)
        return slot

    def _ready(self, slot: Slot) -> None:
        if slot.state == "starting":
            slot.state = "ready"
            self.router.add(slot.replica)

    def active(self) -> list[Slot]:
        return [s for s in self.live if s.state in ("starting", "ready")]

    def reconcile(self, desired: int) -> None:
        """Start or drain replicas until `desired` are starting or ready."""
        active = self.active()
        for _ in range(desired - len(active)):
            self.start()
        if len(active) > desired:
            self.drain(len(active) - desired, active)

    def drain(self, n: int, active: list[Slot]) -> None:
        starting = sorted((s for s in active if s.state == "starting"), key=lambda s: -s.created)
        ready = sorted((s for s in active if s.state == "ready"),
                       key=lambda s: (self.router.workers[s.replica.name].in_flight, -s.created))
        for s in (starting + ready)[:n]:
            if s.state == "starting":
                self._stop(s)  # cancelled before it served
                continue
            self.router.drain(s.replica.name)
            s.state, s.drain_started = "draining", self.loop.now

    def poll_draining(self) -> None:
        """Stop draining replicas that hold no work any more, or have drained past the timeout."""
        for s in [s for s in self.live if s.state == "draining"]:
            if s.replica.idle() or self.loop.now - s.drain_started > self.drain_timeout_s:
                self._stop(s)

    def _stop(self, s: Slot) -> None:
        s.state, s.stopped = "stopped", self.loop.now
        self.live.remove(s)
        self.router.remove(s.replica.name)

    def counts(self) -> dict[str, int]:
        out = {"starting": 0, "ready": 0, "draining": 0}
        for s in self.live:
            out[s.state] += 1
        return out

    def replica_seconds(self, until: float) -> float:
        """Replica-seconds paid up to `until` (multiply by gpus_per_replica for GPU-seconds)."""
        return sum((s.stopped if s.stopped >= 0 else until) - s.created for s in self.slots)
