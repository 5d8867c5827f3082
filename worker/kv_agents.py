"""A worker's KV transfer agents, one per tensor-parallel rank, seen by the puller as one agent.

Rank 0's agent is in this process, on `engine.kv_cache` (rank 0's shard); ranks 1..N-1 have theirs in their own
processes (worker/rank_agent.py), driven through `RankAgentClient`. A read of a request's blocks from a peer worker
is planned from both workers' head layouts (`engine.parallel.kv_heads.plan_head_copies`, fixed per peer at
`add_peer`): one part per head copy, started on the decode rank it fills and reading from the prefill rank that
holds those heads (a head range when the two shards differ in width, whole blocks when they are equal). One worker
of one rank reading from another is one part tagged with the request id, exactly the read of before.

A `WorkerRead` keeps the ownership rules of kvtransfer/base.py for the whole worker: from `start_read` until
`release` returns, the local blocks belong to the transfer on every rank; `release` releases every part and raises
TransferError if any part could not be stopped (the blocks then stay in quarantine, on every rank, since the engine
frees a block on all ranks at once). A part that cannot start, or whose rank is gone, makes the read FAILED; the
parts already started are still released by `release`.

Invariant relied on for ranks 1..N-1: a control connection breaks only when the rank's process is gone (or its
agent was closed). A part whose rank is gone can write nothing any more, so its release returns; a rank that is
alive but does not answer by the deadline might still be writing, so that release raises.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection
from typing import Any

import numpy as np

from engine.engine import LLMEngine
from engine.parallel.kv_heads import HeadCopy, KVHeadLayout, plan_head_copies
from kvtransfer import KVTransferAgent, TransferError, TransferHandle, TransferStatus, create_agent
from worker.rank_agent import RankAgentInfo, RankAgentSpec, start_rank_agent

CALL_MARGIN_S = 5.0  # a rank's answer may come this long after the call's own timeout before it counts as hung


class RankGone(ConnectionError):
    """The rank's process is gone: its control connection broke or refuses connections."""


class RankAgentClient:
    """Rank r's agent (in rank r's process), driven from the worker process over its control server."""

    def __init__(self, info: RankAgentInfo, authkey: bytes, release_timeout_s: float) -> None:
        self.rank, self.name, self.info = info.rank, info.name, info
        self._authkey, self._release_timeout_s = authkey, release_timeout_s
        self._free: list[Connection] = []  # idle connections; a call takes one for its whole duration
        self._lock = threading.Lock()

    def _take(self) -> Connection:
        with self._lock:
            if self._free:
                return self._free.pop()
        try:
            return Client(self.info.address, authkey=self._authkey)
        except OSError as e:
            raise RankGone(f"rank {self.rank}'s transfer agent is gone ({e!r})") from None

    def call(self, op: str, *args: Any, timeout_s: float = 10.0) -> Any:
        conn = self._take()
        try:
            conn.send((op, args))
            if not conn.poll(timeout_s + CALL_MARGIN_S):
                conn.close()  # its answer may still come: the connection cannot be reused
                raise TimeoutError(f"rank {self.rank}'s transfer agent did not answer {op} in time")
            tag, value = conn.recv()
        except (EOFError, OSError) as e:
            conn.close()
            raise RankGone(f"rank {self.rank}'s transfer agent is gone ({e!r})") from None
        with self._lock:
            self._free.append(conn)
        if tag == "transfer_error":
            raise TransferError(value)
        if tag == "error":
            raise RuntimeError(f"rank {self.rank}: {value}")
        return value

    def add_remote(self, name: str, metadata: bytes) -> None:
        self.call("add_remote", name, metadata)

    def start_read(self, *args: Any) -> tuple[int, int]:
        """(read id on the rank, bytes it moves)."""
        return self.call("start_read", *args)

    def wait(self, hid: int, timeout_s: float) -> tuple[TransferStatus, str | None]:
        try:
            status, error = self.call("wait", hid, timeout_s, timeout_s=timeout_s)
        except (RankGone, TimeoutError, RuntimeError) as e:
            return TransferStatus.FAILED, str(e)
        return TransferStatus(status), error

    def release(self, hid: int) -> None:
        try:
            self.call("release", hid, timeout_s=self._release_timeout_s)
        except RankGone:
            return  # the rank's memory is gone with it: nothing can write into its blocks any more
        except TimeoutError as e:
            raise TransferError(str(e)) from None

    def close(self) -> None:
        with contextlib.suppress(RankGone, TimeoutError):
            self.call("close", timeout_s=self._release_timeout_s)
        with self._lock:
            for conn in self._free:
                conn.close()
            self._free.clear()


