"""Per-request block tables over the block pool.

A request owns `ceil(num_computed_or_scheduled_tokens / block_size)` blocks,
in order: token i of the request lives in block `table[i // block_size]` at
offset `i % block_size` (its "slot" is `block * block_size + offset`).
"""

from __future__ import annotations

from engine.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Grows and frees the block tables of requests."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def has(self, request_id: str) -> bool:
        return request_id in self._tables

    def blocks_needed(self, request_id: str, total_tokens: int) -> int:
        """New blocks required for the request to hold `total_tokens` tokens."""
        return max(0, cdiv(total_tokens, self.block_size) - len(self._tables.get(request_id, ())))

    def allocate(self, request_id: str, total_tokens: int) -> bool:
        """Grow the request's table to hold `total_tokens`; False (and no change) if blocks are short."""
        need = self.blocks_needed(request_id, total_tokens)
        if need > self.pool.num_free:
            return False
        table = self._tables.setdefault(request_id, [])
        if need:
            table.extend(self.pool.allocate(need))
        return True

    def free(self, request_id: str) -> int:
        """Release every block of the request; returns how many were released."""
        table = self._tables.pop(request_id, None)
        if not table:
            return 0
        self.pool.free(table)
        return len(table)

    def slots(self, request_id: str, start: int, end: int) -> list[int]:
        """Slot ids of token positions [start, end) of the request."""
        table, bs = self._tables[request_id], self.block_size
        return [table[i // bs] * bs + i % bs for i in range(start, end)]
