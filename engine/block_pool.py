"""A fixed pool of KV blocks with reference counts and a content-addressed prefix cache.

Invariants (checked by `check_invariants`, exercised by hypothesis tests):
- a block is either free (ref count 0, in the free list exactly once) or owned
  (ref count > 0, not in the free list); ref counts never go negative;
- `hash -> block` and `block -> hash` agree; only full, immutable blocks carry a hash;
- a free block may still carry a hash (it is "cached"): a later request with the
  same prefix takes it back (`touch`) instead of recomputing; allocation evicts
  cached blocks least-recently-freed first and drops their hash, so a stale hash
  can never be hit after eviction.
Every hash stored or evicted is queued as a `KVEvent` for KV-aware routing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class OutOfBlocksError(RuntimeError):
    """More blocks were asked for than are free."""


@dataclass(frozen=True)
class KVEvent:
    kind: str  # "stored" | "removed"
    block_hash: int


class BlockPool:
    """Owns block ids 0..num_blocks-1, who holds how many references to each, and which prefix each caches."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head = evicted first
        self._hash_of: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}
        self.events: list[KVEvent] = []
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (cached-but-unreferenced blocks included)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks, each with ref count 1, evicting their cached prefixes."""
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self._ref_counts[b] = 1
            out.append(b)
        return out

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference to blocks found in the cache (they may be free or shared)."""
        for b in block_ids:
            if self._ref_counts[b] == 0:
                del self._free[b]
            self._ref_counts[b] += 1

    def incref(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"incref of free block {b}")
            self._ref_counts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero become free (keeping any cached hash)."""
        for b in block_ids:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free[b] = None

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    # ---- prefix cache --------------------------------------------------------------------------------------
    def lookup(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def register(self, block_id: int, block_hash: int) -> None:
        """Record that an owned, full block holds the prefix `block_hash`. A duplicate stays unregistered."""
        if not self.enable_caching or block_hash in self._cached or self._hash_of[block_id] is not None:
            return
        assert self._ref_counts[block_id] > 0, f"register of free block {block_id}"
        self._cached[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        self.events.append(KVEvent("stored", block_hash))

    def _evict(self, b: int) -> None:
        h = self._hash_of[b]
        if h is not None:
            del self._cached[h]
            self._hash_of[b] = None
            self.num_evictions += 1
            self.events.append(KVEvent("removed", h))

    def drain_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events

    def check_invariants(self) -> None:
        assert all(rc >= 0 for rc in self._ref_counts), "negative ref count"
        assert set(self._free) == {b for b in range(self.num_blocks) if self._ref_counts[b] == 0}, \
            "free list != blocks at 0 refs"
        for h, b in self._cached.items():
            assert self._hash_of[b] == h, f"block {b} cached under {h} but tagged {self._hash_of[b]}"
        assert sum(h is not None for h in self._hash_of) == len(self._cached), "stray block hash"