class LocalRank:
    """Rank 0's agent, with the calls of RankAgentClient."""

    rank = 0

    def __init__(self, agent: KVTransferAgent) -> None:
        self.agent, self.name = agent, agent.name

    def add_remote(self, name: str, metadata: bytes) -> None:
        self.agent.add_remote(name, metadata)

    def start_read(self, *args: Any) -> tuple[TransferHandle, int]:
        h = self.agent.start_read(*args)
        return h, h.nbytes

    def wait(self, h: TransferHandle, timeout_s: float) -> tuple[TransferStatus, str | None]:
        return self.agent.wait(h, timeout_s), h.error

    def release(self, h: TransferHandle) -> None:
        self.agent.release(h)

    def close(self) -> None:
        self.agent.close()


Rank = LocalRank | RankAgentClient


@dataclass
class _Part:
    rank: Rank
    handle: Any  # TransferHandle on rank 0, the read's id on the others
    nbytes: int
    status: TransferStatus = TransferStatus.PENDING
    released: bool = False


@dataclass(eq=False)
class WorkerRead:
    """One read of a request's blocks from a peer worker: a part per decode rank's head copy."""

    tag: str
    parts: list[_Part] = field(default_factory=list)
    status: TransferStatus = TransferStatus.PENDING
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one release at a time

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


@dataclass(frozen=True)
class _Peer:
    heads: KVHeadLayout
    plan: list[HeadCopy]
    agents: list[str]  # the peer's agent name per rank


