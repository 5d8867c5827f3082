"""The request flow across the pools: Prefill on a prefill worker, then Decode on a decode worker.

A prompt shorter than `conditional_disagg_min_prompt_tokens`, or a cluster with no prefill worker, goes straight to
a decode worker, which prefills locally. Whatever way a request ends (finished, stop string, client gone, worker
failure) the `finally` of `Generation.stream` tells the workers still holding it to let go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from engine.output_processor import RequestTextStream
from engine.tokenizer import Tokenizer
from proto import PROTOCOL_VERSION, disagg_pb2
from proto.convert import params_to_proto
from router.config import RouterConfig
from router.errors import APIError
from router.job import GenerationJob
from router.metrics import RouterMetrics
from router.policy import make_policy
from router.registry import WorkerRegistry, WorkerState

log = logging.getLogger(__name__)


@dataclass
class Output:
    """What one step of a request adds: tokens, their logprobs, the text they make visible, maybe the end."""

    token_ids: list[int]
    logprobs: list[disagg_pb2.TokenLogprob]
    text: str
    finish_reason: str | None = None  # stop | length once the request is over


@dataclass
class _Flight:
    """Which workers still hold the request; what `_cleanup` must undo if the request ends early."""

    prefill: WorkerState | None = None  # Prefill RPC sent and not answered: Abort there
    lease: WorkerState | None = None  # its KV leased and not yet taken by a decode worker: ReleaseKV there
    decode: WorkerState | None = None  # Decode stream open and not finished by the worker: Abort there
    call: grpc.aio.UnaryStreamCall | None = None  # the open Decode call, cancelled on cleanup


class Generation:
    """Runs requests on the workers and yields their outputs, stop strings applied."""

    def __init__(self, config: RouterConfig, tokenizer: Tokenizer, workers: WorkerRegistry,
                 metrics: RouterMetrics) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.workers = workers
        self.metrics = metrics
        index, ttl = workers.kv_index, config.kv_expect_ttl_s
        self._prefill_policy = make_policy(config.prefill_policy, "prefill", index, ttl,
                                           config.prefill_overlap_weight, config.prefill_load_weight)
        self._decode_policy = make_policy(config.decode_policy, "decode", index, ttl,
                                          config.decode_overlap_weight, config.decode_load_weight)
        # Cleanup RPCs run as tasks referenced here, so they finish even when the request's task is cancelled.
        self._cleanups: set[asyncio.Task[None]] = set()

    def require_decode_worker(self) -> None:
        if not self.workers.candidates("decode"):
            raise APIError(503, "no healthy decode worker is available", code="no_healthy_worker")

    async def stream(self, job: GenerationJob) -> AsyncIterator[Output]:
        """The request's outputs; raises `APIError` when a worker fails. Close it (or cancel) to abort."""
        flight = _Flight()
        text = RequestTextStream(self.tokenizer, job.prompt_ids, job.params.stop, job.params.skip_special_tokens)
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        last: float | None = None
        try:
            async for out in self._run(job, flight, text):
                now = time.monotonic()
                if out.token_ids:
                    hist, since = (self.metrics.ttft, job.arrival) if last is None else (self.metrics.itl, last)
                    hist.observe(now - since)
                    last = now
                    job.num_output_tokens += len(out.token_ids)
                    self.metrics.generation_tokens.inc(len(out.token_ids))
                yield out
            self.metrics.e2e.observe(time.monotonic() - job.arrival)
        finally:
            await self._cleanup(job.request_id, flight)

    async def _run(self, job: GenerationJob, flight: _Flight, text: RequestTextStream) -> AsyncIterator[Output]:
        self.require_decode_worker()
        first = await self._prefill(job, flight)
        if first is not None:
            logprobs = [first.first_logprob] if first.HasField("first_logprob") else []
            out = _accept(text, [first.first_token], logprobs, first.finish_reason or None)
            yield out
            if out.finish_reason:
                return  # cleanup releases the KV if the worker leased it
        async for out in self._decode(job, flight, text, first):
            yield out

    async def _prefill(self, job: GenerationJob, flight: _Flight) -> disagg_pb2.PrefillResponse | None:
        """Prefill on the prefill pool; None when the decode worker should prefill locally instead."""
        candidates = self.workers.candidates("prefill")
        if not candidates or len(job.prompt_ids) < self.config.conditional_disagg_min_prompt_tokens:
            return None
        p = self._prefill_policy.choose(candidates, job.prompt_ids)
        self.metrics.observe_placement("prefill", self._prefill_policy.last)
        if p.stub is None:
            return None
        req = disagg_pb2.PrefillRequest(version=PROTOCOL_VERSION, request_id=job.request_id,
                                        prompt_token_ids=job.prompt_ids, params=params_to_proto(job.params))
        flight.prefill = p
        placed = self._prefill_policy.last
        cached = placed.matched_blocks * p.kv_block_size if placed is not None else 0
        try:
            with p.dispatched(len(job.prompt_ids), len(job.prompt_ids) - cached):
                resp = await p.stub.Prefill(req, timeout=self.config.worker_timeout_s)
        except grpc.aio.AioRpcError as e:
            err = self._rpc_error(p, e, "prefill")
            if err.status == 400:
                raise err from None
            log.warning("%s: prefill on %s failed (%s); the decode worker prefills instead", job.request_id,
                        p.address, err.message)
            return None  # flight.prefill stays set: the worker may still be running it, so it gets an Abort
        flight.prefill = None
        if resp.HasField("kv"):
            flight.lease = p
        return resp

    async def _decode(self, job: GenerationJob, flight: _Flight, text: RequestTextStream,
                      first: disagg_pb2.PrefillResponse | None) -> AsyncIterator[Output]:
        req = _decode_request(job, first)
        tried: set[str] = set()
        while True:
            d = self._choose_decode(tried, job.prompt_ids)
            tried.add(d.address)
            with d.dispatched(len(job.prompt_ids)):
                call = d.stub.Decode(req, timeout=self.config.request_timeout_s)  # type: ignore[union-attr]
                flight.decode, flight.call = d, call
                try:
                    chunk = await self._next_chunk(d, call)
                except APIError as e:
                    if e.code != "worker_unavailable" or not self._has_decode(tried):
                        raise
                    log.warning("%s: %s; trying another decode worker", job.request_id, e.message)
                    call.cancel()
                    flight.decode = flight.call = None
                    continue
                flight.lease = None  # the decode worker answered: it has pulled the KV or recomputed it
                async for out in self._outputs(d, flight, text, call, chunk):
                    yield out
                return

    def _choose_decode(self, exclude: set[str], prompt_ids: list[int]) -> WorkerState:
        candidates = [w for w in self.workers.candidates("decode") if w.address not in exclude and w.stub]
        if not candidates:
            raise APIError(503, "no healthy decode worker is available", code="no_healthy_worker")
        d = self._decode_policy.choose(candidates, prompt_ids)
        self.metrics.observe_placement("decode", self._decode_policy.last)
        return d

    def _has_decode(self, exclude: set[str]) -> bool:
        return any(w.address not in exclude for w in self.workers.candidates("decode"))

    async def _outputs(self, d: WorkerState, flight: _Flight, text: RequestTextStream,
                       call: grpc.aio.UnaryStreamCall, chunk: disagg_pb2.TokenChunk | None) -> AsyncIterator[Output]:
        while chunk is not None:
            if chunk.finish_reason not in ("", "stop", "length"):
                raise APIError(503, f"decode worker {d.address} ended the request ({chunk.finish_reason})",
                               code="worker_error")
            out = _accept(text, list(chunk.token_ids), list(chunk.logprobs), chunk.finish_reason or None)
            if chunk.finish_reason:
                flight.decode = None  # the worker finished it: nothing to abort
            if out.token_ids or out.text or out.finish_reason:
                yield out
            if out.finish_reason:
                return
            chunk = await self._next_chunk(d, call)
        raise APIError(502, f"decode worker {d.address} closed the stream before the request finished",
                       code="worker_error")

    async def _next_chunk(self, w: WorkerState, call: grpc.aio.UnaryStreamCall) -> disagg_pb2.TokenChunk | None:
        """The next chunk, None at the end of the stream; a silent or failed worker is an `APIError`."""
        try:
            # asyncio.timeout, not wait_for: wait_for drops a cancellation that lands as the read completes,
            # and then a client that went away would not abort the request.
            async with asyncio.timeout(self.config.worker_timeout_s):
                msg = await call.read()
        except TimeoutError:
            raise APIError(503, f"worker {w.address} sent nothing for {self.config.worker_timeout_s:g}s",
                           code="worker_timeout") from None
        except grpc.aio.AioRpcError as e:
            raise self._rpc_error(w, e, "decode") from None
        return None if msg is grpc.aio.EOF else msg

    def _rpc_error(self, w: WorkerState, e: grpc.aio.AioRpcError, what: str) -> APIError:
        code = e.code()
        msg = f"{what} on worker {w.address} failed: {code.name}: {e.details()}"
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

    async def _cleanup(self, request_id: str, flight: _Flight) -> None:
        if flight.call is not None and not flight.call.done():
            flight.call.cancel()
        rpcs = [self._control(w, "Abort", request_id) for w in (flight.decode, flight.prefill) if w is not None]
        if flight.lease is not None:
            rpcs.append(self._control(flight.lease, "ReleaseKV", request_id))
        if not rpcs:
            return
        task = asyncio.create_task(_gather(rpcs), name=f"cleanup-{request_id}")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        await asyncio.shield(task)

    async def _control(self, w: WorkerState, method: str, request_id: str) -> None:
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


