"""In-process backend ("local"): agents of one process find each other through a LocalFabric.

Pass the same `fabric=LocalFabric()` to every agent that should see the others. metadata() is a small JSON
document naming the agent and its fabric; add_remote() checks both layouts agree. A read copies block by
block on a daemon thread (a head range of each, between tensor-parallel shards of different widths); release() of a
PENDING read stops it between two block copies and waits, up to its deadline, for the copy in progress to end.
"""

from __future__ import annotations

import json
import threading
import uuid

import torch

from kvtransfer._threaded import BackgroundRead, ThreadedReads
from kvtransfer.base import (
    DEFAULT_RELEASE_TIMEOUT_S,
    KVLayout,
    KVTransferAgent,
    NotificationInbox,
    TransferError,
    TransferHandle,
    parse_json_metadata,
)
from kvtransfer.parts import check_mappable, check_shards
from kvtransfer.registry import register_backend


class LocalFabric:
    """A namespace of in-process agents, by name. Owns no memory: agents register and leave."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._agents: dict[str, LocalAgent] = {}

    def join(self, agent: LocalAgent) -> None:
        with self._lock:
            if agent.name in self._agents:
                raise ValueError(f"an agent named {agent.name!r} is already on this fabric")
            self._agents[agent.name] = agent

    def leave(self, agent: LocalAgent) -> None:
        with self._lock:
            if self._agents.get(agent.name) is agent:
                del self._agents[agent.name]

    def lookup(self, name: str) -> LocalAgent | None:
        with self._lock:
            return self._agents.get(name)


@register_backend("local")
class LocalAgent(ThreadedReads, KVTransferAgent):
    def __init__(self, name: str, kv_cache: torch.Tensor, *, fabric: LocalFabric, fault: str | None = None,
                 release_timeout_s: float = DEFAULT_RELEASE_TIMEOUT_S) -> None:
        if not isinstance(fabric, LocalFabric):
            raise TypeError("the local backend needs option fabric=LocalFabric()")
        super().__init__(name, kv_cache, fault=fault, release_timeout_s=release_timeout_s)
        self.fabric = fabric
        self._remotes: dict[str, tuple[str, int]] = {}  # label -> (agent name on the fabric, num_blocks)
        self._inbox = NotificationInbox()
        fabric.join(self)

    def metadata(self) -> bytes:
        return json.dumps({"backend": "local", "fabric": self.fabric.token, "name": self.name,
                           "num_blocks": self.num_blocks, "layout": self.layout.to_dict()}).encode()

    def add_remote(self, name: str, metadata: bytes) -> None:
        md = parse_json_metadata(metadata, "local")
        if md["fabric"] != self.fabric.token:
            raise ValueError(f"remote {name!r} is on another LocalFabric; local agents must share one")
        check_shards(self.layout, KVLayout.from_dict(md["layout"]))  # each read checks its heads fit
        self._remotes[name] = (str(md["name"]), int(md["num_blocks"]))

    def notifications(self) -> list[str]:
        return self._inbox.drain()

    def _remote_num_blocks(self, remote: str) -> int | None:
        if remote not in self._remotes:
            raise ValueError(f"unknown remote {remote!r}: call add_remote() first")
        return self._remotes[remote][1]

    def _start(self, handle: TransferHandle) -> None:
        peer = self.fabric.lookup(self._remotes[handle.remote][0])
        if peer is None:
            raise TransferError(f"remote {handle.remote!r} has left the fabric")
        check_mappable(self.layout, peer.layout, handle.heads)
        read = BackgroundRead(f"kv-local-{self.name}-{handle.tag}")
        handle.state = read
        read.start(lambda r: self._copy(r, peer, handle))

    def _copy(self, read: BackgroundRead, peer: LocalAgent, handle: TransferHandle) -> None:
        sync = self.kv_cache.is_cuda or peer.kv_cache.is_cuda
        l0, l1 = handle.layers or (0, self.layout.num_layers)
        (a, b), (c, d) = handle.heads or ((0, peer.layout.num_kv_heads), (0, self.layout.num_kv_heads))
        for src, dst in zip(handle.remote_blocks.tolist(), handle.local_blocks.tolist(), strict=True):
            with read.writing():
                self.kv_cache[dst, l0:l1, :, :, c:d].copy_(peer.kv_cache[src, l0:l1, :, :, a:b])
                if sync:  # a device copy is only queued: it must have landed before the lock is let go
                    torch.cuda.current_stream(self.kv_cache.device if self.kv_cache.is_cuda else None).synchronize()
        peer._inbox.push(handle.tag)

    def _close(self) -> None:
        self.fabric.leave(self)
