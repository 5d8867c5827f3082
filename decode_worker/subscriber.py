"""One router process's token stream from this decode worker (the `Subscribe` RPC).

Every engine step's outputs for the requests a router sent go into that router's outbox; the Subscribe stream
sends the whole outbox as one TokenBatch. If the router reads slower than the engine steps, outputs pile up in
the outbox and go out together, a request's tokens of several steps merged into one chunk: the router is never
sent more messages than it can read, and the engine never waits for it.

Ownership: a request belongs to the subscriber that sent it from admission until its last output (finished,
error or abort) is in the outbox. When the stream ends (the router went away), the worker aborts every request
the subscriber still owns, so a dead router leaves no request running and no block held.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from engine.engine import StepOutput
from proto import disagg_pb2
from proto.convert import logprob_to_proto, prompt_logprobs_to_proto


class Subscriber:
    """A router process's outbox: chunks waiting to be sent, and the requests it owns."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: set[str] = set()
        self._outbox: dict[str, disagg_pb2.TokenChunk] = {}  # request id -> its merged, unsent chunk
        self._ready = asyncio.Event()
        self.closed = False

    def own(self, request_id: str) -> None:
        self.requests.add(request_id)

    def push(self, so: StepOutput) -> None:
        """An engine output of one of its requests (the AsyncEngine sink): merge it into the outbox."""
        chunk = self._outbox.get(so.request_id)
        if chunk is None:
            chunk = self._outbox[so.request_id] = disagg_pb2.TokenChunk(request_id=so.request_id)
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
            if outbox:
                yield disagg_pb2.TokenBatch(chunks=outbox.values())

    def close(self, abort: Callable[[str], None]) -> None:
        """The stream ended: abort every request still owned, forget the outbox."""
        self.closed = True
        self._ready.set()
        for rid in list(self.requests):
            abort(rid)
        self.requests.clear()
        self._outbox.clear()
