"""The scheduler-side half of a KV connector: requests whose KV moves between engines. No networking here.

Receiving (decode role). `receive` reserves blocks for a request whose prompt KV will arrive from elsewhere:
the blocks of its prompt's longest locally cached full-block prefix are shared (never written), the rest are
allocated. The request waits in status RECEIVING_KV, outside the scheduler's queues, so it never stalls a step.
The caller moves the KV into `KVReservation.blocks_to_fill` and reports the outcome:
- `received(rid, layers)`: those layers (None: all) now sit in the blocks and no transfer writes them any more.
  When every layer has arrived the request joins the waiting queue with its prompt computed.
- `failed(rid)`: the transfer ended (no write can land any more) without the KV: the request is recomputed.
The caller must report only after the transfer into those blocks has stopped (`KVTransferAgent.release`).

Block ownership while receiving. From `receive` until the caller reports, the reserved blocks belong to the
transfer. If the request's deadline passes first, or it is aborted, its blocks are *quarantined*: taken out of
its table, still allocated, and freed only when the caller's report comes. The request itself moves on at
once (recomputed with fresh blocks, or finished), so a late write can never land in a block that was reused.
If a report never comes (a transfer that could not be stopped), the quarantined blocks stay allocated: a leak
is preferred to corrupt KV, and `num_quarantined_blocks` makes it visible.

Leasing (prefill role). A request added with `lease_s` ends after its first token (finish reason HANDOFF unless
that token stops it) and keeps its blocks; `grant` records the lease. The blocks are freed exactly once, by
`release` (the puller is done, or the request was aborted) or by `expire` at the lease deadline. Deadlines of
leases are unix times: they travel to the decode worker, another process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.kv_cache_manager import KVCacheManager, cdiv
from engine.request import FinishReason, Request, RequestStatus
from engine.scheduler import Scheduler
from engine.stats import EngineStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVReservation:
    """Where a receiving request's KV goes: its blocks in token order, the leading ones shared from the cache."""

    request_id: str
    block_ids: tuple[int, ...]  # every block of the request's `num_tokens` tokens, in token order
    num_cached_blocks: int  # leading blocks already holding this prompt's KV (prefix cache): not to be written
    num_tokens: int  # tokens whose KV arrives
    deadline: float  # time.monotonic() after which the engine stops waiting and recomputes

    @property
    def blocks_to_fill(self) -> tuple[int, ...]:
        """Local blocks the transfer writes: those of remote blocks num_cached_blocks, num_cached_blocks + 1, ..."""
        return self.block_ids[self.num_cached_blocks:]


@dataclass(frozen=True)
class KVLease:
    """A finished prompt's KV, kept for the worker that decodes the rest."""

    request_id: str
    block_ids: tuple[int, ...]  # in token order
    num_tokens: int  # tokens whose KV the blocks hold
    deadline: float  # unix time at which the blocks are freed if nobody released them
    first_token: int = 0  # the token the prefill sampled (it ends no request: the decode worker continues after it)


@dataclass(frozen=True)
class KVProgress:
    """How far a prefill-role request's KV is: what a decode worker pulling it layer by layer needs."""

    block_ids: tuple[int, ...]  # the prompt's blocks in token order, all allocated when the request was admitted
    num_tokens: int  # prompt tokens
    layer_tokens: tuple[int, ...]  # per layer: leading prompt tokens whose KV of that layer is written
    first_token: int | None = None  # set once the request handed off: its KV is complete and leased


@dataclass
class _Receipt:
    request: Request
    reservation: KVReservation
    layers_left: set[int] = field(default_factory=set)


