"""One router process's token stream from this decode worker (the `Subscribe` RPC).

Every engine step's outputs for the requests a router sent go into that router's outbox; the Subscribe stream
sends the whole outbox as one TokenBatch. If the router reads slower than the engine steps, outputs pile up in
the outbox and go out together, a request's tokens of several steps merged into one chunk: the router is never
sent more messages than it can read, and the engine never waits for it.

With a step log kept (worker/step_log.py), every batch sent is noted (`batch_sent`): how long its oldest output
waited in the outbox (`wait_ms`: the step's end to the batch's hand-over to gRPC), how long gRPC took to take it
(`write_ms`), its chunks, and how many outputs joined a chunk already waiting (`merged`: a request's tokens of
two or more steps in one chunk, which the router sees as one long gap and one of zero).

Ownership: a request belongs to the subscriber that sent it from admission until its last output (finished,
error or abort) is in the outbox. When the stream ends (the router went away), the worker aborts every request
the subscriber still owns, so a dead router leaves no request running and no block held.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from engine.engine import StepOutput
from proto import disagg_pb2
from proto.convert import logprob_to_proto, prompt_logprobs_to_proto


class Subscriber:
    """A router process's outbox: chunks waiting to be sent, and the requests it owns."""

    def __init__(self, name: str, note: Callable[..., None] | None = None) -> None:
        self.name = name
        self.requests: set[str] = set()
        self._outbox: dict[str, disagg_pb2.TokenChunk] = {}  # request id -> its merged, unsent chunk
        self._note = note  # AsyncEngine.note when a step log is kept
        self._oldest = 0.0  # time.perf_counter() of the oldest output in the outbox
        self._merged = 0  # outputs in the outbox that joined a chunk already there
        self._ready = asyncio.Event()
        self.closed = False

    def own(self, request_id: str) -> None:
        self.requests.add(request_id)

    def push(self, so: StepOutput) -> None:
        """An engine output of one of its requests (the AsyncEngine sink): merge it into the outbox."""
        if not self._outbox:
            self._oldest = time.perf_counter()
        chunk = self._outbox.get(so.request_id)
        if chunk is None:
            chunk = self._outbox[so.request_id] = disagg_pb2.TokenChunk(request_id=so.request_id)
        else:
            self._merged += 1
        chunk.token_ids.extend(so.new_token_ids)
        if so.new_logprobs:
            chunk.logprobs.extend(logprob_to_proto(lp) for lp in so.new_logprobs)
        if so.prompt_logprobs is not None:  # the request's first output, its prompt computed here
            chunk.prompt_logprobs.extend(prompt_logprobs_to_proto(so.prompt_logprobs))
        if so.finished:
            chunk.finish_reason = so.finish_reason or ""
            if so.finish_reason == "error":
                chunk.error = str(so.stop_reason or "engine error")
            self.requests.discard(so.request_id)
        self._ready.set()

    async def batches(self) -> AsyncIterator[disagg_pb2.TokenBatch]:
        """An empty batch first (the subscription is registered), then the outbox each time it has something."""
        yield disagg_pb2.TokenBatch()
        while not self.closed:
            await self._ready.wait()
            self._ready.clear()
            outbox, self._outbox = self._outbox, {}
            if not outbox:
                continue
            merged, self._merged = self._merged, 0
            oldest, handed = self._oldest, time.perf_counter()
            yield disagg_pb2.TokenBatch(chunks=outbox.values())
            if self._note is not None:  # resumed once gRPC has taken the message
                self._note("batch_sent", self.name, wait_ms=round((handed - oldest) * 1e3, 3),
                           write_ms=round((time.perf_counter() - handed) * 1e3, 3), chunks=len(outbox), merged=merged)

    def close(self, abort: Callable[[str], None]) -> None:
        """The stream ended: abort every request still owned, forget the outbox."""
        self.closed = True
        self._ready.set()
        for rid in list(self.requests):
            abort(rid)
        self.requests.clear()
        self._outbox.clear()
