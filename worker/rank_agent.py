"""The KV transfer agent of one tensor-parallel rank, in that rank's process, and its control server.

Rank r's KV cache shard lives in rank r's process (engine/parallel/rank.py), so its transfer agent lives there too:
peers read its blocks from it, and its own reads write into its shard, process to process, never through rank 0.
The worker (rank 0) starts the agents of ranks 1..N-1 with `engine.run_on_ranks(start_rank_agent, spec)` and then
drives each through its control server (worker/kv_agents.py `RankAgentClient`): start a read, wait for it, release
it, add a peer. Only those small calls cross the control connection; KV bytes never do.

The control server is a `multiprocessing.connection` listener on loopback with the worker's random authkey. One
thread per connection answers calls in order; the client holds a connection for each call in flight (a wait blocks
only its own), so calls of different reads run concurrently, and a release reaches the rank while another thread
of the worker waits on the same read (the agent's own wait() then returns soon after the release, kvtransfer/base.py).

Notifications: reads of a tensor-parallel worker are several parts with tags of their own, and the reader frees the
prefill worker's lease with ReleaseKV once every part is done (decode_worker/kv_pull.py). So the tags peers leave
with a rank's agent name nothing the worker waits for: the server drops them (rank 0's, which single-part reads of
one-rank workers do use, are the worker's own agent's).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener
from typing import Any

from engine.parallel.kv_heads import RankKV
from kvtransfer import KVTransferAgent, TransferError, TransferHandle, create_agent

log = logging.getLogger(__name__)

NOTIFICATION_DROP_S = 1.0  # how often a rank's server empties its agent's notification inbox


@dataclass(frozen=True)
class RankAgentSpec:
    """What every rank needs to start its agent (pickled to each rank by run_on_ranks)."""

    backend: str
    worker: str  # the worker's id: rank r's agent is `rank_agent_name(worker, r)`
    options: dict[str, Any]  # create_agent options (host, fault, progress_thread, ...)
    authkey: bytes  # the control server's: only this worker's rank 0 may drive the agent


@dataclass(frozen=True)
class RankAgentInfo:
    """A started rank agent: what rank 0 connects to and what peers need to reach it."""

    rank: int
    name: str
    metadata: bytes
    address: tuple[str, int]  # the control server


def rank_agent_name(worker: str, rank: int) -> str:
    """Agent names are unique per rank across the cluster: rank 0's is the worker id itself."""
    return worker if rank == 0 else f"{worker}/rank{rank}"


def start_rank_agent(ctx: RankKV, spec: RankAgentSpec) -> RankAgentInfo | None:
    """run_on_ranks target: build rank ctx.rank's agent on its shard and serve it; None on rank 0, whose agent the
    worker builds itself on `engine.kv_cache`. The server is kept in the rank's state (by agent name) for as long
    as the rank lives."""
    if ctx.rank == 0:
        return None
    name = rank_agent_name(spec.worker, ctx.rank)
    old = ctx.state.pop(("agent_server", name), None)  # the same agent started again replaces the old one
    if old is not None:
        old.close()
    agent = create_agent(spec.backend, name, ctx.kv_cache, **spec.options)
    server = AgentServer(agent, spec.authkey)
    ctx.state[("agent_server", name)] = server
    log.info("rank %d: KV transfer agent %s (%s) on its shard %s", ctx.rank, agent.name, spec.backend,
             tuple(ctx.kv_cache.shape))
    return RankAgentInfo(ctx.rank, agent.name, agent.metadata(), server.address)


class AgentServer:
    """Answers rank 0's calls on this rank's agent (module docstring)."""

    def __init__(self, agent: KVTransferAgent, authkey: bytes) -> None:
        self.agent = agent
        self._listener = Listener(("127.0.0.1", 0), authkey=authkey)
        self.address: tuple[str, int] = self._listener.address
        self._handles: dict[int, TransferHandle] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, name=f"kv-rank-agent-{agent.name}", daemon=True).start()
        threading.Thread(target=self._drop_notifications, name="kv-rank-notifs", daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self._listener.accept()
            except OSError:
                return  # the listener was closed
            except Exception:  # noqa: BLE001 - a bad handshake (wrong authkey) ends that connection only
                continue
            threading.Thread(target=self._serve, args=(conn,), name="kv-rank-call", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    op, args = conn.recv()
                except (EOFError, OSError):
                    return
                try:
                    reply: tuple[str, Any] = ("ok", self._call(op, args))
                except TransferError as e:
                    reply = ("transfer_error", str(e))
                except Exception as e:  # noqa: BLE001 - the caller gets it, this rank goes on
                    reply = ("error", repr(e))
                try:
                    conn.send(reply)
                except OSError:
                    return

    def _call(self, op: str, args: tuple[Any, ...]) -> Any:
        a = self.agent
        if op == "start_read":
            h = a.start_read(*args)
            with self._lock:
                hid = next(self._ids)
                self._handles[hid] = h
            return hid, h.nbytes
        if op == "wait":
            hid, timeout_s = args
            h = self._handles[hid]
            return a.wait(h, timeout_s).value, h.error
        if op == "release":
            h = self._handles.get(args[0])
            if h is not None:
                a.release(h)  # TransferError: kept, so that a later release can try again
                with self._lock:
                    self._handles.pop(args[0], None)
            return None
        if op == "add_remote":
            return a.add_remote(*args)
        if op == "close":
            return self.close()
        raise ValueError(f"unknown call {op!r}")

    def _drop_notifications(self) -> None:
        while not self._stop.wait(NOTIFICATION_DROP_S):
            with contextlib.suppress(Exception):
                self.agent.notifications()

    def close(self) -> None:
        """Stop serving and close the agent (its reads released first; TransferError if one cannot be stopped)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.agent.close()
