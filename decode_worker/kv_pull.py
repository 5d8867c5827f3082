"""Pulling one request's KV blocks from a prefill worker.

Block ownership on the decode side (the engine's half is engine/remote_kv.py):
- `pull` asks the engine to reserve the request's blocks (`receive_kv`): the blocks of the prompt's longest
  full-block prefix that this worker's prefix cache holds are shared (never written), the rest allocated. It
  then starts one READ of only the remote blocks past that prefix (a KVHandle's block ids are in token order)
  into the reservation's `blocks_to_fill`. A prompt whose every block is cached here is not read at all.
- From then until `agent.release()` returns, those blocks belong to the transfer, on every tensor-parallel rank
  (the agent is one per rank, worker/kv_agents.py: a read is a part per decode rank, each reading its own heads
  from the prefill rank that holds them; release() releases every part). `release()` is called on
  every path (done, failed, timed out, cancelled by an abort); only after it returns does the puller report
  `kv_received` or `kv_failed` to the engine, which then lets the request run, recomputes it, or (if it was
  aborted or timed out meanwhile) frees the blocks it kept in quarantine. A block is never handed to another
  request while a write into it may still land.
- Every pull ends by telling the prefill worker (ReleaseKV, idempotent), so its blocks free now rather than at
  lease expiry.
Every wait has a deadline: the pull's own timeout, and never past the lease; the engine's own deadline for the
receipt is a little later, a backstop for a pull that never reports.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from engine.engine import StepOutput
from engine.parallel.kv_heads import HeadCopy, KVHeadLayout, plan_head_copies
from engine.remote_kv import KVReservation
from engine.request import Request
from kvtransfer import KVLayout, TransferStatus
from proto import disagg_pb2, disagg_pb2_grpc
from proto.convert import kv_heads_from_proto
from worker.async_engine import AsyncEngine, Sink
from worker.config import TransferConfig
from worker.kv_agents import WorkerAgents, WorkerRead
from worker.servicer import TransferCounters

log = logging.getLogger(__name__)

LEASE_MARGIN_S = 1.0  # a pull must end this long before the prefill worker may free the blocks
ENGINE_GRACE_S = 2.0  # the engine stops waiting this long after the pull's own deadline (a backstop)


class TransferSetupError(RuntimeError):
    """The two workers cannot exchange KV at all (layout or backend mismatch); not worth a retry."""


class KVUnmappable(TransferSetupError):
    """The transfer cannot map the two workers' tensor-parallel KV layouts onto each other: the decode worker
    prefills the prompt itself rather than move part of its heads."""


def check_mappable(local: KVHeadLayout, remote: KVHeadLayout | None, peer: str) -> list[HeadCopy]:
    """Every KV head of the decode worker's ranks, from the prefill ranks that hold it (worker/kv_agents.py reads
    by this plan); KVUnmappable when there is none. Each rank of a worker holds only its heads: a pull that could
    not say where every head comes from would leave part of the cache stale, silently. So a peer that does not
    describe its ranks (no `kv_heads`), or whose model's KV differs (heads, layers, block size, dtype), is
    refused."""
    if remote is None:
        raise KVUnmappable(f"prefill worker {peer} does not describe its tensor-parallel KV layout")
    try:
        return plan_head_copies(remote, local)
    except ValueError as e:
        raise KVUnmappable(f"prefill worker {peer}: {e}") from None


class KVPuller:
    def __init__(self, agent: WorkerAgents, aengine: AsyncEngine, cfg: TransferConfig,
                 counters: TransferCounters, layout: KVLayout, kv_heads: KVHeadLayout) -> None:
        self.agent, self.aengine, self.cfg, self.counters, self.layout = agent, aengine, cfg, counters, layout
        self.kv_heads = kv_heads
        self._known_agents: set[str] = set()
        self._unmappable: dict[str, str] = {}  # peer agent -> why its KV cannot be pulled (logged once)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: set[asyncio.Task] = set()

    def forget_agent(self, agent_name: str) -> None:
        """Fetch this peer's transfer metadata again next time (it may have restarted under the same name)."""
        self._known_agents.discard(agent_name)
        self.agent.forget_peer(agent_name)

    def stub(self, address: str) -> disagg_pb2_grpc.WorkerStub:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return disagg_pb2_grpc.WorkerStub(self._channels[address])

    async def ensure_remote(self, h: disagg_pb2.KVHandle | disagg_pb2.KVSource) -> None:
        """Once per peer: fetch the prefill worker's transfer metadata (gRPC side channel: its head layout and one
        agent per rank), plan which of its ranks each of our ranks reads which heads from, and register its agents
        on our ranks that read from them."""
        if h.agent_name in self._known_agents:
            return
        md = await self.stub(h.worker_address).GetTransferMetadata(disagg_pb2.TransferMetadataRequest(), timeout=5)
        try:
            remote = kv_heads_from_proto(md.kv_heads) if md.HasField("kv_heads") else None
        except ValueError as e:
            raise TransferSetupError(f"prefill worker {h.worker_id} sent a bad KV head layout: {e}") from None
        check_mappable(self.kv_heads, remote, h.worker_id)
        if md.backend != self.agent.backend:
            raise TransferSetupError(f"prefill worker {h.worker_id} uses KV transfer backend {md.backend!r}, "
                                     f"this decode worker uses {self.agent.backend!r}")
        agents = [(md.agent_name, md.metadata)] + [(a.agent_name, a.metadata)
                                                   for a in sorted(md.rank_agents, key=lambda a: a.rank)]
        try:  # off the loop: registering on ranks 1..N-1 is a call into their processes
            await asyncio.to_thread(self.agent.add_peer, md.agent_name, remote, agents)
        except ValueError as e:
            raise KVUnmappable(f"prefill worker {h.worker_id}: {e}") from None
        self._known_agents.add(md.agent_name)

    async def pull(self, req: Request, h: disagg_pb2.KVHandle, sink: Sink) -> bool:
        """Queue `req` (from `engine.make_request`, its first token sampled by the prefill worker) with its
        prompt's KV pulled from `h`, its outputs going to `sink`. Returns whether the KV arrived (False: the
        prompt is recomputed here). Raises TransferSetupError when the two workers cannot exchange KV at all."""
        rid = req.request_id
        if self.aengine.noting:
            self.aengine.note("pull_received", rid, tokens=h.num_tokens)
            sink = self._noting_first_output(rid, sink)
        lease_left = h.lease_deadline - time.time() - LEASE_MARGIN_S
        if lease_left < self.cfg.timeout_s * 0.1:
            log.warning("%s: lease of its KV has %.1fs left; recomputing instead of pulling", rid, lease_left)
            self.release_remote(h, rid)
            self.aengine.add(req, sink)
            return False
        try:
            await self.ensure_remote(h)
        except grpc.aio.AioRpcError as e:  # the prefill worker is gone (or restarting): its KV with it
            log.warning("%s: no transfer metadata from %s (%s); recomputing", rid, h.worker_id, e.code().name)
            self.aengine.add(req, sink)
            return False
        except KVUnmappable as e:  # never move part of the heads: prefill here instead
            if self._unmappable.get(h.agent_name) != str(e):
                self._unmappable[h.agent_name] = str(e)
                log.warning("%s; prefilling its requests on this decode worker instead", e)
            log.info("%s: KV layouts cannot be mapped; recomputing the prompt locally", rid)
            self.release_remote(h, rid)
            self.aengine.add(req, sink)
            return False
        timeout = min(self.cfg.timeout_s, lease_left)
        res = await self.reserve(req, h.num_tokens, timeout + ENGINE_GRACE_S, sink)
        if res is None:
            log.warning("%s: no free blocks for %d pulled tokens; recomputing", rid, h.num_tokens)
            self.release_remote(h, rid)
            return False
        self.aengine.note("pull_reserved", rid)
        return await self._read(rid, h, res, time.monotonic() + timeout)

    def _noting_first_output(self, rid: str, sink: Sink) -> Sink:
        """`sink`, marking in the step log when the request's first output here reaches it (with overlapped steps a
        pulled row decodes from the step after the first one to start after its read: engine/lookahead.py)."""
        def first(out: StepOutput) -> None:
            nonlocal noted
            if not noted:
                noted = True
                self.aengine.note("pull_first_output", rid)
            sink(out)

        noted = False
        return first

    async def reserve(self, req: Request, num_tokens: int, timeout_s: float, sink: Sink,
                      recompute_if_short: bool = True) -> KVReservation | None:
        """`aengine.receive_kv`, safe to cancel: the reservation is made between steps, possibly after the caller
        was cancelled. Then no transfer will ever report on it, so it is reported failed here (its blocks go back;
        the caller's abort ends the request) before the cancellation goes on."""
        task = asyncio.ensure_future(self.aengine.receive_kv(req, num_tokens, timeout_s, sink, recompute_if_short))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            res = await task
            if res is not None:
                self.aengine.kv_failed(req.request_id)
            raise

    async def _read(self, rid: str, h: disagg_pb2.KVHandle, res: KVReservation, deadline: float) -> bool:
        """READ the remote blocks past the reservation's cached prefix into its `blocks_to_fill`."""
        t0, handle, ok = time.monotonic(), None, False
        cached, dst = res.num_cached_blocks, res.blocks_to_fill
        try:
            if not dst:
                ok = True  # every block was cached here: nothing to read
            else:
                handle = self.agent.start_read(h.agent_name, h.block_ids[cached:len(res.block_ids)], dst, tag=rid)
                # On a worker thread, so the loop keeps serving. If this task is cancelled meanwhile, `finally`
                # releases the handle at once; the abandoned thread's wait then ends soon after release() does.
                st = await asyncio.to_thread(self.wait_until, handle, deadline)
                ok = st is TransferStatus.DONE
                if not ok:
                    log.warning("%s: KV pull %s after %.2fs", rid,
                                "failed" if st is TransferStatus.FAILED else "timed out", time.monotonic() - t0)
        except Exception:  # noqa: BLE001 - any transfer error means recompute, never a dead stream
            log.exception("%s: KV pull raised", rid)
        finally:
            if handle is not None:
                self.agent.release(handle)  # after this, no write can land in `dst`
            if ok:
                self.counters.transfers += 1
                self.counters.transfer_bytes += handle.nbytes if handle is not None else 0  # every rank's part
                self.counters.transfer_seconds += time.monotonic() - t0
                self.counters.pull_cached_blocks += cached
                self.aengine.note("pull_read", rid, nbytes=handle.nbytes if handle is not None else 0)
                self.aengine.kv_received(rid)
            else:
                self.counters.transfer_failures += 1
                self.aengine.kv_failed(rid)
                # The peer may have restarted under the same name with a new transfer address: ask it again.
                self.forget_agent(h.agent_name)
            self.release_remote(h, rid)
        return ok

    def wait_until(self, handle: WorkerRead, deadline: float) -> TransferStatus:
        # The time left is taken when the thread starts, not when the wait was queued: a busy default executor
        # must not push the wait past the pull's deadline (and so past the lease).
        return self.agent.wait(handle, deadline - time.monotonic())

    def release_remote(self, h: disagg_pb2.KVHandle | disagg_pb2.KVSource, rid: str) -> None:
        """Tell the prefill worker it may free the blocks now (fire and forget; its lease is the backstop)."""
        async def call() -> None:
            try:
                await self.stub(h.worker_address).ReleaseKV(disagg_pb2.ReleaseKVRequest(request_id=rid), timeout=5)
            except grpc.aio.AioRpcError as e:
                log.info("%s: ReleaseKV to %s failed (%s); its lease will free the blocks", rid, h.worker_id, e.code())

        task = asyncio.get_running_loop().create_task(call())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
