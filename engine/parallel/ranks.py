"""Rank 0's handle on the other ranks of a tensor-parallel engine: it starts their processes, joins the group
with them, sends each step, runs calls on every rank, watches for deaths and stops them.

Rank 0 is the engine's own process (the worker): it schedules, runs its shard of the model and samples. Ranks
1..N-1 are spawned processes (engine/parallel/rank.py), each talking to rank 0 over a pipe: rank 0 writes one
message per forward (engine/parallel/step.py), they answer only control calls. Tensors move only through the
group's collectives (inside the forward, and the device token ids of a step launched ahead).

Failures. A monitor thread waits on every rank's process: when one exits without being told to, it records the
failure, kills the other ranks and (NCCL) aborts the group, so a collective rank 0 is blocked in fails instead of
hanging (gloo fails it by itself: the dead peer's connection closes). From then on `check()` raises
RankFailedError: the engine's next step, and its idle deadline checks, fail, which makes the worker report
unhealthy and end its requests with an error. Every collective and every reply waits at most the configured
timeout. When rank 0 dies, the other ranks see their pipe close, or their parent gone, and exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from engine.batch import BatchSeq
from engine.config import EngineConfig
from engine.parallel import step as msg
from engine.parallel.group import RankFailedError, TPGroup, backend_for, connect, host_store, rank_device
from engine.parallel.rank import RankSpec

log = logging.getLogger(__name__)
DEAD_RANK_GRACE_S = 1.0  # how long a failed step waits to learn whether a rank died (the cause to report)


class RankProcesses:
    """Ranks 1..N-1 of one engine, seen from rank 0."""

    def __init__(self, config: EngineConfig, device: torch.device, num_blocks: int, max_model_len: int) -> None:
        size, pc = config.tensor_parallel_size, config.parallel
        self.backend = backend_for(pc.backend, device)
        self.timeout_s, self.start_timeout_s = pc.collective_timeout_s, pc.start_timeout_s
        self._failure: str | None = None
        self._closing = False
        self._signalled: list[str] = []  # ranks that a signal ended (kill -9, OOM killer): the cause of a failure
        self._store = host_store(size, pc.start_timeout_s)
        threads = max(1, (os.cpu_count() or 1) // size)
        self._procs: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns)
        try:
            for r in range(1, size):
                spec = RankSpec(r, size, self._store.port, self.backend, str(rank_device(device, r)), config,
                                num_blocks, max_model_len, threads)
                self._spawn(spec)
            self.pids = [self._expect(r, "hello", self.start_timeout_s) for r in range(1, size)]
            self.group: TPGroup = connect(0, size, self._store.port, self.backend, pc.collective_timeout_s,
                                          rank_device(device, 0), store=self._store)
        except BaseException:
            self.close()
            raise
        self.ready: list[dict[str, Any]] = []

    def _spawn(self, spec: RankSpec) -> None:
        """A fresh interpreter (`python -m engine.parallel.rank FD`), not a fork of this process (threads, CUDA,
        a gRPC server) nor a multiprocessing spawn (which re-imports the caller's __main__); the spec goes over
        its socket, and a thread waits for its exit."""
        ours, theirs = socket.socketpair()
        # Its own session: a terminal's Ctrl-C or a signal to the worker's process group goes to rank 0, which
        # decides (drain, then stop); a rank ends with its pipe or its parent.
        proc = subprocess.Popen([sys.executable, "-m", "engine.parallel.rank", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), close_fds=True, start_new_session=True)
        theirs.close()
        conn = Connection(ours.detach())
        self._procs.append(proc)
        self._conns.append(conn)
        conn.send_bytes(pickle.dumps(spec))
        threading.Thread(target=self._watch, args=(spec.rank, proc), name=f"tp-rank-{spec.rank}-monitor",
                         daemon=True).start()

    @property
    def size(self) -> int:
        return len(self._procs) + 1

    # ---- start and stop --------------------------------------------------------------------------------------
    def wait_ready(self) -> None:
        """Wait until every rank has loaded its shard (rank 0 loads its own meanwhile)."""
        self.ready = [self._expect(r, "ready", self.start_timeout_s) for r in range(1, self.size)]
        log.info("tensor parallel: %d ranks ready (%s), pids %s", self.size, self.backend, self.pids)

    def close(self) -> None:
        """Tell every rank to stop and wait for it (killing what does not stop); idempotent."""
        self._closing = True
        self._finalizer()

    # ---- what each step sends --------------------------------------------------------------------------------
    def send_step(self, seqs: list[BatchSeq], tables: np.ndarray, q: int | None, num_layers: int | None,
                  input_ids: torch.Tensor | None) -> None:
        """Tell every rank to run this forward; device token ids follow as a broadcast (in stream order)."""
        self._send(msg.encode_step(seqs, tables, q, num_layers, 0 if input_ids is None else input_ids.shape[0]))
        if input_ids is not None:
            self.group.broadcast(input_ids.contiguous())

    def send_control(self, kind: int, payload: Any = None) -> None:
        self._send(msg.encode_control(kind, payload))

    def replies(self) -> list[Any]:
        """Each rank's answer to the last call, in rank order (RuntimeError if the function raised there)."""
        out = []
        for r in range(1, self.size):
            tag, value = self._receive(r, self.timeout_s)
            if tag == "error":
                raise RuntimeError(f"rank {r}: {value}")
            out.append(value)
        return out

    @contextlib.contextmanager
    def step_guard(self) -> Iterator[None]:
        """Around anything the ranks do together: an error inside leaves them out of step, so it fails the engine."""
        self.check()
        try:
            yield
        except RankFailedError:
            raise
        except Exception as e:
            # A rank that died makes rank 0's collective fail too ("connection closed by peer"), often before the
            # rank's monitor thread has seen the exit: give it a moment, so that the failure names the cause.
            self._await_monitors(DEAD_RANK_GRACE_S)
            self._fail(f"a step failed on rank 0 ({e!r})")
            raise RankFailedError(self._failure) from e

    def check(self) -> None:
        """Raise RankFailedError if a rank has died or the ranks fell out of step."""
        if self._failure is not None:
            raise RankFailedError(self._failure)

    # ---- internals -------------------------------------------------------------------------------------------
    def _send(self, buf: bytes) -> None:
        self.check()
        for rank, conn in enumerate(self._conns, 1):
            try:
                conn.send_bytes(buf)
            except OSError as e:  # the rank died: its monitor names the exit, else the pipe names the rank
                self._await_monitors(DEAD_RANK_GRACE_S)
                self._fail(f"rank {rank}'s pipe broke ({e!r})")
                raise RankFailedError(self._failure) from e

    def _receive(self, rank: int, timeout_s: float) -> tuple[str, Any]:
        conn, deadline = self._conns[rank - 1], time.monotonic() + timeout_s
        while not conn.poll(0.05):
            if self._failure is not None or self._procs[rank - 1].poll() is not None:
                self._fail(f"rank {rank} exited with code {self._procs[rank - 1].returncode}")
                raise RankFailedError(self._failure)
            if time.monotonic() > deadline:
                self._fail(f"rank {rank} did not answer within {timeout_s:g}s")
                raise RankFailedError(self._failure)
        try:
            return pickle.loads(conn.recv_bytes())
        except (EOFError, OSError) as e:
            self._fail(f"rank {rank}'s pipe closed ({e!r})")
            raise RankFailedError(self._failure) from e

    def _expect(self, rank: int, tag: str, timeout_s: float) -> Any:
        got, value = self._receive(rank, timeout_s)
        if got != tag:
            detail = value if got == "error" else f"{got!r} instead of {tag!r}"
            self._fail(f"rank {rank} failed to start: {detail}")
            raise RankFailedError(self._failure)
        return value

    def _await_monitors(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for a monitor thread to record a rank's exit (returns at once if one has)."""
        deadline = time.monotonic() + timeout_s
        while self._failure is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        """Monitor thread of one rank: a rank that exits unasked fails the engine and takes the others down.
        One killed by a signal is named at once; one that exited on its own waits a moment first, since ranks exit
        on their own when a peer died under them (their collective broke) and the peer's monitor may not have run
        yet: the failure should name the rank that died, not the first one to notice."""
        code = proc.wait()
        if self._closing:
            return
        reason = f"rank {rank} (pid {proc.pid}) exited with code {code}"
        if code < 0:
            self._signalled.append(reason)
        else:
            deadline = time.monotonic() + DEAD_RANK_GRACE_S
            while not self._signalled and self._failure is None and time.monotonic() < deadline:
                time.sleep(0.01)
        self._fail(self._signalled[0] if self._signalled else reason)

    def _fail(self, reason: str) -> None:
        """Record the first failure; kill every rank (they cannot go on without the group) and, on NCCL, abort
        the group so that rank 0's collective in flight returns."""
        if self._failure is None:
            self._failure = reason
            log.error("tensor parallel group failed: %s", reason)
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        if self.backend == "nccl" and hasattr(self, "group"):
            self.group.abort()


def _stop(procs: list[subprocess.Popen], conns: list[Connection], grace_s: float = 10.0) -> None:
    """Stop message, then wait; kill what is still running after the grace (also at exit and on GC)."""
    stop = msg.encode_control(msg.STOP)
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send_bytes(stop)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    for conn in conns:
        conn.close()


def run_everywhere(ranks: RankProcesses, fn: Callable[..., Any], args: tuple[Any, ...],
                   local: Callable[[], Any]) -> list[Any]:
    """Send `fn(ctx, *args)` to ranks 1..N-1, run `local()` (rank 0's call) meanwhile, then collect: results
    in rank order. The replies are collected even when rank 0's call raises, so the pipes stay in step."""
    ranks.send_control(msg.CALL, (fn, args))
    try:
        mine = local()
    finally:
        others = ranks.replies()
    return [mine, *others]
