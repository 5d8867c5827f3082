"""The request flow across the pools: Prefill on a prefill worker, then Decode on a decode worker.

A prompt shorter than `conditional_disagg_min_prompt_tokens`, or a cluster with no prefill worker, goes straight to
a decode worker, which prefills locally. A request's tokens arrive on this router's token stream from its decode
worker (router/token_streams.py).

Migration: when the decode worker carrying a request is lost (its stream broke or went silent, it ended the
request with an error, or it refused it as unavailable), the request resumes on another decode worker with its
prompt plus every token this router has already received, with the same sampling parameters and seed. The
worker recomputes that context (its prefix cache helps) and samples the next token exactly as the lost one would
have: a seeded request draws output token n from (seed, n), greedy ones are deterministic. The client's stream goes
on: no token is repeated or missing. Each request migrates at most `max_migrations` times.

Whatever way a request ends (finished, stop string, client gone, worker failure) the `finally` of
`Generation.stream` tells the workers still holding it to let go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from engine.tokenizer import Tokenizer
from proto import PROTOCOL_VERSION, disagg_pb2
from proto.convert import params_to_proto
from router.arrival_log import ArrivalLog
from router.config import RouterConfig
from router.errors import APIError
from router.job import GenerationJob
from router.metrics import HistogramTally, RouterMetrics
from router.policy import make_policy
from router.registry import WorkerRegistry, WorkerState
from router.text import ChoiceText
from router.token_streams import TokenStreams, WorkerLost
from router.worker_calls import WorkerCalls

log = logging.getLogger(__name__)
NO_WORKER_POLL_S = 0.1  # how often a request waiting for a decode worker looks again


@dataclass
class Output:
    """What one step of a request adds: tokens, their logprobs, the text they make visible, maybe the end."""

    token_ids: list[int]
    logprobs: list[disagg_pb2.TokenLogprob]
    text: str
    finish_reason: str | None = None  # stop | length once the request is over
    prompt_logprobs: list[disagg_pb2.TokenLogprob] = field(default_factory=list)  # a worker's, with its first output


@dataclass
class _Flight:
    """Which workers still hold the request; what `calls.release_all` must undo if the request ends early."""

    prefill: WorkerState | None = None  # Prefill RPC sent and not answered: Abort there
    lease: WorkerState | None = None  # its KV leased and not yet taken by a decode worker: ReleaseKV there
    decode: WorkerState | None = None  # Decode sent and the request not finished by the worker: Abort there


@dataclass
class _Handoff:
    """Layer-wise streaming: where the prompt's KV is being computed, and when the prefill's first token is known."""

    source: disagg_pb2.KVSource
    done: asyncio.Event = field(default_factory=asyncio.Event)


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
        self.streams = TokenStreams(stall_s=config.worker_timeout_s, arrivals=ArrivalLog.from_env())
        workers.on_unhealthy.append(self.streams.lose)
        self.calls = WorkerCalls(config, workers)

    async def require_decode_worker(self) -> None:
        """Return once a decode worker can take a request (waiting up to `no_worker_wait_s`), else 503."""
        if not await self._decode_candidates({}):
            raise APIError(503, "no healthy decode worker is available", code="no_healthy_worker")

    async def _decode_candidates(self, tried: dict[str, float]) -> list[WorkerState]:
        """The decode workers a request may go to: healthy, and not tried since they last turned healthy (a worker
        restarted at the address of one that failed it is a new process). Waits up to `no_worker_wait_s` for one;
        [] if none came."""
        deadline = time.monotonic() + self.config.no_worker_wait_s
        while True:
            found = [w for w in self.workers.candidates("decode")
                     if w.stub and (w.address not in tried or w.healthy_since > tried[w.address])]
            if found or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(NO_WORKER_POLL_S)

    async def stream(self, job: GenerationJob) -> AsyncIterator[Output]:
        """The request's outputs; raises `APIError` when a worker fails. Close it (or cancel) to abort."""
        flight = _Flight()
        text = ChoiceText(self.tokenizer, job.prompt_ids, job.text)
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        last: float | None = None
        itl = HistogramTally(self.metrics.itl)
        relayed: list[float] | None = [] if self.streams.arrivals is not None else None  # benchmarks' logs only
        try:
            async for out in self._run(job, flight, text):
                if out.token_ids:
                    now = time.monotonic()
                    if relayed is not None:
                        relayed.append(time.time())
                    if last is None:
                        self.metrics.ttft.observe(now - job.arrival)
                    else:
                        itl.observe(now - last)
                    last = now
                    job.output_ids.extend(out.token_ids)
                job.keep_prompt_logprobs(out.prompt_logprobs)  # before the response reads them
                yield out
            self.metrics.e2e.observe(time.monotonic() - job.arrival)
        finally:
            itl.flush()
            if relayed and self.streams.arrivals is not None:
                self.streams.arrivals.relayed(job.request_id, relayed)
            job.placed.set()  # n > 1: siblings waiting for this choice's worker go on without it
            self.metrics.generation_tokens.inc(job.num_output_tokens)
            await self.calls.release_all(job.request_id, [w for w in (flight.decode, flight.prefill) if w is not None],
                                         flight.lease)

    async def _run(self, job: GenerationJob, flight: _Flight, text: ChoiceText) -> AsyncIterator[Output]:
        await self.require_decode_worker()
        if job.leader is not None:  # n > 1: the first choice's decode worker forks its prompt KV for this one
            await job.leader.placed.wait()
            async for out in self._decode(job, flight, text, None):
                yield out
            return
        p = self._choose_prefill(job)
        if p is not None and self.config.kv_streaming:
            async for out in self._run_streaming(job, flight, text, p):
                yield out
            return
        first = await self._prefill_on(p, job, flight) if p is not None else None
        if first is not None:
            out = _first_output(text, first)
            yield out
            if out.finish_reason:
                return  # cleanup releases the KV if the worker leased it
        async for out in self._decode(job, flight, text, first):
            yield out

    async def _run_streaming(self, job: GenerationJob, flight: _Flight, text: ChoiceText, p: WorkerState
                             ) -> AsyncIterator[Output]:
        """Layer-wise streaming: Decode goes out with Prefill, so the decode worker pulls the KV while the prefill
        computes it (decode_worker/kv_stream.py); the first token still comes from the prefill worker."""
        handoff = _Handoff(disagg_pb2.KVSource(worker_id=p.worker_id, worker_address=p.address,
                                               agent_name=p.worker_id))
        prefill = asyncio.create_task(self._prefill_on(p, job, flight))
        decode = self._decode(job, flight, text, None, handoff)
        ahead = asyncio.ensure_future(anext(decode))  # sends Decode now, then waits for the decode worker's tokens
        try:
            first = await prefill
            if first is not None:
                out = _first_output(text, first)
                yield out  # job.output_ids holds it once we resume: a retry of the decode side may start now
                if out.finish_reason:
                    return
            handoff.done.set()
            try:
                yield await ahead
            except StopAsyncIteration:
                return
            async for out in decode:
                yield out
        finally:
            handoff.done.set()
            for task in (ahead, prefill):
                task.cancel()
            await asyncio.gather(ahead, prefill, return_exceptions=True)
            await decode.aclose()

    def _choose_prefill(self, job: GenerationJob) -> WorkerState | None:
        """The prefill worker for the prompt; None when the decode worker should prefill it locally instead."""
        candidates = self.workers.candidates("prefill")
        if not candidates or len(job.prompt_ids) < self.config.conditional_disagg_min_prompt_tokens:
            return None
        p = self._prefill_policy.choose(candidates, job.prompt_ids)
        self.metrics.observe_placement("prefill", self._prefill_policy.last)
        return p if p.stub is not None else None

    async def _prefill_on(self, p: WorkerState, job: GenerationJob, flight: _Flight
                          ) -> disagg_pb2.PrefillResponse | None:
        """Prefill on `p`; None when it failed and the decode worker should prefill locally instead."""
        assert p.stub is not None
        req = disagg_pb2.PrefillRequest(version=PROTOCOL_VERSION, request_id=job.request_id,
                                        prompt_token_ids=job.prompt_ids, params=params_to_proto(job.wire_params))
        flight.prefill = p
        placed = self._prefill_policy.last
        cached = placed.matched_blocks * p.kv_block_size if placed is not None else 0
        try:
            with p.dispatched(len(job.prompt_ids), len(job.prompt_ids) - cached):
                resp = await self.calls.unless_lost(p, p.stub.Prefill(req, timeout=self.config.worker_timeout_s))
        except WorkerLost as e:
            log.warning("%s: %s; the decode worker prefills instead", job.request_id, e.message)
            return None  # flight.prefill stays set: it gets an Abort, in case it wakes up
        except grpc.aio.AioRpcError as e:
            err = self.calls.error(p, e, "prefill")
            if err.status == 400:
                raise err from None
            log.warning("%s: prefill on %s failed (%s); the decode worker prefills instead", job.request_id,
                        p.address, err.message)
            return None  # flight.prefill stays set: the worker may still be running it, so it gets an Abort
        flight.prefill = None
        if resp.HasField("kv"):
            flight.lease = p
        return resp

    async def _decode(self, job: GenerationJob, flight: _Flight, text: ChoiceText,
                      first: disagg_pb2.PrefillResponse | None, handoff: _Handoff | None = None
                      ) -> AsyncIterator[Output]:
        """Run the decode phase on a decode worker, moving to another one whenever the one carrying it is lost.
        With `handoff` the first attempt pulls the KV layer-wise while the prefill runs; any later one recomputes
        the prompt (plus the prefill's first token, once known), since that first pull already released the KV."""
        kv = first.kv if first is not None and first.HasField("kv") else None
        source = handoff.source if handoff is not None else None
        tried: dict[str, float] = {}  # address -> when this request went there
        left: dict[str, asyncio.Task[None]] = {}  # address -> the Abort sent when the request moved off it
        migrations = 0
        while True:
            d = self._sibling_worker(job, tried) or await self._choose_decode(tried, job.prompt_ids)
            if d.address in left:
                await self.calls.abort_before_return(d, job.request_id, left.pop(d.address))
            tried[d.address] = time.monotonic()
            try:
                async for out in self._decode_on(d, job, flight, text, kv, source):
                    yield out
                return
            except (WorkerLost, APIError) as e:
                if isinstance(e, APIError) and e.code not in ("worker_unavailable", "worker_lost"):
                    raise
                if handoff is not None and source is not None:
                    source, kv = None, None
                    await handoff.done.wait()  # the prefill's first token, if it had one, is in job.output_ids now
                if e.code == "kv_lost":  # the worker is fine; only the streamed KV did not arrive: send it again
                    log.info("%s: %s; recomputing on %s", job.request_id, e.message, d.address)
                    tried.pop(d.address, None)
                    flight.decode = None
                    continue
                moving = flight.decode is not None  # it took the request: a migration, not a retry
                if moving:  # its lease is pulled or gone, and it may still run it (hung, not dead): Abort it there
                    kv, flight.lease = None, None
                    left[d.address] = self.calls.abort_later(d, job.request_id)
                    flight.decode = None
                    migrations += 1
                if migrations > self.config.max_migrations:
                    raise APIError(503, f"{e.message}; the request was moved {migrations - 1} time(s) already",
                                   code=e.code) from None
                if not await self._decode_candidates(tried):
                    raise APIError(503, f"{e.message}; no other decode worker to resume the request on within "
                                   f"{self.config.no_worker_wait_s:g}s", code=e.code) from None
                if moving:
                    self.metrics.migrations.inc()
                log.warning("%s: %s; %s on another decode worker after %d token(s)", job.request_id, e.message,
                            "resuming" if moving else "trying", len(job.output_ids))

    async def _decode_on(self, d: WorkerState, job: GenerationJob, flight: _Flight, text: ChoiceText,
                         kv: disagg_pb2.KVHandle | None, source: disagg_pb2.KVSource | None = None
                         ) -> AsyncIterator[Output]:
        """The request on decode worker `d`: Decode, then its chunks from this router's token stream."""
        sub, stream = await self.streams.open(d, job.request_id, self.config.rpc_timeout_s,
                                              job.arrival + self.config.request_timeout_s)
        try:
            with d.dispatched(len(job.prompt_ids)):
                req = _decode_request(job, kv, self.streams.name, source)
                try:
                    await d.stub.Decode(req, timeout=self.config.worker_timeout_s)  # type: ignore[union-attr]
                except grpc.aio.AioRpcError as e:
                    raise self.calls.error(d, e, "decode") from None
                flight.decode = d
                job.placed_on = d.address  # n > 1: its siblings fork its prompt KV there
                job.placed.set()
                flight.lease = None  # the decode worker has the request: it pulled the KV or recomputes it
                while True:
                    for out in self._outputs(d, flight, text, await stream.next()):
                        yield out
                        if out.finish_reason:
                            return
        finally:
            sub.close_request(job.request_id)

    def _outputs(self, d: WorkerState, flight: _Flight, text: ChoiceText,
                 chunks: list[disagg_pb2.TokenChunk]) -> list[Output]:
        """The chunks that arrived since the last read, as one Output (a stop string may end it early)."""
        tokens: list[int] = []
        logprobs: list[disagg_pb2.TokenLogprob] = []
        prompt: list[disagg_pb2.TokenLogprob] = []
        finish: str | None = None
        for chunk in chunks:
            if chunk.finish_reason in ("error", "abort", "kv_lost"):
                if tokens:  # deliver what came before the worker gave up on it
                    return [_accept(text, tokens, logprobs, None, prompt)] + self._outputs(d, flight, text, [chunk])
                raise WorkerLost(f"decode worker {d.address} ended the request ({chunk.finish_reason}"
                                 f"{': ' + chunk.error if chunk.error else ''})",
                                 code="kv_lost" if chunk.finish_reason == "kv_lost" else "worker_unavailable")
            tokens.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs)
            prompt.extend(chunk.prompt_logprobs)
            if chunk.finish_reason:
                finish = chunk.finish_reason
                flight.decode = None  # the worker finished it: nothing to abort
                break
        out = _accept(text, tokens, logprobs, finish, prompt)
        return [out] if out.token_ids or out.text or out.finish_reason else []

    async def _choose_decode(self, tried: dict[str, float], prompt_ids: list[int]) -> WorkerState:
        candidates = await self._decode_candidates(tried)
        if not candidates:
            raise APIError(503, "no healthy decode worker is available", code="no_healthy_worker")
        d = self._decode_policy.choose(candidates, prompt_ids)
        self.metrics.observe_placement("decode", self._decode_policy.last)
        return d

    def _sibling_worker(self, job: GenerationJob, exclude: dict[str, float]) -> WorkerState | None:
        """n > 1: the decode worker holding the first choice (where this one forks its prompt KV), if usable."""
        address = job.leader.placed_on if job.leader is not None else None
        w = self.workers.get(address) if address is not None and address not in exclude else None
        return w if w is not None and w.stub is not None and w in self.workers.candidates("decode") else None


