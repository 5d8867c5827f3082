"""Byte-level access to the blocks of a KV-cache tensor, for backends that move bytes themselves.

What a read moves of a block is a `BlockRuns` (kvtransfer/parts.py): one contiguous run (the whole block, a layer
range, or a range that covers the shard's every head) or many equal runs at a stride (a head range of a shard
that has more heads). A single run of a CPU tensor is exposed zero-copy as a memoryview of its own memory. Strided
runs, and every part of a CUDA tensor, go through a per-connection staging buffer of one block (pinned for CUDA):
`source()` gathers the runs into it before they are sent, and `commit()` scatters the received buffer into the
block (both synchronous, so a device write has finished on return).
"""

from __future__ import annotations

import torch

from kvtransfer.parts import BlockRuns


class BlockMemory:
    def __init__(self, kv_cache: torch.Tensor, block_bytes: int) -> None:
        self.block_bytes = block_bytes
        self.num_blocks = int(kv_cache.shape[0])
        self.is_cuda = kv_cache.is_cuda
        # A flat byte view of the same storage: works for every dtype (bfloat16 has no numpy twin).
        self._flat = kv_cache.view(-1).view(torch.uint8)
        self._host = None if self.is_cuda else self._flat.numpy()

    @property
    def base_addr(self) -> int:
        return self._flat.data_ptr()

    @property
    def device_id(self) -> int:
        return self._flat.get_device() if self.is_cuda else 0

    @property
    def mem_type(self) -> str:
        """NIXL memory segment type."""
        return "VRAM" if self.is_cuda else "DRAM"

    def new_staging(self, nbytes: int | None = None) -> torch.Tensor:
        """A per-connection bounce buffer of `nbytes` (default a block), pinned when the cache is on a GPU."""
        return torch.empty(nbytes or self.block_bytes, dtype=torch.uint8, pin_memory=self.is_cuda)

    def _whole(self, runs: BlockRuns | None) -> BlockRuns:
        return runs or BlockRuns(0, self.block_bytes, self.block_bytes, 1)

    def _direct(self, runs: BlockRuns) -> bool:
        """Whether the runs are one range of host memory, read and written in place."""
        return self._host is not None and runs.count == 1

    def _view(self, block: int, runs: BlockRuns) -> torch.Tensor:
        """The runs of `block` as a [count, length] byte view of the cache."""
        return self._flat.as_strided((runs.count, runs.length), (runs.stride, 1),
                                     block * self.block_bytes + runs.offset)

    def _staged(self, staging: torch.Tensor, runs: BlockRuns) -> torch.Tensor:
        return staging[: runs.nbytes].view(runs.count, runs.length)

    def source(self, block: int, staging: torch.Tensor, runs: BlockRuns | None = None) -> memoryview:
        """The block's bytes (or the `runs` of them, in order), to send."""
        runs = self._whole(runs)
        if self._direct(runs):
            start = block * self.block_bytes + runs.offset
            return memoryview(self._host[start : start + runs.length])
        self._staged(staging, runs).copy_(self._view(block, runs))
        return memoryview(staging[: runs.nbytes].numpy())

    def sink(self, block: int, staging: torch.Tensor, runs: BlockRuns | None = None) -> memoryview:
        """Where to receive the block's bytes (or its `runs`, in order); call commit() once they are all there."""
        runs = self._whole(runs)
        if self._direct(runs):
            start = block * self.block_bytes + runs.offset
            return memoryview(self._host[start : start + runs.length])
        return memoryview(staging[: runs.nbytes].numpy())

    def commit(self, block: int, staging: torch.Tensor, runs: BlockRuns | None = None) -> None:
        runs = self._whole(runs)
        if not self._direct(runs):
            self._view(block, runs).copy_(self._staged(staging, runs))
