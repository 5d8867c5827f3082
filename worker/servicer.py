"""The gRPC methods every worker answers: Health, Load, Abort, GetTransferMetadata.

Role-specific methods (Prefill, ReleaseKV / Decode) live in prefill_worker/ and decode_worker/.

Load also publishes the worker's prefix-cache events (block hashes stored / evicted) for KV-aware routing;
see `KVEventLog` and `LoadRequest` in proto/disagg.proto.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from engine.block_pool import KVEvent
from engine.gc_heap import WARN_PAUSE_S, GCPauses
from engine.request import InvalidRequestError, SamplingParams
from engine.stats import stat
from kvtransfer import KVLayout
from proto import DRAINING, PROTOCOL_VERSION, REASON_KEY, disagg_pb2, disagg_pb2_grpc
from proto.convert import kv_heads_to_proto, layout_to_proto, load_to_proto, params_from_proto
from worker.async_engine import AsyncEngine
from worker.config import WorkerConfig
from worker.kv_agents import WorkerAgents

log = logging.getLogger(__name__)


@dataclass
class TransferCounters:
    """The worker's KV-transfer figures since start (reported in Load like the engine's, engine/stats.py)."""

    transfers: int = stat("KV transfers the worker has done since start")
    transfer_bytes: int = stat("KV bytes the worker has transferred since start")
    transfer_seconds: float = stat("Seconds the worker has spent on KV transfers since start")
    transfer_failures: int = stat("KV transfers that failed on the worker since start")
    pull_cached_blocks: int = stat("Prompt blocks a decode worker found in its own prefix cache instead of pulling, "
                                   "since start")
    stream_reads: int = stat("Layer-group reads of layer-wise KV pulls, since start")
    stream_read_seconds: float = stat("Seconds layer-wise pulls spent in reads (the transfer itself), since start")
    stream_exposed_seconds: float = stat("Seconds layer-wise pulls spent reading after their prefill had finished "
                                         "(the transfer time not hidden behind it), since start")


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
    def __init__(self, config: WorkerConfig, aengine: AsyncEngine, agent: WorkerAgents) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.aengine = aengine
        self.engine = aengine.engine
        self.agent = agent
        self.layout = KVLayout.from_cache(self.engine.kv_cache)  # rank 0's shard
        self.kv_heads = self.engine.kv_layout()  # every tensor-parallel rank's heads
        self.counters = TransferCounters()
        self.draining = False
        self.kv_events = KVEventLog(capacity=max(4096, 4 * self.engine.num_kv_blocks))
        aengine.add_hook(lambda: self.kv_events.extend(self.engine.drain_kv_events()))
        self.gc_pauses = GCPauses().start()  # stopped by close()
        aengine.add_hook(self._report_gc_pauses)

    def _report_gc_pauses(self) -> None:
        """Long collections go to the step log (when kept) and, past WARN_PAUSE_S, to the log."""
        for p in self.gc_pauses.take_long():
            self.aengine.note("gc_pause", "", generation=p.generation, ms=round(p.seconds * 1e3, 3),
                              began=round(p.at, 6))
            if p.seconds >= WARN_PAUSE_S:
                log.warning("worker %s: a generation-%d garbage collection stopped the process for %.0f ms",
                            self.worker_id, p.generation, p.seconds * 1e3)

    def close(self) -> None:
        self.gc_pauses.stop()

    async def refuse_unless_serving(self, context: grpc.aio.ServicerContext) -> None:
        """Refuse a new request (UNAVAILABLE: the router sends it elsewhere) while draining or once the engine died
        (a tensor-parallel rank lost: the worker is unhealthy and about to exit)."""
        if self.draining:
            await refuse(context, grpc.StatusCode.UNAVAILABLE, DRAINING, f"worker {self.worker_id} is draining")
        if not self.aengine.healthy:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id}: its engine failed")

    async def Health(self, request: disagg_pb2.HealthRequest, context: grpc.aio.ServicerContext
                     ) -> disagg_pb2.HealthResponse:
        return disagg_pb2.HealthResponse(ok=self.aengine.healthy, worker_id=self.worker_id, role=self.config.role,
                                         model=self.config.engine.model, max_model_len=self.engine.max_model_len,
                                         draining=self.draining, kv_block_size=self.layout.block_size)

    async def Load(self, request: disagg_pb2.LoadRequest, context: grpc.aio.ServicerContext) -> disagg_pb2.LoadReport:
        # The engine's counters are read while a step may run: each is a plain int, so at worst a figure is one
        # step old. Its load is the snapshot taken between steps.
        rep = load_to_proto(self.worker_id, self.config.role,
                            [self.aengine.snapshot, self.engine.stats, self.counters, self.gc_pauses.stats],
                            request.want_help)
        self.kv_events.fill(rep, request)
        return rep

    async def Abort(self, request: disagg_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> disagg_pb2.AbortResponse:
        """Stop the request (running, waiting, receiving KV or leased) and free its blocks."""
        found = await self.aengine.abort_and_wait(request.request_id)
        self.agent.expect_read(request.request_id, 0.0)  # a lease of its blocks, if any, is gone: no read comes
        return disagg_pb2.AbortResponse(found=found)

    async def GetTransferMetadata(self, request: disagg_pb2.TransferMetadataRequest,
                                  context: grpc.aio.ServicerContext) -> disagg_pb2.TransferMetadataResponse:
        """The handshake a puller needs: every rank's heads and agent (rank 0's is agent_name / metadata)."""
        ranks = [disagg_pb2.RankAgent(rank=a.rank, agent_name=a.name, metadata=a.metadata)
                 for a in self.agent.rank_agents()]
        return disagg_pb2.TransferMetadataResponse(backend=self.agent.backend, agent_name=self.worker_id,
                                                   metadata=self.agent.metadata(), layout=layout_to_proto(self.layout),
                                                   kv_heads=kv_heads_to_proto(self.kv_heads), rank_agents=ranks)


async def refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, reason: str, message: str) -> None:
    """Abort the call with `code` and `message`, naming `reason` in the trailing metadata for the router."""
    await context.abort(code, message, trailing_metadata=((REASON_KEY, reason),))


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
