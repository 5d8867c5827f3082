"""Per-request block tables over the block pool, with prefix caching.

A request owns `ceil(tokens / block_size)` blocks in order: token i lives in
block `table[i // block_size]` at offset `i % block_size` (slot
`block * block_size + offset`). Full blocks are content-addressed by a hash
chained over (parent hash, the block's token ids), so equal prefixes map to
equal hashes in every process (the hash is stable, not Python's `hash`), which
is what lets the router index which worker holds which prefix.
"""

from __future__ import annotations

import hashlib
from array import array

from engine.block_pool import BlockPool
from engine.block_table import BlockTableArray
from engine.request import Request

ROOT_HASH = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_hash(parent: int, tokens: list[int]) -> int:
    """Stable 63-bit hash of a full block given its parent's hash."""
    data = parent.to_bytes(8, "little") + array("q", tokens).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def prefix_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of every full block of `token_ids`."""
    out, h = [], ROOT_HASH
    for i in range(len(token_ids) // block_size):
        h = block_hash(h, token_ids[i * block_size : (i + 1) * block_size])
        out.append(h)
    return out


class KVCacheManager:
    """Grows, shares and frees the block tables of requests."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.table_array = BlockTableArray()  # the block tables: one row per request holding blocks
        self._hashes: dict[str, list[int]] = {}  # chained hashes of the request's full, registered blocks
        self._dropped: dict[str, int] = {}  # leading table entries already released (outside every attention window)
        self.query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of which found cached

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage

    def block_table(self, request_id: str) -> list[int]:
        return self.table_array.get(request_id)

    def has(self, request_id: str) -> bool:
        return request_id in self.table_array

    def allocate(self, request_id: str, total_tokens: int) -> bool:
        """Grow the request's table to hold `total_tokens`; False (and no change) if blocks are short."""
        tables = self.table_array
        held = tables.length(request_id)
        if held * self.block_size >= total_tokens and (held or request_id in tables):
            return True  # the common decode step: room is left in the last block
        need = max(0, cdiv(total_tokens, self.block_size) - held)
        if need > self.pool.num_free:
            return False
        tables.extend(request_id, self.pool.allocate(need) if need else [])
        return True

    def lookup_prefix(self, token_ids: list[int], max_blocks: int | None = None) -> tuple[list[int], list[int]]:
        """(blocks, their hashes) of the longest cached run of `token_ids`' leading full blocks, at most
        `max_blocks` of them; read-only (nothing is taken)."""
        if not self.pool.enable_caching:
            return [], []
        usable = len(token_ids) // self.block_size
        if max_blocks is not None:
            usable = min(usable, max_blocks)
        hits: list[int] = []
        hashes: list[int] = []
        h = ROOT_HASH
        for i in range(usable):
            h = block_hash(h, token_ids[i * self.block_size : (i + 1) * self.block_size])
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
            hashes.append(h)
        return hits, hashes

    def match_prefix(self, req: Request, max_blocks: int | None = None) -> int:
        """Share the cached blocks of the request's longest cached prefix; returns tokens covered.

        At least one token is always left to compute, so the step produces logits to sample from. A request
        whose KV arrives from elsewhere passes `max_blocks`, the full blocks that will arrive.
        """
        assert req.request_id not in self.table_array, "match_prefix on a request that already holds blocks"
        if not self.pool.enable_caching:
            return 0
        tokens = req.all_token_ids
        hits, hashes = self.lookup_prefix(tokens, (len(tokens) - 1) // self.block_size)
        if max_blocks is not None:
            hits, hashes = hits[:max_blocks], hashes[:max_blocks]
        self.query_tokens += req.num_prompt_tokens
        self.hit_tokens += min(len(hits) * self.block_size, req.num_prompt_tokens)
        if hits:
            self.pool.touch(hits)
            self.table_array.extend(req.request_id, hits)
            self._hashes[req.request_id] = hashes
        return len(hits) * self.block_size

    def cache_full_blocks(self, req: Request) -> None:
        """Register the hashes of blocks that became full with computed tokens."""
        if not self.pool.enable_caching or req.request_id not in self.table_array:
            return
        hashes = self._hashes.setdefault(req.request_id, [])
        full = req.num_computed_tokens // self.block_size
        if full <= len(hashes):
            return
        table, bs = self.table_array.get(req.request_id), self.block_size
        tokens = req.all_token_ids[len(hashes) * bs : full * bs]
        parent = hashes[-1] if hashes else ROOT_HASH
        for j in range(full - len(hashes)):
            parent = block_hash(parent, tokens[j * bs : (j + 1) * bs])
            self.pool.register(table[len(hashes)], parent)
            hashes.append(parent)

    def fork(self, src: str, dst: str, num_tokens: int) -> list[tuple[int, int]] | None:
        """Give `dst` (holding no blocks) the KV of `src`'s first `num_tokens` tokens (computed ones): the blocks
        they fill wholly are shared (ref count + 1), a partly filled last block is copy-on-write, i.e. copied now
        into a fresh block of `dst`'s, since `src` goes on writing its own. Returns the (src block, dst block)
        pairs the caller copies on the device; None (nothing changed) when no block is free for the copy.
        Leading blocks `src` released (outside every attention window) stay released entries for `dst` too."""
        assert dst not in self.table_array, "fork into a request that holds blocks"
        table, bs = self.table_array.get(src), self.block_size
        full, partial = divmod(num_tokens, bs)
        assert full + bool(partial) <= len(table), "fork of tokens the source holds no block for"
        if partial and not self.pool.num_free:
            return None
        dropped = min(self._dropped.get(src, 0), full)
        self.pool.incref(table[dropped:full])
        pairs = [(table[full], self.pool.allocate(1)[0])] if partial else []
        self.table_array.extend(dst, table[:full] + [b for _, b in pairs])
        if dropped:
            self._dropped[dst] = dropped
        hashes = self._hashes.get(src, [])[:full]
        if hashes:
            self._hashes[dst] = list(hashes)
        return pairs

    def free(self, request_id: str) -> int:
        """Release every block of the request (last block first, so a prefix's tail is evicted before its head)."""
        self._hashes.pop(request_id, None)
        table = self.table_array.release(request_id)[self._dropped.pop(request_id, 0):]
        if not table:
            return 0
        self.pool.free(table[::-1])
        return len(table)

    def drop_leading(self, request_id: str, num_blocks: int) -> int:
        """Release the request's first `num_blocks` blocks while it runs: no attention will read them again (they
        lie before every layer's sliding window). Their table entries stay, so positions still map to entries,
        but they may name blocks other requests now own: attention never reads an entry before the window. Their
        KV stays cached (their hashes are kept) until the pool evicts them. Returns how many were released."""
        done = self._dropped.get(request_id, 0)
        if num_blocks <= done:
            return 0
        blocks = self.table_array.get(request_id)[done:num_blocks]
        self.pool.free(blocks[::-1])
        self._dropped[request_id] = done + len(blocks)
        return len(blocks)

    def detach(self, request_id: str) -> list[int]:
        """Take the request's blocks out of its table without freeing them (the caller frees them later with
        `free_blocks`, e.g. once a transfer writing into them has stopped). Their hashes stay registered."""
        self._hashes.pop(request_id, None)
        return self.table_array.release(request_id)[self._dropped.pop(request_id, 0):]

    def free_blocks(self, block_ids: list[int]) -> None:
        """Free blocks taken out with `detach` (last block first, as `free` does)."""
        if block_ids:
            self.pool.free(block_ids[::-1])

    def trim(self, request_id: str, keep: int) -> bool:
        """Free the request's blocks after its first `keep`; the caller guarantees they hold no computed (so no
        cached) token. Returns whether anything was freed."""
        assert keep >= self._dropped.get(request_id, 0), "trimming into released leading blocks"
        if self.table_array.length(request_id) <= keep:
            return False
        self.pool.free(self.table_array.truncate(request_id, keep)[::-1])
        return True

    def slots(self, request_id: str, start: int, end: int) -> list[int]:
        """Slot ids of token positions [start, end) of the request."""
        table, bs = self.table_array.get(request_id), self.block_size
        return [table[i // bs] * bs + i % bs for i in range(start, end)]
