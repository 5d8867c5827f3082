"""A fixed pool of KV blocks with reference counts.

Invariants (checked by `check_invariants`, exercised by a hypothesis test):
- a block is either free (ref count 0, in the free list exactly once) or owned
  (ref count > 0, not in the free list);
- ref counts never go negative; freeing a free block is an error, not a no-op.
Ref counts > 1 are how shared prefixes and copy-on-write will be expressed.
"""

from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """More blocks were asked for than are free."""


class BlockPool:
    """Owns block ids 0..num_blocks-1 and who holds how many references to each."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks, each with ref count 1."""
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._ref_counts[b] = 1
        return out

    def incref(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"incref of free block {b}")
            self._ref_counts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero become free."""
        for b in block_ids:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def check_invariants(self) -> None:
        free = list(self._free)
        assert len(free) == len(set(free)), "a block is in the free list twice"
        for b in range(self.num_blocks):
            rc = self._ref_counts[b]
            assert rc >= 0, f"block {b} has negative ref count {rc}"
        assert set(free) == {b for b in range(self.num_blocks) if self._ref_counts[b] == 0}, "free list != blocks at 0 refs"
