"""The workers the router knows: their channels, health, roles and latest load, and which KV blocks they cache.

A background task polls every worker's `Health` and `Load`. A worker that fails a poll (no answer within
`rpc_timeout_s`: dead, SIGSTOPped, wedged), or whose RPC fails with UNAVAILABLE, is unhealthy and gets no new
requests until a poll succeeds again; the requests streaming from it move to another decode worker at once
(`on_unhealthy`). So a hung worker is detected within `health_interval_s + rpc_timeout_s`.

Each Load poll also carries the worker's prefix-cache events since this router's cursor (epoch, sequence number),
or a full snapshot when the worker cannot give them (it restarted, or the events were trimmed); `KVIndex` keeps
block hash -> workers from them, for the `kv_aware` policy (router/policy.py). See `LoadRequest` in
proto/disagg.proto for the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from proto import disagg_pb2, disagg_pb2_grpc
from proto.convert import WorkerLoad, load_from_proto

log = logging.getLogger(__name__)

PREFILL_ROLES = ("prefill", "both")
DECODE_ROLES = ("decode", "both")

# Short reconnect backoff so a restarted worker is reachable again within about one poll interval.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
]


class KVIndex:
    """Block hash -> the workers (by address) that cache it, from their KV events.

    Besides what the workers confirmed, the router may `expect` blocks: a prompt routed to a worker will be
    cached there once it has run, well before the next poll reports it. Expected entries count as held until
    the worker's events confirm them or `ttl_s` passes, so requests sharing a prefix that arrive within one poll
    interval still find each other. A "removed" event, a snapshot or the worker's removal drops entries.
    Roles need no separate index: a policy only asks about the candidates of its own phase.
    """

    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}  # confirmed: hash -> addresses
        self._held: dict[str, set[int]] = {}  # confirmed: address -> hashes
        self._expected: dict[str, dict[int, float]] = {}  # address -> hash -> monotonic deadline

    def num_blocks(self, address: str) -> int:
        """Blocks the worker is known (confirmed) to cache."""
        return len(self._held.get(address, ()))

    def holds(self, address: str, block_hash: int, now: float | None = None) -> bool:
        if address in self._holders.get(block_hash, ()):
            return True
        deadline = self._expected.get(address, {}).get(block_hash)
        return deadline is not None and deadline > (time.monotonic() if now is None else now)

    def stored(self, address: str, hashes: Iterable[int]) -> None:
        held, expected = self._held.setdefault(address, set()), self._expected.get(address, {})
        for h in hashes:
            self._holders.setdefault(h, set()).add(address)
            held.add(h)
            expected.pop(h, None)

    def removed(self, address: str, hashes: Iterable[int]) -> None:
        held, expected = self._held.get(address, set()), self._expected.get(address, {})
        for h in hashes:
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(address)
                if not holders:
                    del self._holders[h]
            held.discard(h)
            expected.pop(h, None)

    def apply(self, address: str, events: Iterable[tuple[bool, int]]) -> None:
        """(removed, hash) events in the order the worker published them."""
        for removed, h in events:
            (self.removed if removed else self.stored)(address, (h,))

    def replace(self, address: str, hashes: Iterable[int]) -> None:
        """A snapshot: the worker caches exactly `hashes` now (expected entries are dropped too)."""
        self.drop(address)
        self.stored(address, hashes)

    def drop(self, address: str) -> None:
        """Forget everything about the worker."""
        self.removed(address, list(self._held.get(address, ())))
        self._held.pop(address, None)
        self._expected.pop(address, None)

    def expect(self, address: str, hashes: Iterable[int], ttl_s: float) -> None:
        """The worker will cache `hashes` soon (a prompt was routed there); count them as held for `ttl_s`."""
        if ttl_s <= 0:
            return
        now = time.monotonic()
        expected, held = self._expected.setdefault(address, {}), self._held.get(address, set())
        if len(expected) > 4 * len(held) + 65536:  # keep it bounded when a worker never confirms
            for h in [h for h, t in expected.items() if t <= now]:
                del expected[h]
        for h in hashes:
            if h not in held:
                expected[h] = now + ttl_s

    def match(self, hashes: Sequence[int], addresses: Iterable[str]) -> dict[str, int]:
        """For each worker, how many leading blocks of `hashes` it holds (a prefix cache hits only a prefix)."""
        now = time.monotonic()
        out = dict.fromkeys(addresses, 0)
        alive = list(out)
        for i, h in enumerate(hashes):
            alive = [a for a in alive if self.holds(a, h, now)]
            if not alive:
                break
            for a in alive:
                out[a] = i + 1
        return out


@dataclass
class WorkerState:
    """One worker as the router sees it."""

    address: str  # host:port of its gRPC server
    channel: grpc.aio.Channel | None = None  # open while the registry runs
    stub: disagg_pb2_grpc.WorkerStub | None = None  # on `channel`
    worker_id: str = ""  # as reported by Health
    role: str = ""  # prefill | decode | both, as reported by Health; "" until the first answer
    model: str = ""  # model the worker serves
    max_model_len: int = 0  # its context length; 0 until known
    healthy: bool = False  # answered the last poll with ok
    healthy_since: float = 0.0  # monotonic time it last turned healthy (a restart at the same address shows here)
    remote_draining: bool = False  # the worker says it is draining
    draining_refused_at: float = 0.0  # monotonic time a refusal last said it drains (newer than a poll's answer)
    draining: bool = False  # the router was told to stop sending it new requests
    load: WorkerLoad | None = None  # latest Load report
    error: str = ""  # why it is unhealthy
    in_flight: int = 0  # requests this router has running on it now
    in_flight_tokens: int = 0  # prompt tokens of those requests
    in_flight_new_tokens: int = 0  # of which not predicted to be in its prefix cache (the work it has to do)
    kv_block_size: int = 0  # tokens per KV block, from Health; 0: unknown (no KV-aware routing to it)
    kv_epoch: int = 0  # KV event cursor: the worker's epoch and the last event applied to the index
    kv_seq: int = 0
    _removed: bool = field(default=False, repr=False)

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining and not self.remote_draining and not self._removed

    def can(self, phase: str) -> bool:
        """Whether it runs `phase` (prefill | decode) and takes new requests."""
        return self.routable and self.role in (PREFILL_ROLES if phase == "prefill" else DECODE_ROLES)

    @contextlib.contextmanager
    def dispatched(self, prompt_tokens: int, new_tokens: int | None = None) -> Iterator[None]:
        """Count a request as in flight on this worker for the duration of the block; `new_tokens`: those of its
        prompt tokens the worker is expected to compute (default all)."""
        new = prompt_tokens if new_tokens is None else new_tokens
        self.in_flight += 1
        self.in_flight_tokens += prompt_tokens
        self.in_flight_new_tokens += new
        try:
            yield
        finally:
            self.in_flight -= 1
            self.in_flight_tokens -= prompt_tokens
            self.in_flight_new_tokens -= new


class WorkerRegistry:
    """Worker addresses -> live state; add, remove and drain at run time."""

    def __init__(self, addresses: Iterable[str] = (), health_interval_s: float = 1.0, rpc_timeout_s: float = 2.0
                 ) -> None:
        self.health_interval_s = health_interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self._workers: dict[str, WorkerState] = {a: WorkerState(a) for a in dict.fromkeys(addresses)}
        self._task: asyncio.Task[None] | None = None
        self.kv_index = KVIndex()
        self.stat_help: dict[str, str] = {}  # Load figure name -> its meaning, as the workers declared it
        # Called when a healthy worker fails a poll or an RPC finds it unreachable (hang detection: the requests
        # streaming from it move elsewhere, router/token_streams.py).
        self.on_unhealthy: list[Callable[[WorkerState, str], None]] = []

    @property
    def running(self) -> bool:
        return self._task is not None

    def workers(self) -> list[WorkerState]:
        return list(self._workers.values())

    def get(self, address: str) -> WorkerState | None:
        return self._workers.get(address)

    def candidates(self, phase: str) -> list[WorkerState]:
        """Workers that take new `phase` (prefill | decode) requests now."""
        return [w for w in self._workers.values() if w.can(phase)]

    def max_model_len(self) -> int | None:
        """The smallest context length any worker has reported (also from workers down now), None if none has."""
        lens = [w.max_model_len for w in self._workers.values() if w.max_model_len > 0]
        return min(lens) if lens else None

    async def start(self) -> None:
        """Open channels, poll once (so routing works at once), then keep polling in the background."""
        if self._task is not None:
            return
        for w in self._workers.values():
            _open(w)
        await self.poll_once()
        self._task = asyncio.create_task(self._poll_forever(), name="worker-health")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(_close(w) for w in self._workers.values()))

    async def add(self, address: str) -> WorkerState:
        """Register a worker; when running, connect and poll it before returning."""
        if address in self._workers:
            return self._workers[address]
        w = self._workers[address] = WorkerState(address)
        log.info("worker %s added", address)
        if self._task is not None:
            _open(w)
            await self._poll(w)
        return w

    async def remove(self, address: str) -> None:
        """Forget a worker and close its channel, failing what still runs on it.

        To let running requests finish, `set_draining` first and wait for its `in_flight` to reach 0.
        """
        w = self._workers.pop(address, None)
        if w is None:
            return
        w._removed = True
        self.kv_index.drop(address)
        log.info("worker %s removed", address)
        await _close(w)

    def set_draining(self, address: str, draining: bool = True) -> None:
        """Stop (or resume) sending new requests to a worker; running ones go on."""
        w = self._workers.get(address)
        if w is None:
            raise KeyError(f"unknown worker {address}")
        w.draining = draining
        log.info("worker %s %s", address, "draining" if draining else "no longer draining")

    def mark_draining(self, w: WorkerState) -> None:
        """An RPC was refused because the worker drains: route around it. A poll whose Health was asked before
        this refusal does not clear it (its answer is older); the first poll asked after it decides."""
        w.remote_draining, w.draining_refused_at = True, time.monotonic()

    def mark_unavailable(self, w: WorkerState, reason: str) -> None:
        """An RPC found the worker unreachable: route around it until a poll succeeds."""
        self._set_health(w, False, reason)

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(w) for w in list(self._workers.values())))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.poll_once()
            except Exception:  # a bug here must not stop health checks for good
                log.exception("health poll failed")

    async def _poll(self, w: WorkerState) -> None:
        if w.stub is None:
            return
        asked = time.monotonic()
        try:
            health = await w.stub.Health(disagg_pb2.HealthRequest(), timeout=self.rpc_timeout_s)
            load = await w.stub.Load(disagg_pb2.LoadRequest(want_kv_events=True, kv_epoch=w.kv_epoch,
                                                            kv_events_after=w.kv_seq, want_help=w.load is None),
                                     timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            self._set_health(w, False, f"{e.code().name}: {e.details()}")
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # channel closed by a concurrent remove(), or a malformed answer
            self._set_health(w, False, repr(e))
            return
        w.worker_id, w.role, w.model = health.worker_id, health.role, health.model
        w.remote_draining = health.draining or w.draining_refused_at > asked
        w.max_model_len, w.load = health.max_model_len, load_from_proto(load)
        w.kv_block_size = health.kv_block_size
        self.stat_help.update(load.stat_help)
        if load.HasField("kv_events") and not w._removed:
            self._apply_kv(w, load.kv_events)
        self._set_health(w, health.ok, "" if health.ok else "worker reports not ok")

    def _apply_kv(self, w: WorkerState, kv: disagg_pb2.KVEvents) -> None:
        """Bring the index up to a worker's KV events (or snapshot); answers older than the cursor are skipped
        (two polls of one worker may overlap), and a gap makes the next poll ask for a snapshot."""
        if not kv.epoch:
            return  # a worker that does not publish events
        if kv.snapshot:
            if kv.epoch != w.kv_epoch or kv.seq >= w.kv_seq:
                if kv.epoch != w.kv_epoch and w.kv_epoch:
                    log.info("worker %s: new KV event epoch (restarted); index rebuilt from its snapshot", w.address)
                self.kv_index.replace(w.address, kv.cached_hashes)
                w.kv_epoch, w.kv_seq = kv.epoch, kv.seq
            return
        if kv.epoch != w.kv_epoch:  # events of an epoch we hold no cursor in: start over from a snapshot
            w.kv_epoch = w.kv_seq = 0
            return
        first = kv.seq - len(kv.events) + 1  # sequence number of events[0]
        if first > w.kv_seq + 1:
            log.warning("worker %s: KV events %d..%d missing; asking for a snapshot", w.address, w.kv_seq + 1,
                        first - 1)
            w.kv_epoch = w.kv_seq = 0
            return
        skip = w.kv_seq + 1 - first
        if skip < len(kv.events):
            self.kv_index.apply(w.address, ((e.removed, e.block_hash) for e in kv.events[skip:]))
            w.kv_seq = kv.seq

    def _set_health(self, w: WorkerState, healthy: bool, reason: str) -> None:
        was = w.healthy
        w.healthy, w.error = healthy, reason
        if healthy != was:
            if healthy:
                w.healthy_since = time.monotonic()
                log.info("worker %s (%s, %s) is healthy", w.address, w.worker_id or "?", w.role or "?")
            else:
                log.warning("worker %s is unhealthy: %s", w.address, reason)
                for listener in self.on_unhealthy:
                    listener(w, reason)


def _open(w: WorkerState) -> None:
    if w.channel is None:
        w.channel = grpc.aio.insecure_channel(w.address, options=CHANNEL_OPTIONS)
        w.stub = disagg_pb2_grpc.WorkerStub(w.channel)


async def _close(w: WorkerState) -> None:
    channel, w.channel, w.stub = w.channel, None, None
    if channel is not None:
        await channel.close()
