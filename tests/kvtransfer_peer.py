"""Helpers for tests/test_kvtransfer.py (no tests here): KV caches of known contents, and a peer agent that
lives either in this process ("local" backend) or in a spawned child process (tcp, nixl), driven over a pipe.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from kvtransfer import KVTransferAgent, LocalFabric, TransferStatus, create_agent

NUM_BLOCKS = 48
CMD_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0


def make_cache(seed: int | None, num_blocks: int = NUM_BLOCKS, block_size: int = 8,
               dtype: torch.dtype = torch.float16, device: str = "cpu") -> torch.Tensor:
    """[num_blocks, layers=2, 2, block_size, heads=2, head_dim=32]: random from `seed`, or zeros for None."""
    shape = (num_blocks, 2, 2, block_size, 2, 32)
    if seed is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


# Test variants of a backend: the name tests use -> (registered backend, agent options).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"nixl-thread": ("nixl", {"progress_thread": True})}


def make_agent(backend: str, name: str, kv_cache: torch.Tensor, fabric: LocalFabric | None = None,
               **options: Any) -> KVTransferAgent:
    if backend == "local":
        options["fabric"] = fabric
    backend, extra = VARIANTS.get(backend, (backend, {}))
    return create_agent(backend, name, kv_cache, **extra, **options)


def wait_notifications(agent: KVTransferAgent, count: int, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += agent.notifications()
        time.sleep(0.002)
    return got + agent.notifications()


def wait_done(agent: KVTransferAgent, handles: list[Any], timeout: float = 20.0) -> list[TransferStatus]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = [agent.poll(h) for h in handles]
        if TransferStatus.PENDING not in statuses:
            return statuses
        time.sleep(0.001)
    return [agent.poll(h) for h in handles]


def handle_command(agent: KVTransferAgent, op: str, args: tuple[Any, ...]) -> Any:
    if op == "ping":
        return agent.name
    if op == "metadata":
        return agent.metadata()
    if op == "add_remote":
        return agent.add_remote(*args)
    if op == "read":  # (remote, remote_blocks, local_blocks, tag): read, release, report what landed
        remote, remote_blocks, local_blocks, tag = args
        handle = agent.start_read(remote, remote_blocks, local_blocks, tag=tag)
        (status,) = wait_done(agent, [handle])
        agent.release(handle)
        return status.name, handle.error, agent.kv_cache[list(local_blocks)].cpu()
    if op == "notifications":
        return wait_notifications(agent, *args)
    if op == "bytes_moved":
        return agent.bytes_moved
    if op == "close":
        return agent.close()
    raise ValueError(f"unknown peer command {op!r}")


def _child_main(conn: Connection, backend: str, name: str, seed: int, device: str) -> None:
    try:
        agent = make_agent(backend, name, make_cache(seed, device=device))
    except Exception as e:  # noqa: BLE001 - reported as the answer to the parent's first command
        conn.send(("err", f"peer could not create its agent: {e!r}"))
        return
    try:
        # Every wait has a deadline: a parent that vanished leaves this loop within CMD_TIMEOUT_S * 4.
        while conn.poll(CMD_TIMEOUT_S * 4):
            op, args = conn.recv()
            try:
                conn.send(("ok", handle_command(agent, op, args)))
            except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the test
                conn.send(("err", repr(e)))
            if op == "close":
                return
    finally:
        agent.close()


class InProcessPeer:
    """The peer for the local backend: an agent on the same fabric, in this process."""

    def __init__(self, backend: str, name: str, seed: int, fabric: LocalFabric, device: str = "cpu") -> None:
        self.agent = make_agent(backend, name, make_cache(seed, device=device), fabric=fabric)

    def call(self, op: str, *args: Any, timeout: float = CMD_TIMEOUT_S) -> Any:
        return handle_command(self.agent, op, args)

    def close(self) -> None:
        self.agent.close()


class ProcessPeer:
    """The peer for tcp and nixl: an agent in a spawned process, which owns a random kv_cache from `seed`."""

    def __init__(self, backend: str, name: str, seed: int, device: str = "cpu") -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child, backend, name, seed, device), daemon=True)
        self._proc.start()
        child.close()
        self.call("ping", timeout=START_TIMEOUT_S)

    def call(self, op: str, *args: Any, timeout: float = CMD_TIMEOUT_S) -> Any:
        self._conn.send((op, args))
        if not self._conn.poll(timeout):
            raise TimeoutError(f"peer did not answer {op!r} within {timeout}s")
        kind, value = self._conn.recv()
        if kind == "err":
            raise RuntimeError(f"peer failed {op!r}: {value}")
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError, TimeoutError, RuntimeError):
            self.call("close", timeout=10)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()
