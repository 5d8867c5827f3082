"""NIXL backend ("nixl"): one-sided READs over UCX, straight from the peer's registered KV pool into ours.

The whole kv_cache tensor is registered once ("DRAM" for CPU tensors, "VRAM" for CUDA ones). Every block is
one NIXL descriptor (addr, block_bytes, device_id); the local and each remote list are prepared once
(prep_xfer_dlist) and a read selects blocks by index (make_prepped_xfer). NIXL delivers the read's tag to
the peer as a notification when the read completes. A head range between tensor-parallel shards of different
widths (kvtransfer/parts.py) is one descriptor per run on each side - per (block, layer, K/V, token) where a side's
shard has more heads than the range - built for the read (initialize_xfer), not prepared.

metadata() is self-describing, never pickle: b"KVNIXL1\\n", a 4-byte big-endian length, a JSON header (NIXL
agent name, pool base address, block count, block bytes, memory type, device id, KVLayout), then the NIXL
agent metadata bytes. add_remote() checks the layouts agree and builds the peer's descriptors from the header.

Cancel: NIXL's UCX plugin "cancels" an in-flight request by dropping it, which does not stop a one-sided
get already issued to the NIC or the shared-memory transport. So release() of a PENDING read waits, up to
its deadline, until NIXL reports the read DONE or ERR, and only then frees the handle; a read still in
progress at the deadline raises TransferError (the caller must not reuse those blocks).

The NIXL Python package is imported lazily: without it `import kvtransfer` still works and
create_agent("nixl", ...) raises BackendUnavailableError saying how to install it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import struct
import threading
import time
from types import ModuleType
from typing import Any

import numpy as np
import torch

from kvtransfer._memory import BlockMemory
from kvtransfer.base import (
    DEFAULT_RELEASE_TIMEOUT_S,
    BackendUnavailableError,
    KVLayout,
    KVTransferAgent,
    NotificationInbox,
    TransferError,
    TransferHandle,
    TransferStatus,
)
from kvtransfer.parts import BlockRuns, block_runs, check_mappable, check_shards, pair_runs
from kvtransfer.registry import register_backend

MAGIC = b"KVNIXL1\n"
_LEN = struct.Struct("!I")
INSTALL_HINT = "install it with: python -m pip install nixl-cu12"
# The "nixl" meta package re-exports whichever CUDA build is installed; nixl-cu12 alone installs nixl_cu12.
_API_MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")
POLL_INTERVAL_S = 0.0005
PROGRESS_INTERVAL_S = 0.001  # the Python progress poller's period (progress_thread=False) while reads are expected


def load_nixl_api() -> ModuleType:
    errors = []
    for name in _API_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise BackendUnavailableError(f"the nixl KV transfer backend needs the NIXL Python package; {INSTALL_HINT} "
                                  f"({'; '.join(errors)})")


def block_descs(base_addr: int, num_blocks: int, block_bytes: int, device_id: int,
                part: tuple[int, int] | None = None) -> np.ndarray:
    """One (addr, len, device) row per block (or per block's `part` = (offset, length)), as NIXL's Nx3 array."""
    offset, length = part or (0, block_bytes)
    descs = np.empty((num_blocks, 3), dtype=np.uint64)
    descs[:, 0] = base_addr + offset + np.arange(num_blocks, dtype=np.uint64) * np.uint64(block_bytes)
    descs[:, 1] = length
    descs[:, 2] = device_id
    return descs


def _run_descs(runs: BlockRuns, base_addr: int, block_bytes: int, device_id: int, blocks: np.ndarray) -> np.ndarray:
    """One (addr, len, device) row per run of every block, as NIXL's Nx3 array."""
    addrs = runs.addresses(base_addr, block_bytes, blocks)
    descs = np.empty((len(addrs), 3), dtype=np.uint64)
    descs[:, 0], descs[:, 1], descs[:, 2] = addrs, runs.length, device_id
    return descs


def encode_metadata(header: dict[str, Any], agent_md: bytes) -> bytes:
    head = json.dumps(header).encode()
    return MAGIC + _LEN.pack(len(head)) + head + agent_md


def decode_metadata(metadata: bytes) -> tuple[dict[str, Any], bytes]:
    if not metadata.startswith(MAGIC) or len(metadata) < len(MAGIC) + _LEN.size:
        raise ValueError("not nixl-backend metadata (bad magic)")
    (size,) = _LEN.unpack_from(metadata, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    try:
        header = json.loads(metadata[start:start + size])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"nixl metadata header is not JSON: {e}") from None
    return header, metadata[start + size:]


@dataclasses.dataclass
class _Remote:
    nixl_name: str
    num_blocks: int
    dlist: Any  # nixl_prepped_dlist_handle of whole blocks
    digest: str
    header: dict[str, Any] = dataclasses.field(default_factory=dict)  # from its metadata: where its pool is
    parts: dict[tuple[int, int], Any] = dataclasses.field(default_factory=dict)  # layer range -> prepped dlist


@dataclasses.dataclass
class _Xfer:
    handle: Any  # nixl_xfer_handle
    state: str  # last NIXL state: "PROC", "DONE" or "ERR"
    freed: bool = False  # set under the agent's NIXL lock: a freed handle is never touched again


@register_backend("nixl")
class NixlAgent(KVTransferAgent):
    """`progress_thread`: True runs NIXL's own progress thread, which spins (sched_yield) and so takes a core;
    False drives UCX progress from a Python thread that polls every `PROGRESS_INTERVAL_S` and sleeps in
    between, leaving the cores to the engine; None picks True for a GPU pool, False for a CPU pool (whose
    engine needs the cores). Either way a peer's reads of our blocks progress while this process is busy
    elsewhere (a one-sided read over TCP needs the owner's progress). `idle_progress_s` (Python poller only):
    the poller's period while no read of ours is expected (`expect_read`); None polls every
    `PROGRESS_INTERVAL_S` always."""

    def __init__(self, name: str, kv_cache: torch.Tensor, *, nixl_backends: tuple[str, ...] = ("UCX",),
                 progress_thread: bool | None = None, idle_progress_s: float | None = None,
                 fault: str | None = None, release_timeout_s: float = DEFAULT_RELEASE_TIMEOUT_S) -> None:
        api = load_nixl_api()
        super().__init__(name, kv_cache, fault=fault, release_timeout_s=release_timeout_s)
        self.memory = BlockMemory(kv_cache, self.layout.block_bytes)
        # The NIXL agent is built without thread sync; every call into it holds this lock.
        self._nx_lock = threading.Lock()
        if progress_thread is None:
            progress_thread = kv_cache.is_cuda
        config = api.nixl_agent_config(enable_prog_thread=progress_thread, backends=list(nixl_backends))
        self._agent = api.nixl_agent(name, config)
        self._inbox = NotificationInbox()  # notifications the progress poller collected
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by expect_read and close: the poller looks again at once
        self._idle_s = idle_progress_s
        # tag -> monotonic deadline: reads of our blocks that peers may be making now (expect_read). Written from
        # any thread, pruned by the poller, both under _expected_lock (a prune must not drop a tag re-expected
        # after it read the old deadline).
        self._expected: dict[str, float] = {}
        self._expected_lock = threading.Lock()
        self._poller: threading.Thread | None = None
        missing = [b for b in nixl_backends if b not in self._agent.backends]
        if missing:
            raise TransferError(f"NIXL could not create backend(s) {missing}; plugins here: "
                                f"{self._agent.get_plugin_list()}")
        self._reg = self._agent.register_memory(kv_cache)
        self._local_dlist = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", self._descs(), self.memory.mem_type)
        # Layer-range reads use descriptor lists of that range of every block, prepared on first use and kept.
        self._local_parts: dict[tuple[int, int], Any] = {}
        self._remotes: dict[str, _Remote] = {}
        if not progress_thread:
            self._poller = threading.Thread(target=self._progress, name=f"nixl-progress-{name}", daemon=True)
            self._poller.start()

    def expect_read(self, tag: str, until: float) -> None:
        """A peer may read our blocks under `tag` until monotonic `until`: progress every PROGRESS_INTERVAL_S until
        the read's notification arrives or `until` passes (with `idle_progress_s` set, the poller slows down to it
        otherwise)."""
        with self._expected_lock:
            self._expected[tag] = until
        self._wake.set()

    def _period(self) -> float:
        if self._idle_s is None:
            return PROGRESS_INTERVAL_S
        now = time.monotonic()
        with self._expected_lock:
            for tag in [t for t, until in self._expected.items() if until <= now]:
                del self._expected[tag]
            return PROGRESS_INTERVAL_S if self._expected else self._idle_s

    def _progress(self) -> None:
        """Reading notifications makes the UCX worker progress; what it reads waits in the inbox. A poller waking
        every millisecond costs a CPU engine's threads (each wake-up preempts one of them, and the others wait for
        it at their next barrier): with `idle_progress_s` it wakes that often only while a read is expected."""
        while not self._stop.is_set():
            self._wake.wait(self._period())
            self._wake.clear()
            for tag in self._read_notifs():
                self._inbox.push(tag)

    def _read_nixl_notifs(self) -> list[str]:
        with self._nx_lock:
            notifs = self._agent.get_new_notifs()
        return [m.decode(errors="replace") for msgs in notifs.values() for m in msgs]

    @classmethod
    def is_available(cls) -> bool:
        try:
            load_nixl_api()
        except BackendUnavailableError:
            return False
        return True

    def _descs(self, part: tuple[int, int] | None = None) -> np.ndarray:
        m = self.memory
        return block_descs(m.base_addr, self.num_blocks, self.layout.block_bytes, m.device_id, part)

    def _dlists(self, remote: _Remote, layers: tuple[int, int] | None) -> tuple[Any, Any]:
        """(local, remote) prepared descriptor lists for whole blocks or a layer range. Call holding _nx_lock."""
        if layers is None:
            return self._local_dlist, remote.dlist
        part = self.layout.byte_range(layers)
        if layers not in self._local_parts:
            self._local_parts[layers] = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", self._descs(part),
                                                                    self.memory.mem_type)
        if layers not in remote.parts:
            h = remote.header
            descs = block_descs(int(h["base_addr"]), int(h["num_blocks"]), int(h["block_bytes"]), int(h["device_id"]),
                                part)
            remote.parts[layers] = self._agent.prep_xfer_dlist(remote.nixl_name, descs, str(h["mem_type"]))
        return self._local_parts[layers], remote.parts[layers]

    def metadata(self) -> bytes:
        m = self.memory
        header = {"backend": "nixl", "name": self.name, "base_addr": m.base_addr, "num_blocks": self.num_blocks,
                  "block_bytes": self.layout.block_bytes, "mem_type": m.mem_type, "device_id": m.device_id,
                  "layout": self.layout.to_dict()}
        with self._nx_lock:
            agent_md = self._agent.get_agent_metadata()
        return encode_metadata(header, agent_md)

    def add_remote(self, name: str, metadata: bytes) -> None:
        header, agent_md = decode_metadata(metadata)
        check_shards(self.layout, KVLayout.from_dict(header.get("layout") or {}))  # each read checks its heads
        digest = hashlib.sha256(metadata).hexdigest()
        old = self._remotes.get(name)
        if old is not None and old.digest == digest:
            return
        descs = block_descs(int(header["base_addr"]), int(header["num_blocks"]), int(header["block_bytes"]),
                            int(header["device_id"]))
        with self._nx_lock:
            if old is not None:  # the peer restarted: forget its old registration first
                for d in (old.dlist, *old.parts.values()):
                    d.release()
                self._agent.remove_remote_agent(old.nixl_name)
            loaded = self._agent.add_remote_agent(agent_md)
            nixl_name = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
            dlist = self._agent.prep_xfer_dlist(nixl_name, descs, str(header["mem_type"]))
        self._remotes[name] = _Remote(nixl_name, int(header["num_blocks"]), dlist, digest, header)

    def notifications(self) -> list[str]:
        return self._inbox.drain() + self._read_notifs()

    def _read_notifs(self) -> list[str]:
        """New notifications from the NIXL agent (reading them progresses UCX); their reads are no longer expected."""
        tags = self._read_nixl_notifs()
        with self._expected_lock:
            for tag in tags:
                self._expected.pop(tag, None)
        return tags

    def _remote_num_blocks(self, remote: str) -> int | None:
        if remote not in self._remotes:
            raise ValueError(f"unknown remote {remote!r}: call add_remote() first")
        return self._remotes[remote].num_blocks

    def _start(self, handle: TransferHandle) -> None:
        remote = self._remotes[handle.remote]
        remote_layout = KVLayout.from_dict(remote.header.get("layout") or {})
        check_mappable(self.layout, remote_layout, handle.heads)
        if handle.heads is not None:
            self._start_heads(handle, remote, remote_layout)
            return
        with self._nx_lock:
            local_dlist, remote_dlist = self._dlists(remote, handle.layers)
            xh = self._agent.make_prepped_xfer("READ", local_dlist, handle.local_blocks.tolist(), remote_dlist,
                                               handle.remote_blocks.tolist(), notif_msg=handle.tag.encode())
            handle.state = _Xfer(xh, "PROC")
            handle.state.state = self._agent.transfer(xh)
        if handle.state.state == "ERR":
            raise TransferError("NIXL refused to post the read")

    def _start_heads(self, handle: TransferHandle, remote: _Remote, remote_layout: KVLayout) -> None:
        """A head range: one descriptor per run on both sides, paired run for run (parts.pair_runs)."""
        assert handle.heads is not None
        theirs, ours = pair_runs(block_runs(remote_layout, handle.layers, handle.heads[0]),
                                 block_runs(self.layout, handle.layers, handle.heads[1]))
        h, m = remote.header, self.memory
        remote_descs = _run_descs(theirs, int(h["base_addr"]), int(h["block_bytes"]), int(h["device_id"]),
                                  handle.remote_blocks)
        local_descs = _run_descs(ours, m.base_addr, self.layout.block_bytes, m.device_id, handle.local_blocks)
        with self._nx_lock:
            xh = self._agent.initialize_xfer("READ", self._agent.get_xfer_descs(local_descs, m.mem_type),
                                             self._agent.get_xfer_descs(remote_descs, str(h["mem_type"])),
                                             remote.nixl_name, handle.tag.encode())
            handle.state = _Xfer(xh, "PROC")
            handle.state.state = self._agent.transfer(xh)
        if handle.state.state == "ERR":
            raise TransferError("NIXL refused to post the read")

    def _poll(self, handle: TransferHandle) -> TransferStatus:
        xfer: _Xfer = handle.state
        with self._nx_lock:
            if xfer.state == "PROC" and not xfer.freed:
                xfer.state = self._agent.check_xfer_state(xfer.handle)
        if xfer.state == "ERR":
            handle.error = "NIXL reported the read failed"
            return TransferStatus.FAILED
        return TransferStatus.DONE if xfer.state == "DONE" else TransferStatus.PENDING

    def _release(self, handle: TransferHandle, deadline: float) -> None:
        xfer: _Xfer | None = handle.state
        if xfer is None:
            return
        while True:
            with self._nx_lock:
                if xfer.state == "PROC" and not xfer.freed:
                    xfer.state = self._agent.check_xfer_state(xfer.handle)
            if xfer.state != "PROC":
                break
            if time.monotonic() >= deadline:
                raise TransferError(f"NIXL read {handle.tag!r} still in flight at its release deadline; its local "
                                    "blocks may still be written and must not be reused")
            time.sleep(POLL_INTERVAL_S)
        with self._nx_lock:
            if not xfer.freed:
                xfer.handle.release()
                xfer.freed = True

    def _close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._poller is not None:
            self._poller.join()
        with self._nx_lock:
            for remote in self._remotes.values():
                for d in (remote.dlist, *remote.parts.values()):
                    d.release()
                self._agent.remove_remote_agent(remote.nixl_name)
            self._remotes.clear()
            for d in (self._local_dlist, *self._local_parts.values()):
                d.release()
            self._agent.deregister_memory(self._reg)