async def _gather(coros: list[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*coros)


def _decode_request(job: GenerationJob, first: disagg_pb2.PrefillResponse | None) -> disagg_pb2.DecodeRequest:
    req = disagg_pb2.DecodeRequest(version=PROTOCOL_VERSION, request_id=job.request_id,
                                   prompt_token_ids=job.prompt_ids, params=params_to_proto(job.params))
    if first is not None:
        req.first_token = first.first_token
        if first.HasField("first_logprob"):
            req.first_logprob.CopyFrom(first.first_logprob)
        if first.HasField("kv"):
            req.kv.CopyFrom(first.kv)
    return req


def _accept(text: RequestTextStream, token_ids: list[int], logprobs: list[disagg_pb2.TokenLogprob],
            finish_reason: str | None) -> Output:
    """Detokenize one token at a time so a stop string cuts exactly at the token that completes it."""
    parts: list[str] = []
    for i, token_id in enumerate(token_ids):
        delta = text.push([token_id], final=finish_reason is not None and i == len(token_ids) - 1)
        parts.append(delta.text)
        if delta.stopped:
            return Output(token_ids[:i + 1], logprobs[:i + 1], "".join(parts), "stop")
    if finish_reason is not None and not token_ids:
        delta = text.push([], final=True)
        parts.append(delta.text)
        finish_reason = "stop" if delta.stopped else finish_reason
    return Output(token_ids, logprobs[:len(token_ids)], "".join(parts), finish_reason)