def _decode_request(job: GenerationJob, kv: disagg_pb2.KVHandle | None, subscriber: str,
                    source: disagg_pb2.KVSource | None = None) -> disagg_pb2.DecodeRequest:
    """The request for a decode worker: the prompt, the tokens generated so far (the prefill worker's first one,
    or everything streamed before a migration) and, with the first token only, where its KV waits (or, streaming
    layer-wise before any token, where it is being computed)."""
    req = disagg_pb2.DecodeRequest(version=PROTOCOL_VERSION, request_id=job.request_id, subscriber=subscriber,
                                   prompt_token_ids=job.prompt_ids, params=params_to_proto(job.wire_params),
                                   output_token_ids=job.output_ids)
    if kv is not None:
        req.kv.CopyFrom(kv)
    elif source is not None and not job.output_ids:
        req.kv_source.CopyFrom(source)
    return req


def _first_output(text: ChoiceText, first: disagg_pb2.PrefillResponse) -> Output:
    logprobs = [first.first_logprob] if first.HasField("first_logprob") else []
    return _accept(text, [first.first_token], logprobs, first.finish_reason or None, list(first.prompt_logprobs))


def _accept(text: ChoiceText, token_ids: list[int], logprobs: list[disagg_pb2.TokenLogprob],
            finish_reason: str | None, prompt: list[disagg_pb2.TokenLogprob]) -> Output:
    """Detokenize one token at a time so a stop string cuts exactly at the token that completes it."""
    parts: list[str] = []
    for i, token_id in enumerate(token_ids):
        last = finish_reason is not None and i == len(token_ids) - 1
        delta = text.push([token_id], final=last, finish_reason=finish_reason if last else None)
        parts.append(delta.text)
        if delta.stopped:
            return Output(token_ids[:i + 1], logprobs[:i + 1], "".join(parts), "stop", prompt)
    if finish_reason is not None and not token_ids:
        delta = text.push([], final=True)
        parts.append(delta.text)
        finish_reason = "stop" if delta.stopped else finish_reason
    return Output(token_ids, logprobs[:len(token_ids)], "".join(parts), finish_reason, prompt)
