"""Same-host GPU peers: map the peer's KV pool into this process with CUDA IPC, copy blocks device-to-device.

The prefill worker exports an IPC handle of its (single-allocation) KV cache; the decode worker opens it once
and a READ is a few `copy_` calls on a side stream, one per run of consecutive blocks, at device-copy speed
(or one gather-scatter kernel for scattered ids; a layer or head range is a strided copy per run of blocks, not
run on a GPU here yet). Completion is an event on that stream: `wait()` blocks on it
rather than polling it, and since a GPU copy cannot be cancelled, `release()` waits for it too. Either wait is
bounded by the copy itself (microseconds to milliseconds) plus the earlier reads still queued on the side stream.

The side stream does not wait for the caller's streams: a read starts copying at once, even while the caller has
kernels queued. So when start_read() is called, no queued kernel may still read or write its local blocks (the
ownership rules in kvtransfer/base.py). The engine guarantees it: blocks are freed only between steps, and its
lookahead fence waits for a queued guess that wrote a freed block's request before the blocks can be reused.
Waiting for the caller's current stream instead cost a pull up to two decode steps with overlapped steps (the
running one plus the queued guess), for nothing.

There is no reverse channel: `notifications()` is always empty and the reader's completion reaches the
prefill worker as the ReleaseKV RPC (its lease is the backstop), exactly as for a failed read.
"""

from __future__ import annotations

import base64
import json
import time
from typing import NamedTuple

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
from kvtransfer.parts import check_mappable, check_shards
from kvtransfer.registry import register_backend

try:
    from kvtransfer.gpu_copy import block_words, launch_copy_blocks
except ImportError:  # triton missing: scattered reads fall back to one memcpy per run
    block_words = launch_copy_blocks = None

_BYTES_FIELDS = (1, 4, 6)  # positions of the bytes items in torch's `_share_cuda_()` tuple


class _Remote(NamedTuple):
    pool: torch.Tensor  # the peer's KV cache, mapped into this process
    words: torch.Tensor | None  # block_words(pool), for the gather-scatter kernel (None without triton)
    layout: KVLayout  # the peer's (its shard's width may differ from ours: reads of head ranges)


def run_starts(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Indices where a new run begins: a run is a stretch where both sides are consecutive block ids."""
    if len(src) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([[0], np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1])


def id_pairs(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """[2, n rounded up to even] int64 holding src then dst ids (the padding is never read). Even rows keep the
    dst row 16-byte aligned on the device whatever n is: Triton specialises a kernel on its pointers' alignment,
    so an odd n would compile a second variant of the gather-scatter kernel in the middle of some pull."""
    n = len(src)
    ids = np.zeros((2, n + (n & 1)), dtype=np.int64)
    ids[0, :n], ids[1, :n] = src, dst
    return ids


def block_runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) for maximal runs where both sides are consecutive."""
    starts = run_starts(src, dst)
    lengths = np.diff(np.concatenate([starts, [len(src)]]))
    return list(zip(src[starts].tolist(), dst[starts].tolist(), lengths.tolist(), strict=True))


def event_done_within(done: torch.cuda.Event, timeout_s: float) -> bool:
    """Whether the work before `done` has completed, blocking for it only if `timeout_s` > 0.

    The block is not cut off at the timeout (CUDA has no timed event wait, and the copy cannot be cancelled
    anyway): it can overrun by the rest of the copy and of the reads queued ahead of it, milliseconds, never an
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
        # Word views are built here and in add_remote(), once: per read they cost host time on the pull's path.
        self._words = block_words(kv_cache) if block_words is not None else None
        self._remotes: dict[str, _Remote] = {}
        if self._words is not None:
            self._warm_up(self._words, self._words)

    def _warm_up(self, src_words: torch.Tensor, dst_words: torch.Tensor) -> None:
        """Take a read's first-use costs now, not in a pull's TTFT: Triton compiles the gather-scatter kernel at
        its first launch in a process (2.3 s on an H100; `id_pairs` keeps it to one variant), and a peer's
        mapped pool is touched once. Copies block 0 of `src_words` to block 0 of `dst_words`: the pool onto
        itself at start (the same bytes), a peer's into a scratch block in add_remote()."""
        with torch.cuda.stream(self._stream):
            ids = torch.from_numpy(id_pairs(np.zeros(1), np.zeros(1))).to(self.kv_cache.device, non_blocking=True)
            launch_copy_blocks(src_words, dst_words, ids[0, :1], ids[1, :1])
        self._stream.synchronize()

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
        layout = KVLayout.from_dict(md["layout"])
        check_shards(self.layout, layout)  # each read checks its heads fit
        share = list(md["share"])
        for i in _BYTES_FIELDS:
            share[i] = base64.b64decode(share[i])
        storage = torch.UntypedStorage._new_shared_cuda(*share)
        dtype = getattr(torch, md["dtype"])
        remote = torch.empty(0, dtype=dtype, device=self.kv_cache.device)
        remote.set_(storage, md["offset"], md["shape"])
        words = block_words(remote) if block_words is not None else None
        if words is not None:
            self._warm_up(words, torch.empty_like(words[:1]))
        self._remotes[name] = _Remote(remote, words, layout)

    def notifications(self) -> list[str]:
        return []

    def _remote_num_blocks(self, remote: str) -> int | None:
        if remote not in self._remotes:
            raise ValueError(f"unknown remote {remote!r}: call add_remote() first")
        return int(self._remotes[remote].pool.shape[0])

    def _start(self, handle: TransferHandle) -> None:
        src = self._remotes[handle.remote]
        check_mappable(self.layout, src.layout, handle.heads)
        # No wait for the caller's streams (module docstring): the ownership rules keep queued kernels off the
        # local blocks, and the side stream orders this copy after every earlier read's.
        with torch.cuda.stream(self._stream):
            remote_ids, local_ids = handle.remote_blocks, handle.local_blocks
            if handle.layers is not None or handle.heads is not None:  # one strided copy per run of blocks
                l0, l1 = handle.layers or (0, self.layout.num_layers)
                (a, b), (c, e) = handle.heads or ((0, src.layout.num_kv_heads), (0, self.layout.num_kv_heads))
                for s, d, n in block_runs(remote_ids, local_ids):
                    self.kv_cache[d : d + n, l0:l1, :, :, c:e].copy_(src.pool[s : s + n, l0:l1, :, :, a:b],
                                                                      non_blocking=True)
            elif len(run_starts(remote_ids, local_ids)) <= 4 or src.words is None:  # mostly consecutive: memcpys
                for s, d, n in block_runs(remote_ids, local_ids):
                    self.kv_cache[d : d + n].copy_(src.pool[s : s + n], non_blocking=True)
            else:  # scattered: one gather-scatter launch
                # From pageable memory on purpose: the driver stages these few bytes before the call returns (seen
                # on an H100 even with 0.2 s of work queued ahead on the stream), so `ids` may die at once, and
                # nothing page-locked is allocated (or cached and fenced) per read.
                n = len(local_ids)
                dev_ids = torch.from_numpy(id_pairs(remote_ids, local_ids)).to(self.kv_cache.device, non_blocking=True)
                launch_copy_blocks(src.words, self._words, dev_ids[0, :n], dev_ids[1, :n])
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
