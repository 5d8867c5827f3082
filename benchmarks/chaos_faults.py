"""The chaos soak's faults: on a schedule, kill -9, SIGSTOP/SIGCONT or SIGTERM a random worker of a local cluster.

Rules that keep the run meaningful (the goal is zero errors while a worker of each role can serve):
  * a decode worker is hit only while another decode worker is up (not stopped, not restarting, not draining);
    a prefill worker may always be hit (decode workers prefill locally when no prefill worker serves);
  * a worker is hit again only after it is back up (the launcher's supervision restarts killed and drained ones);
  * a SIGSTOP lasts `stop_s` (a random span), then SIGCONT: shorter than the router's health deadline it is only a
    pause, longer it is a hang, and the worker's requests move elsewhere until it answers again.
Every fault is recorded (time, action, worker, pid) for the report.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field

from deploy.local import LocalCluster

ACTIONS = ("kill9", "stop", "term")


@dataclass(frozen=True)
class FaultPlan:
    """How often and how the soak breaks workers."""

    interval_s: float = 8.0  # mean seconds between two faults (uniform in [0.5, 1.5] x this)
    actions: tuple[str, ...] = ACTIONS  # what faults may be injected
    stop_s: tuple[float, float] = (1.0, 6.0)  # range of a SIGSTOP's length, seconds
    roles: tuple[str, ...] = ("prefill", "decode")  # which pools may be hit

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or not self.actions or set(self.actions) - set(ACTIONS):
            raise ValueError(f"fault plan needs interval_s > 0 and actions among {ACTIONS}")


@dataclass
class Fault:
    t: float  # seconds since the soak began
    action: str
    worker: str
    pid: int
    length_s: float = 0.0  # a SIGSTOP's length


@dataclass
class Chaos:
    """Runs the plan in a thread between `start()` and `stop()`."""

    cluster: LocalCluster
    plan: FaultPlan
    seed: int = 0
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._stop = threading.Event()
        self._paused: dict[str, float] = {}  # worker -> when its SIGCONT is due
        self._pids: dict[str, int] = {}  # worker -> the pid a fault last hit (busy until the name has another)
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos")
        self._began = 0.0

    def start(self) -> None:
        self._began = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """No more faults; every stopped worker is continued."""
        self._stop.set()
        self._thread.join()
        for name in list(self._paused):
            self.cluster.send(name, signal.SIGCONT)
        self._paused.clear()

    def _run(self) -> None:
        next_at = time.monotonic() + self._gap()
        while not self._stop.wait(0.1):
            now = time.monotonic()
            for name, due in list(self._paused.items()):
                if now >= due:
                    self.cluster.send(name, signal.SIGCONT)
                    del self._paused[name]
            if now >= next_at:
                self._inject(now)
                next_at = now + self._gap()

    def _gap(self) -> float:
        return self.plan.interval_s * self._rng.uniform(0.5, 1.5)

    def up(self, name: str) -> bool:
        """The worker serves: running, READY, not paused, and not the process a fault already hit."""
        p = self.cluster.procs[name]
        return (p.state == "up" and p.popen.poll() is None and name not in self._paused
                and self._pids.get(name) != p.popen.pid)

    def _inject(self, now: float) -> None:
        names = [n for n in self.cluster.procs if n.split("-")[0] in self.plan.roles]
        up = [n for n in names if self.up(n)]
        allowed = [n for n in up if n.startswith("prefill") or
                   sum(1 for m in up if m.startswith("decode")) >= 2]
        if not allowed:
            return
        # Actions in turn, and each action on each role in turn (every pair is exercised even in a short run: six
        # faults cover them), the worker within the role at random.
        n, k = len(self.faults), len(self.plan.actions)
        action, role = self.plan.actions[n % k], self.plan.roles[(n // k) % len(self.plan.roles)]
        name = self._rng.choice([m for m in allowed if m.startswith(role)] or allowed)
        pid = self.cluster.procs[name].popen.pid
        fault = Fault(round(now - self._began, 2), action, name, pid)
        if action == "stop":
            fault.length_s = round(self._rng.uniform(*self.plan.stop_s), 2)
            self._paused[name] = now + fault.length_s
            self.cluster.send(name, signal.SIGSTOP)
        else:
            self._pids[name] = pid  # busy until the supervisor has started another process under the name
            self.cluster.send(name, signal.SIGKILL if action == "kill9" else signal.SIGTERM)
        self.faults.append(fault)
