"""Runs the (synchronous) engine on one thread and talks to it from asyncio.

Invariant: the engine is touched by exactly one thing at a time. `step()` runs
on a single-thread executor; every mutation requested from the event loop
(add, abort, free blocks, hooks) is queued and applied on the loop thread
between steps, never while a step is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.engine import LLMEngine, StepOutput
from engine.remote_kv import KVReservation
from engine.request import InvalidRequestError, Request, SamplingParams
from engine.stats import EngineLoad

log = logging.getLogger(__name__)


class AsyncEngine:
    """An engine loop task plus per-request output queues."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.snapshot: EngineLoad = engine.load()  # read between steps, so RPC handlers never touch live queues
        self._queues: dict[str, asyncio.Queue[StepOutput]] = {}
        self._pending: list[tuple[Callable[[], Any], asyncio.Future | None]] = []
        self._hooks: list[Callable[[], None]] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None

    def add_hook(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread before every step (and at least every 50 ms when idle)."""
        self._hooks.append(fn)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    output_token_ids: list[int] | None = None, lease_s: float | None = None
                    ) -> asyncio.Queue[StepOutput]:
        """Check now (raises InvalidRequestError), enqueue for the next step; returns the output queue."""
        return self.add(self.engine.make_request(request_id, prompt_token_ids, params,
                                                 output_token_ids=output_token_ids or (), lease_s=lease_s))

    def add(self, req: Request) -> asyncio.Queue[StepOutput]:
        """Enqueue a request from `engine.make_request` for the next step; returns its output queue."""
        q = self._open(req.request_id)
        self._submit(lambda: self._add(req, q), None)
        return q

    async def receive_kv(self, req: Request, num_tokens: int, timeout_s: float
                         ) -> tuple[asyncio.Queue[StepOutput], KVReservation | None]:
        """Reserve blocks for a request (from `engine.make_request`) whose prompt KV arrives from elsewhere.
        Returns its output queue and the reservation; with None (no free blocks) the request is already queued
        to recompute its prompt here. After a reservation, report the transfer with `kv_received`/`kv_failed`."""
        q = self._open(req.request_id)

        def reserve() -> KVReservation | None:
            try:
                res = self.engine.receive_kv(req, num_tokens, timeout_s)
            except InvalidRequestError as e:
                self._fail(req.request_id, q, e)
                return None
            if res is None:
                self._add(req, q)
            return res

        return q, await self.run_between_steps(reserve)

    def kv_received(self, request_id: str) -> None:
        self._submit(lambda: self.engine.kv_received(request_id), None)

    def kv_failed(self, request_id: str) -> None:
        self._submit(lambda: self.engine.kv_failed(request_id), None)

    def _open(self, request_id: str) -> asyncio.Queue[StepOutput]:
        if request_id in self._queues:  # another stream of this id is live: never take its outputs over
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        q: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._queues[request_id] = q
        return q

    def _add(self, req: Request, q: asyncio.Queue[StepOutput]) -> None:
        try:
            self.engine.add(req)
        except InvalidRequestError as e:  # e.g. a duplicate id: end this stream, never leave it waiting
            self._fail(req.request_id, q, e)

    def _fail(self, request_id: str, q: asyncio.Queue[StepOutput], e: Exception) -> None:
        if self._queues.get(request_id) is q:
            del self._queues[request_id]
        q.put_nowait(StepOutput(request_id, [], True, "error", stop_reason=str(e)))

    def abort(self, request_id: str) -> None:
        """Stop the request at the next step boundary and free its blocks (or its lease). Idempotent. Whoever
        still waits on its output queue gets a last output with finish reason "abort"."""
        self._end(request_id)
        self._submit(lambda: self.engine.abort(request_id), None)

    async def abort_and_wait(self, request_id: str) -> bool:
        """`abort`, returning once it is done: False if the engine knew no such request (nor lease)."""
        self._end(request_id)
        return await self.run_between_steps(lambda: self.engine.abort(request_id))

    def _end(self, request_id: str) -> None:
        q = self._queues.pop(request_id, None)
        if q is not None:
            q.put_nowait(StepOutput(request_id, [], True, "abort"))

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the loop thread before the next step, without waiting (safe from `finally` blocks)."""
        self._submit(fn, None)

    async def run_between_steps(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the loop thread while no step is running; returns its result."""
        fut = asyncio.get_running_loop().create_future()
        self._submit(fn, fut)
        return await fut

    def _submit(self, fn: Callable[[], Any], fut: asyncio.Future | None) -> None:
        if self._error is not None:
            raise RuntimeError(f"engine loop died: {self._error!r}")
        self._pending.append((fn, fut))
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._apply_pending()
                for hook in self._hooks:
                    hook()
                if self.engine.has_unfinished():
                    outputs = await loop.run_in_executor(self._executor, self.engine.step)
                    self._dispatch(outputs)
                    self.snapshot = self.engine.load()
                else:
                    self.engine.check_deadlines()
                    self.snapshot = self.engine.load()
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=0.05)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the worker reports unhealthy rather than hanging its streams
            log.exception("engine loop failed")
            self._error = e
            for q in self._queues.values():
                q.put_nowait(StepOutput("", [], True, "error"))

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        for fn, fut in pending:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - handed to the awaiting caller
                if fut is None:
                    log.exception("engine mutation failed")
                elif not fut.done():
                    fut.set_exception(e)
                continue
            if fut is not None and not fut.done():
                fut.set_result(result)

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for so in outputs:
            q = self._queues.get(so.request_id)
            if q is not None:
                q.put_nowait(so)
                if so.finished:
                    self._queues.pop(so.request_id, None)

    @property
    def healthy(self) -> bool:
        return self._error is None and self._task is not None and not self._task.done()
