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
from dataclasses import dataclass
from typing import Any

from engine.engine import LLMEngine, StepOutput
from engine.request import InvalidRequestError, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class EngineSnapshot:
    """Load figures read between steps, so RPC handlers never iterate live engine queues."""

    num_waiting: int = 0
    num_running: int = 0
    queued_prefill_tokens: int = 0
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0


class AsyncEngine:
    """An engine loop task plus per-request output queues."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.snapshot = EngineSnapshot(kv_blocks_free=engine.kv.num_free_blocks, kv_blocks_total=engine.kv.num_blocks)
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
                    output_token_ids: list[int] | None = None, num_computed_tokens: int = 0,
                    keep_blocks_on_finish: bool = False) -> asyncio.Queue[StepOutput]:
        """Validate now (raises InvalidRequestError), enqueue for the next step; returns the output queue."""
        self.engine.validate(prompt_token_ids, params)
        q: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._queues[request_id] = q

        def add() -> None:
            try:
                self.engine.add_request(request_id, prompt_token_ids, params, keep_blocks_on_finish, output_token_ids,
                                        num_computed_tokens)
            except InvalidRequestError as e:  # e.g. a duplicate id: end this stream, never leave it waiting
                self._queues.pop(request_id, None)
                q.put_nowait(StepOutput(request_id, [], True, "error", stop_reason=str(e)))

        self._submit(add, None)
        return q

    def abort(self, request_id: str) -> None:
        """Stop the request at the next step boundary and free its blocks. Idempotent."""
        self._queues.pop(request_id, None)
        self._submit(lambda: self.engine.abort(request_id), None)

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
                    self._take_snapshot()
                else:
                    self._take_snapshot()
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

    def _take_snapshot(self) -> None:
        s, kv = self.engine.scheduler, self.engine.kv
        queued = sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in [*s.waiting, *s.running])
        self.snapshot = EngineSnapshot(len(s.waiting), len(s.running), queued, kv.num_free_blocks, kv.num_blocks)

    @property
    def healthy(self) -> bool:
        return self._error is None and self._task is not None and not self._task.done()
