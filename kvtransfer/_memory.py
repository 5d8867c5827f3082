"""Byte-level access to the blocks of a KV-cache tensor, for backends that move bytes themselves.

CPU tensors are exposed zero-copy as memoryviews of their own memory. CUDA tensors are staged through a
pinned host buffer of one block: `source()` copies the block to the buffer before it is sent, and `commit()`
copies the received buffer into the block (both synchronous, so the device write has finished on return).
"""

from __future__ import annotations

import torch


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

    def new_staging(self, nbytes: int | None = None) -> torch.Tensor | None:
        """A per-connection bounce buffer of `nbytes` (default a block; CUDA only); None for CPU."""
        if not self.is_cuda:
            return None
        return torch.empty(nbytes or self.block_bytes, dtype=torch.uint8, pin_memory=True)

    def _range(self, block: int, part: tuple[int, int] | None) -> slice:
        offset, length = part or (0, self.block_bytes)
        start = block * self.block_bytes + offset
        return slice(start, start + length)

    def source(self, block: int, staging: torch.Tensor | None, part: tuple[int, int] | None = None) -> memoryview:
        """The block's bytes (or the `part` = (offset, length) of them), to send."""
        if self._host is not None:
            return memoryview(self._host[self._range(block, part)])
        assert staging is not None
        r = self._range(block, part)
        staging[: r.stop - r.start].copy_(self._flat[r])
        return memoryview(staging[: r.stop - r.start].numpy())

    def sink(self, block: int, staging: torch.Tensor | None, part: tuple[int, int] | None = None) -> memoryview:
        """Where to receive the block's bytes (or their `part`); call commit() once they are all there."""
        if self._host is not None:
            return memoryview(self._host[self._range(block, part)])
        assert staging is not None
        r = self._range(block, part)
        return memoryview(staging[: r.stop - r.start].numpy())

    def commit(self, block: int, staging: torch.Tensor | None, part: tuple[int, int] | None = None) -> None:
        if self._host is None:
            assert staging is not None
            r = self._range(block, part)
            self._flat[r].copy_(staging[: r.stop - r.start])
