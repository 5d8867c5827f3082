"""Same-host GPU peers: map the peer's KV pool into this process with CUDA IPC, copy blocks device-to-device.

The prefill worker exports an IPC handle of its (single-allocation) KV cache; the decode worker opens it once
and a READ is a few `copy_` calls on a side stream, one per run of consecutive blocks, at device-copy speed
(or one gather-scatter kernel for scattered ids). Completion is an event on that stream: `wait()` blocks on it
rather than polling it, and since a GPU copy cannot be cancelled, `release()` waits for it too. Either wait is
bounded by the copy itself (microseconds to milliseconds) plus whatever work the caller's stream had queued
when the read started, which the side stream waits for.

There is no reverse channel: `notifications()` is always empty and the reader's completion reaches the
prefill worker as the ReleaseKV RPC (its lease is the backstop), exactly as for a failed read.
"""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import torch

from kvtransfer.base import (
    DEFAULT_RELEASE_TIMEOUT_S,
    KVLayout,
    KVTransferAgent,
    TransferError,
    TransferHandle,
    TransferStatus,
    parse_json_metadata,
)
from kvtransfer.registry import register_backend

try:
    from kvtransfer.gpu_copy import copy_blocks
except ImportError:  # triton missing: scattered reads fall back to one memcpy per run
    copy_blocks = None

_BYTES_FIELDS = (1, 4, 6)  # positions of the bytes items in torch's `_share_cuda_()` tuple


def run_starts(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Indices where a new run begins: a run is a stretch where both sides are consecutive block ids."""
    if len(src) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([[0], np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1])


def block_runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) for maximal runs where both sides are consecutive."""
    starts = run_starts(src, dst)
    lengths = np.diff(np.concatenate([starts, [len(src)]]))
    return list(zip(src[starts].tolist(), dst[starts].tolist(), lengths.tolist(), strict=True))


def event_done_within(done: torch.cuda.Event, timeout_s: float) -> bool:
    """Whether the work before `done` has completed, blocking for it only if `timeout_s` > 0.

    The block is not cut off at the timeout (CUDA has no timed event wait, and the copy cannot be cancelled
    anyway): it can overrun by the rest of the copy and of the work it queued behind, milliseconds, never an
    unbounded time since nothing in it waits on a peer or the network. synchronize() releases the GIL."""
    if done.query():
        return True
    if timeout_s <= 0:
        return False
    done.synchronize()
    return True


@register_backend("cuda_ipc")
class CudaIpcAgent(KVTransferAgent):
    def __init__(self, name: str, kv_cache: torch.Tensor, *, fault: str | None = None,
                 release_timeout_s: float = DEFAULT_RELEASE_TIMEOUT_S) -> None:
        if not kv_cache.is_cuda or not kv_cache.is_contiguous():
            raise ValueError("the cuda_ipc backend needs a contiguous CUDA KV cache")
        super().__init__(name, kv_cache, fault=fault, release_timeout_s=release_timeout_s)
        self._stream = torch.cuda.Stream(device=kv_cache.device)
        self._remotes: dict[str, torch.Tensor] = {}

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    def metadata(self) -> bytes:
        share = list(self.kv_cache.untyped_storage()._share_cuda_())
        for i in _BYTES_FIELDS:
            share[i] = base64.b64encode(share[i]).decode()
        return json.dumps({"backend": "cuda_ipc", "share": share, "offset": self.kv_cache.storage_offset(),
                           "shape": list(self.kv_cache.shape), "dtype": str(self.kv_cache.dtype).split(".")[-1],
                           "layout": self.layout.to_dict()}).encode()

    def add_remote(self, name: str, metadata: bytes) -> None:
        if name in self._remotes:
            return
        md = parse_json_metadata(metadata, "cuda_ipc")
        self.layout.check_compatible(KVLayout.from_dict(md["layout"]))
        share = list(md["share"])
        for i in _BYTES_FIELDS:
            share[i] = base64.b64decode(share[i])
        storage = torch.UntypedStorage._new_shared_cuda(*share)
        dtype = getattr(torch, md["dtype"])
        remote = torch.empty(0, dtype=dtype, device=self.kv_cache.device)
        remote.set_(storage, md["offset"], md["shape"])
        self._remotes[name] = remote

    def notifications(self) -> list[str]:
        return []

    def _remote_num_blocks(self, remote: str) -> int | None:
        if remote not in self._remotes:
            raise ValueError(f"unknown remote {remote!r}: call add_remote() first")
        return int(self._remotes[remote].shape[0])

    def _start(self, handle: TransferHandle) -> None:
        src = self._remotes[handle.remote]
        dev = self.kv_cache.device
        self._stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(self._stream):
            ids = np.array([handle.remote_blocks, handle.local_blocks], dtype=np.int64)
            if len(run_starts(ids[0], ids[1])) <= 4 or copy_blocks is None:  # mostly consecutive: device memcpys
                for s, d, n in block_runs(ids[0], ids[1]):
                    self.kv_cache[d : d + n].copy_(src[s : s + n], non_blocking=True)
            else:  # scattered: one gather-scatter launch
                # From pageable memory on purpose: the driver stages these few bytes before the call returns (seen
                # on an H100 even with 0.2 s of work queued ahead on the stream), so `ids` may die at once, and
                # nothing page-locked is allocated (or cached and fenced) per read.
                dev_ids = torch.from_numpy(ids).to(dev, non_blocking=True)
                copy_blocks(src, self.kv_cache, dev_ids[0], dev_ids[1])
            # Not blocking-sync: its synchronize() woke ~0.1 ms after the copy on an H100, no better than the old
            # poll loop. The default spins (GIL released) for the rest of the copy, one core per waiting read.
            done = torch.cuda.Event()
            done.record(self._stream)
        handle.state = done

    def _poll(self, handle: TransferHandle) -> TransferStatus:
        return TransferStatus.DONE if handle.state.query() else TransferStatus.PENDING

    def _wait(self, handle: TransferHandle, timeout_s: float) -> None:
        if handle.state is not None:
            event_done_within(handle.state, timeout_s)

    def _release(self, handle: TransferHandle, deadline: float) -> None:
        # A queued GPU copy cannot be recalled: the blocks are free only once it has landed.
        if handle.state is not None and not event_done_within(handle.state, deadline - time.monotonic()):
            raise TransferError(f"GPU copy of read {handle.tag!r} still running at the release deadline")

    def _close(self) -> None:
        self._remotes.clear()
