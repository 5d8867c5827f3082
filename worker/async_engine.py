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
from worker.step_log import StepLog

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.002  # a step that scheduled nothing waits this long (or for a submission) before the next
Sink = Callable[[StepOutput], None]  # where a request's outputs go, one call per step that gave it any


class AsyncEngine:
    """An engine loop task plus per-request output queues."""

    def __init__(self, engine: LLMEngine, step_log: StepLog | None = None) -> None:
        self.engine = engine
        self._step_log = step_log  # worker/step_log.py: each step timed and written (benchmarks)
        self.snapshot: EngineLoad = engine.load()  # read between steps, so RPC handlers never touch live queues
        self._sinks: dict[str, Sink] = {}
        self._pending: list[tuple[Callable[[], Any], asyncio.Future | None]] = []
        self._hooks: list[Callable[[], None]] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None

    @property
    def noting(self) -> bool:
        """Whether request events are kept (a step log is)."""
        return self._step_log is not None

    def note(self, event: str, rid: str, **fields: float | int) -> None:
        """A request event for the step log (worker/step_log.py), when one is kept."""
        if self._step_log is not None:
            self._step_log.note(event, rid, **fields)

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
        if self._step_log is not None:
            self._step_log.close()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    output_token_ids: list[int] | None = None, lease_s: float | None = None
                    ) -> asyncio.Queue[StepOutput]:
        """Check now (raises InvalidRequestError), enqueue for the next step; returns a queue of its outputs."""
        q: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.add(self.engine.make_request(request_id, prompt_token_ids, params,
                                          output_token_ids=output_token_ids or (), lease_s=lease_s), q.put_nowait)
        return q

    def add(self, req: Request, sink: Sink) -> None:
        """Enqueue a request from `engine.make_request` for the next step; its outputs go to `sink` (called on
        the event loop, in order, the last one finished). Raises InvalidRequestError for a live duplicate id."""
        self._open(req.request_id, sink)
        self._submit(lambda: self._add(req, sink), None)

    async def receive_kv(self, req: Request, num_tokens: int, timeout_s: float, sink: Sink,
                         recompute_if_short: bool = True) -> KVReservation | None:
        """Reserve blocks for a request (from `engine.make_request`) whose prompt KV arrives from elsewhere; its
        outputs go to `sink`. None (no free blocks): with `recompute_if_short` the request is already queued to
        recompute its prompt here, else nothing is registered. After a reservation, report the transfer with
        `kv_received` / `kv_failed`."""
        self._open(req.request_id, sink)

        def reserve() -> KVReservation | None:
            try:
                res = self.engine.receive_kv(req, num_tokens, timeout_s)
            except InvalidRequestError as e:
                self._fail(req.request_id, sink, e)
                return None
            if res is None:
                if recompute_if_short:
                    self._add(req, sink)
                elif self._sinks.get(req.request_id) is sink:
                    del self._sinks[req.request_id]
            return res

        return await self.run_between_steps(reserve)

    def kv_received(self, request_id: str, output_token_ids: list[int] | None = None) -> None:
        self._submit(lambda: self.engine.kv_received(request_id, output_token_ids=output_token_ids or ()), None)

    def kv_failed(self, request_id: str) -> None:
        self._submit(lambda: self.engine.kv_failed(request_id), None)

    def _open(self, request_id: str, sink: Sink) -> None:
        if request_id in self._sinks:  # another stream of this id is live: never take its outputs over
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        self._sinks[request_id] = sink

    def _add(self, req: Request, sink: Sink) -> None:
        try:
            self.engine.add(req)
        except InvalidRequestError as e:  # e.g. a duplicate id: end this stream, never leave it waiting
            self._fail(req.request_id, sink, e)

    def _fail(self, request_id: str, sink: Sink, e: Exception) -> None:
        if self._sinks.get(request_id) is sink:
            del self._sinks[request_id]
        sink(StepOutput(request_id, [], True, "error", stop_reason=str(e)))

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Stop the request at the next step boundary and free its blocks (or its lease). Idempotent. Its sink
        gets a last output with finish reason `reason`. After the loop died there is nothing left to stop: safe to
        call from cleanup paths then too."""
        self._end(request_id, reason)
        if self._error is None:
            self._submit(lambda: self.engine.abort(request_id), None)

    async def abort_and_wait(self, request_id: str) -> bool:
        """`abort`, returning once it is done: False if the engine knew no such request (nor lease), or is dead."""
        self._end(request_id)
        if self._error is not None:
            return False
        return await self.run_between_steps(lambda: self.engine.abort(request_id))

    def _end(self, request_id: str, reason: str = "abort") -> None:
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink(StepOutput(request_id, [], True, reason))

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
                    steps = self.engine.stats.steps
                    step = self._step_log.step if self._step_log is not None else self.engine.step
                    outputs = await loop.run_in_executor(self._executor, step)
                    self._dispatch(outputs)
                    self.snapshot = self.engine.load()
                    if self.engine.stats.steps == steps:  # nothing could run (held back: a grammar compiling,
                        await self._idle(IDLE_WAIT_S)  # a fork's source still computing): do not spin
                else:
                    self.engine.check_deadlines()
                    self.snapshot = self.engine.load()
                    await self._idle(0.05)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the worker reports unhealthy rather than hanging its streams
            # A tensor-parallel rank that died lands here too (RankFailedError from step or check_deadlines).
            log.exception("engine loop failed")
            self._error = e
            for rid, sink in self._sinks.items():
                sink(StepOutput(rid, [], True, "error", stop_reason=f"engine loop died: {e!r}"))
            self._sinks.clear()
            # Nothing will run what was queued: its callers (an RPC waiting for a reservation, say) fail now rather
            # than wait for ever.
            pending, self._pending = self._pending, []
            for _fn, fut in pending:
                if fut is not None and not fut.done():
                    fut.set_exception(RuntimeError(f"engine loop died: {e!r}"))

    async def failed(self) -> BaseException | None:
        """Wait until the loop ends: the error that ended it, or None when it was stopped."""
        if self._task is not None:
            await asyncio.shield(asyncio.gather(self._task, return_exceptions=True))
        return self._error

    async def _idle(self, timeout_s: float) -> None:
        """Sleep until something is submitted or `timeout_s` passes."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=timeout_s)

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
        sinks = self._sinks
        for so in outputs:
            sink = sinks.get(so.request_id)
            if sink is not None:
                if so.finished:
                    del sinks[so.request_id]
                sink(so)

    @property
    def healthy(self) -> bool:
        return self._error is None and self._task is not None and not self._task.done()
