"""This router process's token streams: one Subscribe stream per decode worker, carrying every request's tokens.

A decode worker sends the new tokens of all the requests this router gave it in one TokenBatch per engine step
(decode_worker/subscriber.py), so the router reads one gRPC message per worker step, not one per token. A reader
task per worker hands each chunk to its request's `RequestStream`, which the request's generation awaits.

Failure: when a worker's stream breaks (the worker died or restarted) or stays silent past `stall_s` while it
has requests, every request on it ends with `WorkerLost`; its Generation then decides (retry elsewhere, or an
error event). Nothing waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque

import grpc

from proto import PROTOCOL_VERSION, disagg_pb2
from router.arrival_log import ArrivalLog
from router.errors import APIError
from router.registry import WorkerState

log = logging.getLogger(__name__)


class WorkerLost(Exception):
    """The worker carrying a request stopped streaming (died, restarted, or went silent)."""

    def __init__(self, message: str, code: str = "worker_unavailable") -> None:
        super().__init__(message)
        self.message = message
        self.code = code  # the OpenAI error code a client sees if the request cannot move on


class RequestStream:
    """One request's chunks as they arrive; `next()` returns every chunk that came since the last call."""

    __slots__ = ("request_id", "deadline", "_chunks", "_waiter", "_error")

    def __init__(self, request_id: str, deadline: float) -> None:
        self.request_id = request_id
        self.deadline = deadline  # time.monotonic() past which the request fails (router.request_timeout_s)
        self._chunks: deque[disagg_pb2.TokenChunk] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    def put(self, chunk: disagg_pb2.TokenChunk) -> None:
        self._chunks.append(chunk)
        self._wake()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next(self) -> list[disagg_pb2.TokenChunk]:
        """Every chunk that arrived since the last call, waiting for one if there is none; raises the stream's
        error once its chunks are consumed."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out = list(self._chunks)
        self._chunks.clear()
        return out


class Subscription:
    """The Subscribe stream to one decode worker and the requests waiting on it."""

    def __init__(self, worker: WorkerState, subscriber: str, stall_s: float,
                 arrivals: ArrivalLog | None = None) -> None:
        self.worker, self.subscriber, self.stall_s = worker, subscriber, stall_s
        self.arrivals = arrivals  # router/arrival_log.py, when benchmarks keep step logs
        self.requests: dict[str, RequestStream] = {}
        self.quiet_since = time.monotonic()  # the last batch, or when requests began waiting on an idle stream
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self._task = asyncio.create_task(self._read(), name=f"tokens-{worker.address}")
        self._watch = asyncio.create_task(self._watchdog(), name=f"stall-{worker.address}")

    def open(self, request_id: str, deadline: float) -> RequestStream:
        if self.closed:
            raise WorkerLost(f"the token stream of worker {self.worker.address} is closed")
        if not self.requests:
            self.quiet_since = time.monotonic()
        stream = self.requests[request_id] = RequestStream(request_id, deadline)
        return stream

    def close_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    async def _read(self) -> None:
        error: BaseException = WorkerLost(f"worker {self.worker.address} ended its token stream")
        try:
            assert self.worker.stub is not None
            call = self.worker.stub.Subscribe(disagg_pb2.SubscribeRequest(version=PROTOCOL_VERSION,
                                                                          subscriber=self.subscriber))
            async for batch in call:
                if not self.ready.done():
                    self.ready.set_result(None)
                if self.arrivals is not None:
                    self.arrivals.batch(self.subscriber, self.worker.address, batch)
                requests = self.requests
                self.quiet_since = time.monotonic()
                for chunk in batch.chunks:
                    stream = requests.get(chunk.request_id)
                    if stream is not None:
                        stream.put(chunk)
        except grpc.aio.AioRpcError as e:
            error = WorkerLost(f"token stream of worker {self.worker.address} broke: {e.code().name}: {e.details()}")
        except asyncio.CancelledError:
            error = WorkerLost("the router is stopping")
            raise
        finally:
            self._end(error)

    async def _watchdog(self) -> None:
        """A worker that sends nothing for `stall_s` while requests wait on it is lost (hung, or unreachable
        without the connection noticing)."""
        while not self.closed:
            await asyncio.sleep(min(1.0, self.stall_s / 4))
            now = time.monotonic()
            for rid in [rid for rid, s in self.requests.items() if now > s.deadline]:
                self.requests.pop(rid).fail(APIError(503, f"request {rid} ran past router.request_timeout_s",
                                                     code="worker_timeout"))
            if self.requests and now - self.quiet_since > self.stall_s:
                log.warning("worker %s sent no token for %.0fs to %d waiting request(s); giving up on its stream",
                            self.worker.address, self.stall_s, len(self.requests))
                self.lose(WorkerLost(f"worker {self.worker.address} sent nothing for {self.stall_s:g}s",
                                     code="worker_timeout"))

    def lose(self, error: BaseException) -> None:
        """Give up on this stream: its requests fail with `error`, the reader stops."""
        self._end(error)
        self._task.cancel()

    def _end(self, error: BaseException) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved here: nobody may be waiting for it
        for stream in self.requests.values():
            stream.fail(error)
        self.requests.clear()
        if asyncio.current_task() is not self._watch:
            self._watch.cancel()

    async def aclose(self) -> None:
        self._task.cancel()
        self._watch.cancel()
        await asyncio.gather(self._task, self._watch, return_exceptions=True)


class TokenStreams:
    """This router process's subscriptions, one per decode worker, opened on first use and again after a loss."""

    def __init__(self, stall_s: float, arrivals: ArrivalLog | None = None) -> None:
        self.stall_s = stall_s
        self.name = f"router-{secrets.token_hex(6)}"
        self.arrivals = arrivals
        self._subs: dict[str, Subscription] = {}

    async def open(self, worker: WorkerState, request_id: str, timeout_s: float, deadline: float
                   ) -> tuple[Subscription, RequestStream]:
        """The request's stream on `worker`'s subscription (subscribing first if needed), failing past `deadline`
        (monotonic). Raises WorkerLost when the worker does not take the subscription within `timeout_s`."""
        sub = self._subs.get(worker.address)
        if sub is None or sub.closed:
            sub = self._subs[worker.address] = Subscription(worker, self.name, self.stall_s, self.arrivals)
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(sub.ready)
        except TimeoutError:
            raise WorkerLost(f"worker {worker.address} did not open a token stream in {timeout_s:g}s",
                             code="worker_timeout") from None
        return sub, sub.open(request_id, deadline)

    def lose(self, worker: WorkerState, reason: str) -> None:
        """The registry found `worker` unhealthy: end its stream now; its requests move elsewhere."""
        sub = self._subs.pop(worker.address, None)
        if sub is not None and not sub.closed:
            if sub.requests:
                log.warning("worker %s is unhealthy (%s): moving its %d request(s)", worker.address, reason,
                            len(sub.requests))
            sub.lose(WorkerLost(f"worker {worker.address} is unhealthy: {reason}", code="worker_timeout"))

    async def aclose(self) -> None:
        subs, self._subs = list(self._subs.values()), {}
        with contextlib.suppress(Exception):
            await asyncio.gather(*(s.aclose() for s in subs), return_exceptions=True)
        if self.arrivals is not None:
            self.arrivals.close()
