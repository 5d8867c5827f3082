"""The local launcher's port choice and restart policy, and the worker's drain deadline, without a cluster."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

from deploy.local import RestartPolicy, pick_router_port, port_free
from engine.config import ConfigError
from engine.stats import EngineLoad
from worker.config import TransferConfig, WorkerConfig
from worker.server import drain


def time_wait_port() -> int:
    """A port whose server side holds a TIME_WAIT connection and nothing listening: what a router leaves behind
    right after it stops (it closed its client connections first)."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        conn.close()  # the server closes first: its side of the connection goes to TIME_WAIT
        time.sleep(0.05)
        cli.close()
    return port


def test_a_port_in_time_wait_is_free_and_a_listened_one_is_not() -> None:
    port = time_wait_port()
    with socket.socket() as plain, pytest.raises(OSError):  # the old probe (no SO_REUSEADDR) saw it as busy
        plain.bind(("127.0.0.1", port))
    assert port_free("127.0.0.1", port)
    assert pick_router_port("127.0.0.1", port, explicit=True) == port
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        busy = other.getsockname()[1]
        assert not port_free("127.0.0.1", busy)


def test_a_busy_explicit_port_is_an_error_and_a_busy_default_falls_back_saying_so(caplog) -> None:  # noqa: ANN001
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        busy = other.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {busy} .* in use.*--port"):
            pick_router_port("127.0.0.1", busy, explicit=True)
        with caplog.at_level(logging.WARNING):
            chosen = pick_router_port("127.0.0.1", busy, explicit=False)
        assert chosen != busy and port_free("127.0.0.1", chosen)
        assert f"port {busy} on 127.0.0.1 is in use; the router serves on port {chosen} instead" in caplog.text


def test_disagg_serve_with_a_busy_port_fails_at_once_with_a_clear_error() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        busy = other.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "deploy.cli", "serve", "--port", str(busy)], capture_output=True,
                           text=True, timeout=120)
    assert r.returncode != 0
    assert f"disagg serve: port {busy} on 127.0.0.1 is in use" in r.stderr
    assert "Loading weights" not in r.stdout  # nothing was started


def test_restart_policy_backs_off_and_validates() -> None:
    p = RestartPolicy(backoff_s=1.0, max_backoff_s=5.0)
    assert [p.delay(n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    with pytest.raises(ConfigError):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ConfigError):
        RestartPolicy(backoff_s=10.0, max_backoff_s=1.0)


def test_drain_timeout_is_validated() -> None:
    assert TransferConfig(drain_timeout_s=0).drain_timeout_s == 0
    for bad in (-1, True, "soon"):
        with pytest.raises(ConfigError, match="drain_timeout_s"):
            TransferConfig(drain_timeout_s=bad)


# ---- the drain against a stand-in service: the engine's load and the routers' subscriptions ---------------------
@dataclass
class FakeSubscriber:
    requests: set[str]


@dataclass
class FakeAsyncEngine:
    load: EngineLoad
    aborted: list[str] = field(default_factory=list)
    healthy: bool = True

    async def run_between_steps(self, fn):  # noqa: ANN001, ANN201
        return fn()

    def abort(self, rid: str) -> None:
        self.aborted.append(rid)


class FakeService:
    def __init__(self, load: EngineLoad, owned: set[str]) -> None:
        self.aengine = FakeAsyncEngine(load)
        self.engine = self  # drain reads `service.engine.load()`
        self.subscribers = {"router-a": FakeSubscriber(owned)}
        self.draining = False

    def load(self) -> EngineLoad:
        return self.aengine.load


def config(drain_s: float) -> WorkerConfig:
    return WorkerConfig(worker_id="decode-x", transfer=TransferConfig(drain_timeout_s=drain_s))


def test_drain_aborts_what_is_left_at_the_deadline_so_routers_move_it() -> None:
    svc = FakeService(EngineLoad(num_running=2), {"a", "b"})
    began = time.monotonic()
    asyncio.run(drain(config(0.3), svc, asyncio.Event()))  # type: ignore[arg-type]
    assert 0.3 <= time.monotonic() - began < 2.0
    assert svc.draining and sorted(svc.aengine.aborted) == ["a", "b"]


def test_drain_returns_once_idle_without_aborting() -> None:
    svc = FakeService(EngineLoad(num_running=1), {"a"})

    async def run() -> None:
        task = asyncio.create_task(drain(config(30), svc, asyncio.Event()))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)
        assert not task.done() and svc.draining  # still finishing its request, refusing new ones
        svc.aengine.load, svc.subscribers["router-a"].requests = EngineLoad(), set()
        await asyncio.wait_for(task, 2)

    asyncio.run(run())
    assert svc.aengine.aborted == []


def test_drain_waits_for_leases_and_a_second_signal_ends_it_at_once() -> None:
    svc = FakeService(EngineLoad(leased_requests=1), set())
    now = asyncio.Event()

    async def run() -> float:
        task = asyncio.create_task(drain(config(30), svc, now))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)
        assert not task.done()  # a lease not yet pulled keeps a prefill worker up
        t = time.monotonic()
        now.set()
        await asyncio.wait_for(task, 2)
        return time.monotonic() - t

    assert asyncio.run(run()) < 0.5
