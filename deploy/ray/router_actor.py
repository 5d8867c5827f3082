"""The router as a Ray actor: the same FastAPI app `python -m router` serves, on uvicorn, on the actor's event loop.

Running in the actor's own loop (as Ray Serve's proxy does) lets the planner's calls - add, drain, remove a worker,
read a snapshot - act on the live `WorkerRegistry` directly, with no admin HTTP API and no locks: every method
here runs on the same loop as the request handlers, so nothing interleaves inside one method body.

Restarts: the launcher creates router actors with `max_restarts=-1`. When one dies (its process killed, an OOM),
Ray starts it again with the same arguments; `__init__` sees it was reconstructed and queues `recover()` on
itself, which rebuilds the worker registry from the worker actors themselves (worker_actor.discover: every live
worker's address, draining if it is stopping) before it serves again, so it never serves with an empty registry.
Load and the KV-aware index then come from the registry's first polls (a new cursor asks each worker for a
snapshot of its cached blocks). Counters in /metrics start again from zero. Several replicas (`router.processes`)
bind the one port with SO_REUSEPORT; while one restarts, the others take every new connection (routers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import uvicorn
from prometheus_client import Histogram

from deploy.config import ClusterConfig
from deploy.planner_metrics import PlannerCollector
from deploy.ray.worker_actor import call_self_after_init, discover, reconstructed
from engine.gc_heap import freeze_heap
from engine.tokenizer import Tokenizer
from router.app import create_app
from router.processes import listen_socket
from router.registry import WorkerRegistry, WorkerState

log = logging.getLogger("disagg.router")


class _Server(uvicorn.Server):
    """uvicorn without its SIGINT/SIGTERM handlers: the process's signals are Ray's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def tokenizer_path(model: str) -> str:
    if Path(model).exists():
        return model
    from engine.loader import smollm2_gguf_path

    return smollm2_gguf_path()


def histogram_buckets(h: Histogram) -> list[tuple[float, float]]:
    """Cumulative (le, count) pairs of an unlabelled histogram, ascending, ending with +Inf."""
    samples = [s for m in h.collect() for s in m.samples if s.name.endswith("_bucket")]
    return sorted((float(s.labels["le"]), float(s.value)) for s in samples)


def worker_view(w: WorkerState) -> dict[str, Any]:
    load = None if w.load is None else dict(w.load.stats)
    return {"address": w.address, "worker_id": w.worker_id, "role": w.role, "healthy": w.healthy,
            "draining": w.draining or w.remote_draining, "in_flight": w.in_flight,
            "in_flight_tokens": w.in_flight_tokens, "load": load, "error": w.error}


@ray.remote
class RouterActor:
    """Serves the OpenAI API on `router.host:router.port` of its node; the planner manages its workers."""

    def __init__(self, cluster: dict[str, Any]) -> None:
        cfg = ClusterConfig.from_dict(cluster)
        self.config = cfg.router_config()
        self.registry = WorkerRegistry([], health_interval_s=self.config.health_interval_s,
                                       rpc_timeout_s=self.config.rpc_timeout_s)
        self.app = create_app(self.config, Tokenizer.from_model_path(tokenizer_path(cfg.model)), self.registry)
        self.planner_metrics = PlannerCollector()
        self.app.service.metrics.registry.register(self.planner_metrics)
        freeze_heap("router actor")  # start-up's objects (Ray's, the app's, the tokenizer's) out of full collections
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.url = ""
        self._recovery: asyncio.Future[str] | None = None
        self.restarted = reconstructed()
        if self.restarted:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            log.warning("router actor restarted; recovering its workers before serving again")
            call_self_after_init("recover")  # runs once __init__ has returned

    async def recover(self, timeout_s: float = 60.0) -> str:
        """After a restart: register every live worker actor (draining ones as draining), then serve. Once: a
        second call (call_self_after_init may retry) waits for the first."""
        if self._recovery is None:
            self._recovery = asyncio.ensure_future(self._recover(timeout_s))
        return await asyncio.shield(self._recovery)

    async def _recover(self, timeout_s: float) -> str:
        try:
            found = await asyncio.to_thread(discover, ray.get_runtime_context().namespace)
        except Exception:  # serve anyway: the planner's next tick registers the workers (routers.py reconcile)
            log.exception("could not list the worker actors")
            found = []
        for w in found:
            if w["alive"] and w["address"]:
                await self.registry.add(w["address"])
                if w["stopping"]:
                    self.registry.set_draining(w["address"])
        log.info("router recovered %d worker(s) from the worker actors", len(self.registry.workers()))
        return await self.start(timeout_s)

    async def start(self, timeout_s: float = 60.0) -> str:
        """Bind, serve, and return the base URL once uvicorn has started (the port is bound here, so a busy port
        is an OSError from this call rather than uvicorn's sys.exit inside the actor). Idempotent."""
        if self._server is not None:
            return self.url
        host, port = self.config.host, self.config.port
        sock = listen_socket(host, port)  # SO_REUSEPORT: the other router replicas serve the same port
        server = self._server = _Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if self._task.done():
                raise RuntimeError(f"router stopped while starting: {self._task.exception()!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"router not serving after {timeout_s:.0f}s")
            await asyncio.sleep(0.05)
        shown = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::", "") else host
        self.url = f"http://{shown}:{sock.getsockname()[1]}"
        return self.url

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        if not self._task.done():
            self._server.force_exit = True

    async def get_url(self) -> str:
        return self.url

    async def pid(self) -> int:
        """The actor's process id (tests kill it to check the restart)."""
        return os.getpid()

    async def add_worker(self, address: str) -> None:
        await self.registry.add(address)

    async def drain_worker(self, address: str) -> None:
        """No new requests go to the worker from now on; running ones go on."""
        if self.registry.get(address) is not None:
            self.registry.set_draining(address)

    async def remove_worker(self, address: str) -> None:
        await self.registry.remove(address)

    async def snapshot(self) -> dict[str, Any]:
        """Every worker's state and latest load, and the latency histograms (see deploy/pool_metrics.py)."""
        metrics = self.app.service.metrics
        return {"workers": [worker_view(w) for w in self.registry.workers()],
                "histograms": {"ttft": histogram_buckets(metrics.ttft), "itl": histogram_buckets(metrics.itl)}}

    async def set_planner_report(self, pools: dict[str, Any]) -> None:
        self.planner_metrics.update(pools)
