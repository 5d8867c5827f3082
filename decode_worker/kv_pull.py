"""Pulling one request's KV blocks from a prefill worker.

Block ownership on the decode side:
- `pull` first shares the blocks of the prompt's longest full-block prefix that
  this worker's own prefix cache holds (ref-counted, as `KVCacheManager.match_prefix`
  does; they are never written), then allocates the rest under the request id,
  and starts one READ of only the remote blocks past that prefix (a KVHandle's
  block ids are in token order) into the newly allocated ones. From then until
  `agent.release()` returns, the blocks belong to the transfer: nothing frees or
  reuses them. A prompt whose every block is cached here is not read at all.
- `release()` is called on every path (done, failed, timed out, cancelled by an
  abort); only after it returns are failed blocks freed (shared ones lose this
  request's reference, nothing more), so a block is never
  handed to another request while a write into it may still land.
- On success the blocks pass to the engine request, which frees them when it ends.
- Every pull ends by telling the prefill worker (ReleaseKV, idempotent), so its
  blocks free now rather than at lease expiry.
Every wait has a deadline: the pull's own timeout, and never past the lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import grpc

from engine.request import Request, SamplingParams
from kvtransfer import KVLayout, KVTransferAgent, TransferHandle, TransferStatus
from proto import disagg_pb2, disagg_pb2_grpc
from worker.async_engine import AsyncEngine
from worker.config import TransferConfig
from worker.servicer import TransferCounters, layout_from_proto

log = logging.getLogger(__name__)

LEASE_MARGIN_S = 1.0  # a pull must end this long before the prefill worker may free the blocks


class TransferSetupError(RuntimeError):
    """The two workers cannot exchange KV at all (layout or backend mismatch); not worth a retry."""


class KVPuller:
    def __init__(self, agent: KVTransferAgent, aengine: AsyncEngine, cfg: TransferConfig,
                 counters: TransferCounters, layout: KVLayout) -> None:
        self.agent, self.aengine, self.cfg, self.counters, self.layout = agent, aengine, cfg, counters, layout
        self._known_agents: set[str] = set()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: set[asyncio.Task] = set()

    def _stub(self, address: str) -> disagg_pb2_grpc.WorkerStub:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return disagg_pb2_grpc.WorkerStub(self._channels[address])

    async def _ensure_remote(self, h: disagg_pb2.KVHandle) -> None:
        """Fetch the prefill agent's metadata once (gRPC side channel) and check both layouts agree."""
        if h.agent_name in self._known_agents:
            return
        md = await self._stub(h.worker_address).GetTransferMetadata(disagg_pb2.TransferMetadataRequest(), timeout=5)
        if md.backend != self.agent.backend:
            raise TransferSetupError(f"prefill worker {h.worker_id} uses KV transfer backend {md.backend!r}, "
                                     f"this decode worker uses {self.agent.backend!r}")
        try:
            self.layout.check_compatible(layout_from_proto(md.layout))
        except ValueError as e:
            raise TransferSetupError(f"KV layout of prefill worker {h.worker_id} differs: {e}") from None
        self.agent.add_remote(md.agent_name, md.metadata)
        self._known_agents.add(md.agent_name)

    async def pull(self, rid: str, h: disagg_pb2.KVHandle, prompt_token_ids: Sequence[int] = ()) -> bool:
        """True: the request's local blocks now hold the KV of `h.num_tokens` tokens. False: recompute.

        With the prompt's token ids, blocks of its prefix already cached here are shared, not pulled.
        """
        lease_left = h.lease_deadline - time.time() - LEASE_MARGIN_S
        if lease_left < self.cfg.timeout_s * 0.1:
            log.warning("%s: lease of its KV has %.1fs left; recomputing instead of pulling", rid, lease_left)
            self._release_remote(h, rid)
            return False
        await self._ensure_remote(h)
        kv = self.aengine.engine.kv
        cached = await self.aengine.run_between_steps(lambda: self._reserve(rid, h, prompt_token_ids))
        if cached is None:
            log.warning("%s: no free blocks for %d pulled tokens; recomputing", rid, h.num_tokens)
            self._release_remote(h, rid)
            return False
        deadline = time.monotonic() + min(self.cfg.timeout_s, lease_left)
        return await self._read(rid, h, list(kv.block_table(rid)), cached, deadline)

    def _reserve(self, rid: str, h: disagg_pb2.KVHandle, prompt: Sequence[int]) -> int | None:
        """Runs between steps. Share the locally cached full-block prefix of the prompt, allocate the other blocks
        of `h.num_tokens` tokens; returns how many leading blocks are shared, None (holding nothing) if short."""
        kv = self.aengine.engine.kv
        cached = 0
        if len(prompt) == h.num_tokens and not kv.has(rid):
            # One token past the prompt, so every full block of the prompt may match: its KV all arrives here,
            # none has to be left for a step to compute (match_prefix's rule for local prefills).
            probe = Request(rid, list(prompt), SamplingParams(max_tokens=1), output_token_ids=[0])
            cached = min(kv.match_prefix(probe) // kv.block_size, len(h.block_ids))
        if not kv.allocate(rid, h.num_tokens):
            if cached:
                kv.free(rid)  # give the shared prefix back
            return None
        return cached

    async def _read(self, rid: str, h: disagg_pb2.KVHandle, local: list[int], cached: int, deadline: float) -> bool:
        """READ the remote blocks past the first `cached` (those are shared from the local cache) into `local`."""
        t0, handle, ok = time.monotonic(), None, False
        remote, dst = list(h.block_ids)[cached:], local[cached:]
        try:
            if not dst:
                ok = True  # every block was cached here: nothing to read
            else:
                handle = self.agent.start_read(h.agent_name, remote, dst, tag=rid)
                # On a worker thread, so the loop keeps serving. If this task is cancelled meanwhile, `finally`
                # releases the handle at once; the abandoned thread's wait then ends soon after release() does.
                st = await asyncio.to_thread(self._wait_until, handle, deadline)
                ok = st is TransferStatus.DONE
                if not ok:
                    log.warning("%s: KV pull %s after %.2fs", rid,
                                "failed" if st is TransferStatus.FAILED else "timed out", time.monotonic() - t0)
        except Exception:  # noqa: BLE001 - any transfer error means recompute, never a dead stream
            log.exception("%s: KV pull raised", rid)
        finally:
            if handle is not None:
                self.agent.release(handle)  # after this, no write can land in `local`
            if ok:
                self.counters.transfers += 1
                self.counters.transfer_bytes += len(dst) * self.layout.block_bytes
                self.counters.transfer_seconds += time.monotonic() - t0
                self.counters.pull_cached_blocks += cached
            else:
                self.counters.transfer_failures += 1
                self.aengine.call_soon(lambda: self.aengine.engine.kv.free(rid))
            self._release_remote(h, rid)
        return ok

    def _wait_until(self, handle: TransferHandle, deadline: float) -> TransferStatus:
        # The time left is taken when the thread starts, not when the wait was queued: a busy default executor
        # must not push the wait past the pull's deadline (and so past the lease).
        return self.agent.wait(handle, deadline - time.monotonic())

    def _release_remote(self, h: disagg_pb2.KVHandle, rid: str) -> None:
        """Tell the prefill worker it may free the blocks now (fire and forget; its lease is the backstop)."""
        async def call() -> None:
            try:
                await self._stub(h.worker_address).ReleaseKV(disagg_pb2.ReleaseKVRequest(request_id=rid), timeout=5)
            except grpc.aio.AioRpcError as e:
                log.info("%s: ReleaseKV to %s failed (%s); its lease will free the blocks", rid, h.worker_id, e.code())

        task = asyncio.get_running_loop().create_task(call())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