class RemoteKV:
    """Receipts, quarantined blocks and leases of one engine. Called only between steps (or inside `step`)."""

    def __init__(self, kv: KVCacheManager, scheduler: Scheduler, num_layers: int, stats: EngineStats) -> None:
        self.kv, self.scheduler, self.num_layers, self.stats = kv, scheduler, num_layers, stats
        self.receipts: dict[str, _Receipt] = {}
        self.quarantine: dict[str, list[int]] = {}
        self.leases: dict[str, KVLease] = {}

    # ---- receiving -------------------------------------------------------------------------------------------
    def receive(self, req: Request, num_tokens: int, timeout_s: float) -> KVReservation | None:
        """Reserve blocks for `num_tokens` tokens of `req` arriving from elsewhere; None (holding nothing) when
        the blocks are short. `req` must not be queued yet; on success it is RECEIVING_KV."""
        kv = self.kv
        cached = kv.match_prefix(req, max_blocks=num_tokens // kv.block_size) // kv.block_size
        if not kv.allocate(req.request_id, num_tokens):
            kv.free(req.request_id)  # give the shared prefix back
            return None
        table = tuple(kv.block_table(req.request_id))[: cdiv(num_tokens, kv.block_size)]
        res = KVReservation(req.request_id, table, cached, num_tokens, time.monotonic() + timeout_s)
        req.status = RequestStatus.RECEIVING_KV
        self.receipts[req.request_id] = _Receipt(req, res, set(range(self.num_layers)))
        return res

    def received(self, request_id: str, layers: range | list[int] | None = None,
                 output_token_ids: Sequence[int] = ()) -> bool:
        """These layers' KV has arrived; True when it was the last of them and the request joined the queue.
        `output_token_ids`: tokens sampled elsewhere that the request continues after, when they were not known
        at `receive` (layer-wise streaming learns the prefill's first token with the last layer group)."""
        if self._end_quarantine(request_id):
            return False
        rec = self.receipts.get(request_id)
        if rec is None:
            return False
        rec.layers_left.difference_update(range(self.num_layers) if layers is None else layers)
        if rec.layers_left:
            return False
        del self.receipts[request_id]
        req = rec.request
        req.output_token_ids.extend(output_token_ids)
        req.num_computed_tokens = rec.reservation.num_tokens
        req.status = RequestStatus.WAITING
        self.kv.cache_full_blocks(req)
        self.scheduler.add(req)
        return True

    def failed(self, request_id: str) -> None:
        """The transfer ended without the KV (and writes no more): free the blocks, recompute the request."""
        if self._end_quarantine(request_id):
            return
        rec = self.receipts.pop(request_id, None)
        if rec is not None:
            self.kv.free(request_id)
            self._recompute(rec.request)

    def abort(self, req: Request) -> None:
        """A receiving request is aborted: it ends now, its blocks wait in quarantine for the transfer's end."""
        self.receipts.pop(req.request_id, None)
        self.quarantine[req.request_id] = self.kv.detach(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = FinishReason.ABORT

    def _end_quarantine(self, request_id: str) -> bool:
        blocks = self.quarantine.pop(request_id, None)
        if blocks is None:
            return False
        self.kv.free_blocks(blocks)
        return True

    def _recompute(self, req: Request) -> None:
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.stats.recomputes += 1
        self.scheduler.add(req)

    # ---- leasing ---------------------------------------------------------------------------------------------
    def grant(self, req: Request) -> KVLease:
        """Lease a request that just handed off: its blocks stay allocated under its id until released."""
        assert req.lease_s is not None and req.finish_reason == FinishReason.HANDOFF
        lease = KVLease(req.request_id, tuple(self.kv.block_table(req.request_id)), req.num_prompt_tokens,
                        time.time() + req.lease_s, req.output_token_ids[0])
        self.leases[req.request_id] = lease
        return lease

    def release(self, request_id: str) -> bool:
        """Free a lease's blocks (its puller is done, or the request was aborted); False if there is none."""
        if self.leases.pop(request_id, None) is None:
            return False
        self.kv.free(request_id)
        return True

    # ---- deadlines -------------------------------------------------------------------------------------------
    def expire(self) -> list[str]:
        """Recompute receipts past their deadline (blocks quarantined) and free leases past theirs; returns the
        ids of the expired leases."""
        now = time.monotonic()
        for rid in [r for r, rec in self.receipts.items() if rec.reservation.deadline <= now]:
            rec = self.receipts.pop(rid)
            self.quarantine[rid] = self.kv.detach(rid)
            self.stats.remote_kv_timeouts += 1
            log.warning("%s: its KV did not arrive in time; recomputing the prompt", rid)
            self._recompute(rec.request)
        wall = time.time()
        gone = [rid for rid, lease in self.leases.items() if lease.deadline <= wall]
        for rid in gone:
            self.release(rid)
            self.stats.leases_expired += 1
            log.warning("lease of %s expired before its KV was pulled; blocks freed", rid)
        return gone

    @property
    def num_quarantined_blocks(self) -> int:
        return sum(len(b) for b in self.quarantine.values())
