"""The KV transfer interface: one agent per worker process, reading KV-cache blocks from peer agents.

Memory model. A worker's KV cache is one contiguous tensor of shape
[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]; block `b` is the byte range
`[data_ptr + b * block_bytes, data_ptr + (b + 1) * block_bytes)`, and within it layer `l` is the contiguous
range of `layer_bytes = block_bytes / num_layers` at offset `l * layer_bytes`. An agent registers the whole
tensor once (its "pool"). A read moves whole blocks, or a range of layers of each block (`layers=(l0, l1)`:
layer-wise streaming pulls each layer group as soon as the prefill has written it), and between tensor-parallel
shards of different widths a range of KV heads (`heads=(remote heads, local heads)`, kvtransfer/parts.py). The
decode side initiates: it READs a prefill agent's blocks into its own blocks.

Ownership rules (every backend guarantees them; callers rely on them):
- From `start_read()` until `release()` returns, the LOCAL blocks of the read belong to the transfer. The
  caller must not free, reuse or read them; the backend may write into them at any moment.
- `release()` must be called for every handle, on every path (done, failed, timed out, aborted). After it
  returns, no further write from that transfer can land in those local blocks; only then may the caller free
  or reuse them. If the read is still PENDING, `release()` cancels it and waits, up to the agent's
  `release_timeout_s`, until the in-flight write has stopped. If it cannot confirm that in time it raises
  `TransferError`: the blocks must then be treated as still owned by the transfer (leak, never reuse).
- The REMOTE blocks belong to the peer. The peer must keep them intact until it sees the read's tag in its
  own `notifications()` (the reader completed) or until its own lease on them expires. A read that races
  with the peer freeing its blocks copies garbage but never corrupts memory that is not part of a pool.
- A tag is reported by the peer's `notifications()` only for a read that completed in full.
- `start_read()` does not order the read after work the caller has queued on its own CUDA streams (a GPU
  backend copies on a stream of its own, at once). So when `start_read()` is called, no queued kernel may still
  read or write the local blocks. The engine guarantees it: it frees blocks only between steps, and its
  lookahead fence waits for a queued guess that wrote a freed block's request before those blocks can be reused.

Threading: all methods may be called from any thread. `poll()` and `wait()` never raise for transfer errors: a
broken connection, a refused read or a backend error all end as `TransferStatus.FAILED` (see `handle.error`).
`wait()` blocks only its own thread; it may run while other threads poll, wait on or release the same handle,
and it returns soon after another thread's `release()` of that handle returns.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from kvtransfer.faults import FaultInjector
from kvtransfer.parts import HeadRanges, block_runs

DEFAULT_RELEASE_TIMEOUT_S = 5.0
WAIT_POLL_S = 0.0002  # period of the default _wait(): the latency it adds to a read is at most about this


class LayoutMismatchError(ValueError):
    """Two KV caches cannot exchange blocks: some layout field differs."""


class TransferError(RuntimeError):
    """A transfer could not be completed or stopped (for example release() ran past its deadline)."""


class BackendUnavailableError(ImportError):
    """The backend's library is not installed in this environment."""