class WorkerAgents:
    """The module docstring's one agent per rank, as the puller and the servicer use one agent."""

    def __init__(self, ranks: list[Rank], kv_heads: KVHeadLayout, backend: str) -> None:
        self.ranks, self.kv_heads, self.backend = ranks, kv_heads, backend
        self.name = ranks[0].name
        self._peers: dict[str, _Peer] = {}
        self._added: set[tuple[int, str]] = set()  # (our rank, peer agent) already registered there
        # Two pulls from a new peer may register it at once (from threads): one at a time, the second finds it.
        self._peer_lock = threading.Lock()

    @classmethod
    def start(cls, engine: LLMEngine, backend: str, name: str, options: dict[str, Any]) -> WorkerAgents:
        """Rank 0's agent here on `engine.kv_cache`; the other ranks' in their processes (between steps: call it
        before the engine loop starts)."""
        kv_heads = engine.kv_layout()
        if kv_heads.tp_size > 1:  # ranks > 0 hear of no expected read (expect_read): they poll at full rate
            options = {k: v for k, v in options.items() if k != "idle_progress_s"}
        agent0 = create_agent(backend, name, engine.kv_cache, **options)
        ranks: list[Rank] = [LocalRank(agent0)]
        if kv_heads.tp_size > 1:
            authkey = secrets.token_bytes(32)
            try:
                infos = engine.run_on_ranks(start_rank_agent, RankAgentSpec(backend, name, options, authkey))[1:]
            except BaseException:
                agent0.close()
                raise
            ranks += [RankAgentClient(i, authkey, agent0.release_timeout_s) for i in infos]
        return cls(ranks, kv_heads, backend)

    # ---- serving side: what peers need to read from this worker ---------------------------------------------
    def metadata(self) -> bytes:
        """Rank 0's agent's metadata (the others' are `rank_agents()`)."""
        return self._agent0.metadata()

    def rank_agents(self) -> list[RankAgentInfo]:
        return [r.info for r in self.ranks[1:] if isinstance(r, RankAgentClient)]

    def expect_read(self, tag: str, until: float) -> None:
        """A peer may read rank 0's blocks under `tag` until monotonic `until` (kvtransfer/base.py). Ranks > 0
        are started without an idle progress period (`start`), so they need no word of it."""
        self._agent0.expect_read(tag, until)

    def notifications(self) -> list[str]:
        """Tags of reads of rank 0's blocks: a one-rank peer's reads of a one-rank worker (worker/rank_agent.py)."""
        return self._agent0.notifications()

    @property
    def _agent0(self) -> KVTransferAgent:
        r0 = self.ranks[0]
        assert isinstance(r0, LocalRank)
        return r0.agent

    # ---- reading side ----------------------------------------------------------------------------------------
    def add_peer(self, name: str, heads: KVHeadLayout, agents: list[tuple[str, bytes]]) -> None:
        """Plan reads from peer `name` (its head layout, its agents' names and metadata in rank order) and register
        each of its rank agents on our ranks that read from it. ValueError when the layouts cannot map (different
        model shapes); blocking (RPCs to our ranks)."""
        if len(agents) != heads.tp_size:
            raise ValueError(f"peer {name} names {len(agents)} rank agent(s) for {heads.tp_size} rank(s)")
        plan = plan_head_copies(heads, self.kv_heads)
        with self._peer_lock:
            for c in plan:
                peer_agent, metadata = agents[c.src_rank]
                if (c.dst_rank, peer_agent) not in self._added:
                    self.ranks[c.dst_rank].add_remote(peer_agent, metadata)
                    self._added.add((c.dst_rank, peer_agent))
            self._peers[name] = _Peer(heads, plan, [a for a, _ in agents])

    def forget_peer(self, name: str) -> None:
        """Register the peer again next time (it may have restarted with new agents under the same names)."""
        with self._peer_lock:
            peer = self._peers.pop(name, None)
            if peer is not None:
                self._added -= {(c.dst_rank, peer.agents[c.src_rank]) for c in peer.plan}

    def knows(self, name: str) -> bool:
        return name in self._peers

    def start_read(self, remote: str, remote_blocks: list[int] | np.ndarray, local_blocks: list[int] | np.ndarray,
                   tag: str, layers: tuple[int, int] | None = None) -> WorkerRead:
        """Start every part of a read of `remote`'s blocks into ours (pairwise), whole or layers [l0, l1). Never
        raises for a part that cannot start: the read is FAILED then (release it all the same)."""
        peer = self._peers.get(remote)
        if peer is None:
            raise ValueError(f"unknown peer {remote!r}: call add_peer() first")
        read = WorkerRead(tag)
        single = len(peer.plan) == 1
        for i, c in enumerate(peer.plan):
            rank = self.ranks[c.dst_rank]
            part_tag = tag if single else f"{tag}#tp{c.dst_rank}.{i}"  # the lease is freed by ReleaseKV then
            try:
                handle, nbytes = rank.start_read(peer.agents[c.src_rank], remote_blocks, local_blocks, part_tag,
                                                 layers, self._heads(peer, c))
            except Exception as e:  # noqa: BLE001 - a part that cannot start fails the read, never raises
                read.status, read.error = TransferStatus.FAILED, f"rank {c.dst_rank}: start failed: {e!r}"
                break
            read.parts.append(_Part(rank, handle, nbytes))
        return read

    def _heads(self, peer: _Peer, c: HeadCopy) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """None when both shards are this copy's heads exactly (whole blocks), else the two head ranges."""
        src_w, dst_w = peer.heads.local_heads(c.src_rank), self.kv_heads.local_heads(c.dst_rank)
        if c.src_heads == (0, src_w) and c.dst_heads == (0, dst_w):
            return None
        return c.src_heads, c.dst_heads

    def wait(self, read: WorkerRead, timeout_s: float) -> TransferStatus:
        """Until every part is DONE (DONE), one FAILED (FAILED) or `timeout_s` passed (PENDING)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        for p in read.parts:
            if read.status is not TransferStatus.PENDING:
                break
            if p.status is TransferStatus.PENDING:
                p.status, error = p.rank.wait(p.handle, max(0.0, deadline - time.monotonic()))
                if p.status is TransferStatus.FAILED:
                    read.status, read.error = TransferStatus.FAILED, f"rank {p.rank.rank}: {error}"
        if read.status is TransferStatus.PENDING and all(p.status is TransferStatus.DONE for p in read.parts):
            read.status = TransferStatus.DONE
        return read.status

    def release(self, read: WorkerRead) -> None:
        """Release every part; afterwards no write of this read lands in any rank's blocks. TransferError naming
        the parts that could not be stopped (call again to retry them)."""
        with read.lock:
            stuck = []
            for p in read.parts:
                if p.released:
                    continue
                try:
                    p.rank.release(p.handle)
                    p.released = True
                except TransferError as e:
                    stuck.append(f"rank {p.rank.rank}: {e}")
            if read.status is TransferStatus.PENDING:
                read.status, read.error = TransferStatus.FAILED, read.error or "released before completion"
            if stuck:
                raise TransferError("; ".join(stuck))

    def close(self) -> None:
        """Close every rank's agent (a rank already gone has nothing to close)."""
        for r in self.ranks[1:]:
            r.close()
        self.ranks[0].close()
