"""The gRPC methods every worker answers: Health, Load, Abort, GetTransferMetadata.

Role-specific methods (Prefill, ReleaseKV / Decode) live in prefill_worker/ and decode_worker/.

Load also publishes the worker's prefix-cache events (block hashes stored / evicted) for KV-aware routing;
see `KVEventLog` and `LoadRequest` in proto/disagg.proto.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from engine.block_pool import KVEvent
from engine.request import InvalidRequestError, SamplingParams
from kvtransfer import KVLayout, KVTransferAgent
from proto import PROTOCOL_VERSION, disagg_pb2, disagg_pb2_grpc
from worker.async_engine import AsyncEngine
from worker.config import WorkerConfig


@dataclass
class TransferCounters:
    """Transfer and lease figures since start, reported in Load and exported by the router."""

    transfers: int = 0
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0
    transfer_failures: int = 0
    recomputes: int = 0
    leases_expired: int = 0
    pull_cached_blocks: int = 0  # decode: prompt blocks found in the local prefix cache instead of pulled


class KVEventLog:
    """The prefix-cache events this worker publishes, numbered 1, 2, ... within a random epoch.

    Protocol (the wire side is `LoadRequest` / `LoadReport` in proto/disagg.proto): a caller sends the epoch and
    the last sequence number it has applied and gets the events after it, or a snapshot of every cached hash
    when those events are gone (another epoch, i.e. the worker restarted; trimmed from this bounded log; or no
    cursor yet). Reading consumes nothing, so any number of routers and tools may call Load.

    Threads: `extend` runs on the engine loop thread between steps (a hook drains `BlockPool.events`), and Load
    reads on the same thread; the engine itself is never read by Load, and `cached` (the snapshot) is kept here,
    in step with the numbered events, so a snapshot and its sequence number always agree.
    """

    def __init__(self, capacity: int, epoch: int | None = None) -> None:
        self.epoch = epoch if epoch else secrets.randbits(63) | 1  # never 0: 0 means "no cursor" on the wire
        self.seq = 0  # sequence number of the latest event
        self.cached: set[int] = set()
        self._events: deque[tuple[bool, int]] = deque(maxlen=max(1, capacity))  # (removed, block hash)

    def extend(self, events: Iterable[KVEvent]) -> None:
        for e in events:
            removed = e.kind == "removed"
            if removed:
                self.cached.discard(e.block_hash)
            else:
                self.cached.add(e.block_hash)
            self._events.append((removed, e.block_hash))
            self.seq += 1

    def since(self, epoch: int, after: int) -> list[tuple[bool, int]] | None:
        """The events numbered after `after` in `epoch`, in order; None when a snapshot is needed instead."""
        if epoch != self.epoch or after > self.seq or after < self.seq - len(self._events):
            return None
        n = self.seq - after
        return list(itertools.islice(self._events, len(self._events) - n, None))

    def fill(self, rep: disagg_pb2.LoadReport, req: disagg_pb2.LoadRequest) -> None:
        rep.kv_cached_blocks = len(self.cached)
        if not req.want_kv_events:
            return
        out = rep.kv_events
        out.epoch, out.seq = self.epoch, self.seq
        events = self.since(req.kv_epoch, req.kv_events_after)
        if events is None:
            out.snapshot = True
            out.cached_hashes.extend(self.cached)
        else:
            out.events.extend(disagg_pb2.KVEvent(removed=r, block_hash=h) for r, h in events)


class WorkerServicerBase(disagg_pb2_grpc.WorkerServicer):
    def __init__(self, config: WorkerConfig, aengine: AsyncEngine, agent: KVTransferAgent) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.aengine = aengine
        self.agent = agent
        self.layout = KVLayout.from_cache(aengine.engine.runner.kv_cache)
        self.counters = TransferCounters()
        self.draining = False
        kv = aengine.engine.kv
        self.kv_events = KVEventLog(capacity=max(4096, 4 * kv.num_blocks))
        self.prefix_counts = (0, 0)  # (query tokens, hit tokens) of the engine's prefix cache, read between steps
        aengine.add_hook(self._drain_kv_events)

    def _drain_kv_events(self) -> None:
        """Engine-loop hook (between steps): move the block pool's new events into the published log."""
        kv = self.aengine.engine.kv
        self.kv_events.extend(kv.pool.drain_events())
        self.prefix_counts = (kv.query_tokens, kv.hit_tokens)

    async def Health(self, request: disagg_pb2.HealthRequest, context: grpc.aio.ServicerContext
                     ) -> disagg_pb2.HealthResponse:
        eng = self.aengine.engine
        return disagg_pb2.HealthResponse(ok=self.aengine.healthy, worker_id=self.worker_id, role=self.config.role,
                                         model=self.config.engine.model, max_model_len=eng.max_model_len,
                                         draining=self.draining, kv_block_size=self.layout.block_size)

    async def Load(self, request: disagg_pb2.LoadRequest, context: grpc.aio.ServicerContext) -> disagg_pb2.LoadReport:
        s, st, c = self.aengine.snapshot, self.aengine.engine.stats, self.counters
        rep = disagg_pb2.LoadReport(
            worker_id=self.worker_id, role=self.config.role, num_waiting=s.num_waiting, num_running=s.num_running,
            queued_prefill_tokens=s.queued_prefill_tokens, kv_blocks_total=s.kv_blocks_total,
            kv_blocks_free=s.kv_blocks_free, kv_usage=1.0 - s.kv_blocks_free / max(1, s.kv_blocks_total),
            prompt_tokens=st.prompt_tokens_computed, generation_tokens=st.generation_tokens,
            preemptions=st.preemptions, transfers=c.transfers, transfer_bytes=c.transfer_bytes,
            transfer_seconds=c.transfer_seconds, transfer_failures=c.transfer_failures, recomputes=c.recomputes,
            leases_expired=c.leases_expired, leased_requests=self.num_leased(),
            prefix_query_tokens=self.prefix_counts[0], prefix_hit_tokens=self.prefix_counts[1],
            pull_cached_blocks=c.pull_cached_blocks, lookahead_steps=st.lookahead_steps,
            lookahead_taken=st.lookahead_taken, lookahead_postponed=st.lookahead_postponed,
            lookahead_beside=st.lookahead_beside,
        )
        self.kv_events.fill(rep, request)
        return rep

    def num_leased(self) -> int:
        return 0

    async def Abort(self, request: disagg_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> disagg_pb2.AbortResponse:
        found = request.request_id in self.aengine.engine.requests
        self.aengine.abort(request.request_id)
        return disagg_pb2.AbortResponse(found=found)

    async def GetTransferMetadata(self, request: disagg_pb2.TransferMetadataRequest,
                                  context: grpc.aio.ServicerContext) -> disagg_pb2.TransferMetadataResponse:
        return disagg_pb2.TransferMetadataResponse(backend=self.agent.backend, agent_name=self.worker_id,
                                                   metadata=self.agent.metadata(), layout=layout_to_proto(self.layout))


def layout_to_proto(layout: KVLayout) -> disagg_pb2.KVLayout:
    return disagg_pb2.KVLayout(block_size=layout.block_size, num_layers=layout.num_layers,
                               num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=layout.dtype,
                               block_bytes=layout.block_bytes)


def layout_from_proto(m: disagg_pb2.KVLayout) -> KVLayout:
    return KVLayout(block_size=m.block_size, num_layers=m.num_layers, num_kv_heads=m.num_kv_heads,
                    head_dim=m.head_dim, dtype=m.dtype, block_bytes=m.block_bytes)


def params_from_proto(m: disagg_pb2.SamplingParams) -> SamplingParams:
    """Wire params -> engine params; raises InvalidRequestError naming the bad field."""
    return SamplingParams(
        max_tokens=m.max_tokens, temperature=m.temperature, top_k=m.top_k, top_p=m.top_p or 1.0, min_p=m.min_p,
        seed=m.seed if m.HasField("seed") else None, repetition_penalty=m.repetition_penalty or 1.0,
        frequency_penalty=m.frequency_penalty, presence_penalty=m.presence_penalty,
        stop_token_ids=tuple(m.stop_token_ids), ignore_eos=m.ignore_eos,
        logprobs=m.logprobs if m.HasField("logprobs") else None,
    )


def params_to_proto(p: SamplingParams) -> disagg_pb2.SamplingParams:
    return disagg_pb2.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
        seed=p.seed, repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty, stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
    )


def logprob_to_proto(lp: tuple[float, list[tuple[int, float]]]) -> disagg_pb2.TokenLogprob:
    return disagg_pb2.TokenLogprob(logprob=lp[0], top_ids=[t for t, _ in lp[1]], top_logprobs=[v for _, v in lp[1]])


def logprob_from_proto(m: disagg_pb2.TokenLogprob) -> tuple[float, list[tuple[int, float]]]:
    return m.logprob, list(zip(m.top_ids, m.top_logprobs, strict=True))


async def check_request(version: int, params: disagg_pb2.SamplingParams, context: grpc.aio.ServicerContext
                        ) -> SamplingParams:
    """Version and parameter checks shared by Prefill and Decode; aborts the RPC with a clear status."""
    if version != PROTOCOL_VERSION:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"protocol version {version} not supported (this worker speaks {PROTOCOL_VERSION})")
    try:
        return params_from_proto(params)
    except InvalidRequestError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    raise AssertionError("unreachable")