class TransferStatus(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class KVLayout:
    """What two KV caches must agree on, field for field, before any block moves between them."""

    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_bytes: int

    @classmethod
    def from_cache(cls, kv_cache: torch.Tensor) -> KVLayout:
        if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
            raise ValueError(f"kv_cache must be [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], "
                             f"got shape {tuple(kv_cache.shape)}")
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous: each block is moved as one byte range")
        _, num_layers, _, block_size, num_kv_heads, head_dim = (int(s) for s in kv_cache.shape)
        return cls(block_size=block_size, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   dtype=str(kv_cache.dtype).removeprefix("torch."),
                   block_bytes=kv_cache[0].numel() * kv_cache.element_size())

    def check_compatible(self, other: KVLayout) -> None:
        """Raise LayoutMismatchError naming every differing field with both values (this one first)."""
        diffs = [f"{f.name}: {getattr(self, f.name)!r} here vs {getattr(other, f.name)!r} there"
                 for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
        if diffs:
            raise LayoutMismatchError("KV layout mismatch (must match exactly): " + "; ".join(diffs))

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer of one block (its K and V), contiguous within the block."""
        return self.block_bytes // self.num_layers

    def byte_range(self, layers: tuple[int, int] | None) -> tuple[int, int]:
        """(offset in a block, length) of a layer range; the whole block for None. ValueError if out of range."""
        if layers is None:
            return 0, self.block_bytes
        l0, l1 = layers
        if not 0 <= l0 < l1 <= self.num_layers:
            raise ValueError(f"layer range {layers} is not within [0, {self.num_layers})")
        return l0 * self.layer_bytes, (l1 - l0) * self.layer_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVLayout:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(d)
        if missing:
            raise ValueError(f"KV layout lacks {sorted(missing)}")
        return cls(**{k: (str(d[k]) if k == "dtype" else int(d[k])) for k in names})


@dataclass(eq=False)
class TransferHandle:
    """One READ of `remote_blocks` (peer's ids) into `local_blocks` (ours), pairwise in that order.

    Both are read-only 1-D int64 numpy arrays of equal length, checked by start_read() (see block_id_array);
    backends that need Python ints take `.tolist()`."""

    tag: str
    remote: str
    remote_blocks: np.ndarray
    local_blocks: np.ndarray
    nbytes: int
    layers: tuple[int, int] | None = None  # the layer range read of every block; None: whole blocks
    heads: HeadRanges | None = None  # (remote shard's heads, local shard's heads); None: whole shards
    status: TransferStatus = TransferStatus.PENDING
    error: str | None = None
    fault: str | None = None
    released: bool = False
    started_at: float = field(default_factory=time.monotonic)
    state: Any = field(default=None, repr=False)  # backend-private
    release_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def block_id_array(ids: Sequence[int] | np.ndarray, num_blocks: int | None, side: str, *,
                   unique: bool = False) -> np.ndarray:
    """`ids` as a read-only 1-D int64 array, checked: integers in [0, num_blocks) ([0, 2**63) for None, a pool
    size not known here), all distinct if `unique`; ValueError otherwise. Vectorised: it runs per read, per id."""
    # Always a copy: the caller may reuse its own array while the read runs, and a backend may read the ids
    # late (on its copy thread), so they must not change after start_read().
    arr = np.array(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):  # kind "b" (bools) and floats refused too
        raise ValueError(f"{side} block ids must be a flat sequence of integers, got {arr.dtype} of shape {arr.shape}")
    top = num_blocks if num_blocks is not None else 2**63  # int64 ids: the cast below must not wrap
    # Compared as Python ints: exact for uint64 ids past 2**63 too.
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= top):
        bad = [b for b in arr.tolist() if not 0 <= b < top]
        raise ValueError(f"{side} block ids out of range [0, {top}): {bad[:8]}")
    arr = arr.astype(np.int64, copy=False)
    if unique and arr.size > 1:
        ordered = np.sort(arr)
        if (ordered[1:] == ordered[:-1]).any():
            raise ValueError(f"{side} block ids repeat: two writes would race on one block")
    arr.flags.writeable = False
    return arr


class NotificationInbox:
    """Tags of reads peers finished on our blocks, pushed from transfer threads, drained by `notifications()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tags: list[str] = []

    def push(self, tag: str) -> None:
        with self._lock:
            self._tags.append(tag)

    def drain(self) -> list[str]:
        with self._lock:
            out, self._tags = self._tags, []
        return out


def parse_json_metadata(metadata: bytes, backend: str) -> dict[str, Any]:
    """A peer's JSON metadata for `backend`; ValueError if it is not that."""
    try:
        md = json.loads(metadata)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not {backend} metadata: {e}") from None
    if not isinstance(md, dict) or md.get("backend") != backend:
        raise ValueError(f"not {backend} metadata")
    return md


class KVTransferAgent(ABC):
    """A worker's endpoint: registers its KV pool, serves peers' reads of it, reads peers' blocks into it.

    Options common to every backend: `fault` (None | "fail" | "hang", test-only fault injection on reads
    this agent starts) and `release_timeout_s` (deadline of `release()` for a PENDING read).
    """

    backend: ClassVar[str]

    def __init__(self, name: str, kv_cache: torch.Tensor, *, fault: str | None = None,
                 release_timeout_s: float = DEFAULT_RELEASE_TIMEOUT_S) -> None:
        self.name = name
        self.kv_cache = kv_cache
        self.layout = KVLayout.from_cache(kv_cache)
        self.num_blocks = int(kv_cache.shape[0])
        self.faults = FaultInjector(fault)
        self.release_timeout_s = float(release_timeout_s)
        self._lock = threading.Lock()  # guards handle status transitions, _active, _bytes_moved
        self._active: set[TransferHandle] = set()
        self._bytes_moved = 0
        self._closed = False
        self._backend_closed = False

    @classmethod
    def is_available(cls) -> bool:
        """Whether this backend's library can be used here."""
        return True

    @property
    def bytes_moved(self) -> int:
        """Bytes written into this agent's blocks by reads it started that completed."""
        return self._bytes_moved

    @abstractmethod
    def metadata(self) -> bytes:
        """What a peer passes to its add_remote() to reach this agent."""

    @abstractmethod
    def add_remote(self, name: str, metadata: bytes) -> None:
        """Make the peer reachable as `name`; adding the same peer again is a no-op."""

    def expect_read(self, tag: str, until: float) -> None:  # noqa: B027 - a no-op unless a backend needs it
        """A peer may read our blocks under `tag` until monotonic time `until` (a lease): a backend whose reads
        need this process's progress keeps it up until the read's notification or `until`; an `until` already past
        withdraws the tag (its blocks were freed). Nothing to do here."""

    @abstractmethod
    def notifications(self) -> list[str]:
        """Tags of reads that peers completed against our blocks since the last call."""

    @abstractmethod
    def _remote_num_blocks(self, remote: str) -> int | None:
        """The peer's pool size if known here (None: the peer checks ids itself); unknown peer -> ValueError."""

    @abstractmethod
    def _start(self, handle: TransferHandle) -> None:
        """Begin the read without blocking; raising ends it FAILED with the error in handle.error."""

    @abstractmethod
    def _poll(self, handle: TransferHandle) -> TransferStatus:
        """DONE only once every byte is in the local blocks."""

    def _wait(self, handle: TransferHandle, timeout_s: float) -> None:
        """Block until `_poll(handle)` would not say PENDING, the handle is released, or `timeout_s` passes.

        Called only for a started read that was PENDING and unreleased when wait() looked; another thread may
        release it meanwhile. Default: poll every WAIT_POLL_S. An override may return early, or late by a
        bounded overrun it documents; wait() takes the status from poll() either way, so `_poll` must keep
        saying DONE or FAILED once it has."""
        self._poll_until(handle, time.monotonic() + timeout_s, lambda: self._poll(handle))

    @staticmethod
    def _poll_until(handle: TransferHandle, deadline: float, probe: Callable[[], TransferStatus]) -> None:
        # `released` is checked on every round: a wait must end soon after another thread's release(), or a
        # cancelled waiter's thread would stay parked on a dead handle until its whole timeout passed.
        while not handle.released and probe() is TransferStatus.PENDING:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(WAIT_POLL_S, left))

    @abstractmethod
    def _release(self, handle: TransferHandle, deadline: float) -> None:
        """Stop the read and free its resources; on return nothing writes into its local blocks any more.
        Raise TransferError if that cannot be ensured by `deadline` (time.monotonic())."""

    @abstractmethod
    def _close(self) -> None:
        """Free backend resources after every handle was released."""

    def start_read(self, remote: str, remote_blocks: Sequence[int] | np.ndarray,
                   local_blocks: Sequence[int] | np.ndarray, tag: str,
                   layers: tuple[int, int] | None = None, heads: HeadRanges | None = None) -> TransferHandle:
        """Start a non-blocking READ of `remote`'s blocks into ours (pairwise, in order), whole or only the
        layers [l0, l1) of each, of every KV head or of `heads` (the peer's shard's range into ours). The ids are
        copied: the caller may reuse its sequences at once. See the ownership rules (module docstring) for the
        local blocks."""
        if self._closed:
            raise TransferError(f"agent {self.name!r} is closed")
        local_ids = block_id_array(local_blocks, self.num_blocks, "local", unique=True)
        remote_ids = block_id_array(remote_blocks, self._remote_num_blocks(remote), "remote")
        if len(remote_ids) != len(local_ids) or not len(local_ids):
            raise ValueError(f"need equal, non-empty block lists, got {len(remote_ids)} remote "
                             f"and {len(local_ids)} local")
        layers = None if layers is None or tuple(layers) == (0, self.layout.num_layers) else (int(layers[0]),
                                                                                          int(layers[1]))
        if heads is not None:
            heads = ((int(heads[0][0]), int(heads[0][1])), (int(heads[1][0]), int(heads[1][1])))
            if heads[0][1] - heads[0][0] != heads[1][1] - heads[1][0]:
                raise ValueError(f"head ranges {heads} differ in size")
        part = block_runs(self.layout, layers, heads[1] if heads else None).nbytes
        handle = TransferHandle(tag=str(tag), remote=remote, remote_blocks=remote_ids, local_blocks=local_ids,
                                nbytes=len(local_ids) * part, layers=layers, heads=heads)
        with self._lock:
            self._active.add(handle)
        if not self.faults.intercept(handle):
            try:
                self._start(handle)
            except Exception as e:  # noqa: BLE001 - a read that cannot start is a FAILED read, not a crash
                self._finish(handle, TransferStatus.FAILED, f"start failed: {e!r}")
        return handle

    def poll(self, handle: TransferHandle) -> TransferStatus:
        """PENDING, DONE or FAILED; never raises for transfer errors."""
        if handle.status is not TransferStatus.PENDING or handle.released:
            return handle.status
        if handle.fault is not None:
            status = self.faults.status(handle)
        else:
            try:
                status = self._poll(handle)
            except Exception as e:  # noqa: BLE001 - see module docstring: errors surface as FAILED
                self._finish(handle, TransferStatus.FAILED, f"poll failed: {e!r}")
                return handle.status
        if status is not TransferStatus.PENDING:
            self._finish(handle, status, handle.error)
        return handle.status

    def wait(self, handle: TransferHandle, timeout_s: float) -> TransferStatus:
        """Block until the read is no longer PENDING or `timeout_s` (<= 0: not at all) has passed; return what
        poll() then returns (PENDING on a timeout). Never raises for transfer errors, and a read that ends here
        is counted once, however many threads wait on or poll it."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        if handle.status is TransferStatus.PENDING and not handle.released:
            try:
                if handle.fault is not None:  # nothing was started: only release() ends a faked read
                    self._poll_until(handle, deadline, lambda: self.faults.status(handle))
                else:
                    self._wait(handle, max(0.0, deadline - time.monotonic()))
            except Exception as e:  # noqa: BLE001 - see module docstring: errors surface as FAILED
                self._finish(handle, TransferStatus.FAILED, f"wait failed: {e!r}")
        return self.poll(handle)

    def _finish(self, handle: TransferHandle, status: TransferStatus, error: str | None) -> None:
        with self._lock:
            # Only the first transition counts, so concurrent pollers cannot double-count bytes.
            if handle.status is not TransferStatus.PENDING:
                return
            handle.status, handle.error = status, error
            if status is TransferStatus.DONE:
                self._bytes_moved += handle.nbytes

    def release(self, handle: TransferHandle) -> None:
        """Cancel if still PENDING and free the transfer; afterwards no write lands in its local blocks.

        Raises TransferError if that cannot be ensured within `release_timeout_s`; the blocks then stay owned
        by the transfer and release() may be called again."""
        # A second, concurrent release() waits for the first: returning early would let its caller free
        # blocks that a write may still reach.
        if not handle.release_lock.acquire(timeout=self.release_timeout_s + 1.0):
            raise TransferError(f"another release() of read {handle.tag!r} did not finish in time")
        try:
            if handle.released:
                return
            if handle.fault is None:
                self._release(handle, time.monotonic() + self.release_timeout_s)
            with self._lock:
                handle.released = True
                self._active.discard(handle)
                if handle.status is TransferStatus.PENDING:
                    handle.status, handle.error = TransferStatus.FAILED, "released before completion"
        finally:
            handle.release_lock.release()

    def close(self) -> None:
        """Release every outstanding read, stop serving, free backend resources. Idempotent.

        If some read cannot be stopped, raises TransferError and keeps the pool registered, so that no
        in-flight write can reach memory that was handed back."""
        self._closed = True
        with self._lock:
            active = list(self._active)
        stuck = []
        for handle in active:
            try:
                self.release(handle)
            except TransferError:
                stuck.append(handle.tag)
        if stuck:
            raise TransferError(f"agent {self.name!r} could not stop reads {stuck}; not closing its pool")
        with self._lock:
            if self._backend_closed:
                return
            self._backend_closed = True
        self._close()

    def __enter__(self) -> KVTransferAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
