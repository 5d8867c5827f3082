"""The workers the router knows: their channels, health, roles and latest load.

A background task polls every worker's `Health` and `Load`. A worker that fails a poll, or whose RPC fails with
UNAVAILABLE, is unhealthy and gets no new requests until a poll succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import grpc

from proto import disagg_pb2, disagg_pb2_grpc

log = logging.getLogger(__name__)

PREFILL_ROLES = ("prefill", "both")
DECODE_ROLES = ("decode", "both")

# Short reconnect backoff so a restarted worker is reachable again within about one poll interval.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
]


@dataclass
class WorkerState:
    """One worker as the router sees it."""

    address: str  # host:port of its gRPC server
    channel: grpc.aio.Channel | None = None  # open while the registry runs
    stub: disagg_pb2_grpc.WorkerStub | None = None  # on `channel`
    worker_id: str = ""  # as reported by Health
    role: str = ""  # prefill | decode | both, as reported by Health; "" until the first answer
    model: str = ""  # model the worker serves
    max_model_len: int = 0  # its context length; 0 until known
    healthy: bool = False  # answered the last poll with ok
    remote_draining: bool = False  # the worker says it is draining
    draining: bool = False  # the router was told to stop sending it new requests
    load: disagg_pb2.LoadReport | None = None  # latest Load report
    error: str = ""  # why it is unhealthy
    in_flight: int = 0  # requests this router has running on it now
    in_flight_tokens: int = 0  # prompt tokens of those requests
    _removed: bool = field(default=False, repr=False)

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining and not self.remote_draining and not self._removed

    def can(self, phase: str) -> bool:
        """Whether it runs `phase` (prefill | decode) and takes new requests."""
        return self.routable and self.role in (PREFILL_ROLES if phase == "prefill" else DECODE_ROLES)

    @contextlib.contextmanager
    def dispatched(self, prompt_tokens: int) -> Iterator[None]:
        """Count a request as in flight on this worker for the duration of the block."""
        self.in_flight += 1
        self.in_flight_tokens += prompt_tokens
        try:
            yield
        finally:
            self.in_flight -= 1
            self.in_flight_tokens -= prompt_tokens


class WorkerRegistry:
    """Worker addresses -> live state; add, remove and drain at run time."""

    def __init__(self, addresses: Iterable[str] = (), health_interval_s: float = 1.0, rpc_timeout_s: float = 2.0
                 ) -> None:
        self.health_interval_s = health_interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self._workers: dict[str, WorkerState] = {a: WorkerState(a) for a in dict.fromkeys(addresses)}
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def workers(self) -> list[WorkerState]:
        return list(self._workers.values())

    def get(self, address: str) -> WorkerState | None:
        return self._workers.get(address)

    def candidates(self, phase: str) -> list[WorkerState]:
        """Workers that take new `phase` (prefill | decode) requests now."""
        return [w for w in self._workers.values() if w.can(phase)]

    def max_model_len(self) -> int | None:
        """The smallest context length any worker has reported (also from workers down now), None if none has."""
        lens = [w.max_model_len for w in self._workers.values() if w.max_model_len > 0]
        return min(lens) if lens else None

    async def start(self) -> None:
        """Open channels, poll once (so routing works at once), then keep polling in the background."""
        if self._task is not None:
            return
        for w in self._workers.values():
            _open(w)
        await self.poll_once()
        self._task = asyncio.create_task(self._poll_forever(), name="worker-health")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(_close(w) for w in self._workers.values()))

    async def add(self, address: str) -> WorkerState:
        """Register a worker; when running, connect and poll it before returning."""
        if address in self._workers:
            return self._workers[address]
        w = self._workers[address] = WorkerState(address)
        log.info("worker %s added", address)
        if self._task is not None:
            _open(w)
            await self._poll(w)
        return w

    async def remove(self, address: str) -> None:
        """Forget a worker and close its channel, failing what still runs on it.

        To let running requests finish, `set_draining` first and wait for its `in_flight` to reach 0.
        """
        w = self._workers.pop(address, None)
        if w is None:
            return
        w._removed = True
        log.info("worker %s removed", address)
        await _close(w)

    def set_draining(self, address: str, draining: bool = True) -> None:
        """Stop (or resume) sending new requests to a worker; running ones go on."""
        w = self._workers.get(address)
        if w is None:
            raise KeyError(f"unknown worker {address}")
        w.draining = draining
        log.info("worker %s %s", address, "draining" if draining else "no longer draining")

    def mark_unavailable(self, w: WorkerState, reason: str) -> None:
        """An RPC found the worker unreachable: route around it until a poll succeeds."""
        self._set_health(w, False, reason)

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(w) for w in list(self._workers.values())))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.poll_once()
            except Exception:  # a bug here must not stop health checks for good
                log.exception("health poll failed")

    async def _poll(self, w: WorkerState) -> None:
        if w.stub is None:
            return
        try:
            health = await w.stub.Health(disagg_pb2.HealthRequest(), timeout=self.rpc_timeout_s)
            load = await w.stub.Load(disagg_pb2.LoadRequest(), timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            self._set_health(w, False, f"{e.code().name}: {e.details()}")
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # channel closed by a concurrent remove(), or a malformed answer
            self._set_health(w, False, repr(e))
            return
        w.worker_id, w.role, w.model = health.worker_id, health.role, health.model
        w.max_model_len, w.remote_draining, w.load = health.max_model_len, health.draining, load
        self._set_health(w, health.ok, "" if health.ok else "worker reports not ok")

    def _set_health(self, w: WorkerState, healthy: bool, reason: str) -> None:
        if healthy != w.healthy:
            if healthy:
                log.info("worker %s (%s, %s) is healthy", w.address, w.worker_id or "?", w.role or "?")
            else:
                log.warning("worker %s is unhealthy: %s", w.address, reason)
        w.healthy, w.error = healthy, reason


def _open(w: WorkerState) -> None:
    if w.channel is None:
        w.channel = grpc.aio.insecure_channel(w.address, options=CHANNEL_OPTIONS)
        w.stub = disagg_pb2_grpc.WorkerStub(w.channel)


async def _close(w: WorkerState) -> None:
    channel, w.channel, w.stub = w.channel, None, None
    if channel is not None:
        await channel.close()
