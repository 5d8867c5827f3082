"""The chaos soak's fault schedule and its accounting of router kills, against a fake target (no processes): which
worker or router replica a fault may hit, and which client errors count as cut by a router replica's kill."""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field

import pytest

from benchmarks.chaos import cut_by_router_kill, evaluate
from benchmarks.chaos_faults import RAY_ACTIONS, ROUTER_KILL, Chaos, FaultPlan
from benchmarks.chaos_load import Result, Spec


@dataclass
class FakeTarget:
    workers: dict[str, int] = field(default_factory=lambda: {"prefill-0": 10, "decode-0": 20, "decode-1": 30})
    routers: list[str] = field(default_factory=lambda: ["router", "router-1"])
    down: set[str] = field(default_factory=set)  # router replicas not serving
    sent: list[tuple[str, int, int]] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)

    def serving(self) -> dict[str, int]:
        return dict(self.workers)

    def send(self, name: str, pid: int, sig: int) -> None:
        self.sent.append((name, pid, sig))
        if sig in (signal.SIGKILL, signal.SIGTERM):
            del self.workers[name]

    def router_serves(self, name: str) -> bool:
        return name not in self.down

    def kill_router(self, name: str) -> int:
        self.killed.append(name)
        self.down.add(name)
        return 99


def test_router_kill_needs_router_replicas() -> None:
    with pytest.raises(ValueError, match=ROUTER_KILL):
        Chaos(FakeTarget(routers=[]), FaultPlan(actions=RAY_ACTIONS))
    with pytest.raises(ValueError):
        FaultPlan(actions=("kill9", "reboot"))


def test_actions_in_turn_and_a_router_is_killed_only_while_every_replica_serves() -> None:
    t = FakeTarget()
    chaos = Chaos(t, FaultPlan(actions=("kill9", ROUTER_KILL)), seed=1)
    chaos._inject(0.0)
    assert [f.action for f in chaos.faults] == ["kill9"] and chaos.faults[0].worker == "prefill-0"
    chaos._inject(1.0)
    assert chaos.faults[-1].action == ROUTER_KILL and t.killed == [chaos.faults[-1].worker]
    [kill] = chaos.router_kills
    assert kill.back is None and chaos.windows() == [(kill.at, math.inf)]
    chaos._inject(2.0)  # kill9 (role decode now): one decode worker of two may go
    assert chaos.faults[-1].action == "kill9" and chaos.faults[-1].worker.startswith("decode")
    chaos._inject(3.0)  # a router kill while a replica is still down: passed over, and counted
    assert len(chaos.faults) == 3 and len(t.killed) == 1 and chaos.router_kills_skipped == 1
    chaos._check_routers(10.0)
    assert kill.back is None  # still down
    t.down.clear()
    chaos._check_routers(11.0)
    assert kill.back is not None and chaos.windows(grace_s=2.0) == [(kill.at, kill.back + 2.0)]
    t.workers["prefill-1"] = 40  # the killed prefill worker's replacement
    chaos._inject(12.0)  # kill9 again: the worker faults go on
    assert (chaos.faults[-1].action, chaos.faults[-1].worker) == ("kill9", "prefill-1")
    chaos._inject(13.0)
    assert chaos.faults[-1].action == ROUTER_KILL and len(chaos.router_kills) == 2


def test_the_last_serving_decode_worker_is_never_hit() -> None:
    t = FakeTarget(workers={"decode-0": 20})
    chaos = Chaos(t, FaultPlan(actions=("kill9",), roles=("decode",)))
    chaos._inject(0.0)
    assert chaos.faults == [] and t.sent == []


def test_a_stopped_worker_is_not_hit_meanwhile_and_stop_continues_it() -> None:
    t = FakeTarget(workers={"prefill-0": 10})
    chaos = Chaos(t, FaultPlan(interval_s=1000.0, actions=("stop",), stop_s=(50.0, 50.0)))
    chaos.start()  # its own faults are 500 s away at the earliest: the test injects them
    chaos._inject(0.0)
    chaos._inject(1.0)  # paused: not hit again
    assert t.sent == [("prefill-0", 10, signal.SIGSTOP)]
    chaos.stop()
    assert t.sent == [("prefill-0", 10, signal.SIGSTOP), ("prefill-0", 10, signal.SIGCONT)]


def _result(index: int, kind: str = "greedy", *, error: str = "", lost: bool = False, start: float = 0.0,
            end: float = 1.0, text: str = "x", done: bool = True) -> Result:
    spec = Spec(index, kind, "p", 4, True)
    return Result(spec, status=0 if lost else 200, text=text, done=done and not error, error=error,
                  connection_lost=lost, start=start, end=end)


def test_only_lost_connections_during_a_router_kill_count_as_cut_by_it() -> None:
    windows = [(10.0, 20.0)]
    lost_in = _result(0, error="RemoteProtocolError: peer closed", lost=True, start=5.0, end=10.5)
    lost_before = _result(1, error="ReadError: reset", lost=True, start=1.0, end=9.0)
    http_error_in = _result(2, error="HTTP 503: no worker", start=11.0, end=12.0)
    assert cut_by_router_kill(lost_in, windows)
    assert not cut_by_router_kill(lost_before, windows) and not cut_by_router_kill(http_error_in, windows)
    ok = _result(3, start=0.0, end=2.0)
    report = evaluate([lost_in, lost_before, http_error_in, ok], {("p", 4, None): "x"}, windows)
    assert report["cut_by_router_kill"] == 1
    assert report["errors_to_clients"] == 2 and report["wrong_text"] == 0
