"""The router's calls to workers beyond the request path: turning gRPC failures into client errors (and telling a
refusal from a dead worker), giving up on a call as soon as its worker turns unhealthy, and the Abort / ReleaseKV
calls that let a worker go of a request, which finish even when the request's own task is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import grpc

from proto import DRAINING, NO_SUBSCRIPTION, REASON_KEY, disagg_pb2
from router.config import RouterConfig
from router.errors import APIError
from router.registry import WorkerRegistry, WorkerState
from router.token_streams import WorkerLost

log = logging.getLogger(__name__)


class WorkerCalls:
    """Failure mapping, lost-worker races and cleanup RPCs of one router process."""

    def __init__(self, config: RouterConfig, workers: WorkerRegistry) -> None:
        self.config, self.workers = config, workers
        self._lost: dict[str, asyncio.Future[str]] = {}  # address -> resolved (with the reason) when it turns unhealthy
        # Cleanup RPCs run as tasks referenced here, so they finish even when the request's task is cancelled.
        self._cleanups: set[asyncio.Task[None]] = set()
        workers.on_unhealthy.append(self._worker_lost)

    def error(self, w: WorkerState, e: grpc.aio.AioRpcError, what: str) -> APIError:
        code = e.code()
        msg = f"{what} on worker {w.address} failed: {code.name}: {e.details()}"
        reason = _refusal(e)
        if reason == DRAINING:  # alive and finishing its requests: route around it, move nothing
            self.workers.mark_draining(w)
            return APIError(503, msg, code="worker_unavailable")
        if reason == NO_SUBSCRIPTION:  # we gave up on its token stream meanwhile (it froze): nothing started there
            return APIError(503, msg, code="worker_unavailable")
        if code == grpc.StatusCode.UNAVAILABLE:
            self.workers.mark_unavailable(w, f"{code.name}: {e.details()}")
            return APIError(503, msg, code="worker_unavailable")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return APIError(503, msg, code="worker_timeout")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return APIError(503, msg, code="worker_overloaded")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return APIError(400, str(e.details()))
        return APIError(502, msg, code="worker_error")

    def _worker_lost(self, w: WorkerState, reason: str) -> None:
        lost = self._lost.pop(w.address, None)
        if lost is not None and not lost.done():
            lost.set_result(reason)

    async def unless_lost(self, w: WorkerState, call: grpc.aio.UnaryUnaryCall) -> Any:
        """Await `call` to `w`, giving up (WorkerLost) as soon as `w` turns unhealthy: a worker that froze (SIGSTOP,
        a wedged step) would otherwise hold the call for its whole deadline."""
        lost = self._lost.get(w.address)
        if lost is None or lost.done():
            lost = self._lost[w.address] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(call)
        try:
            done, _ = await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()  # a client that went away, or the worker lost: the RPC is cancelled with it
        if task in done:
            return task.result()
        raise WorkerLost(f"worker {w.address} is unhealthy: {lost.result()}", code="worker_timeout")

    def abort_later(self, w: WorkerState, request_id: str) -> asyncio.Task[None]:
        task = asyncio.create_task(self.control(w, "Abort", request_id), name=f"abort-{request_id}")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def abort_before_return(self, w: WorkerState, request_id: str, sent: asyncio.Task[None]) -> None:
        """Before a request goes back to a worker it left (a frozen worker that answers again is the same process,
        still holding its copy): wait for the Abort sent when it left, then abort once more, awaited. That one
        lands now that the worker answers, so the old copy is gone before the new Decode (else the worker refuses
        it as a duplicate id, or the late first Abort kills the new copy)."""
        await asyncio.shield(sent)
        await asyncio.shield(self.control(w, "Abort", request_id))

    async def control(self, w: WorkerState, method: str, request_id: str) -> None:
        """Abort or ReleaseKV on a worker, best effort: a failure is logged, never raised."""
        stub = w.stub
        if stub is None:
            return
        try:
            if method == "Abort":
                await stub.Abort(disagg_pb2.AbortRequest(request_id=request_id), timeout=self.config.rpc_timeout_s)
            else:
                await stub.ReleaseKV(disagg_pb2.ReleaseKVRequest(request_id=request_id),
                                     timeout=self.config.rpc_timeout_s)
            log.debug("%s: %s sent to %s", request_id, method, w.address)
        except grpc.aio.AioRpcError as e:
            log.info("%s: %s on %s failed: %s", request_id, method, w.address, e.code().name)


    async def release_all(self, request_id: str, abort: list[WorkerState], release: WorkerState | None) -> None:
        """Abort the request on `abort`, release its lease on `release`; waits for them, but they go on even if
        the caller is cancelled meanwhile."""
        rpcs = [self.control(w, "Abort", request_id) for w in abort]
        if release is not None:
            rpcs.append(self.control(release, "ReleaseKV", request_id))
        if not rpcs:
            return
        task = asyncio.create_task(_gather(rpcs), name=f"cleanup-{request_id}")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        await asyncio.shield(task)


async def _gather(coros: list[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*coros)


def _refusal(e: grpc.aio.AioRpcError) -> str | None:
    """The reason a worker named for refusing the call (proto.REASON_KEY), if any."""
    for key, value in e.trailing_metadata() or ():
        if key == REASON_KEY:
            return value if isinstance(value, str) else value.decode()
    return None


